"""DKIM signing (RFC 6376; ed25519-sha256, RFC 8463), once, when a message is received.

The keys are loaded by config/dkim_key.py, ``relaywatch dkim keygen`` and the
key warnings are receive/dkim.py; this is the signer applied to a message.

Who is signed: mail from trusted clients (``server.trusted_networks``) whose
``From:`` domain has a ``[[dkim]]`` entry (or is a subdomain of one with
``sub_domains = true``; the most specific domain wins, and every entry for
it signs, so RSA and Ed25519 can sign side by side as RFC 8463 §4
suggests).  Never mail from other clients: that would put our signature on
forgeries.  A message that already has a signature with our ``d=`` and
``s=`` is not signed again.

When: in ``Committer.commit`` (receive/commit.py), before the message is committed, so the
signature is made once and survives every retry.  The signature is the
first header of the stored message, above our Received header, as signing
MTAs put it.

What is signed is what will be sent.  relaywatch changes a message on the
way out when the destination needs it (relaywatch/mime.py: lines over 998
octets, 8-bit bodies for servers without 8BITMIME), and any such change
after signing would break the signature.  So a message we sign is first
made to fit the least capable destination -- 7-bit, lines of at most 998
octets -- which is what RFC 6376 §5.3 asks of signers ("convert the message
to a suitable MIME content-transfer encoding such as quoted-printable or
base64 ... before signing").  ``downgrade`` then has nothing left to change
for any destination, and the common message (ASCII, short lines) is not
touched at all.

How: dkimpy does the DKIM part -- parsing the header section, header
canonicalization and selection, the hash over the signed header fields,
the folding of the signature -- through its module-level functions, as its
own ``DKIM.sign`` does.  Two steps are ours:

- the body hash is computed here, streaming (``BodyHash``), because
  dkimpy takes the body as one bytes object and a spooled body may be
  35 MB; it is tested byte for byte against dkimpy's canonicalization;
- the signature itself is made by ``cryptography`` (OpenSSL): dkimpy's RSA
  is pure Python and costs about 9 ms for a 2048-bit key, OpenSSL 0.4 ms.
  PKCS#1 v1.5 and Ed25519 signatures are deterministic, so the bytes are
  the same either way.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import logging
import re
import time
from typing import BinaryIO, Callable, Iterable, Sequence

from relaywatch.mime import Scan, downgrade

log = logging.getLogger("relaywatch.dkim")

_WSP = re.compile(rb"[ \t]+")
_READ_CHUNK = 1024 * 1024


# -- the body hash, streaming ---------------------------------------------------------------

def _relaxed_lines(block: bytes) -> bytes:
    """Whole lines with WSP runs made one SP and the WSP at their ends removed (RFC 6376 §3.4.4 a).

    With ``bytes.replace`` rather than a regex: a regex over a character class
    tries every position, some 350 µs for 50 KB; these run at C speed and most
    text has neither tabs nor double spaces."""
    if b"\t" in block:
        block = block.replace(b"\t", b" ")
    while b"  " in block:
        block = block.replace(b"  ", b" ")
    if b" \r\n" in block:
        block = block.replace(b" \r\n", b"\r\n")     # runs are single spaces by now
    return block


class BodyHash:
    """SHA-256 of the canonicalized body (RFC 6376 §3.4.3 simple, §3.4.4 relaxed), fed in chunks.

    Whole lines are canonicalized as they come; empty lines are held back as a
    count until something follows them, since the ones at the end do not
    count.  Only an unfinished line is kept between chunks."""

    def __init__(self, relaxed: bool):
        self.relaxed = relaxed
        self._hash = hashlib.sha256()
        self._carry = b""           # the start of a line that the last chunk did not finish
        self._held = 0              # CRLFs after the last non-empty content
        self._any = False           # some non-empty line was seen

    def feed(self, chunk: bytes) -> None:
        data = self._carry + chunk if self._carry else chunk
        cut = data.rfind(b"\r\n")
        if cut < 0:
            self._carry = data
            return
        block, self._carry = data[:cut + 2], data[cut + 2:]
        self._lines(block)

    def _lines(self, block: bytes) -> None:
        if self.relaxed:
            block = _relaxed_lines(block)
        # The CRLFs at the end: the last line's own and those of the empty lines after it.
        end = len(block.rstrip(b"\r\n"))
        if block[end:] != b"\r\n" * ((len(block) - end) // 2):   # a bare CR or LF among them
            end = len(block)
            while block.endswith(b"\r\n", 0, end):
                end -= 2
        crlfs = (len(block) - end) // 2
        content = block[:end]
        if content:
            if self._held:
                self._hash.update(b"\r\n" * self._held)
            self._hash.update(content)
            self._any = True
            self._held = crlfs
        else:
            self._held += crlfs

    def digest(self) -> bytes:
        if self._carry:
            # A last line without CRLF (never in a stored message) gets one; read as dkimpy
            # reads it, its trailing whitespace stays (compressed).
            last = _WSP.sub(b" ", self._carry) if self.relaxed else self._carry
            self._carry = b""
            self._hash.update(b"\r\n" * self._held + last)
            self._any = True
        if self._any:
            self._hash.update(b"\r\n")                 # the last non-empty line's own CRLF
        elif not self.relaxed:
            self._hash.update(b"\r\n")                 # simple: an empty body is one CRLF
        return self._hash.digest()


# -- choosing the signers --------------------------------------------------------------------

def from_domain(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The domain of the one mailbox in the one From field, lower case; else None."""
    values = [v for k, v in headers if k.lower() == b"from"]
    if len(values) != 1:
        return None     # none, or several: DMARC cannot align those anyway (RFC 7489 §6.6.1)
    text = re.sub(r"\r\n", "", values[0].decode("utf-8", "replace"))
    addresses = [a for _, a in email.utils.getaddresses([text]) if a]
    if len(addresses) != 1 or "@" not in addresses[0]:
        return None
    return addresses[0].rsplit("@", 1)[1].strip().rstrip(".").lower() or None


