"""Make a message fit what the destination accepts: lines of at most 998
octets, and 7-bit content when the destination does not offer 8BITMIME.

relaywatch accepts what clients send (long lines, 8-bit bodies without
``BODY=8BITMIME``) and stores it unchanged; on the way out it changes only
what the destination would otherwise refuse, as Postfix does
(``smtp_line_length_limit = 998``, MIME output conversion, RFC 6152 §3):

- **Header lines** over 998 octets are folded as header continuation:
  ``CRLF`` is inserted before the last space or tab that keeps the line
  within the limit, so unfolding (RFC 5322 §2.2.3) gives back the original
  field exactly.  A line with no such whitespace gets a hard break,
  ``CRLF SP``, which stays a valid continuation line but adds one space to
  the unfolded value (Postfix does the same).  A hard break never splits a
  UTF-8 sequence.
- **Body lines** over 998 octets: a leaf part sent as it is (7bit, 8bit,
  binary or no encoding) is re-encoded, text as quoted-printable and
  anything else as base64, so the decoded content is exactly what the
  client sent: a reader sees the original long line, and a long URL or
  HTML attribute is not cut (Postfix instead inserts a CRLF, which changes
  the text).  A quoted-printable part gets soft line breaks (``=`` CRLF,
  never inside an ``=XX``); a base64 part is re-wrapped at 76 (decoders
  ignore line breaks).  Only where no encoding can be declared (the
  preamble and epilogue of a multipart, a part with an unknown encoding,
  message/partial and message/external-body) is a long line broken with a
  plain CRLF, as Postfix does.
- **8-bit content to a destination without 8BITMIME**: each leaf part with
  8-bit bytes is re-encoded the same way (text/* as quoted-printable,
  anything else as base64), composite parts (multipart/*, message/rfc822)
  are walked down to their leaves, nesting included, and their own
  ``Content-Transfer-Encoding: 8bit`` becomes ``7bit``.  A message without
  ``Content-Type`` is one text leaf; when it is re-encoded it gains
  ``MIME-Version: 1.0`` (if it had none) and, when 8-bit,
  ``Content-Type: text/plain; charset=unknown-8bit`` (RFC 1428: the
  charset is not known, and saying us-ascii would be wrong).  Raw 8-bit
  bytes inside a part declared quoted-printable are escaped as ``=XX``, and
  removed from a part declared base64 (decoders ignore them, RFC 2045
  §6.8): the decoded content is unchanged either way.
- **8-bit bytes in headers** are left as they are.  Quoted-printable cannot
  apply to a header, and RFC 2047 encoded words need the charset, which a
  raw header does not name (UTF-8, Latin-1 and others look alike as bytes);
  an encoded word with a guessed charset would turn a correct name into a
  wrong one for every reader, and address headers cannot be encoded at all.
  Most servers accept such headers; one that does not answers with its own
  reply, which is classified like any other.

Changing a message breaks a DKIM signature the client made over what
changed: any change in the body fails ``bh=``; a folded header changes only
under ``c=simple`` (``relaxed`` unfolds it).  That is why nothing is changed
for a destination that does not need it: a message whose lines all fit,
going to a destination that offers 8BITMIME (or that is 7-bit already),
is returned as the same bytes object.

The check for that common case runs at C speed (``bytes.isascii`` and
``bytes.rfind``); the walk over the MIME structure only runs when something
must change.  Everything here is pure, bytes in and bytes out, and shared by
both sides of the queue: delivery fits each message to its destination
(deliver/downgrade.py, the adapter from a stored body), and DKIM signing fits
a message to the least capable destination before it signs (receive/dkim_sign.py).
"""

from __future__ import annotations

import base64
import binascii
import re

# RFC 5321 4.5.3.1.6: 1000 octets per line including the CRLF.
LINE_LIMIT = 998
_ENCODED_WIDTH = 76        # RFC 2045 6.7 and 6.8: encoded lines of at most 76 characters
_WSP = b" \t"

_FIELD_NAME = re.compile(rb"[!-9;-~]+[ \t]*:")
_TYPE = re.compile(rb"\s*([!#-'*+.0-9A-Za-z^-~-]+)\s*/\s*([!#-'*+.0-9A-Za-z^-~-]+)")
_BOUNDARY = re.compile(rb'(?i);\s*boundary\s*=\s*(?:"((?:[^"\\\r\n]|\\.)*)"|([^\s;"]+))')
_EIGHT_BIT = re.compile(rb"[\x80-\xff]")
_IDENTITY = (b"", b"7bit", b"8bit", b"binary")


# -- the fast check --------------------------------------------------------------------------

