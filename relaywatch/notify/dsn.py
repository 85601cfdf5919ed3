"""Delivery status notifications (RFC 3464 ``multipart/report; report-type=delivery-status``).

Pure: the facts in, the message bytes out.  ``notices_for`` says which
notices an attempt's retry decision calls for (an NDR, a delay notice, a
success notice) and builds them as messages to queue; the recording step (deliver/record.py)
reads the original's headers for it and keeps an NDR that could not be built.  The NDR is queued as a new message
with the null sender ``<>``; a message from ``<>`` never gets one (no loops).

A notice is always 7-bit, whatever the original carried, so it can go to any
server (no ``BODY=8BITMIME`` needed) and building it cannot fail on the
original's bytes:

- the original's header section is attached as ``text/rfc822-headers``
  octet for octet.  Headers that are plain 7-bit text go as they are; raw
  8-bit headers (accepted under ``BODY=8BITMIME``: UTF-8, Latin-1, anything)
  or lines over 998 octets are sent ``quoted-printable``, which RFC 3462 and
  RFC 6522 (section "Encoding considerations" of text/rfc822-headers) name
  for headers that "are broken and require encoding to make them legal 7 bit
  content".  Decoding the part gives back exactly the bytes received; they
  are never decoded to text and re-encoded.
- the Subject (``Undeliverable: <original subject>``) is RFC 2047 encoded;
  8-bit bytes of the original that are not UTF-8 show as U+FFFD there.
- the human-readable part is UTF-8 (quoted-printable when not ASCII), and the
  machine-readable fields stay ASCII (RFC 3464 §2.1.1): any other character
  is written ``\\x{HEX}`` as RFC 6533 §3 does for UTF-8 in these fields; a
  UTF-8 recipient is ``Final-Recipient: utf-8; <utf-8-addr-xtext>`` (§3).
- the DSN parameters the sender gave (RFC 3461) decide which notices it gets
  (``requested``: NOTIFY=NEVER none, NOTIFY=SUCCESS a ``relayed`` notice when
  the destination did not take the NOTIFY itself, ``delivered`` for a local
  mailbox; without NOTIFY failures and delays, as always), what an NDR returns
  (RET=FULL: the whole message as ``message/rfc822`` when it is 7-bit and at
  most ``FULL_RETURN_LIMIT`` octets, else the headers; RET=HDRS and no RET:
  the headers), and ENVID and ORCPT come back as ``Original-Envelope-Id`` and
  ``Original-Recipient``.
- SMTPUTF8: the human text shows domains as U-labels; a notice to a UTF-8
  sender has UTF-8 headers (RFC 6532: ``To:`` keeps the address as it is)
  and goes out with SMTPUTF8 like any message with a UTF-8 envelope.
- RFC 6533: a notice about a message with a UTF-8 address (sender,
  recipient or ORCPT; so it came with SMTPUTF8) is ``report-type=global-delivery-status``
  (RFC 6522: the subtype of its second part): the fields are
  ``message/global-delivery-status``, a UTF-8 address written as it is
  (``utf-8; ünïcode@…``), and the original comes back as
  ``message/global-headers`` (or ``message/global`` for RET=FULL) when it is
  UTF-8.  RFC 6532
  3.5 lets these parts be encoded, so they are quoted-printable when not
  ASCII and the notice stays 7-bit.  ASCII-only messages keep RFC 3464's
  ``message/delivery-status`` and ``text/rfc822-headers``.
"""

from __future__ import annotations

import binascii
import email.utils
import re
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser

from relaywatch.classify.retry import RetryDecision
from relaywatch.dsn_params import NO_RECIPIENT_DSN
from relaywatch.idn import address_to_unicode
from relaywatch.model import (Entry, Failure, NewMessage, RecipientOutcome, RecipientStatus, Route, RouteKind,
                              StoredBody, iso)

# RET=FULL returns at most this much of the original (Postfix's bounce_size_limit is 50 kB);
# a bigger one, or one with 8-bit content (a notice is 7-bit), returns its headers.
FULL_RETURN_LIMIT = 64 * 1024


@dataclass(frozen=True)
class ReportedRecipient:
    address: str
    status: RecipientStatus        # FAILED (permanent) or EXPIRED; DEFERRED (delay); DELIVERED (success)
    failure: Failure | None
    orcpt: str | None = None       # ORCPT as given (RFC 3461): the report's Original-Recipient
    reply: str | None = None       # DELIVERED: the destination's reply


# cte_type="7bit": text with other characters goes quoted-printable or base64.
_SMTP_POLICY = policy.SMTP.clone(max_line_length=998, cte_type="7bit")
# RFC 6532: a UTF-8 sender's notice is itself an SMTPUTF8 message, with UTF-8 headers
# (an address's local part has no RFC 2047 form).
_SMTPUTF8_POLICY = _SMTP_POLICY.clone(utf8=True)
_NOT_ASCII_PRINTABLE = re.compile(r"[^\x20-\x7e]")
_NOT_QCHAR = re.compile(r"[^\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e]")   # RFC 6533 3: utf-8-addr-xtext
_NOT_7BIT_TEXT = re.compile(rb"[^\t\x20-\x7e]")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]+")
_MESSAGE_ID = re.compile(r"<[!-;=?-~]{1,250}>")    # printable ASCII, no space, no inner < or >