def signers_for(signings: Iterable, headers: Sequence[tuple[bytes, bytes]]) -> list:
    """The ``[[dkim]]`` entries that sign a message with these headers.

    The From domain's own entries, else those of the closest parent domain
    with ``sub_domains``; less any whose d=/s= already signed the message."""
    domain = from_domain(headers)
    if domain is None:
        return []
    matching = [s for s in signings if s.domain == domain or (s.sub_domains and domain.endswith("." + s.domain))]
    if not matching:
        return []
    closest = max(len(s.domain) for s in matching)
    chosen = [s for s in matching if len(s.domain) == closest]
    done = _signed_by(headers)
    return [s for s in chosen if (s.domain, s.selector.lower()) not in done]


def _signed_by(headers: Sequence[tuple[bytes, bytes]]) -> set[tuple[str, str]]:
    from dkim.util import InvalidTagValueList, parse_tag_value
    out = set()
    for name, value in headers:
        if name.lower() != b"dkim-signature":
            continue
        try:
            tags = parse_tag_value(re.sub(rb"\r\n", b"", value))
        except InvalidTagValueList:
            continue
        d, s = tags.get(b"d", b""), tags.get(b"s", b"")
        out.add((d.decode("ascii", "replace").lower().rstrip("."), s.decode("ascii", "replace").lower()))
    return out


# -- the signature ---------------------------------------------------------------------------

