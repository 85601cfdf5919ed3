"""The notices themselves (RFC 3464 reports): an NDR, a delay notice, a success notice.

Pure: the facts in, the message bytes out.  Each writes its human-readable text (the
domains as people write them: U-labels) and the fields only its kind has (``Action``,
``Status``, ``Last-Attempt-Date``, ``Will-Retry-Until``); notify/report.py makes the
multipart/report around them.  notify/notices.py says which of them an attempt calls for.
"""

from __future__ import annotations

import email.utils
from email.message import Message

from relaywatch.idn import address_to_unicode
from relaywatch.model import RecipientStatus, iso
from relaywatch.notify.report import ReportedRecipient, build_report, field_value


def _when(ts: float | None) -> str:
    return (iso(ts) or "?").replace("T", " ").replace("Z", " UTC")


def _status(r: ReportedRecipient) -> str:
    if r.status is RecipientStatus.EXPIRED:
        return "4.4.7"     # delivery time expired (RFC 3463)
    if r.failure is not None and r.failure.code[:1] == "5":
        return r.failure.code
    return "5.0.0"


def _human(r: ReportedRecipient, first_failure_at: float | None, expires_at: float, attempts: int) -> str:
    f = r.failure
    lines = [f"  {address_to_unicode(r.address)}"]     # the domain as people write it (U-labels)
    if r.status is RecipientStatus.EXPIRED:
        since = f" since {_when(first_failure_at)}" if first_failure_at else ""
        lines.append(f"    We kept trying to deliver it{since} ({attempts} attempts) and gave up at "
                     f"{_when(expires_at)}.")
        if f is not None:
            lines.append(f"    The last attempt failed: {f.detail}")
            lines.append(f"    Error: {f.code} {f.title}")
    else:
        lines.append("    The receiving side refused it, so we did not try again.")
        if f is not None:
            lines.append(f"    What happened: {f.detail}")
            lines.append(f"    Error: {f.code} {f.title}")
    return "\n".join(lines)


def build_ndr(*, reporting_mta: str, original_sender: str, original_headers: bytes,
              original_message_id: str, received_at: float, expires_at: float,
              first_failure_at: float | None, attempts: int,
              recipients: list[ReportedRecipient], now: float, envid: str | None = None,
              returned: Message | None = None) -> bytes:
    """``Action: failed``: the message is given up for these recipients.  ``returned``: what
    goes back of the original (``returned_part``; default: ``original_headers``)."""
    expired = any(r.status is RecipientStatus.EXPIRED for r in recipients)
    intro = ("Your message could not be delivered to the recipient(s) below. "
             + ("relaywatch retried for as long as it is allowed to and then gave up."
                if expired else "The destination rejected it."))
    body = [intro, ""]
    body += [_human(r, first_failure_at, expires_at, attempts) for r in recipients]
    body += ["",
             f"Sent: {_when(received_at)}" + (f"    Message-ID: {field_value(original_message_id)}"
                                              if original_message_id else ""),
             "",
             "If the address is right, try again later or reach the recipient another way; if this "
             "keeps happening, forward this report to your mail administrator. The technical "
             "details and the original message's headers are attached.",
             f"-- relaywatch at {reporting_mta}"]
    return build_report(
        subject_prefix="Undeliverable: ", fallback_subject="Undeliverable message", text="\n".join(body) + "\n",
        action="failed", reporting_mta=reporting_mta, original_sender=original_sender,
        original_headers=original_headers, original_message_id=original_message_id, received_at=received_at,
        recipients=recipients, now=now, status_of=_status, envid=envid, returned=returned,
        extra_fields=lambda r: {"Last-Attempt-Date": email.utils.formatdate(r.failure.at if r.failure else now)})


def build_delay_notice(*, reporting_mta: str, original_sender: str, original_headers: bytes,
                       original_message_id: str, received_at: float, expires_at: float,
                       recipients: list[ReportedRecipient], now: float, envid: str | None = None) -> bytes:
    """``Action: delayed``: not a failure, a heads-up with the deadline."""
    lines = ["Your message has not been delivered yet to the recipient(s) below. You do not need to "
             "send it again: relaywatch keeps trying until " + _when(expires_at) + ".", ""]
    for r in recipients:
        lines.append(f"  {address_to_unicode(r.address)}")
        if r.failure is not None:
            lines.append(f"    What is wrong: {r.failure.detail}")
            lines.append(f"    Error: {r.failure.code} {r.failure.title}")
    lines += ["", f"Sent: {_when(received_at)}. If it cannot be delivered by {_when(expires_at)} you will get "
                  "a final report.", f"-- relaywatch at {reporting_mta}"]
    return build_report(
        subject_prefix="Delayed: ", fallback_subject="Delivery delayed", text="\n".join(lines) + "\n",
        action="delayed", reporting_mta=reporting_mta, original_sender=original_sender,
        original_headers=original_headers, original_message_id=original_message_id, received_at=received_at,
        recipients=recipients, now=now, envid=envid,
        status_of=lambda r: r.failure.code if r.failure is not None and r.failure.code[:1] == "4" else "4.0.0",
        extra_fields=lambda r: {"Will-Retry-Until": email.utils.formatdate(expires_at)})


def build_success_notice(*, reporting_mta: str, original_sender: str, original_headers: bytes,
                         original_message_id: str, received_at: float, relayed: bool,
                         recipients: list[ReportedRecipient], now: float, envid: str | None = None) -> bytes:
    """The sender asked for NOTIFY=SUCCESS: ``Action: delivered`` (a mailbox here) or
    ``relayed`` (handed to a server that does not offer DSN, so no later notice will come)."""
    if relayed:
        intro = ("Your message was handed over to the recipient's mail server for the recipient(s) below. "
                 "That server does not send delivery reports, so this is the last report you will get.")
    else:
        intro = "Your message was delivered to the mailbox of the recipient(s) below."
    lines = [intro, ""] + [f"  {address_to_unicode(r.address)}" for r in recipients]
    lines += ["", f"Sent: {_when(received_at)}. You get this report because the message asked for one "
                  "(NOTIFY=SUCCESS).", f"-- relaywatch at {reporting_mta}"]
    return build_report(
        subject_prefix="Delivered: ", fallback_subject="Delivery report", text="\n".join(lines) + "\n",
        action="relayed" if relayed else "delivered", reporting_mta=reporting_mta, original_sender=original_sender,
        original_headers=original_headers, original_message_id=original_message_id, received_at=received_at,
        recipients=recipients, now=now, envid=envid, status_of=lambda r: "2.0.0", extra_fields=lambda r: {})
