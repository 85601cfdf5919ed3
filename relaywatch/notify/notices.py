"""Which notices an attempt calls for, built as messages to queue (RFC 3461's NOTIFY decides).

Pure.  ``notices_for`` says which notices an attempt's retry decision calls for (an NDR, a
delay notice, a success notice) and builds them (notify/dsn.py) as messages to queue; the
recording step (deliver/record.py) reads the original's headers for it and keeps an NDR
that could not be built.  A notice is queued as a new message with the null sender ``<>``;
a message from ``<>`` never gets one (no loops).

The DSN parameters the sender gave decide which notices it gets (``requested``:
NOTIFY=NEVER none, NOTIFY=SUCCESS a ``relayed`` notice when the destination did not take
the NOTIFY itself, ``delivered`` for a local mailbox; without NOTIFY failures and delays,
as always).
"""

from __future__ import annotations

from dataclasses import dataclass

from relaywatch.classify.retry import RetryDecision
from relaywatch.dsn_params import NO_RECIPIENT_DSN
from relaywatch.model import Entry, Failure, NewMessage, RecipientOutcome, RecipientStatus, Route, RouteKind, StoredBody
from relaywatch.notify.dsn import build_delay_notice, build_ndr, build_success_notice
from relaywatch.notify.report import ReportedRecipient, header_block, is_international, returned_part


def requested(entry: Entry, outcomes: list[RecipientOutcome], kind: str) -> list[RecipientOutcome]:
    """The outcomes whose recipient asked for a notice of ``kind`` (SUCCESS, FAILURE,
    DELAY: its NOTIFY, RFC 3461 4.1; without NOTIFY failures and delays)."""
    dsn = {r.address: r.dsn for r in entry.recipients}
    return [o for o in outcomes if dsn.get(o.address, NO_RECIPIENT_DSN).wants(kind)]


def success_owed(entry: Entry, outcomes: list[RecipientOutcome]) -> list[RecipientOutcome]:
    """Delivered recipients that asked for NOTIFY=SUCCESS and whose destination was not
    handed the NOTIFY (a server that offers DSN sends the success notice itself)."""
    delivered = [o for o in outcomes if o.status is RecipientStatus.DELIVERED and not o.dsn_passed_on]
    return requested(entry, delivered, "SUCCESS") if entry.sender and not entry.is_dsn else []


def reported(entry: Entry, outcomes: list[RecipientOutcome]) -> list[ReportedRecipient]:
    orcpt = {r.address: r.dsn.orcpt for r in entry.recipients}
    return [ReportedRecipient(o.address, o.status, o.failure, orcpt.get(o.address), o.reply) for o in outcomes]


def owed_recipients(entry: Entry, bounced: list[RecipientOutcome]) -> list[ReportedRecipient]:
    """The recipients an NDR is owed for: those of an NDR the entry holds back (it
    could not be built before; read tolerantly, another version may have written
    it) and those that bounce now (of those, the caller keeps the ``requested``)."""
    notice_pending = entry.notice_pending
    held = [ReportedRecipient(r["address"], RecipientStatus(r.get("status", "failed")),
                              Failure.from_dict(r["failure"]) if r.get("failure") else None, r.get("orcpt"))
            for r in notice_pending.get("recipients", ())] if notice_pending else []
    return held + reported(entry, bounced)


def held_notice(owed: list[ReportedRecipient], error: str, since: float, tries: int, retry_at: float) -> dict:
    """An NDR that could not be built, as the entry keeps it (``notice_pending``)."""
    return {"recipients": [{"address": r.address, "status": r.status.value,
                            "failure": r.failure.to_dict() if r.failure else None,
                            **({"orcpt": r.orcpt} if r.orcpt else {})} for r in owed],
            "error": error[:500], "since": since, "tries": tries, "retry_at": retry_at}


def delay_notice_due(entry: Entry, after: float | None, now: float) -> bool:
    """A "still trying" notice, once per message, ``after`` seconds after it
    came in (the connector's ``delay_notice_after``); never to <> or for a DSN."""
    if entry.delay_notified or not entry.sender or entry.is_dsn:
        return False
    return after is not None and now - entry.received_at >= after


