"""Recording an attempt: classification, the retry decision, the notices, the store, the mail log.

What the scheduler's record step (and an operator's bounce or expire,
deliver/queue_actions.py) does with a delivery's outcomes: ``classify_result``
turns what the connector observed into Failures (classify/classify.py, the one
place delivery classifies), classify/retry.py decides what follows, notify/notices.py builds the notices that calls for (this
module only reads the original's headers for them), the store records it all
in one transaction, and the mail log gets one line per recipient.

A notice that cannot be built never stops the outcomes being recorded:
recipients the destination accepted are recorded DELIVERED whatever happens
to the notice (they must never get the message again).  An NDR that fails is
kept on the entry as ``notice_pending`` and built again on its own schedule
(the entry is leased for the notice alone, nothing is delivered); a delay
notice that fails is tried again at the next attempt.
"""

from __future__ import annotations

import logging
import time

from relaywatch import events, meters
from relaywatch.classify.classify import classify, where
from relaywatch.classify.retry import RetryDecision, decide as decide_retry, notice_given_up, notice_retry
from relaywatch.config import Config
from relaywatch.deliver.connector import DeliveryResult, Observed
from relaywatch.model import Attempt, Destination, Entry, Failure, RecipientOutcome, RecipientStatus, StoredBody
from relaywatch.notify.notices import (Notices, delay_notice_due, held_notice, notices_for, owed_recipients, requested,
                                       success_owed)
from relaywatch.notify.report import ReportedRecipient
from relaywatch.route import decide as decide_route
from relaywatch.store.base import QueueStore
from relaywatch.store.pending import PendingOutcomes, PendingRecord

log = logging.getLogger("relaywatch.scheduler")

HEADERS_READ = 64 * 1024     # the original's start read for a notice: its header section


def classify_result(result: DeliveryResult) -> DeliveryResult:
    """Turn the connector's observations into Failures and outcomes, in place: each
    ``Observed`` is classified once (its recipients, and a dead-destination mark's
    later attempts, share the one Failure, stamped when it was observed)."""
    outcomes = result.outcomes
    for i, o in enumerate(outcomes):
        if type(o) is tuple:
            address, seen = o
            failure = _failure(seen)
            outcomes[i] = RecipientOutcome(
                address, RecipientStatus.FAILED if failure.permanent else RecipientStatus.DEFERRED, failure)
    if result.tried:
        result.tried = tuple(_failure(t) if isinstance(t, Observed) else t for t in result.tried)
    return result


def _failure(seen: Observed) -> Failure:
    if seen.failure is None:
        seen.failure = classify(seen.observation, seen.at)
    return seen.failure


async def record_attempt(store: QueueStore, config: Config, entry: Entry, outcomes: list[RecipientOutcome],
                         dest: Destination | None, started: float, body: StoredBody | None, *,
                         owner: str | None, tried: tuple[Failure, ...] = (), now: float,
                         count_attempt: bool = True, expire: bool = False,
                         keep: PendingOutcomes | None = None) -> list[RecipientOutcome]:
    """Record an attempt's outcomes, queue the NDR (or delay notice) they call
    for, log them; return the outcomes as recorded.  With ``keep`` (the
    scheduler's) a record the store cannot take is kept and tried again.
    ``count_attempt=False``: no delivery was attempted (an operator's action,
    a held-back NDR alone); ``expire=True``: the operator gives up now."""
    decision = decide_retry(entry, outcomes, config.queue, now, counted=count_attempt, expire=expire)
    outcomes = decision.outcomes
    attempt = Attempt(at=started, duration=now - started, destination=dest, outcomes=tuple(outcomes),
                      tried=tried) if count_attempt else None
    if count_attempt:
        meters.observe_attempt(entry.route.name, now - started)    # /metrics: attempt duration by connector
    # What the sender asked for (NOTIFY, RFC 3461); without NOTIFY, failures and delays.
    bounced = requested(entry, decision.bounced, "FAILURE")
    unrequested = {o.address for o in decision.bounced} - {o.address for o in bounced}
    owed = owed_recipients(entry, bounced)
    delay_due = bool(requested(entry, decision.delayed, "DELAY")) and delay_notice_due(
        entry, _delay_notice_after(config, entry), now)
    succeeded = success_owed(entry, outcomes)
    notices: list = []
    notice_pending = None
    delay_notified = False
    ndr = "none"
    reported_success: set[str] = set()
    if owed or delay_due or succeeded:
        built = await _notices(store, config, entry, decision, owed, delay_due, succeeded, body, now)
        for _ in range(built.unroutable):
            events.emit("bounced", id=entry.id, to=entry.sender, detail="no DSN: the sender's mailbox does not exist here")
        if built.ndr_error is not None:
            notice_pending = _notice_failed(config, entry, owed, built.ndr_error, now)
        ndr = "pending" if notice_pending is not None else "queued" if built.ndr is not None else "none"
        if built.delay_error is not None:
            exc = built.delay_error
            log.error("the delay notice for %s to %s could not be built (%s: %s); "
                      "it is tried again at the next attempt", entry.id, entry.sender, type(exc).__name__, exc)
        if built.success_error is not None:
            exc = built.success_error
            log.error("the success notice (NOTIFY=SUCCESS) for %s to %s could not be built (%s: %s); "
                      "the sender is not told", entry.id, entry.sender, type(exc).__name__, exc)
        delay_notified = delay_due and built.delay_error is None
        reported_success = {o.address for o in succeeded} if built.success is not None else set()
        notices = built.messages
    next_at = decision.next_attempt(notice_pending)
    if keep is not None:
        await keep.record(PendingRecord(entry.id, owner, entry.attempts, attempt, tuple(outcomes), next_at,
                                        tuple(notices), delay_notified, notice_pending, leased=entry))
    else:
        await store.record(entry.id, owner, attempt, outcomes, next_at, notices, delay_notified=delay_notified,
                           notice_pending=notice_pending, leased=entry)
    _log_outcomes(entry, outcomes, dest, now, next_at, ndr=ndr, unrequested=unrequested,
                  reported_success=reported_success)
    if delay_notified:
        events.emit("delay-notice", id=entry.id, to=entry.sender or "<>", connector=entry.route.name,
                    delay=now - entry.received_at, status="queued" if notices else "none")
    if entry.notice_pending and notice_pending is None:
        events.emit("bounced", id=entry.id, msgid=entry.message_id or None, to=entry.sender,
                    connector=entry.route.name, status="notice",
                    detail=f"the NDR held back since {_stamp(entry.notice_pending.get('since', now))} is queued"
                    if ndr == "queued" else "the NDR held back could not be built; given up")
    return outcomes


