"""The client side of SMTP without I/O: reply parsing, commands, dot-stuffing.

Bytes in, replies out; commands in, bytes out.  The driver in
deliver/transport.py owns the socket, the phases and the timeouts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relaywatch.dsn_params import MessageDsn, RecipientDsn, mail_params, rcpt_params
from relaywatch.errors import RemoteProtocolError
from relaywatch.idn import address_to_unicode
from relaywatch.mime import dot_line

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")
MAX_REPLY_LINES = 100

__all__ = ["DotStuffer", "RemoteProtocolError", "Reply", "ReplyReader", "mail_from", "parse_ehlo", "rcpt_to"]


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def enhanced(self) -> str | None:
        m = _ENHANCED.match(self.lines[0]) if self.lines else None
        if m and m.group(1) == str(self.code)[0]:
            return f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
        return None

    @property
    def text(self) -> str:
        """The reply text without the enhanced code, lines joined."""
        enhanced = self.enhanced
        first = self.lines[0][len(enhanced):].lstrip() if enhanced and self.lines else (self.lines[0] if self.lines else "")
        return " ".join([first, *self.lines[1:]]).strip()

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 400

    def __str__(self) -> str:
        return " ".join(filter(None, (str(self.code), self.enhanced, self.text)))


class ReplyReader:
    """Feeds reply lines (CRLF stripped) and yields complete replies."""

    def __init__(self) -> None:
        self._code: int | None = None
        self._lines: list[str] = []

    def feed_line(self, raw: bytes) -> Reply | None:
        line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
        if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3] not in " -"):
            raise RemoteProtocolError(f"not an SMTP reply: {line[:60]!r}")
        code = int(line[:3])
        if not 200 <= code <= 599:
            raise RemoteProtocolError(f"reply code out of range: {code}")
        if self._code is not None and code != self._code:
            raise RemoteProtocolError(f"reply code changed inside a multi-line reply: {line[:60]!r}")
        self._code = code
        self._lines.append(line[4:])
        if len(self._lines) > MAX_REPLY_LINES:
            raise RemoteProtocolError("multi-line reply too long")
        if len(line) > 3 and line[3] == "-":
            return None
        reply = Reply(code, tuple(self._lines))
        self._code, self._lines = None, []
        return reply


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) -> their parameters."""
    caps = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            caps[keyword.upper()] = params
    return caps


def _address(addr: str, utf8: bool = False) -> str:
    """``<addr>``; with ``utf8`` (an SMTPUTF8 transaction) its domain as U-labels, the form
    the sender wrote (RFC 6531 3.2 allows either; the recipient's server sees what people see)."""
    if any(c in addr for c in "\r\n<>") or len(addr) > 512:
        raise ValueError(f"refusing to send an unsafe address: {addr!r}")
    if not utf8 and not addr.isascii():
        raise ValueError(f"refusing to send a non-ASCII address without SMTPUTF8: {addr!r}")
    return f"<{address_to_unicode(addr) if utf8 else addr}>"


def mail_from(sender: str, size: int | None = None, eight_bit: bool = False, smtputf8: bool = False,
              dsn: MessageDsn | None = None) -> bytes:
    """``dsn``: RET and ENVID, for a server that offers DSN (None: leave them out)."""
    cmd = f"MAIL FROM:{_address(sender, smtputf8)}"
    if size is not None:
        cmd += f" SIZE={size}"
    if eight_bit:
        cmd += " BODY=8BITMIME"
    if smtputf8:
        cmd += " SMTPUTF8"
    if dsn is not None:
        cmd += mail_params(dsn)
    return cmd.encode("utf-8") + b"\r\n"


def rcpt_to(recipient: str, smtputf8: bool = False, dsn: RecipientDsn | None = None) -> bytes:
    """``dsn``: NOTIFY and ORCPT, for a server that offers DSN (None: leave them out)."""
    params = rcpt_params(dsn) if dsn is not None else ""
    return f"RCPT TO:{_address(recipient, smtputf8)}{params}".encode("utf-8") + b"\r\n"


class DotStuffer:
    """Transparency (RFC 5321 4.5.2) over a body streamed in chunks."""

    def __init__(self) -> None:
        self._tail = b"\r\n"   # the body starts at the beginning of a line

    def stuff(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        if chunk[:1] == b"." and self._tail.endswith(b"\r\n"):
            chunk = b"." + chunk
        elif chunk[:2] == b"\n." and self._tail.endswith(b"\r"):
            chunk = b"\n." + chunk[1:]
        out = chunk if dot_line(chunk) < 0 else chunk.replace(b"\r\n.", b"\r\n..")
        self._tail = (self._tail + chunk[-2:])[-2:]    # not a copy of the whole chunk
        return out

    def end(self) -> bytes:
        return b".\r\n" if self._tail.endswith(b"\r\n") else b"\r\n.\r\n"
