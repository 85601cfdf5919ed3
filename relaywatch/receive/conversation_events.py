"""What the receiving conversation (receive/conversation.py) hands its caller.

Frozen events named for what happened, and ``NEED_DATA`` when nothing has yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from relaywatch.dsn_params import NO_MESSAGE_DSN, NO_RECIPIENT_DSN, MessageDsn, RecipientDsn
from relaywatch.sentinel import Sentinel


@dataclass(frozen=True)
class Reply:
    text: str            # one or more lines joined with CRLF, without the last CRLF
    close: bool = False


@dataclass(frozen=True)
class Recipient:
    address: str
    source_route: str = ""    # "@a,@b" from <@a,@b:user@domain>: the client asks us to route through them
    dsn: RecipientDsn = NO_RECIPIENT_DSN     # NOTIFY, ORCPT (RFC 3461)


@dataclass(frozen=True)
class StartTls:
    pass


@dataclass(frozen=True)
class Authenticate:
    mechanism: str       # "PLAIN" or "LOGIN"
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class MessageStart:
    pass


@dataclass(frozen=True)
class BodyData:
    data: bytes


@dataclass(frozen=True)
class MessageEnd:
    problem: str | None
    sender: str                               # "" for the null sender <>
    recipients: tuple[tuple[str, Any], ...]   # (address, what accept_recipient was given)
    user: str | None = None                   # the authenticated user who sent it
    smtputf8: bool = False                    # MAIL FROM had SMTPUTF8 (RFC 6531)
    helo: str | None = None                   # the name given in HELO/EHLO (kept for the message trace)
    dsn: MessageDsn = NO_MESSAGE_DSN          # RET, ENVID (RFC 3461)
    recipient_dsn: tuple[RecipientDsn, ...] = ()   # NOTIFY, ORCPT of each recipient, in order; () if none had any


NEED_DATA = Sentinel("NEED_DATA")   # nothing more until receive() is given more bytes