def _when(ts: float | None) -> str:
    return (iso(ts) or "?").replace("T", " ").replace("Z", " UTC")


def _field(value: str) -> str:
    """A delivery-status field value: printable ASCII only (RFC 3464 §2.1.1),
    other characters as ``\\x{HEX}`` (RFC 6533 §3), no line breaks."""
    return _NOT_ASCII_PRINTABLE.sub(lambda m: f"\\x{{{ord(m.group()):X}}}", value)


def _recipient_field(address: str, international: bool = False) -> str:
    """Final-Recipient: ``rfc822; a@b``, or for a UTF-8 address ``utf-8;`` with the address
    as it is in message/global-delivery-status (RFC 6533 3: utf-8-address), as
    utf-8-addr-xtext elsewhere (``\\x{HEX}`` for each character outside QCHAR)."""
    if address.isascii():
        return _field(f"rfc822; {address}")
    if international:
        return "utf-8; " + _CONTROLS.sub("", address)
    return "utf-8; " + _NOT_QCHAR.sub(lambda m: f"\\x{{{ord(m.group()):X}}}", address)


def is_international(sender: str, recipients: list["ReportedRecipient"]) -> bool:
    """A notice RFC 6533 is for: about a message with a UTF-8 address (sender, recipient,
    ORCPT), which came with SMTPUTF8 (RFC 6531 3.4).  Raw 8-bit headers under an ASCII
    envelope are 8BITMIME content, not RFC 6532's (that needs SMTPUTF8; the envelope
    is all the queue keeps of it): their notice stays RFC 3464's, headers quoted-printable."""
    return not sender.isascii() or any(not r.address.isascii() or not (r.orcpt or "").isascii()
                                       for r in recipients)


def _global_part(content_type: str, description: str, data: bytes) -> Message:
    """A message/global* part: its UTF-8 as it is when ASCII, else quoted-printable line by
    line (RFC 6532 3.5 allows it), so decoding gives back exactly ``data``."""
    part = Message()
    part["Content-Type"] = content_type
    part["Content-Description"] = description
    lines = data.replace(b"\r\n", b"\n").split(b"\n")
    while lines and not lines[-1]:
        lines.pop()
    if data.isascii() and all(len(line) <= 998 for line in lines):
        part.set_payload("\n".join(line.decode("ascii") for line in lines) + "\n")
    else:
        part["Content-Transfer-Encoding"] = "quoted-printable"
        part.set_payload("\n".join(binascii.b2a_qp(line, istext=False).decode("ascii") for line in lines) + "\n")
    return part


