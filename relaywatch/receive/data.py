"""The DATA phase without I/O: bytes in, message content out, in big blocks.

Reading DATA one line at a time (as aiosmtpd does) costs hundreds of
Python-level reads for a 50 KB message.  This parser takes whatever the socket delivered and
works on whole blocks of complete lines with bytes methods:

- the end is the line ``.`` (found as ``CRLF . CRLF``; the data starts at a
  line start), and what follows it (pipelined commands) is handed back;
- a CR or LF that is not part of a CRLF is refused (SMTP smuggling: another
  server could take a bare-LF dot as the end and see a second message), and
  so is a NUL (a server that drops NULs reads the line NUL-dot as the end);
- dot-stuffing is undone (RFC 5321 4.5.2);
- the size limit is enforced while reading (the answer comes after the end).
"""

from __future__ import annotations

from relaywatch.mime import dot_line

# A line still without its CRLF after this many bytes is passed on in pieces:
# lines of any length are accepted, bounded only by the message size (RFC
# 5321 allows 1000 octets; Postfix accepts longer ones too and breaks them
# when it sends, as relaywatch/mime.py does).  Holding the whole line
# instead would copy it again for every chunk that arrives.
LINE_PIECE = 64 * 1024

BARE_CR_LF = "554 5.6.11 Bare CR or LF in message; lines must end with CRLF"
NUL = "554 5.6.0 NUL character in message"


class DataParser:
    def __init__(self, size_limit: int | None):
        self.size_limit = size_limit
        self.size = 0
        self.done = False
        self.problem: str | None = None   # the reply to give once the end has been read
        self.leftover = b""               # bytes after the end: the client's next commands
        self._pending = b""               # an incomplete last line
        self._line_start = True           # ``_pending`` starts at the start of a line

    def feed(self, data: bytes) -> bytes:
        """Feed received bytes; return content to keep (possibly empty)."""
        buf = self._pending + data if self._pending else data
        cut = buf.rfind(b"\r\n")
        if cut < 0:
            if len(buf) <= LINE_PIECE:
                self._pending = buf
                return b""
            # A long line: pass on all of it but the last byte (a CR there may
            # be half of the CRLF that ends it).
            piece, self._pending = buf[:-1], buf[-1:]
            at_start, self._line_start = self._line_start, False
            if b"\r" in piece or b"\n" in piece:
                self.problem = self.problem or BARE_CR_LF
            if b"\0" in piece:
                self.problem = self.problem or NUL
            if at_start and piece[:1] == b".":
                piece = piece[1:]        # a stuffed dot; the line is too long to be the end
            return self._keep(piece)
        # A block of whole lines, whose first one may be the rest of a long line.
        block, self._pending = buf[:cut + 2], buf[cut + 2:]
        at_start, self._line_start = self._line_start, True
        # The end line and stuffed lines both start with a dot: one look finds the
        # first such line (most blocks have none, most messages none but the end),
        # instead of a pass for the end and another to unstuff (each ~30-50 us for
        # 50 KB; mime.dot_line).
        if at_start and block[:1] == b".":
            dot = 0
        else:
            dot = dot_line(block)
            dot = dot + 2 if dot >= 0 else -1
        end, stuffed = -1, False
        if dot >= 0:
            if block.startswith(b".\r\n", dot):
                end = dot
            else:
                stuffed = True
                end = block.find(b"\r\n.\r\n", dot)
                if end >= 0:
                    end += 2      # the end line starts after that CRLF
        if end >= 0:
            self.done = True
            self.leftover = block[end + 3:] + self._pending
            self._pending = b""
            block = block[:end]
        crlf = block.count(b"\r\n")
        if block.count(b"\n") != crlf or block.count(b"\r") != crlf:
            self.problem = self.problem or BARE_CR_LF
        if b"\0" in block:
            self.problem = self.problem or NUL
        if not stuffed:
            return self._keep(block)
        content = block.replace(b"\r\n.", b"\r\n")
        if at_start and content[:1] == b".":   # a stuffed dot on the block's first line
            content = content[1:]
        return self._keep(content)

    def _keep(self, content: bytes) -> bytes:
        if self.problem:
            return b""
        self.size += len(content)
        if self.size_limit and self.size > self.size_limit:
            self.problem = f"552 5.3.4 Message too big (the limit is {self.size_limit} bytes)"
            return b""
        return content
