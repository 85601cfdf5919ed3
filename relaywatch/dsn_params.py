"""The DSN extension's envelope parameters (RFC 3461): parsed, checked, written.

A client asks for delivery status notifications with ``RET`` and ``ENVID`` on
MAIL FROM and ``NOTIFY`` and ``ORCPT`` on RCPT TO.  The receiving
conversation parses them here (``parse_mail``, ``parse_rcpt``: a precise reply
for a bad value), the store keeps them as text (``MessageDsn``,
``RecipientDsn`` and their ``stored`` forms), the SMTP client hands them on to
a destination that offers DSN (``mail_params``, ``rcpt_params``), and the
notices follow them (``RecipientDsn.wants``).

ENVID and ORCPT are *xtext* on the wire (RFC 3461 4): printable ASCII but
``+`` and ``=``, any other octet ``+XX`` with two upper-case hex digits.  They
are kept decoded, the way they go into a report's ``Original-Envelope-Id`` and
``Original-Recipient`` fields, and encoded again when passed on.  Decoded they
must be printable ASCII (RFC 3461 4.2, 4.4: the report format allows nothing
else), so a value can never break a report's fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 3461 4.4 and 4.2: the longest ENVID and ORCPT values (xtext, as sent).
MAX_ENVID = 100
MAX_ORCPT = 500
NOTIFY_KINDS = ("SUCCESS", "FAILURE", "DELAY")     # the stored order
RET_VALUES = ("FULL", "HDRS")
MAIL_PARAMS = {"RET", "ENVID"}
RCPT_PARAMS = {"NOTIFY", "ORCPT"}

_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")     # xchar (33..126 but + and =) or hexchar
_HEX = re.compile(r"\+([0-9A-F]{2})")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")      # an atom (RFC 3461 4.2)


class ParameterError(ValueError):
    """A MAIL or RCPT parameter the client got wrong; ``reply`` is what to answer."""

    def __init__(self, reply: str):
        super().__init__(reply)
        self.reply = reply


@dataclass(frozen=True)
class MessageDsn:
    """MAIL FROM's DSN parameters; None: not given."""
    ret: str | None = None          # FULL or HDRS: what a failure notice returns
    envid: str | None = None        # decoded

    def __bool__(self) -> bool:
        return self.ret is not None or self.envid is not None


@dataclass(frozen=True)
class RecipientDsn:
    """RCPT TO's DSN parameters; None: not given."""
    notify: tuple[str, ...] | None = None   # ("NEVER",) or some of NOTIFY_KINDS in that order
    orcpt: str | None = None                # "addr-type;address", the address decoded

    def __bool__(self) -> bool:
        return self.notify is not None or self.orcpt is not None

    def wants(self, kind: str) -> bool:
        """Whether the sender asked for a notice of ``kind`` (SUCCESS, FAILURE, DELAY).

        Without NOTIFY it is what relaywatch always did: failures and delays,
        never success (RFC 3461 4.1 leaves the default to the MTA)."""
        if self.notify is None:
            return kind != "SUCCESS"
        return kind in self.notify

    @property
    def stored_notify(self) -> str | None:
        return ",".join(self.notify) if self.notify is not None else None

    @classmethod
    def from_stored(cls, notify: str | None, orcpt: str | None) -> "RecipientDsn":
        """What the store kept; tolerant of values another version may write."""
        kinds = tuple(k for k in (notify or "").upper().split(",") if k in (*NOTIFY_KINDS, "NEVER"))
        return cls(kinds if notify is not None else None, orcpt or None)


NO_MESSAGE_DSN = MessageDsn()
NO_RECIPIENT_DSN = RecipientDsn()


def xtext_decode(value: str, name: str) -> str:
    if not _XTEXT.fullmatch(value):
        raise ParameterError(f"501 5.5.4 {name} is not valid xtext (printable ASCII; '+' only as +XX with "
                            f"two upper-case hex digits; no '=')")
    decoded = _HEX.sub(lambda m: chr(int(m.group(1), 16)), value)
    if not _PRINTABLE.fullmatch(decoded):
        raise ParameterError(f"501 5.5.4 {name} must decode to printable ASCII")
    return decoded


def xtext_encode(value: str) -> str:
    return "".join(c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}" for c in value)


def parse_mail(params: dict[str, str]) -> MessageDsn:
    """RET and ENVID of MAIL FROM (the other parameters are the caller's)."""
    ret = params.get("RET")
    if ret is not None:
        ret = ret.upper()
        if ret not in RET_VALUES:
            raise ParameterError("501 5.5.4 RET must be FULL or HDRS")
    envid = params.get("ENVID")
    if envid is not None:
        if not envid:
            raise ParameterError("501 5.5.4 ENVID needs a value")
        if len(envid) > MAX_ENVID:
            raise ParameterError(f"501 5.5.4 ENVID is longer than {MAX_ENVID} characters")
        envid = xtext_decode(envid, "ENVID")
    return MessageDsn(ret, envid)


def parse_rcpt(params: dict[str, str]) -> RecipientDsn:
    """NOTIFY and ORCPT of RCPT TO."""
    notify = params.get("NOTIFY")
    kinds = None
    if notify is not None:
        words = notify.upper().split(",")
        if words == ["NEVER"]:
            kinds = ("NEVER",)
        elif "NEVER" in words:
            raise ParameterError("501 5.5.4 NOTIFY=NEVER cannot be combined with other values")
        else:
            unknown = [w for w in words if w not in NOTIFY_KINDS]
            if unknown:
                raise ParameterError("501 5.5.4 NOTIFY takes NEVER, or a list of SUCCESS, FAILURE and DELAY")
            if len(set(words)) != len(words):
                raise ParameterError("501 5.5.4 NOTIFY names a value twice")
            kinds = tuple(k for k in NOTIFY_KINDS if k in words)
    orcpt = params.get("ORCPT")
    if orcpt is not None:
        if len(orcpt) > MAX_ORCPT:
            raise ParameterError(f"501 5.5.4 ORCPT is longer than {MAX_ORCPT} characters")
        addr_type, semi, address = orcpt.partition(";")
        if not semi or not _ADDR_TYPE.fullmatch(addr_type) or not address:
            raise ParameterError("501 5.5.4 ORCPT must be addr-type;address (rfc822;user@example.com)")
        if addr_type.lower() == "rfc822":
            addr_type = "rfc822"
        orcpt = f"{addr_type};{xtext_decode(address, 'ORCPT')}"
    return RecipientDsn(kinds, orcpt)


def mail_params(dsn: MessageDsn) -> str:
    """`` RET=.. ENVID=..`` for MAIL FROM to a server that offers DSN ("" for none)."""
    out = f" RET={dsn.ret}" if dsn.ret else ""
    return out + (f" ENVID={xtext_encode(dsn.envid)}" if dsn.envid else "")


def rcpt_params(dsn: RecipientDsn) -> str:
    """`` NOTIFY=.. ORCPT=..`` for RCPT TO to a server that offers DSN."""
    out = f" NOTIFY={','.join(dsn.notify)}" if dsn.notify else ""
    if dsn.orcpt:
        addr_type, _, address = dsn.orcpt.partition(";")
        out += f" ORCPT={addr_type};{xtext_encode(address)}"
    return out