def has_long_line(data: bytes, limit: int = LINE_LIMIT, end: int | None = None) -> bool:
    """Whether some line of ``data[:end]`` is longer than ``limit`` octets (not counting its CRLF).

    Jumps from the last line end in each window of ``limit + 2`` bytes to the
    next window, so a 50 KB body costs some fifty ``rfind`` calls at C speed.
    Lines are counted between LFs (stored messages have no bare LF: the
    receiver refuses them)."""
    window = limit + 2
    pos, end = 0, len(data) if end is None else end
    while end - pos > limit:
        last = data.rfind(b"\n", pos, pos + window)
        if last < 0:
            return True
        pos = last + 1
    return False


_DOTS_ONE_BY_ONE = 16    # dots visited one at a time before one substring search does the rest


def dot_line(data: bytes, start: int = 0) -> int:
    """Where the first line of ``data[start:]`` starting with a dot begins: the index of
    its ``CRLF .`` (-1 if there is none).  SMTP's transparency (RFC 5321 4.5.2) cares
    about exactly those lines: the receiver ends at ``.`` and unstuffs ``..``, the
    sender stuffs them.

    ``data.find(b"\r\n.")`` costs ~50 us for 50 KB here, whatever the answer, since
    its first two bytes match at every line end; a single byte is found with memchr at
    memory speed.  Most dots sit inside lines (a header's domains, a sentence's end)
    and base64 has none, so the dots are visited one by one, and only a text with more
    of them than ``_DOTS_ONE_BY_ONE`` falls back to the substring search."""
    i = start
    for _ in range(_DOTS_ONE_BY_ONE):
        i = data.find(b".", i)
        if i < 0:
            return -1
        if i >= start + 2 and data.startswith(b"\r\n", i - 2):
            return i - 2
        i += 1
    return data.find(b"\r\n.", max(start, i - 2))


def needs_change(message: bytes, *, eight_bit_ok: bool) -> bool:
    """Whether ``downgrade`` would have anything to do (the fast path's test)."""
    return (not eight_bit_ok and not message.isascii()) or has_long_line(message)


class Scan:
    """``needs_change`` over a message read in chunks (a spooled body)."""

    def __init__(self, *, eight_bit_ok: bool):
        self.eight_bit_ok = eight_bit_ok
        self.needed = False
        self._carry = b""     # the start of a line the last chunk did not finish

    def feed(self, chunk: bytes) -> None:
        if self.needed:
            return
        if not self.eight_bit_ok and not chunk.isascii():
            self.needed = True
            return
        data = self._carry + chunk
        # A CR at the end may be the first half of the CRLF that ends a line of exactly 998.
        if has_long_line(data, end=len(data) - data.endswith(b"\r")):
            self.needed = True
            return
        self._carry = data[data.rfind(b"\n") + 1:]


# -- the rewrite -----------------------------------------------------------------------------

def downgrade(message: bytes, *, eight_bit_ok: bool) -> bytes:
    """The bytes to send for ``message`` (CRLF lines, not dot-stuffed).

    ``eight_bit_ok``: the destination offers 8BITMIME.  Returns ``message``
    itself when nothing must change."""
    seven_bit = not eight_bit_ok and not message.isascii()
    if not seven_bit and not has_long_line(message):
        return message
    return _Rewrite(seven_bit).entity(message, is_message=True)


class _Head:
    """The header section of an entity: physical lines (without CRLF), grouped into fields."""

    def __init__(self, lines: list[bytes]):
        self.lines = lines

    def value(self, name: bytes) -> bytes | None:
        """The unfolded value of the first field called ``name`` (lower case), or None."""
        for i, line in enumerate(self.lines):
            m = _FIELD_NAME.match(line)
            if m and m.group(0)[:-1].rstrip(_WSP).lower() == name:
                parts = [line[m.end():]]
                for cont in self.lines[i + 1:]:
                    if cont[:1] not in (b" ", b"\t") or not cont:
                        break
                    parts.append(cont)
                return b"".join(parts).strip()
        return None

    def without(self, name: bytes) -> list[bytes]:
        kept, skipping = [], False
        for line in self.lines:
            if line[:1] in (b" ", b"\t") and line:
                if not skipping:
                    kept.append(line)
                continue
            m = _FIELD_NAME.match(line)
            skipping = bool(m) and m.group(0)[:-1].rstrip(_WSP).lower() == name
            if not skipping:
                kept.append(line)
        return kept


