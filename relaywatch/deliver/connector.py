"""The connector seam: how the scheduler hands an entry over for delivery.

The scheduler (deliver/scheduler.py) knows only this interface, as httpcore's
pool knows only ``handle_async_request``: a ``Connector`` per destination
queue (a route key), and from it one ``Session`` per worker, whose
``deliver(entry, body, recipients)`` returns a ``DeliveryResult``: what
happened to each recipient, where, which other hosts were tried, the TLS
facts.  Nothing a connector meets escapes as an exception but a bug.

A connector observes; it does not classify.  A failure is an ``Observed`` (the
``Observation`` with its evidence and when it was seen), shared by the
recipients it concerns; the scheduler's record step (deliver/record.py
``classify_result``, right before ``record_attempt``) turns each into its
Failure once, so a message visits classify/ once, in one place.

- ``SmtpConnector`` (SMTP to smart hosts or MX): the worker's session keeps
  one connection and sends message after message over it (RSET-probed when
  it sat idle, replaced after ``messages_per_connection``); the connector
  marks its destination down for a few seconds when no target can be
  reached, so every entry waiting for it is deferred with that one failure
  instead of each trying again (Postfix's "dead destination").  Target
  fallback (smart hosts in order, MX by preference, two addresses each) is
  deliver/smtp.py's, shared with the callout and the alert mail.
- ``LocalConnector``: Maildir delivery (deliver/local.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Protocol

from relaywatch.classify.observation import Observation, Outcome, Phase
from relaywatch.clock import Clock
from relaywatch.config import Config
from relaywatch.deliver.local import deliver_local
from relaywatch.dsn_params import NO_RECIPIENT_DSN
from relaywatch.deliver.smtp import AllTargetsFailed, SmtpRoutes
from relaywatch.deliver.observe import SessionFailure, reply_observation
from relaywatch.deliver.transport import SmtpConnection, TransactionResult
from relaywatch.model import Destination, Entry, Failure, RecipientOutcome, RecipientStatus, Route, RouteKind, StoredBody
from relaywatch.route import split_address

DEAD_DESTINATION_SECONDS = 5.0
PROBE_IDLE_CONNECTION_AFTER = 1.0
LOCAL_DESTINATION = Destination("local")
StillHeld = Callable[[], Awaitable[bool]]     # may this process still deliver the entry? (cluster/fence.py)


@dataclass(slots=True, eq=False)
class Observed:
    """A failure as the connector saw it, not yet classified: one per observation,
    shared by every recipient it concerns (and by a dead-destination mark)."""
    observation: Observation
    at: float
    failure: Failure | None = None      # classify_result's, made once and then shared


@dataclass(slots=True)
class DeliveryResult:
    """One attempt at one entry.  As the connector returns it, a failed recipient is
    ``(address, Observed)`` and ``tried`` holds ``Observed``s; deliver/record.py
    ``classify_result`` replaces them in place by ``RecipientOutcome``s and Failures."""
    outcomes: list[RecipientOutcome | tuple[str, Observed]]
    destination: Destination | None
    tried: tuple[Observed | Failure, ...] = ()    # the other hosts of the attempt that failed
    tls: dict | None = None             # facts of the TLS session that delivered, if any


class Session(Protocol):
    async def deliver(self, entry: Entry, body: StoredBody, recipients: list[str],
                      still_held: StillHeld | None = None) -> DeliveryResult:
        """Deliver ``body`` to ``recipients`` (the entry's pending ones).  ``still_held``: asked
        right before the destination would have the message (the final dot); False raises
        LeaseFenced (the scheduler's fence, cluster/fence.py)."""

    def abandon(self) -> None:
        """Drop whatever the session holds, without a goodbye (after a bug)."""

    async def close(self) -> None:
        """The worker is done: end the session politely."""


class Connector(Protocol):
    def session(self) -> Session:
        """A session for one worker of this destination."""

    def paused(self) -> bool:
        """An operator paused this connector: keep its mail, make no attempt."""

    def forget_down(self) -> None:
        """An operator (or a passing probe) wants a real try now: forget that
        the destination was down a moment ago."""


def connector_for_route(route: Route, config_ref: Callable[[], Config], routes: SmtpRoutes,
                        clock: Clock) -> Connector:
    """The connector for a destination queue's route."""
    if route.kind is RouteKind.LOCAL:
        return LocalConnector(config_ref, clock)
    return SmtpConnector(route, config_ref, routes, clock)


def unreachable(failed: AllTargetsFailed, recipients: list[str], now: float) -> DeliveryResult:
    """No target took the session: every recipient fails with the primary target's failure."""
    seen = [Observed(o, now) for o in failed.observations]
    return DeliveryResult([(r, seen[0]) for r in recipients], seen[0].observation.destination,
                          tuple(seen[1:]))


def transaction_outcomes(result: TransactionResult, recipients: list[str], dest: Destination,
                         now: float, dsn_passed_on: bool = False) -> DeliveryResult:
    """What one MAIL/RCPT/DATA exchange did for each recipient; ``dsn_passed_on``: the server
    offered DSN and was given the recipients' NOTIFY (its success notices are its own)."""
    if not result.mail.is_success:
        seen = Observed(reply_observation(Phase.MAIL, result.mail, dest), now)
        return DeliveryResult([(r, seen) for r in recipients], dest)
    out: list[RecipientOutcome | tuple[str, Observed]] = []
    accepted: list[str] = []
    for r in recipients:
        reply = result.rcpts.get(r)
        if reply is not None and reply.is_success:
            accepted.append(r)
        elif reply is not None:
            out.append((r, Observed(reply_observation(Phase.RCPT, reply, dest), now)))
    delivery = DeliveryResult(out, dest)
    data = result.data
    if not accepted or data is None:
        return delivery
    if result.data_phase is Phase.AFTER_DATA and data.is_success:
        out += [RecipientOutcome(r, RecipientStatus.DELIVERED, reply=str(data), dsn_passed_on=dsn_passed_on)
                for r in accepted]
    else:
        seen = Observed(reply_observation(result.data_phase or Phase.DATA, data, dest), now)
        out += [(r, seen) for r in accepted]
    return delivery


# -- SMTP ------------------------------------------------------------------------------------

class SmtpConnector:
    """SMTP delivery for one destination queue; its dead-destination mark."""

    def __init__(self, route: Route, config_ref: Callable[[], Config], routes: SmtpRoutes, clock: Clock):
        self.route = route
        self.config_ref = config_ref
        self.routes = routes
        self.clock = clock
        self.down_until = 0.0                      # clock.monotonic()
        self.down_seen: Observed | None = None
        self.down_tried: tuple[Observed, ...] = ()

    def session(self) -> "SmtpSession":
        return SmtpSession(self)

    def paused(self) -> bool:
        connector = self.routes.connector_for(self.route)
        return connector is not None and connector.paused

    def forget_down(self) -> None:
        self.down_until, self.down_seen = 0.0, None


class SmtpSession:
    """One worker's connection, reused message after message."""

    def __init__(self, connector: SmtpConnector):
        self.connector = connector
        self.conn: SmtpConnection | None = None

    async def deliver(self, entry: Entry, body: StoredBody, recipients: list[str],
                      still_held: StillHeld | None = None) -> DeliveryResult:
        c = self.connector
        if entry.is_tls_report:
            return await self._deliver_tls_report(entry, body, recipients, still_held)
        if c.down_until > c.clock.monotonic() and c.down_seen is not None:
            return DeliveryResult([(r, c.down_seen) for r in recipients],
                                  c.down_seen.observation.destination, c.down_tried)
        conn = self.conn
        if conn is not None and (conn.broken or
                                 conn.transactions >= c.config_ref().delivery.messages_per_connection):
            await conn.quit()
            conn = self.conn = None
        # The socket's own idle time (transport.py keeps it): real seconds, not the clock's.
        if conn is not None and time.monotonic() - conn.last_used > PROBE_IDLE_CONNECTION_AFTER:
            if not await conn.probe():
                conn.close()
                conn = self.conn = None
        if conn is None:
            try:
                conn = self.conn = await c.routes.connect(entry.route, split_address(recipients[0])[1])
            except AllTargetsFailed as failed:
                result = unreachable(failed, recipients, c.clock.now())
                c.down_until, c.down_seen, c.down_tried = (
                    c.clock.monotonic() + DEAD_DESTINATION_SECONDS, result.outcomes[0][1], result.tried)
                return result
            c.down_until, c.down_seen = 0.0, None
        return await self._send(conn, entry, body, recipients, still_held)

    async def _deliver_tls_report(self, entry: Entry, body: StoredBody, recipients: list[str],
                                  still_held: StillHeld | None) -> DeliveryResult:
        """A TLS report of ours on a connection of its own (deliver/smtp.py ``tls_report``):
        never one kept under the domain's policy, never kept for mail that must be under
        it, and not held back by the route being down (it may be down for TLS alone)."""
        c = self.connector
        try:
            conn = await c.routes.connect(entry.route, split_address(recipients[0])[1], tls_report=True)
        except AllTargetsFailed as failed:
            return unreachable(failed, recipients, c.clock.now())
        result = await self._send(conn, entry, body, recipients, still_held)   # LeaseFenced: closed already
        await conn.quit()
        return result

    async def _send(self, conn: SmtpConnection, entry: Entry, body: StoredBody,
                    recipients: list[str], still_held: StillHeld | None) -> DeliveryResult:
        clock = self.connector.clock
        try:
            by_address = {r.address: r.dsn for r in entry.recipients}
            result = await conn.transaction(entry.sender, recipients, body, entry.dsn,
                                            [by_address.get(r, NO_RECIPIENT_DSN) for r in recipients],
                                            utf8_headers=entry.utf8_headers, still_held=still_held)
        except SessionFailure as failure:
            conn.close()
            if conn is self.conn:
                self.conn = None
            seen = Observed(failure.observation, clock.now())
            return DeliveryResult([(r, seen) for r in recipients], conn.dest)
        delivery = transaction_outcomes(result, recipients, conn.dest, clock.now(),
                                        dsn_passed_on="DSN" in conn.capabilities)
        delivery.tls = conn.tls
        return delivery

    def abandon(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    async def close(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            await conn.quit()


# -- local ----------------------------------------------------------------------------------

class LocalConnector:
    """Maildir delivery; stateless, so it is its own session."""

    def __init__(self, config_ref: Callable[[], Config], clock: Clock):
        self.config_ref = config_ref
        self.clock = clock

    def session(self) -> "LocalConnector":
        return self

    def paused(self) -> bool:
        return False

    def forget_down(self) -> None:
        pass

    async def deliver(self, entry: Entry, body: StoredBody, recipients: list[str],
                      still_held: StillHeld | None = None) -> DeliveryResult:
        # The scheduler asked still_held just before: a Maildir write has no later point of no return.
        data_dir = self.config_ref().server.data_dir
        return DeliveryResult([await self._one(data_dir, address, body) for address in recipients],
                              LOCAL_DESTINATION)

    async def _one(self, data_dir: Path, address: str, body: StoredBody) -> RecipientOutcome | tuple[str, Observed]:
        try:
            name = await deliver_local(data_dir, address, body)
            return RecipientOutcome(address, RecipientStatus.DELIVERED, reply=f"maildir {name}")
        except OSError as exc:
            obs = Observation(Phase.LOCAL, Outcome.LOCAL_ERROR, LOCAL_DESTINATION,
                              errno=None, note=exc.strerror or str(exc))
            return address, Observed(obs, self.clock.now())

    def abandon(self) -> None:
        pass

    async def close(self) -> None:
        pass
