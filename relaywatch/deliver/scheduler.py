"""The queue manager: lease due entries, deliver them, record what happened.

One loop leases due entries in batches and hands each to its destination's
queue.  Per destination, up to ``per_destination`` workers each hold one
session of the destination's connector (deliver/connector.py: SMTP or local)
and deliver entry after entry through it (bounded overall by
``concurrency``).  How a connector reaches the destination, reuses its
connection or marks it down is the connector's business; the scheduler only
leases, dispatches and records.

Only this module and the operator commands (cli) change an entry's status.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

from relaywatch import events
from relaywatch.classify.classify import where
from relaywatch.classify.retry import decide as decide_retry, notice_given_up, notice_retry
from relaywatch.config import Config
from relaywatch.deliver.connector import Connector, DeliveryResult, Session, connector_for_route
from relaywatch.deliver.smtp import SmtpRoutes
from relaywatch.errors import StoreError
from relaywatch.model import Attempt, Destination, Entry, Failure, NewMessage, RecipientOutcome, RecipientStatus, StoredBody
from relaywatch.notify.dsn import FailedRecipient, build_delay_notice, build_ndr, header_block
from relaywatch.receive.spool import open_body
from relaywatch.route import decide
from relaywatch.store.base import QueueStore
from relaywatch.store.pending import JOURNAL_NAME, PendingOutcomes, PendingRecord

log = logging.getLogger("relaywatch.scheduler")

LEASE_BATCH = 256
PAUSED_RECHECK = 30.0


@dataclass
class DestinationQueue:
    key: str
    connector: Connector                  # its dead-destination mark lives and goes with this queue
    entries: collections.deque = field(default_factory=collections.deque)
    workers: int = 0
    more: asyncio.Event = field(default_factory=asyncio.Event)


class Scheduler:
    def __init__(self, config_ref: Callable[[], Config], store: QueueStore, routes: SmtpRoutes,
                 clock: Callable[[], float] = time.time):
        self.config_ref = config_ref
        self.store = store
        self.routes = routes
        self.clock = clock
        self.node = f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(3)}"
        self.wake = asyncio.Event()
        self.destinations: dict[str, DestinationQueue] = {}
        self.inflight = 0
        self._stopping = False
        self._workers: set[asyncio.Task] = set()
        self._recording: set[str] = set()          # entry ids whose outcome is being committed
        # Told of every recorded attempt (the watch monitor): (entry, outcomes, destination, tls facts).
        self.observer: Callable[[Entry, list[RecipientOutcome], Destination | None, dict | None], None] | None = None
        self._record_tasks: set[asyncio.Task] = set()
        self._connections = asyncio.Semaphore(self.config_ref().delivery.concurrency)
        # Outcomes the store could not take: recorded later, never delivered again.
        self.pending = PendingOutcomes(store, self.config_ref().server.data_dir / JOURNAL_NAME,
                                       lambda: self.config_ref().queue.lease_time, clock)
        self._lease_failing = False

    def notify(self) -> None:
        """Called when new work may be due (enqueue, retry, release)."""
        self.wake.set()

    def retry_now(self) -> None:
        """An operator (or a passing probe) asked for delivery now: forget that
        destinations were down a moment ago, so the next message really tries."""
        for dq in self.destinations.values():
            dq.connector.forget_down()
        self.wake.set()

    # -- the loop ------------------------------------------------------------

    async def run(self) -> None:
        # What a previous run delivered but could not record goes in before
        # anything is leased (store/pending.py).
        await self.pending.replay()
        while not self._stopping:
            config = self.config_ref()
            room = self._max_inflight() - self.inflight
            leased = []
            if room > 0:
                self.wake.clear()
                try:
                    leased = await self.store.lease(self.node, min(room, LEASE_BATCH),
                                                    config.queue.lease_time, self.clock())
                    if self._lease_failing:
                        self._lease_failing = False
                        log.warning("leasing from the queue works again")
                        self.pending.nudge()
                except StoreError as exc:
                    if not self._lease_failing:   # one line per outage, not one a second
                        self._lease_failing = True
                        log.error("cannot lease from the queue: %s (trying every second)", exc)
                except Exception:
                    # The loop must outlive any one failure: mail waits, it is not lost.
                    log.exception("leasing failed unexpectedly; trying again in a second")
                for entry in leased:
                    self._dispatch(entry)
            if len(leased) == LEASE_BATCH:
                await asyncio.sleep(0)
                continue
            # Poll at least every second: operator commands from another process
            # (queue retry, release) are seen within a second.
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=1.0)
            except TimeoutError:
                pass

    async def stop(self, grace: float) -> None:
        """Stop leasing; let deliveries finish within ``grace``; return the rest."""
        self._stopping = True
        self.wake.set()
        for dq in self.destinations.values():
            dq.more.set()
        if self._workers:
            done, pending = await asyncio.wait(self._workers, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._record_tasks:
            await asyncio.wait(self._record_tasks, timeout=grace)
        if len(self.pending):
            await self.pending.flush()
        await self.pending.close()
        try:
            # Not the leases of outcomes still kept: the next run records them.
            await self.store.release_leases(self.node, self.clock(), keep=self.pending.ids())
        except StoreError as exc:
            log.error("could not return leases at shutdown (they lapse by themselves): %s", exc)

    def _finished_one(self) -> None:
        self.inflight -= 1
        # Room for more: lease the next batch now.  Without this a backlog
        # drained at one batch per poll interval (400 messages a second).
        if self.inflight == self._max_inflight() // 2:
            self.wake.set()

    def _max_inflight(self) -> int:
        return self.config_ref().delivery.concurrency * 4

    def _dispatch(self, entry: Entry) -> None:
        if entry.id in self.pending:
            # Delivered already; only its record is missing (its lease lapsed
            # while the store was away): record it under this lease, never deliver.
            self.pending.adopt(entry.id, self.node)
            return
        key = entry.route.key
        dq = self.destinations.get(key)
        if dq is None:
            dq = self.destinations[key] = DestinationQueue(
                key, connector_for_route(entry.route, self.config_ref, self.routes, self.clock))
        dq.entries.append(entry)
        self.inflight += 1
        dq.more.set()
        if dq.workers < self.config_ref().delivery.per_destination and (dq.workers == 0 or len(dq.entries) > 1):
            dq.workers += 1
            task = asyncio.create_task(self._worker(dq), name=f"deliver:{key}")
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)

    async def _next_entry(self, dq: DestinationQueue) -> Entry | None:
        idle = self.config_ref().delivery.connection_idle
        deadline = time.monotonic() + idle
        while not dq.entries:
            if self._stopping:
                return None
            dq.more.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(dq.more.wait(), remaining)
            except TimeoutError:
                return None
        return dq.entries.popleft()

    async def _worker(self, dq: DestinationQueue) -> None:
        session = dq.connector.session()
        try:
            async with self._connections:
                while True:
                    entry = await self._next_entry(dq)
                    if entry is None:
                        return
                    try:
                        await self._deliver(dq, entry, session)
                    except StoreError as exc:
                        # Nothing was sent (the body or a bookkeeping write failed):
                        # the lease lapses and the entry is due again.  The store
                        # logs the outage itself, once; no traceback per entry.
                        log.warning("delivery of %s waits for the queue store: %s", entry.id, exc)
                    except Exception:
                        log.exception("delivery of %s failed unexpectedly; it stays queued", entry.id)
                        session.abandon()
                    finally:
                        if entry.id not in self._recording:
                            self._finished_one()
        finally:
            dq.workers -= 1
            await session.close()
            if not dq.entries and dq.workers == 0 and self.destinations.get(dq.key) is dq:
                del self.destinations[dq.key]

    # -- one entry ------------------------------------------------------------------

    async def _deliver(self, dq: DestinationQueue, entry: Entry, session: Session) -> None:
        started = self.clock()
        recipients = [r.address for r in entry.pending]
        if not recipients:
            if entry.notice_pending:
                # Delivered and bounced already; only the sender's notice is owed.
                self._finish(entry, DeliveryResult([], None), started, entry.body, count_attempt=False)
            else:
                await self.store.record(entry.id, self.node, None, [], None)
            return
        body = entry.body or await self.store.read_body(entry.body_id)
        if dq.connector.paused():
            # Paused by an operator: keep the message, make no attempt.
            await self.store.record(entry.id, self.node, None, [], self.clock() + PAUSED_RECHECK,
                                    notice_pending=entry.notice_pending)
            return
        self._finish(entry, await session.deliver(entry, body, recipients), started, body)

    def _finish(self, entry: Entry, result: DeliveryResult, started: float, body: StoredBody | None,
                count_attempt: bool = True) -> None:
        """Record the attempt in the background: the connection moves on to the
        next message while the store commits.  The lease is held until the
        record is durable; if we crash before that, the message is tried again
        (at-least-once, as in every MTA)."""
        self._recording.add(entry.id)
        task = asyncio.create_task(finish_attempt(
            self.store, self.config_ref(), entry, result.outcomes, result.destination, started, body,
            owner=self.node, tried=result.tried, now=self.clock(), count_attempt=count_attempt,
            keep=self.pending), name=f"record:{entry.id}")

        def done(t: asyncio.Task) -> None:
            self._recording.discard(entry.id)
            self._record_tasks.discard(t)
            self._finished_one()
            if not t.cancelled() and t.exception() is not None:
                log.error("could not record the attempt for %s (it will be retried): %s", entry.id, t.exception())
            elif not t.cancelled() and self.observer is not None:
                self.observer(entry, t.result(), result.destination, result.tls)
        self._record_tasks.add(task)
        task.add_done_callback(done)


async def finish_attempt(store: QueueStore, config: Config, entry: Entry, outcomes: list[RecipientOutcome],
                         dest: Destination | None, started: float, body: StoredBody | None, *,
                         owner: str | None, tried: tuple[Failure, ...] = (), now: float,
                         count_attempt: bool = True, expire: bool = False,
                         keep: PendingOutcomes | None = None) -> list[RecipientOutcome]:
    """Record an attempt's outcomes, queue the NDR (or delay notice) they call
    for, log them; return the outcomes as recorded.  With ``keep`` (the
    scheduler's) a record the store cannot take is kept and tried again.

    A notice that cannot be built never stops the outcomes being recorded:
    recipients the destination accepted are recorded DELIVERED whatever
    happens to the notice (they must never get the message again).  An NDR
    that fails is kept on the entry as ``notice_pending`` and built again on
    its own schedule (the entry is leased for the notice alone, nothing is
    delivered); a delay notice that fails is tried again at the next attempt."""
    decision = decide_retry(entry, outcomes, config.queue, now, counted=count_attempt, expire=expire)
    outcomes = decision.outcomes
    attempt = Attempt(at=started, duration=now - started, destination=dest, outcomes=tuple(outcomes),
                      tried=tried) if count_attempt else None
    attempts = decision.attempts
    owed = owed_recipients(entry.notice_pending) + [FailedRecipient(o.address, o.status, o.failure)
                                                    for o in decision.bounced]
    notices: list[NewMessage] = []
    notice_pending = None
    if owed:
        try:
            notice = await _ndr(store, config, entry, owed, body, attempts, decision.expires_at, now,
                                with_headers=not notice_given_up(entry.notice_pending, now, config.queue))
        except Exception as exc:   # noqa: BLE001 - whatever it is, it must not become a redelivery
            notice_pending = _notice_failed(config, entry, owed, exc, now)
        else:
            if notice is not None:
                notices.append(notice)
    ndr = "pending" if notice_pending is not None else "queued" if notices else "none"
    delayed = decision.delayed
    delay_notified = False
    if delayed and _delay_notice_due(config, entry, now):
        try:
            notice = await _delay_notice(store, config, entry, delayed, body, now)
        except Exception as exc:   # noqa: BLE001 - a courtesy notice; the next attempt tries again
            log.error("the delay notice for %s to %s could not be built (%s: %s); "
                      "it is tried again at the next attempt", entry.id, entry.sender, type(exc).__name__, exc)
        else:
            if notice is not None:
                notices.append(notice)
            delay_notified = True
    next_at = decision.next_attempt(notice_pending)
    if keep is not None:
        await keep.record(PendingRecord(entry.id, owner, entry.attempts, attempt, tuple(outcomes), next_at,
                                        tuple(notices), delay_notified, notice_pending))
    else:
        await store.record(entry.id, owner, attempt, outcomes, next_at, notices, delay_notified=delay_notified,
                           notice_pending=notice_pending)
    _log_outcomes(entry, outcomes, dest, now, next_at, ndr=ndr)
    if delay_notified:
        events.emit("delay-notice", id=entry.id, to=entry.sender or "<>", connector=entry.route.name,
                    delay=now - entry.received_at, status="queued" if notices else "none")
    if entry.notice_pending and notice_pending is None:
        events.emit("bounced", id=entry.id, msgid=entry.message_id or None, to=entry.sender,
                    connector=entry.route.name, status="notice",
                    detail=f"the NDR held back since {_stamp(entry.notice_pending.get('since', now))} is queued"
                    if ndr == "queued" else "the NDR held back could not be built; given up")
    return outcomes


def owed_recipients(notice_pending: dict | None) -> list[FailedRecipient]:
    """The recipients a held-back NDR is about (see finish_attempt).  Read
    tolerantly, as stored failures are: another version may have written it."""
    if not notice_pending:
        return []
    return [FailedRecipient(r["address"], RecipientStatus(r.get("status", "failed")),
                            Failure.from_dict(r["failure"]) if r.get("failure") else None)
            for r in notice_pending.get("recipients", ())]


def _notice_failed(config: Config, entry: Entry, owed: list[FailedRecipient], exc: Exception,
                   now: float) -> dict | None:
    """What to keep of an NDR that could not be built (classify/retry.py says when it is tried again)."""
    held = entry.notice_pending or {}
    error = f"{type(exc).__name__}: {exc}"
    retry = notice_retry(entry.notice_pending, now, config.queue)
    if retry is None:
        log.error("the NDR for %s to %s could not be built even without the original's headers (%s); "
                  "giving up after %d tries: the sender is not told", entry.id, entry.sender, error,
                  held.get("tries", 0) + 1)
        return None
    log.error("the NDR for %s to %s could not be built (%s); its delivered recipients are recorded and "
              "the NDR is tried again at %s (try %d)", entry.id, entry.sender, error, _stamp(retry.retry_at),
              retry.tries)
    return {"recipients": [{"address": r.address, "status": r.status.value,
                            "failure": r.failure.to_dict() if r.failure else None} for r in owed],
            "error": error[:500], "since": retry.since, "tries": retry.tries, "retry_at": retry.retry_at}


def _delay_notice_due(config: Config, entry: Entry, now: float) -> bool:
    if entry.delay_notified or not entry.sender or entry.is_dsn:
        return False
    connector = config.connector(entry.route.name)
    after = connector.delay_notice_after if connector is not None else None
    return after is not None and now - entry.received_at >= after


async def _delay_notice(store: QueueStore, config: Config, entry: Entry, delayed: list[RecipientOutcome],
                        body: StoredBody | None, now: float) -> NewMessage | None:
    return await _notice(store, config, entry, body, now, lambda head: build_delay_notice(
        reporting_mta=config.server.hostname, original_sender=entry.sender, original_headers=head,
        original_message_id=entry.message_id, received_at=entry.received_at, expires_at=entry.expires_at,
        recipients=[FailedRecipient(o.address, o.status, o.failure) for o in delayed], now=now))


async def _ndr(store: QueueStore, config: Config, entry: Entry, bounced: list[FailedRecipient],
               body: StoredBody | None, attempts: int, expires_at: float, now: float,
               with_headers: bool = True) -> NewMessage | None:
    if not entry.sender:
        return None    # never bounce a bounce
    return await _notice(store, config, entry, body, now, lambda head: build_ndr(
        reporting_mta=config.server.hostname, original_sender=entry.sender, original_headers=head,
        original_message_id=entry.message_id, received_at=entry.received_at, expires_at=expires_at,
        first_failure_at=entry.first_failure_at, attempts=attempts, recipients=bounced, now=now),
        with_headers=with_headers)


async def _notice(store: QueueStore, config: Config, entry: Entry, body: StoredBody | None, now: float,
                  build, with_headers: bool = True) -> NewMessage | None:
    """A DSN to the entry's sender, queued like any message with the null sender."""
    route = decide(config, entry.sender).route
    if route is None:
        events.emit("bounced", id=entry.id, to=entry.sender,
                    detail="no DSN: the sender's mailbox does not exist here")
        return None
    head = b""
    if with_headers:
        if body is None:
            body = await store.read_body(entry.body_id)
        with open_body(body) as f:
            head = header_block(f.read(64 * 1024))
    data = build(head)
    return NewMessage(sender="", recipients=((entry.sender, route),), body=StoredBody(size=len(data), data=data),
                      received_at=now, expires_at=now + config.queue.message_expiration, is_dsn=True,
                      client="relaywatch")


def _log_outcomes(entry: Entry, outcomes: list[RecipientOutcome], dest: Destination | None, now: float,
                  next_at: float, ndr: str) -> None:
    relay = where(dest) if dest is not None else None
    delay = now - entry.received_at
    for o in outcomes:
        fields = {"id": entry.id, "msgid": entry.message_id or None, "from": entry.sender or "<>",
                  "to": o.address, "connector": entry.route.name, "relay": relay, "delay": delay}
        if o.status is RecipientStatus.DELIVERED:
            events.emit("delivered", **fields, status="sent", detail=o.reply)
            continue
        f = o.failure
        fields.update(code=f.code if f else None, detail=f.detail if f else None)
        if o.status is RecipientStatus.DEFERRED:
            events.emit("deferred", **fields, status="deferred", retry_at=_stamp(next_at))
        elif o.status is RecipientStatus.EXPIRED:
            events.emit("expired", **fields, status="expired", ndr=ndr)
        else:
            events.emit("bounced", **fields, status="bounced", ndr=ndr)


def _stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