def _delay_notice_after(config: Config, entry: Entry) -> float | None:
    connector = config.connector(entry.route.name)
    return connector.delay_notice_after if connector is not None else None


async def _notices(store: QueueStore, config: Config, entry: Entry, decision: RetryDecision,
                   owed: list[ReportedRecipient], delay_due: bool, succeeded: list[RecipientOutcome],
                   body: StoredBody | None, now: float) -> Notices:
    """The I/O around notify/notices.notices_for: the sender's route, the original's headers."""
    with_headers = not notice_given_up(entry.notice_pending, now, config.queue)
    route = None
    headers: bytes | Exception = b""
    if entry.sender:
        try:
            route = decide_route(config, entry.sender).route
            if route is not None and (delay_due or succeeded or (owed and with_headers)):
                if body is None:
                    body = await store.read_body(entry.body_id)
                with body.open() as f:
                    # RET=FULL: one octet more than is returned says the original is too big for it.
                    limit = config.queue.ndr_return_limit
                    headers = f.read(max(limit + 1, HEADERS_READ) if owed and entry.dsn.ret == "FULL" else HEADERS_READ)
        except Exception as exc:   # noqa: BLE001 - the notices that needed it fail, the record goes on
            headers = exc
    return notices_for(entry, decision, headers, owed=owed, delay=delay_due, ndr_headers=with_headers, route=route,
                       reporting_mta=config.server.hostname, expiration=config.queue.message_expiration, now=now,
                       return_limit=config.queue.ndr_return_limit, succeeded=succeeded)


def _notice_failed(config: Config, entry: Entry, owed: list[ReportedRecipient], exc: Exception,
                   now: float) -> dict | None:
    """What to keep of an NDR that could not be built (classify/retry.py says when it is tried again)."""
    error = f"{type(exc).__name__}: {exc}"
    retry = notice_retry(entry.notice_pending, now, config.queue)
    if retry is None:
        log.error("the NDR for %s to %s could not be built even without the original's headers (%s); "
                  "giving up after %d tries: the sender is not told", entry.id, entry.sender, error,
                  (entry.notice_pending or {}).get("tries", 0) + 1)
        return None
    log.error("the NDR for %s to %s could not be built (%s); its delivered recipients are recorded and "
              "the NDR is tried again at %s (try %d)", entry.id, entry.sender, error, _stamp(retry.retry_at),
              retry.tries)
    return held_notice(owed, error, retry.since, retry.tries, retry.retry_at)


def _log_outcomes(entry: Entry, outcomes: list[RecipientOutcome], dest: Destination | None, now: float,
                  next_at: float, ndr: str, unrequested: set[str] = frozenset(),
                  reported_success: set[str] = frozenset()) -> None:
    """One line per recipient; ``unrequested``: bounced recipients whose NOTIFY asked for no NDR
    (``ndr=not-requested``); ``reported_success``: delivered ones a success report (NOTIFY=SUCCESS)
    was queued for (``dsn=queued``)."""
    relay = where(dest) if dest is not None else None
    delay = now - entry.received_at
    for o in outcomes:
        fields = {"id": entry.id, "msgid": entry.message_id or None, "from": entry.sender or "<>",
                  "to": o.address, "connector": entry.route.name, "relay": relay, "delay": delay}
        if o.status is RecipientStatus.DELIVERED:
            events.emit("delivered", **fields, status="sent", detail=o.reply,
                        **({"dsn": "queued"} if o.address in reported_success else {}))
            continue
        f = o.failure
        fields.update(code=f.code if f else None, detail=f.detail if f else None)
        if o.status is RecipientStatus.DEFERRED:
            events.emit("deferred", **fields, status="deferred", retry_at=_stamp(next_at))
            continue
        told = "not-requested" if o.address in unrequested else ndr
        if o.status is RecipientStatus.EXPIRED:
            events.emit("expired", **fields, status="expired", ndr=told)
        else:
            events.emit("bounced", **fields, status="bounced", ndr=told)


def _stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
