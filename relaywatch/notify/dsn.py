"""Non-delivery reports (RFC 3464 ``multipart/report; report-type=delivery-status``).

Pure: the facts in, the message bytes out.  The NDR is queued as a new message
with the null sender ``<>``; a message from ``<>`` never gets one (no loops).
"""

from __future__ import annotations

import email.utils
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser

from relaywatch.model import Failure, RecipientStatus, iso


@dataclass(frozen=True)
class FailedRecipient:
    address: str
    status: RecipientStatus        # FAILED (permanent) or EXPIRED
    failure: Failure | None


_SMTP_POLICY = policy.SMTP.clone(max_line_length=998)


def _when(ts: float | None) -> str:
    return (iso(ts) or "?").replace("T", " ").replace("Z", " UTC")


def _status(r: FailedRecipient) -> str:
    if r.status is RecipientStatus.EXPIRED:
        return "4.4.7"     # delivery time expired (RFC 3463)
    if r.failure is not None and r.failure.code[:1] == "5":
        return r.failure.code
    return "5.0.0"


def _diagnostic(f: Failure | None) -> str:
    if f is None:
        return "smtp; 450 4.4.7 Message expired before it could be tried"
    if f.reply:
        return f"smtp; {f.reply}"
    return f"smtp; {f.smtp_code} {f.code} {f.title}: {f.detail}"


def _human(r: FailedRecipient, first_failure_at: float | None, expires_at: float, attempts: int) -> str:
    f = r.failure
    lines = [f"  {r.address}"]
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


def _report(*, subject_prefix: str, fallback_subject: str, text: str, action: str,
            reporting_mta: str, original_sender: str, original_headers: bytes, original_message_id: str,
            received_at: float, recipients: list[FailedRecipient], now: float,
            status_of, extra_fields) -> bytes:
    """The multipart/report both kinds of DSN share (RFC 3464, recipe in shared/STACK.md §6)."""
    original = BytesHeaderParser(policy=policy.default).parsebytes(original_headers)
    subject = str(original.get("Subject", "") or "")
    msg = EmailMessage(policy=_SMTP_POLICY)
    msg["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    msg["To"] = original_sender
    msg["Subject"] = (subject_prefix + subject) if subject else fallback_subject
    msg["Date"] = email.utils.formatdate(now)
    msg["Message-ID"] = email.utils.make_msgid(domain=reporting_mta)
    msg["Auto-Submitted"] = "auto-replied"
    if original_message_id:
        msg["In-Reply-To"] = original_message_id
        msg["References"] = original_message_id
    msg.set_content(text)
    msg.make_mixed()
    msg.set_type("multipart/report")
    msg.set_param("report-type", "delivery-status")

    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {reporting_mta}"
    per_message["Arrival-Date"] = email.utils.formatdate(received_at)
    blocks = [per_message]
    for r in recipients:
        block = Message()
        block["Final-Recipient"] = f"rfc822; {r.address}"
        block["Action"] = action
        block["Status"] = status_of(r)
        if r.failure is not None and r.failure.destination is not None and r.failure.destination.host:
            block["Remote-MTA"] = f"dns; {r.failure.destination.host}"
        block["Diagnostic-Code"] = _diagnostic(r.failure)
        for name, value in extra_fields(r).items():
            block[name] = value
        blocks.append(block)
    status_part = Message()
    status_part["Content-Type"] = "message/delivery-status"
    status_part.set_payload(blocks)
    msg.attach(status_part)

    headers_part = Message()
    headers_part["Content-Type"] = "text/rfc822-headers"
    headers_part["Content-Description"] = "Headers of the message"
    headers_part.set_payload(original_headers.decode("utf-8", "replace"))
    msg.attach(headers_part)
    return msg.as_bytes(policy=_SMTP_POLICY)


def build_ndr(*, reporting_mta: str, original_sender: str, original_headers: bytes,
              original_message_id: str, received_at: float, expires_at: float,
              first_failure_at: float | None, attempts: int,
              recipients: list[FailedRecipient], now: float) -> bytes:
    """``Action: failed``: the message is given up for these recipients."""
    expired = any(r.status is RecipientStatus.EXPIRED for r in recipients)
    intro = ("Your message could not be delivered to the recipient(s) below. "
             + ("relaywatch retried for as long as it is allowed to and then gave up."
                if expired else "The destination rejected it."))
    body = [intro, ""]
    body += [_human(r, first_failure_at, expires_at, attempts) for r in recipients]
    body += ["",
             f"Sent: {_when(received_at)}" + (f"    Message-ID: {original_message_id}" if original_message_id else ""),
             "",
             "If the address is right, try again later or reach the recipient another way; if this "
             "keeps happening, forward this report to your mail administrator. The technical "
             "details and the original message's headers are attached.",
             f"-- relaywatch at {reporting_mta}"]
    return _report(
        subject_prefix="Undeliverable: ", fallback_subject="Undeliverable message", text="\n".join(body) + "\n",
        action="failed", reporting_mta=reporting_mta, original_sender=original_sender,
        original_headers=original_headers, original_message_id=original_message_id, received_at=received_at,
        recipients=recipients, now=now, status_of=_status,
        extra_fields=lambda r: {"Last-Attempt-Date": email.utils.formatdate(r.failure.at if r.failure else now)})


def build_delay_notice(*, reporting_mta: str, original_sender: str, original_headers: bytes,
                       original_message_id: str, received_at: float, expires_at: float,
                       recipients: list[FailedRecipient], now: float) -> bytes:
    """``Action: delayed``: not a failure, a heads-up with the deadline."""
    lines = ["Your message has not been delivered yet to the recipient(s) below. You do not need to "
             "send it again: relaywatch keeps trying until " + _when(expires_at) + ".", ""]
    for r in recipients:
        lines.append(f"  {r.address}")
        if r.failure is not None:
            lines.append(f"    What is wrong: {r.failure.detail}")
            lines.append(f"    Error: {r.failure.code} {r.failure.title}")
    lines += ["", f"Sent: {_when(received_at)}. If it cannot be delivered by {_when(expires_at)} you will get "
                  "a final report.", f"-- relaywatch at {reporting_mta}"]
    return _report(
        subject_prefix="Delayed: ", fallback_subject="Delivery delayed", text="\n".join(lines) + "\n",
        action="delayed", reporting_mta=reporting_mta, original_sender=original_sender,
        original_headers=original_headers, original_message_id=original_message_id, received_at=received_at,
        recipients=recipients, now=now,
        status_of=lambda r: r.failure.code if r.failure is not None and r.failure.code[:1] == "4" else "4.0.0",
        extra_fields=lambda r: {"Will-Retry-Until": email.utils.formatdate(expires_at)})


def header_block(head: bytes) -> bytes:
    """The header section of a message (up to the first empty line)."""
    end = head.find(b"\r\n\r\n")
    if end < 0:
        end = head.find(b"\n\n")
    return head[: end + 2] if end >= 0 else head