def signed_header_names(signing, headers: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
    """The h= list: each instance present of the configured fields, plus one more of each oversigned one."""
    wanted = {h.encode() for h in signing.headers}
    names = [name.lower() for name, _ in headers if name.lower() in wanted]
    names += [h.encode() for h in signing.oversign_headers]
    return names


def signature_field(signing, headers: list[tuple[bytes, bytes]], body_hash: bytes, now: int) -> bytes:
    """The ``DKIM-Signature:`` field (CRLF-terminated) for a message with these headers
    (as dkimpy's ``rfc822_parse`` gives them) and this body hash.  The steps are
    dkimpy's ``DKIM.sign``, with our body hash and signature."""
    import dkim
    from dkim.canonicalization import CanonicalizationPolicy
    policy = CanonicalizationPolicy.from_c_value(signing.canonicalization.encode())
    include = signed_header_names(signing, headers)
    domain = signing.domain.encode()
    fields = [
        (b"v", b"1"),
        (b"a", signing.key.algorithm.encode()),
        (b"c", policy.to_c_value()),
        (b"d", domain),
        (b"s", signing.selector.encode()),
        (b"t", str(now).encode()),
        (b"h", b" : ".join(include)),
        (b"bh", base64.b64encode(body_hash)),
        (b"b", b"0" * 60),        # dkimpy's placeholder: b= folds onto a line of its own
    ]
    name = b"DKIM-Signature"
    unsigned = dkim.fold(b"; ".join(b"=".join(f) for f in fields), namelen=len(name))
    unsigned = dkim.RE_BTAG.sub(b"\\1", unsigned)
    hasher = hashlib.sha256()
    dkim.hash_headers(hasher, policy, policy.canonicalize_headers(headers), include,
                      (name, b" " + unsigned), dict(fields))
    fields[-1] = (b"b", base64.b64encode(signing.key.sign(hasher.digest())))
    value = dkim.fold(b"; ".join(b"=".join(f) for f in fields) + b"\r\n", namelen=len(name))
    return name + b": " + value


# -- a whole message -------------------------------------------------------------------------

def _split(data: bytes) -> tuple[bytes, bytes] | None:
    """(header section with its last CRLF, body) of a message, or None with no blank line yet."""
    if data.startswith(b"\r\n"):
        return b"", data[2:]
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    return data[:end + 2], data[end + 4:]


def _parse_headers(head: bytes) -> list[tuple[bytes, bytes]] | None:
    import dkim
    try:
        headers, _ = dkim.rfc822_parse(head + b"\r\n")
    except dkim.MessageFormatError as exc:
        log.warning("not signing a message whose header section does not parse: %s", exc)
        return None
    return headers


def _signatures(signers: list, headers, hashes: dict[str, BodyHash], now: int) -> bytes:
    digests = {c: h.digest() for c, h in hashes.items()}
    return b"".join(signature_field(s, headers, digests[s.canonicalization.split("/")[1]], now) for s in signers)


def _body_hashes(signers: list) -> dict[str, BodyHash]:
    kinds = {s.canonicalization.split("/")[1] for s in signers}
    return {kind: BodyHash(relaxed=kind == "relaxed") for kind in kinds}


def sign_message(signings: Iterable, message: bytes, now: int | None = None) -> tuple[bytes, list[str]] | None:
    """The message with its DKIM-Signature fields on top and who signed it
    (``domain/selector``), or None when nothing signs it.

    ``message``: CRLF lines, as stored (the Received header first).  A message
    that will be signed is first made 7-bit with lines of at most 998 octets."""
    head, body = _split(message) or (message, b"")
    headers = _parse_headers(head)
    signers = signers_for(signings, headers) if headers is not None else []
    if not signers:
        return None
    fitted = downgrade(message, eight_bit_ok=False)
    if fitted != message:
        message = fitted
        head, body = _split(message) or (message, b"")
        headers = _parse_headers(head)
        if headers is None:
            return None
    hashes = _body_hashes(signers)
    for h in hashes.values():
        h.feed(body)
    return _signatures(signers, headers, hashes, _now(now)) + message, _names(signers)


def sign_file(signings: Iterable, source: BinaryIO, write: Callable[[bytes], None],
              now: int | None = None) -> list[str]:
    """``sign_message`` for a spooled message read from ``source``: when it is
    signed, the signed message goes to ``write``; returns who signed it ([]: nobody).

    The body is read twice in chunks (once for the body hash and the check
    whether it must change, once to copy it out), never held whole -- unless
    it must be made 7-bit or line-limited first, which needs it in memory
    (relaywatch/mime.py works on whole messages)."""
    head = b""
    while (parts := _split(head)) is None:
        chunk = source.read(_READ_CHUNK)
        if not chunk:
            break
        head += chunk
    head, chunk = parts or (head, b"")
    lowered = head.lower()
    if not any(s.domain.encode() in lowered for s in signings):
        return []          # the common unsigned case, at C speed: our domains are nowhere in the header
    headers = _parse_headers(head)
    signers = signers_for(signings, headers) if headers is not None else []
    if not signers:
        return []
    scan = Scan(eight_bit_ok=False)
    scan.feed(head)
    hashes = _body_hashes(signers)
    while chunk and not scan.needed:
        scan.feed(chunk)
        for h in hashes.values():
            h.feed(chunk)
        chunk = source.read(_READ_CHUNK)
    source.seek(0)
    if scan.needed:
        signed = sign_message(signings, source.read(), now)
        if signed is None:
            return []
        write(signed[0])
        return signed[1]
    write(_signatures(signers, headers, hashes, _now(now)))
    while chunk := source.read(_READ_CHUNK):
        write(chunk)
    return _names(signers)


def _now(now: int | None) -> int:
    return int(time.time()) if now is None else now


def _names(signers: list) -> list[str]:
    return [f"{s.domain}/{s.selector}" for s in signers]


async def sign_spool(signings: Sequence, spool):
    """(the spool to commit, who signed it): a new spool with the signed message,
    or ``spool`` itself when nothing signs it.

    A small message is signed here (about 0.1-0.5 ms); a spooled one in a
    thread.  The disk failing raises OSError, with both spools discarded (the
    commit answers as for any spool error and the client retries); a bug in
    signing must not stop mail: then it is committed unsigned, and the log
    says so."""
    import asyncio
    from relaywatch.receive.spool import BodySpool

    def work():
        signed = BodySpool(spool.spool_dir, spool.inline_limit)
        try:
            with spool.reader() as source:
                by = sign_file(signings, source, signed.write)
        except BaseException:
            signed.discard()
            raise
        if not by:
            signed.discard()
            return spool, []
        spool.discard()
        return signed, by

    try:
        if spool.spilled:
            return await asyncio.to_thread(work)
        return work()
    except OSError:
        spool.discard()
        raise
    except Exception:
        log.exception("could not DKIM-sign a message; committing it unsigned")
        return spool, []