@dataclass(slots=True)
class Notices:
    """What ``notices_for`` built; a notice that could not be built is reported, not raised."""
    ndr: NewMessage | None = None
    delay: NewMessage | None = None
    success: NewMessage | None = None
    ndr_error: Exception | None = None
    delay_error: Exception | None = None
    success_error: Exception | None = None
    unroutable: int = 0        # notices owed to a sender whose mailbox does not exist here: none is sent

    @property
    def messages(self) -> list[NewMessage]:
        return [m for m in (self.ndr, self.delay, self.success) if m is not None]


def notices_for(entry: Entry, decision: RetryDecision, headers: bytes | Exception, *,
                owed: list[ReportedRecipient], delay: bool, ndr_headers: bool, route: Route | None,
                reporting_mta: str, expiration: float, now: float, return_limit: int,
                succeeded: list[RecipientOutcome] = ()) -> Notices:
    """The notices an attempt calls for, ready to queue with the null sender:
    an NDR about ``owed`` (never for a message from <>), a delay notice about
    the decision's delayed recipients that want one when ``delay`` is due, a
    success notice about ``succeeded`` (``success_owed``).

    ``headers`` is the start of the original (64 KiB are plenty; for RET=FULL
    up to ``return_limit`` (queue.ndr_return_limit) + 1 octets), or why it could not be read;
    ``ndr_headers=False`` builds the NDR without them (a held-back NDR given up
    on its headers, classify/retry.notice_given_up).  ``route`` is the
    sender's (None: no mailbox here, so no notice)."""
    out = Notices()
    common = dict(reporting_mta=reporting_mta, original_sender=entry.sender, original_message_id=entry.message_id,
                  received_at=entry.received_at, now=now, envid=entry.dsn.envid)
    if owed and entry.sender:
        out.ndr, out.ndr_error = _notice(entry, headers, route, ndr_headers, expiration, now, lambda head: build_ndr(
            **common, original_headers=header_block(head), expires_at=decision.expires_at,
            first_failure_at=entry.first_failure_at, attempts=decision.attempts, recipients=owed,
            returned=returned_part(head, entry.dsn.ret, is_international(entry.sender, owed), limit=return_limit)
            if head else None))
        out.unroutable += out.ndr is None and out.ndr_error is None
    delayed = requested(entry, decision.delayed, "DELAY") if delay else []
    if delayed:
        out.delay, out.delay_error = _notice(entry, headers, route, True, expiration, now, lambda head: build_delay_notice(
            **common, original_headers=header_block(head), expires_at=entry.expires_at,
            recipients=reported(entry, delayed)))
        out.unroutable += out.delay is None and out.delay_error is None
    if succeeded:
        out.success, out.success_error = _notice(
            entry, headers, route, True, expiration, now, lambda head: build_success_notice(
                **common, original_headers=header_block(head), relayed=entry.route.kind is not RouteKind.LOCAL,
                recipients=reported(entry, list(succeeded))))
        out.unroutable += out.success is None and out.success_error is None
    return out


def _notice(entry: Entry, headers: bytes | Exception, route: Route | None, with_headers: bool, expiration: float,
            now: float, build) -> tuple[NewMessage | None, Exception | None]:
    """One notice, or why it could not be built; (None, None): the sender has no mailbox here."""
    if isinstance(headers, Exception) and (with_headers or route is None):
        return None, headers        # the original (or the sender's route) could not be read
    if route is None:
        return None, None
    try:
        data = build(headers if with_headers else b"")
    except Exception as exc:   # noqa: BLE001 - whatever it is, the caller keeps the NDR or tries again later
        return None, exc
    return _queued(entry, route, data, expiration, now), None


def _queued(entry: Entry, route: Route, data: bytes, expiration: float, now: float) -> NewMessage:
    return NewMessage(sender="", recipients=((entry.sender, route),), body=StoredBody(size=len(data), data=data),
                      received_at=now, expires_at=now + expiration, is_dsn=True, client="relaywatch")
