"""The multipart/report a notice is (RFC 3464 ``report-type=delivery-status``, RFC 6533
``global-delivery-status``): the machine-readable fields and what comes back of the original.

Pure: the facts in, the message bytes out; notify/dsn.py writes the human-readable text of
each kind of notice and hands it here.

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
- what an NDR returns follows the sender's RET (RFC 3461): RET=FULL the whole
  message as ``message/rfc822`` when it is 7-bit and at most
  ``queue.ndr_return_limit`` octets, else the headers; RET=HDRS and no RET the
  headers.  ENVID and ORCPT come back as ``Original-Envelope-Id`` and
  ``Original-Recipient``.
- SMTPUTF8: a notice to a UTF-8 sender has UTF-8 headers (RFC 6532: ``To:``
  keeps the address as it is) and goes out with SMTPUTF8 like any message
  with a UTF-8 envelope.
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

from relaywatch.model import Failure, RecipientStatus

# RET=FULL returns at most ``limit`` octets of the original: queue.ndr_return_limit, 64 KiB by
# default (Postfix's bounce_size_limit is 50 kB); a bigger one, or one with 8-bit content (a
# notice is 7-bit), returns its headers.


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


def field_value(value: str) -> str:
    """A delivery-status field value: printable ASCII only (RFC 3464 §2.1.1),
    other characters as ``\\x{HEX}`` (RFC 6533 §3), no line breaks."""
    return _NOT_ASCII_PRINTABLE.sub(lambda m: f"\\x{{{ord(m.group()):X}}}", value)


def _recipient_field(address: str, international: bool = False) -> str:
    """Final-Recipient: ``rfc822; a@b``, or for a UTF-8 address ``utf-8;`` with the address
    as it is in message/global-delivery-status (RFC 6533 3: utf-8-address), as
    utf-8-addr-xtext elsewhere (``\\x{HEX}`` for each character outside QCHAR)."""
    if address.isascii():
        return field_value(f"rfc822; {address}")
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


def _diagnostic(f: Failure | None) -> str:
    if f is None:
        return "smtp; 450 4.4.7 Message expired before it could be tried"
    if f.reply:
        return f"smtp; {f.reply}"
    return f"smtp; {f.smtp_code} {f.code} {f.title}: {f.detail}"


def returned_part(original: bytes, ret: str | None, international: bool = False, *, limit: int) -> Message:
    """What a notice returns of the original: all of it for RET=FULL when it fits
    (7-bit, lines of at most 998 octets, ``limit`` octets: queue.ndr_return_limit), else its
    header section; for an ``international`` notice message/global (UTF-8 allowed) and
    message/global-headers."""
    if international:
        if ret == "FULL" and len(original) <= limit and _is_utf8(original):
            return _global_part("message/global", "The message", original)
        head = header_block(original)
        return _global_part("message/global-headers", "Headers of the message", head) if _is_utf8(head) else \
            headers_part(head)
    if ret == "FULL" and len(original) <= limit:
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


def build_report(*, subject_prefix: str, fallback_subject: str, text: str, action: str,
                 reporting_mta: str, original_sender: str, original_headers: bytes, original_message_id: str,
                 received_at: float, recipients: list[ReportedRecipient], now: float,
                 status_of, extra_fields, envid: str | None = None, returned: Message | None = None) -> bytes:
    """The multipart/report every kind of notice shares (RFC 3464, recipe in shared/STACK.md §6):
    ``text`` its human-readable part, ``action``, ``status_of(r)`` and ``extra_fields(r)`` the
    per-recipient fields of the notice's kind."""
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
        per_message["Original-Envelope-Id"] = field_value(envid)
    per_message["Reporting-MTA"] = field_value(f"dns; {reporting_mta}")
    per_message["Arrival-Date"] = email.utils.formatdate(received_at)
    blocks = [per_message]
    for r in recipients:
        block = Message()
        if r.orcpt:
            block["Original-Recipient"] = field_value(r.orcpt)
        block["Final-Recipient"] = _recipient_field(r.address, international)
        block["Action"] = action
        block["Status"] = field_value(status_of(r))
        if r.failure is not None and r.failure.destination is not None and r.failure.destination.host:
            block["Remote-MTA"] = field_value(f"dns; {r.failure.destination.host}")
        if r.status is not RecipientStatus.DELIVERED or r.reply:
            block["Diagnostic-Code"] = field_value(f"smtp; {r.reply}" if r.reply else _diagnostic(r.failure))
        for name, value in extra_fields(r).items():
            block[name] = field_value(value)
        blocks.append(block)
    if international:
        fields = "\r\n".join("".join(f"{k}: {v}\r\n" for k, v in b.items()) for b in blocks)
        msg.attach(_global_part("message/global-delivery-status", "Delivery report", fields.encode()))
        msg.attach(returned if returned is not None else returned_part(original_headers, None, True, limit=0))
        return msg.as_bytes(policy=_SMTP_POLICY if original_sender.isascii() else _SMTPUTF8_POLICY)
    status_part = Message()
    status_part["Content-Type"] = "message/delivery-status"
    status_part.set_payload(blocks)
    msg.attach(status_part)

    msg.attach(returned if returned is not None else headers_part(original_headers))
    return msg.as_bytes(policy=_SMTP_POLICY if original_sender.isascii() else _SMTPUTF8_POLICY)


def header_block(head: bytes) -> bytes:
    """The header section of a message (up to the first empty line)."""
    end = head.find(b"\r\n\r\n")
    if end < 0:
        end = head.find(b"\n\n")
    return head[: end + 2] if end >= 0 else head