def _text(value: str) -> str:
    """Text from parsed headers, with any undecodable byte (a lone surrogate) as U+FFFD."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def headers_part(original_headers: bytes) -> Message:
    """The original's header section as ``text/rfc822-headers``, octet for octet:
    7-bit as it is, otherwise quoted-printable (see the module docstring)."""
    lines = original_headers.replace(b"\r\n", b"\n").split(b"\n")
    while lines and not lines[-1]:
        lines.pop()
    part = Message()
    part["Content-Type"] = "text/rfc822-headers"
    part["Content-Description"] = "Headers of the message"
    plain = all(len(line) <= 998 and not _NOT_7BIT_TEXT.search(line) for line in lines)
    if plain:
        part.set_payload("\n".join(line.decode("ascii") for line in lines) + "\n")
    else:
        part["Content-Transfer-Encoding"] = "quoted-printable"
        part.set_payload("\n".join(binascii.b2a_qp(line, istext=False).decode("ascii")
                                   for line in lines) + "\n")
    return part



def _status(r: ReportedRecipient) -> str:
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


def returned_part(original: bytes, ret: str | None, international: bool = False) -> Message:
    """What a notice returns of the original: all of it for RET=FULL when it fits
    (7-bit, lines of at most 998 octets, ``FULL_RETURN_LIMIT``), else its header section;
    for an ``international`` notice message/global (UTF-8 allowed) and message/global-headers."""
    if international:
        if ret == "FULL" and len(original) <= FULL_RETURN_LIMIT and _is_utf8(original):
            return _global_part("message/global", "The message", original)
        head = header_block(original)
        return _global_part("message/global-headers", "Headers of the message", head) if _is_utf8(head) else \
            headers_part(head)
    if ret == "FULL" and len(original) <= FULL_RETURN_LIMIT:
        lines = original.split(b"\r\n")
        if all(len(line) <= 998 and not _NOT_7BIT_TEXT.search(line) for line in lines):
            part = Message()
            part["Content-Type"] = "message/rfc822"
            part["Content-Description"] = "The message"
            # A string payload is written as it is: the original goes back octet for octet.
            part.set_payload(original.decode("ascii") if original.endswith(b"\r\n") else
                             original.decode("ascii") + "\r\n")
            return part
    return headers_part(header_block(original))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _report(*, subject_prefix: str, fallback_subject: str, text: str, action: str,
            reporting_mta: str, original_sender: str, original_headers: bytes, original_message_id: str,
            received_at: float, recipients: list[ReportedRecipient], now: float,
            status_of, extra_fields, envid: str | None = None, returned: Message | None = None) -> bytes:
    """The multipart/report every kind of notice shares (RFC 3464, recipe in shared/STACK.md §6)."""
    original = BytesHeaderParser(policy=policy.default).parsebytes(original_headers)
    subject = _CONTROLS.sub(" ", _text(str(original.get("Subject", "") or ""))).strip()
    msg = EmailMessage(policy=_SMTP_POLICY)
    msg["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    msg["To"] = original_sender
    msg["Subject"] = (subject_prefix + subject) if subject else fallback_subject
    msg["Date"] = email.utils.formatdate(now)
    msg["Message-ID"] = email.utils.make_msgid(domain=reporting_mta)
    msg["Auto-Submitted"] = "auto-replied"
    if _MESSAGE_ID.fullmatch(original_message_id):   # anything else would not thread anyway
        msg["In-Reply-To"] = original_message_id
        msg["References"] = original_message_id
    msg.set_content(_text(text))
    msg.make_mixed()
    msg.set_type("multipart/report")
    international = is_international(original_sender, recipients)
    msg.set_param("report-type", "global-delivery-status" if international else "delivery-status")

    per_message = Message()
    if envid:
        per_message["Original-Envelope-Id"] = _field(envid)
    per_message["Reporting-MTA"] = _field(f"dns; {reporting_mta}")
    per_message["Arrival-Date"] = email.utils.formatdate(received_at)
    blocks = [per_message]
    for r in recipients:
        block = Message()
        if r.orcpt:
            block["Original-Recipient"] = _field(r.orcpt)
        block["Final-Recipient"] = _recipient_field(r.address, international)
        block["Action"] = action
        block["Status"] = _field(status_of(r))
        if r.failure is not None and r.failure.destination is not None and r.failure.destination.host:
            block["Remote-MTA"] = _field(f"dns; {r.failure.destination.host}")
        if r.status is not RecipientStatus.DELIVERED or r.reply:
            block["Diagnostic-Code"] = _field(f"smtp; {r.reply}" if r.reply else _diagnostic(r.failure))
        for name, value in extra_fields(r).items():
            block[name] = _field(value)
        blocks.append(block)
    if international:
        fields = "\r\n".join("".join(f"{k}: {v}\r\n" for k, v in b.items()) for b in blocks)
        msg.attach(_global_part("message/global-delivery-status", "Delivery report", fields.encode()))
        msg.attach(returned if returned is not None else returned_part(original_headers, None, True))
        return msg.as_bytes(policy=_SMTP_POLICY if original_sender.isascii() else _SMTPUTF8_POLICY)
    status_part = Message()
    status_part["Content-Type"] = "message/delivery-status"
    status_part.set_payload(blocks)
    msg.attach(status_part)

    msg.attach(returned if returned is not None else headers_part(original_headers))
    return msg.as_bytes(policy=_SMTP_POLICY if original_sender.isascii() else _SMTPUTF8_POLICY)


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
             f"Sent: {_when(received_at)}" + (f"    Message-ID: {_field(original_message_id)}"
                                              if original_message_id else ""),
             "",
             "If the address is right, try again later or reach the recipient another way; if this "
             "keeps happening, forward this report to your mail administrator. The technical "
             "details and the original message's headers are attached.",
             f"-- relaywatch at {reporting_mta}"]
    return _report(
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
    return _report(
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
    return _report(
        subject_prefix="Delivered: ", fallback_subject="Delivery report", text="\n".join(lines) + "\n",
        action="relayed" if relayed else "delivered", reporting_mta=reporting_mta, original_sender=original_sender,
        original_headers=original_headers, original_message_id=original_message_id, received_at=received_at,
        recipients=recipients, now=now, envid=envid, status_of=lambda r: "2.0.0", extra_fields=lambda r: {})


def header_block(head: bytes) -> bytes:
    """The header section of a message (up to the first empty line)."""
    end = head.find(b"\r\n\r\n")
    if end < 0:
        end = head.find(b"\n\n")
    return head[: end + 2] if end >= 0 else head



# -- which notices an attempt calls for, and the notices themselves ------------------------

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
                reporting_mta: str, expiration: float, now: float,
                succeeded: list[RecipientOutcome] = ()) -> Notices:
    """The notices an attempt calls for, ready to queue with the null sender:
    an NDR about ``owed`` (never for a message from <>), a delay notice about
    the decision's delayed recipients that want one when ``delay`` is due, a
    success notice about ``succeeded`` (``success_owed``).

    ``headers`` is the start of the original (64 KiB are plenty; for RET=FULL
    up to ``FULL_RETURN_LIMIT`` + 1 octets), or why it could not be read;
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
            returned=returned_part(head, entry.dsn.ret, is_international(entry.sender, owed))
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