def _split_entity(data: bytes) -> tuple[list[bytes], bool, bytes]:
    """(header lines, whether a blank line ends them, body) of an entity.

    The header section ends at the first empty line, or at the first line
    that is neither a field nor a continuation (then it is the body's first
    line, as the stdlib email parser also has it)."""
    lines: list[bytes] = []
    pos = 0
    while pos < len(data):
        nl = data.find(b"\r\n", pos)
        line = data[pos:] if nl < 0 else data[pos:nl]
        if nl >= 0 and not line:
            return lines, True, data[nl + 2:]
        if not (_FIELD_NAME.match(line) or (lines and line[:1] in (b" ", b"\t"))):
            break
        lines.append(line)
        if nl < 0:
            return lines, False, b""
        pos = nl + 2
    return lines, False, data[pos:]


def _join_entity(head: list[bytes], blank: bool, body: bytes) -> bytes:
    out = b"".join(line + b"\r\n" for line in head)
    return out + (b"\r\n" if blank else b"") + body


def _safe_cut(line: bytes, cut: int) -> int:
    """``cut`` moved back so that it does not split a UTF-8 sequence."""
    for back in range(3):
        if cut - back > 1 and not 0x80 <= line[cut - back] < 0xC0:
            return cut - back
    return cut


def fold_header_line(line: bytes, limit: int = LINE_LIMIT) -> list[bytes]:
    """A physical header line as continuation lines of at most ``limit`` octets."""
    out = []
    while len(line) > limit:
        start = len(line) - len(line.lstrip(_WSP))   # a continuation's own leading whitespace
        at = max(line.rfind(b" ", 1, limit + 1), line.rfind(b"\t", 1, limit + 1))
        if at > start:
            out.append(line[:at])        # the whitespace starts the continuation: unfolds exactly
            line = line[at:]
        else:
            cut = _safe_cut(line, limit)
            out.append(line[:cut])
            line = b" " + line[cut:]
    out.append(line)
    return out


def _hard_break(data: bytes, width: int = LINE_LIMIT) -> bytes:
    """Lines over ``width`` broken with a plain CRLF (Postfix's way, where nothing better exists)."""
    if not has_long_line(data, width):
        return data
    out = []
    for line in data.split(b"\r\n"):
        while len(line) > width:
            cut = _safe_cut(line, width)
            out.append(line[:cut])
            line = line[cut:]
        out.append(line)
    return b"\r\n".join(out)


def quoted_printable(data: bytes) -> bytes:
    """``data`` as quoted-printable, CRLFs as hard line breaks; a bare CR or LF is encoded."""
    return b"\r\n".join(binascii.b2a_qp(line, quotetabs=False, istext=False).replace(b"=\n", b"=\r\n")
                        for line in data.split(b"\r\n"))


def _base64(data: bytes) -> bytes:
    raw = base64.b64encode(data)
    out = b"\r\n".join(raw[i:i + _ENCODED_WIDTH] for i in range(0, len(raw), _ENCODED_WIDTH))
    return out + b"\r\n" if data.endswith(b"\r\n") else out


def _qp_soft_breaks(data: bytes) -> bytes:
    """Long lines of a quoted-printable body broken with soft line breaks (decoded text unchanged)."""
    if not has_long_line(data):
        return data
    out = []
    for line in data.split(b"\r\n"):
        if len(line) > LINE_LIMIT:
            while len(line) > _ENCODED_WIDTH:
                cut = _ENCODED_WIDTH - 1
                eq = line.rfind(b"=", cut - 2, cut)   # never cut an =XX in two
                if eq > 0:
                    cut = eq
                out.append(line[:cut] + b"=")
                line = line[cut:]
        out.append(line)
    return b"\r\n".join(out)


def _base64_rewrap(data: bytes) -> bytes:
    if not has_long_line(data):
        return data
    out = []
    for line in data.split(b"\r\n"):
        out += [line[i:i + _ENCODED_WIDTH] for i in range(0, len(line), _ENCODED_WIDTH)] or [b""]
    return b"\r\n".join(out)


