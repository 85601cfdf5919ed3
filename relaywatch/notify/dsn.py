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


def build_ndr(*, reporting_mta: str, original_sender: str, original_headers: bytes,
              original_message_id: str, received_at: float, expires_at: float,
              first_failure_at: float | None, attempts: int,
              recipients: list[FailedRecipient], now: float) -> bytes:
    expired = any(r.status is RecipientStatus.EXPIRED for r in recipients)
    original = BytesHeaderParser(policy=policy.default).parsebytes(original_headers)
    subject = str(original.get("Subject", "") or "")

    msg = EmailMessage(policy=_SMTP_POLICY)
    msg["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    msg["To"] = original_sender
    msg["Subject"] = ("Undeliverable: " + subject) if subject else "Undeliverable message"
    msg["Date"] = email.utils.formatdate(now)
    msg["Message-ID"] = email.utils.make_msgid(domain=reporting_mta)
    msg["Auto-Submitted"] = "auto-replied"
    if original_message_id:
        msg["In-Reply-To"] = original_message_id
        msg["References"] = original_message_id

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
    msg.set_content("\n".join(body) + "\n")
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
        block["Action"] = "failed"
        block["Status"] = _status(r)
        if r.failure is not None and r.failure.destination is not None and r.failure.destination.host:
            block["Remote-MTA"] = f"dns; {r.failure.destination.host}"
        block["Diagnostic-Code"] = _diagnostic(r.failure)
        block["Last-Attempt-Date"] = email.utils.formatdate(r.failure.at if r.failure else now)
        blocks.append(block)
    status_part = Message()
    status_part["Content-Type"] = "message/delivery-status"
    status_part.set_payload(blocks)
    msg.attach(status_part)

    headers_part = Message()
    headers_part["Content-Type"] = "text/rfc822-headers"
    headers_part["Content-Description"] = "Headers of the undelivered message"
    headers_part.set_payload(original_headers.decode("utf-8", "replace"))
    msg.attach(headers_part)
    return msg.as_bytes(policy=_SMTP_POLICY)


def header_block(head: bytes) -> bytes:
    """The header section of a message (up to the first empty line)."""
    end = head.find(b"\r\n\r\n")
    if end < 0:
        end = head.find(b"\n\n")
    return head[: end + 2] if end >= 0 else head


def build_delay_notice(*, reporting_mta: str, original_sender: str, original_headers: bytes,
                       original_message_id: str, received_at: float, expires_at: float,
                       recipients: list[FailedRecipient], now: float) -> bytes:
    """An RFC 3464 ``Action: delayed`` notice: not a failure, a heads-up."""
    original = BytesHeaderParser(policy=policy.default).parsebytes(original_headers)
    subject = str(original.get("Subject", "") or "")
    msg = EmailMessage(policy=_SMTP_POLICY)
    msg["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    msg["To"] = original_sender
    msg["Subject"] = ("Delayed: " + subject) if subject else "Delivery delayed"
    msg["Date"] = email.utils.formatdate(now)
    msg["Message-ID"] = email.utils.make_msgid(domain=reporting_mta)
    msg["Auto-Submitted"] = "auto-replied"
    if original_message_id:
        msg["In-Reply-To"] = original_message_id
        msg["References"] = original_message_id
    lines = ["Your message has not been delivered yet to the recipient(s) below. You do not need to "
             "send it again: relaywatch keeps trying until " + _when(expires_at) + ".", ""]
    for r in recipients:
        lines.append(f"  {r.address}")
        if r.failure is not None:
            lines.append(f"    What is wrong: {r.failure.detail}")
            lines.append(f"    Error: {r.failure.code} {r.failure.title}")
    lines += ["", f"Sent: {_when(received_at)}. If it cannot be delivered by {_when(expires_at)} you will get "
                  "a final report.", f"-- relaywatch at {reporting_mta}"]
    msg.set_content("\n".join(lines) + "\n")
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
        block["Action"] = "delayed"
        block["Status"] = r.failure.code if r.failure is not None and r.failure.code[:1] == "4" else "4.0.0"
        if r.failure is not None and r.failure.destination is not None and r.failure.destination.host:
            block["Remote-MTA"] = f"dns; {r.failure.destination.host}"
        block["Diagnostic-Code"] = _diagnostic(r.failure)
        block["Will-Retry-Until"] = email.utils.formatdate(expires_at)
        blocks.append(block)
    status_part = Message()
    status_part["Content-Type"] = "message/delivery-status"
    status_part.set_payload(blocks)
    msg.attach(status_part)
    headers_part = Message()
    headers_part["Content-Type"] = "text/rfc822-headers"
    headers_part.set_payload(original_headers.decode("utf-8", "replace"))
    msg.attach(headers_part)
    return msg.as_bytes(policy=_SMTP_POLICY)
