"""What the client conversation is given (commands) and what it hands out (events).

Commands go to ``ClientConversation.send()``, which returns their bytes;
events come from ``next_event()``.  All are frozen, slotted dataclasses named
for what they are; ``NEED_DATA`` and ``SEND_BODY`` are sentinels, compared with
``is``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from relaywatch.classify.observation import Phase
from relaywatch.dsn_params import NO_MESSAGE_DSN, MessageDsn, RecipientDsn
from relaywatch.sentinel import Sentinel
from relaywatch.smtpclient.protocol import Reply


NEED_DATA = Sentinel("NEED_DATA")   # nothing decided yet: read from the server, then receive_data()
SEND_BODY = Sentinel("SEND_BODY")   # the server said 354: send the message with Body and END_OF_BODY


# -- commands ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Transaction:
    """MAIL FROM, one RCPT TO per recipient, DATA: pipelined when the server offers it.

    ``size`` is sent as SIZE= when the server offers SIZE; BODY=8BITMIME is
    sent when it offers 8BITMIME.  ``smtputf8``: the envelope has UTF-8 addresses
    (RFC 6531): MAIL carries SMTPUTF8, which the server must offer (the driver
    checks first; sending it anyway is a LocalProtocolError).  ``dsn`` (RET, ENVID) and
    ``recipient_dsn`` (NOTIFY, ORCPT; one per recipient, or () for none) are sent when the
    server offers DSN and left out when it does not (RFC 3461 5.2)."""
    sender: str
    recipients: Sequence[str]
    size: int | None = None
    smtputf8: bool = False
    dsn: MessageDsn = NO_MESSAGE_DSN
    recipient_dsn: Sequence[RecipientDsn] = ()


@dataclass(frozen=True, slots=True)
class Mail:
    """MAIL FROM on its own (a verification or a probe); only SMTPUTF8 as a parameter."""
    sender: str
    smtputf8: bool = False          # a verification of a UTF-8 address (the server must offer it)


@dataclass(frozen=True, slots=True)
class Rcpt:
    """RCPT TO on its own, after an accepted ``Mail``."""
    recipient: str
    smtputf8: bool = False          # after a ``Mail`` with SMTPUTF8: the domain as U-labels


@dataclass(frozen=True, slots=True)
class Rset:
    pass


@dataclass(frozen=True, slots=True)
class Quit:
    pass


@dataclass(frozen=True, slots=True)
class TlsStarted:
    """The driver finished the TLS handshake asked for by ``NeedTls``."""


@dataclass(frozen=True, slots=True)
class Body:
    """A piece of the message after the 354; dot-stuffed on the way out."""
    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfBody:
    """The final dot."""


RSET, QUIT, TLS_STARTED, END_OF_BODY = Rset(), Quit(), TlsStarted(), EndOfBody()


# -- events -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Greeting:
    """The server greeted us with 220 (a refusal is ``Failed``; either way ``greeting`` keeps it)."""
    reply: Reply


@dataclass(frozen=True, slots=True)
class Capabilities:
    """EHLO (or the HELO fallback) was accepted; after STARTTLS it comes again."""
    reply: Reply
    extensions: dict[str, str]       # keyword (upper case) -> parameters; {} after HELO


@dataclass(frozen=True, slots=True)
class NeedTls:
    """The server said 220 to STARTTLS: do the handshake, then send ``TlsStarted``.
    Whatever it sent after the 220 in the clear has been dropped."""


@dataclass(frozen=True, slots=True)
class Ready:
    """The session is open: greeting, EHLO/HELO and TLS as the policy asks are done."""


@dataclass(frozen=True, slots=True)
class TlsNotOffered:
    """TLS is required and the server did not offer STARTTLS: send QUIT and close."""


@dataclass(frozen=True, slots=True)
class Failed:
    """The server refused the session in ``phase`` with ``reply``: send QUIT and close."""
    phase: Phase
    reply: Reply


@dataclass(frozen=True, slots=True)
class TransactionReplies:
    """How a ``Transaction`` ended: after the reply to the final dot, or after
    the RSET that follows a refusal.  ``data`` is the reply to DATA when it was
    refused (``data_phase`` DATA) or to the final dot (AFTER_DATA); None when
    no recipient was accepted."""
    mail: Reply
    rcpts: dict[str, Reply]
    data: Reply | None
    data_phase: Phase | None


@dataclass(frozen=True, slots=True)
class Replied:
    """The reply to a ``Mail``, ``Rcpt`` or ``Rset`` sent on its own."""
    reply: Reply