class _Rewrite:
    def __init__(self, seven_bit: bool):
        self.seven_bit = seven_bit     # the destination needs 7-bit and the message is not

    def entity(self, data: bytes, *, is_message: bool, default_type: bytes = b"text/plain") -> bytes:
        """One entity (a message or a body part, without the CRLF before the next delimiter)."""
        lines, blank, body = _split_entity(data)
        head = _Head(lines)
        ctype = head.value(b"content-type")
        m = _TYPE.match(ctype) if ctype else None
        kind = (m.group(1) + b"/" + m.group(2)).lower() if m else default_type
        cte = (head.value(b"content-transfer-encoding") or b"").lower()
        added: list[bytes] = []

        if kind.startswith(b"multipart/") and cte in _IDENTITY and (boundary := _boundary(ctype)):
            inner = b"message/rfc822" if kind == b"multipart/digest" else b"text/plain"
            new_body = self.multipart(body, boundary, inner)
            cte_now = self.composite_encoding(cte, new_body)
        elif kind == b"message/rfc822" and cte in _IDENTITY:
            new_body = self.entity(body, is_message=True)
            cte_now = self.composite_encoding(cte, new_body)
        elif kind.startswith(b"multipart/") or (kind.startswith(b"message/") and kind != b"message/global"):
            # A multipart without a boundary or with an encoding it may not have (RFC 2045 6.4),
            # message/partial, message/external-body: never re-encoded.
            new_body, cte_now = _hard_break(body), cte
        elif cte == b"quoted-printable":
            if self.seven_bit:
                body = _EIGHT_BIT.sub(lambda c: b"=%02X" % c[0][0], body)
            new_body, cte_now = _qp_soft_breaks(body), cte
        elif cte == b"base64":
            if self.seven_bit:
                body = _EIGHT_BIT.sub(b"", body)
            new_body, cte_now = _base64_rewrap(body), cte
        elif cte in _IDENTITY:
            if (self.seven_bit and not body.isascii()) or has_long_line(body):
                textual = kind.startswith(b"text/") or kind == b"message/global"
                new_body = quoted_printable(body) if textual else _base64(body)
                cte_now = b"quoted-printable" if textual else b"base64"
                if is_message and ctype is None and not body.isascii():
                    added.append(b"Content-Type: text/plain; charset=unknown-8bit")   # RFC 1428
            else:
                new_body, cte_now = body, cte
        else:
            new_body, cte_now = _hard_break(body), cte        # x-uuencode and the like: unknown to us
        if cte_now != cte:
            if is_message and head.value(b"mime-version") is None:
                added.insert(0, b"MIME-Version: 1.0")       # the encoding header means nothing without it
            lines = head.without(b"content-transfer-encoding")
            added.append(b"Content-Transfer-Encoding: " + cte_now)
        lines = [piece for line in lines + added for piece in fold_header_line(line)]
        if added and not blank:
            blank = True      # a header section that had no body gets its blank line before one
        return _join_entity(lines, blank, new_body)

    def composite_encoding(self, cte: bytes, new_body: bytes) -> bytes:
        """A multipart or message/rfc822 whose parts are now 7-bit says so (RFC 2045 6.4);
        one that still holds 8-bit headers keeps saying 8bit."""
        return b"7bit" if self.seven_bit and cte in (b"8bit", b"binary") and new_body.isascii() else cte

    def multipart(self, body: bytes, boundary: bytes, inner_type: bytes) -> bytes:
        """Each body part rewritten; delimiters kept; preamble and epilogue only line-limited."""
        dash = b"--" + boundary
        lines = body.split(b"\r\n")
        segments: list[bytes] = []
        part: list[bytes] | None = None     # lines of the part being read; None before the first delimiter
        preamble: list[bytes] = []
        closed_at = None
        for i, line in enumerate(lines):
            if line.startswith(dash) and line[len(dash):].rstrip(_WSP) in (b"", b"--"):
                if part is None:
                    if preamble:
                        segments.append(self.ignored_text(b"\r\n".join(preamble)))
                elif part:
                    segments.append(self.entity(b"\r\n".join(part), is_message=False, default_type=inner_type))
                segments.append(line)
                part = []
                if line[len(dash):].rstrip(_WSP) == b"--":
                    closed_at = i
                    break
            elif part is None:
                preamble.append(line)
            else:
                part.append(line)
        if part is None:                  # no delimiter at all: nothing to walk
            return self.ignored_text(body)
        if closed_at is None:
            if part:
                segments.append(self.entity(b"\r\n".join(part), is_message=False, default_type=inner_type))
        elif closed_at + 1 < len(lines):
            segments.append(self.ignored_text(b"\r\n".join(lines[closed_at + 1:])))
        return b"\r\n".join(segments)

    def ignored_text(self, text: bytes) -> bytes:
        """A preamble or epilogue (RFC 2046 5.1.1: to be ignored): 8-bit bytes become '?'."""
        if self.seven_bit:
            text = _EIGHT_BIT.sub(b"?", text)
        return _hard_break(text)


def _boundary(ctype: bytes) -> bytes | None:
    m = _BOUNDARY.search(ctype)
    if m is None:
        return None
    if m.group(1) is not None:
        return re.sub(rb"\\(.)", rb"\1", m.group(1)) or None
    return m.group(2)
