"""What the receiver adds to a message and reads from it before it is queued.

Pure: the ``Received:`` header written first into the spool (RFC 5321 4.4,
with RFC 3848's protocol names) and the ``Message-ID`` read back from the
first block of the header section for the mail log.
"""

from __future__ import annotations

import email.utils
import functools
import re

from relaywatch.receive.conversation import Conversation

# How much of the start of a message is kept to find its Message-ID: the header
# section normally ends well before this; a message whose does not is logged without one.
HEADER_SCAN_LIMIT = 64 * 1024
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*?)\s*$", re.I | re.M)


def received_header(conv: Conversation, client_ip: str, hostname: str, now: float) -> bytes:
    # RFC 3848: ESMTPA/ESMTPSA once the client authenticated; who it was, as Postfix writes it.
    proto = "ESMTPS" if conv.tls_active else ("ESMTP" if conv.esmtp else "SMTP")
    if conv.user is not None:
        proto = "ESMTPSA" if conv.tls_active else "ESMTPA"
    if conv.smtputf8:
        proto = "UTF8" + proto[1:]    # RFC 6531 4.3: UTF8SMTP, UTF8SMTPS, UTF8SMTPA, UTF8SMTPSA
    who = f"\r\n\t(Authenticated sender: {conv.user})" if conv.user is not None else ""
    rcpt = f"\r\n\tfor <{conv.recipients[0][0]}>" if len(conv.recipients) == 1 else ""
    stamp = _date(int(now))
    return (f"Received: from {conv.helo or 'unknown'} ([{client_ip}]){who}\r\n\tby {hostname} (relaywatch) "
            f"with {proto}{rcpt}; {stamp}\r\n").encode("utf-8" if conv.smtputf8 else "ascii", "replace")


@functools.lru_cache(maxsize=4)
def _date(second: int) -> str:
    """RFC 5322's date of a second, made once per second (formatdate was 4% of the receiver)."""
    return email.utils.formatdate(second, localtime=False)


def message_id(header_block: bytes) -> str:
    """The Message-ID field's value in the start of a message ("" when it has none there)."""
    # Only the header section: the first block read may run into the body.
    headers = (b"\r\n" + header_block).split(b"\r\n\r\n", 1)[0]
    match = _MESSAGE_ID.search(headers)
    return match.group(1).decode("ascii", "replace") if match else ""
