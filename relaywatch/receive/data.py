"""The DATA phase without I/O: bytes in, message content out, in big blocks.

Reading DATA one line at a time (as aiosmtpd does) costs hundreds of
Python-level reads for a 50 KB message.  This parser takes whatever the socket delivered and
works on whole blocks of complete lines with bytes methods:

- the end is the line ``.`` (found as ``CRLF . CRLF``; the data starts at a
  line start), and what follows it (pipelined commands) is handed back;
- a CR or LF that is not part of a CRLF is refused (SMTP smuggling: another
  server could take a bare-LF dot as the end and see a second message);
- dot-stuffing is undone (RFC 5321 4.5.2);
- the size limit is enforced while reading (the answer comes after the end).
"""

from __future__ import annotations

# A line still without its CRLF after this many bytes is refused (RFC 5321
# allows 1000 octets; we are lenient, as Postfix is, but not unbounded).
MAX_LINE = 64 * 1024

BARE_CR_LF = "554 5.6.11 Bare CR or LF in message; lines must end with CRLF"
LINE_TOO_LONG = "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6 allows 1000 octets)"


class DataParser:
    def __init__(self, size_limit: int | None):
        self.size_limit = size_limit
        self.size = 0
        self.done = False
        self.problem: str | None = None   # the reply to give once the end has been read
        self.leftover = b""               # bytes after the end: the client's next commands
        self._pending = b""               # an incomplete last line

    def feed(self, data: bytes) -> bytes:
        """Feed received bytes; return content to keep (possibly empty)."""
        buf = self._pending + data if self._pending else data
        cut = buf.rfind(b"\r\n")
        if cut < 0:
            if len(buf) > MAX_LINE:
                self.problem = self.problem or LINE_TOO_LONG
                buf = buf[-1:]     # a CR here may be half of the next CRLF
            self._pending = buf
            return b""
        # A block of whole lines: it starts at a line start, as the data does.
        block, self._pending = buf[:cut + 2], buf[cut + 2:]
        end = 0 if block.startswith(b".\r\n") else block.find(b"\r\n.\r\n")
        if end >= 0:
            if end > 0:
                end += 2          # the end line starts after that CRLF
            self.done = True
            self.leftover = block[end + 3:] + self._pending
            self._pending = b""
            block = block[:end]
        if self.problem:
            return b""
        crlf = block.count(b"\r\n")
        if block.count(b"\n") != crlf or block.count(b"\r") != crlf:
            self.problem = BARE_CR_LF
            return b""
        content = block.replace(b"\r\n.", b"\r\n")
        if content[:1] == b".":   # a stuffed dot on the block's first line
            content = content[1:]
        self.size += len(content)
        if self.size_limit and self.size > self.size_limit:
            self.problem = f"552 5.3.4 Message too big (the limit is {self.size_limit} bytes)"
            return b""
        return content
