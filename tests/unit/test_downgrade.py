"""What relaywatch sends to a line-limited or 7-bit destination (relaywatch/mime.py, deliver/downgrade.py).

Pure tables: bytes in, bytes out.  Every rewrite is checked the way a reader
would see it: the stdlib email package parses the result, and the decoded
content of every leaf part must equal the original's.
"""

import email
import email.policy
import random
import re

import pytest

from relaywatch.mime import (
    LINE_LIMIT, Scan, downgrade, fold_header_line, has_long_line, needs_change, quoted_printable,
)


def lines_of(data: bytes) -> list[bytes]:
    return data.split(b"\r\n")


def longest_line(data: bytes) -> int:
    return max(len(line) for line in lines_of(data))


def head_and_body(data: bytes) -> tuple[bytes, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def unfold(head: bytes) -> bytes:
    return re.sub(rb"\r\n(?=[ \t])", b"", head)


def leaves(raw: bytes) -> list[tuple[str, bytes]]:
    """(content type, decoded payload) of every leaf part, as a reader gets them."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    out = []
    for part in msg.walk():
        if part.is_multipart() or part.get_content_type() == "message/rfc822":
            continue
        out.append((part.get_content_type(), part.get_payload(decode=True)))
    return out


def assert_sendable(out: bytes, *, seven_bit: bool) -> None:
    assert longest_line(out) <= LINE_LIMIT
    if seven_bit:
        assert out.isascii()


# -- the fast path ---------------------------------------------------------------------------

@pytest.mark.parametrize("data, long", [
    (b"", False),
    (b"x" * 998, False),
    (b"x" * 999, True),
    (b"x" * 998 + b"\r\n", False),
    (b"x" * 999 + b"\r\n", True),
    (b"short\r\n" + b"x" * 998 + b"\r\nshort\r\n", False),
    (b"short\r\n" + b"x" * 999 + b"\r\nshort\r\n", True),
    (b"a\r\n" * 5000 + b"y" * 1200 + b"\r\n", True),       # far into the body
    (b"a\r\n" * 5000 + b"y" * 999, True),                  # the last line, without its CRLF
    ((b"z" * 997 + b"\r\n") * 100, False),                 # many lines just under the limit
    (b"\r\n" * 3000, False),
])
def test_has_long_line(data, long):
    assert has_long_line(data) is long


def test_the_common_case_returns_the_same_bytes_object():
    ascii_msg = b"Subject: hi\r\n\r\n" + b"a line of text\r\n" * 3000
    eight_bit = b"Subject: hi\r\n\r\n" + "caf\u00e9\r\n".encode() * 3000
    assert downgrade(ascii_msg, eight_bit_ok=False) is ascii_msg
    assert downgrade(ascii_msg, eight_bit_ok=True) is ascii_msg
    assert downgrade(eight_bit, eight_bit_ok=True) is eight_bit
    assert not needs_change(eight_bit, eight_bit_ok=True)
    assert needs_change(eight_bit, eight_bit_ok=False)
    edge = b"Subject: x\r\n\r\n" + b"y" * 998 + b"\r\n"
    assert downgrade(edge, eight_bit_ok=True) is edge


@pytest.mark.parametrize("chunk", [1, 7, 999, 1000, 1001, 4096])
@pytest.mark.parametrize("data, eight_bit_ok", [
    (b"Subject: x\r\n\r\n" + (b"w" * 900 + b"\r\n") * 20, True),
    (b"Subject: x\r\n\r\n" + (b"w" * 900 + b"\r\n") * 20 + b"v" * 999 + b"\r\n", True),
    (b"Subject: x\r\n\r\n" + b"v" * 5000 + b"\r\n", True),
    (b"Subject: x\r\n\r\n\xe9\r\n", True),
    (b"Subject: x\r\n\r\n\xe9\r\n", False),
    (b"Subject: x\r\n\r\n" + b"a\r\n" * 3000 + b"\xff", False),
])
def test_scanning_in_chunks_agrees_with_the_whole(data, eight_bit_ok, chunk):
    scan = Scan(eight_bit_ok=eight_bit_ok)
    for i in range(0, len(data), chunk):
        scan.feed(data[i:i + chunk])
    assert scan.needed is needs_change(data, eight_bit_ok=eight_bit_ok)


def test_a_chunk_that_ends_between_cr_and_lf_is_not_a_long_line():
    head = b"Subject: x\r\n\r\n"
    data = head + b"w" * 998 + b"\r\n" + b"after\r\n"
    cut = len(head) + 999          # right after the CR of the 998-octet line
    scan = Scan(eight_bit_ok=True)
    scan.feed(data[:cut])
    scan.feed(data[cut:])
    assert not scan.needed
    scan = Scan(eight_bit_ok=True)
    scan.feed(head + b"w" * 999 + b"\r")    # one octet more: 999
    scan.feed(b"\n")
    assert scan.needed


# -- headers ---------------------------------------------------------------------------------

def test_a_long_header_is_folded_at_whitespace_and_unfolds_exactly():
    subject = b"Subject: " + b" ".join(b"word%d" % i for i in range(600))
    msg = b"From: a@example.org\r\n" + subject + b"\r\nTo: b@example.org\r\n\r\nbody\r\n"
    out = downgrade(msg, eight_bit_ok=True)
    assert_sendable(out, seven_bit=True)
    head, body = head_and_body(out)
    assert unfold(head) == head_and_body(msg)[0]
    assert body == b"body\r\n"
    parsed = email.message_from_bytes(out, policy=email.policy.default)
    assert parsed["Subject"] == subject[len(b"Subject: "):].decode()
    assert parsed["To"] == "b@example.org"


def test_a_header_without_whitespace_gets_a_hard_break_that_stays_a_continuation():
    token = b"X-Token: " + b"A" * 2500
    out = downgrade(b"From: a@example.org\r\n" + token + b"\r\n\r\nbody\r\n", eight_bit_ok=True)
    head, _ = head_and_body(out)
    folded = lines_of(head)[1:]
    # The space after the colon is a fold point; the rest has none: two hard breaks.
    assert [len(line) for line in folded] == [8, 998, 998, 507]
    assert all(line.startswith(b" ") for line in folded[1:])
    # Unfolded, the value is the original with one space per hard break (Postfix does the same).
    assert unfold(head).split(b"\r\n")[1] == b"X-Token: " + b"A" * 997 + b" " + b"A" * 997 + b" " + b"A" * 506
    parsed = email.message_from_bytes(out, policy=email.policy.compat32)
    assert parsed.get_payload() == "body\r\n" and len(parsed.keys()) == 2


@pytest.mark.parametrize("line", [
    b"Subject:" + "\u00e9".encode() * 800,                  # 2-byte sequences, no whitespace
    b"Subject:" + "\u20ac".encode() * 600,                  # 3-byte sequences
    b"Subject:" + "\U0001F600".encode() * 500,              # 4-byte sequences
])
def test_a_hard_break_never_splits_a_utf8_sequence(line):
    pieces = fold_header_line(line)
    assert all(len(p) <= LINE_LIMIT for p in pieces)
    for piece in pieces:
        piece.decode("utf-8")     # raises if a sequence was cut
    assert b"".join(p[1:] if i else p for i, p in enumerate(pieces)) == line


def test_a_continuation_line_keeps_its_leading_whitespace_and_is_not_emptied():
    line = b"\t" + b"x" * 500 + b" " + b"y" * 700
    pieces = fold_header_line(line)
    assert pieces == [b"\t" + b"x" * 500, b" " + b"y" * 700]


def test_8bit_headers_are_left_alone_even_for_a_7bit_destination():
    head = "From: J\u00f6rg <j@example.org>\r\nSubject: Gr\u00fc\u00dfe\r\n".encode()
    msg = head + b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n" \
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" + "Gr\u00fc\u00dfe\r\n".encode()
    out = downgrade(msg, eight_bit_ok=False)
    assert out.startswith(head)
    assert head_and_body(out)[1].isascii()
    assert leaves(out) == [("text/plain", "Gr\u00fc\u00dfe\r\n".encode())]


# -- body lines ------------------------------------------------------------------------------

def test_a_long_line_in_a_plain_message_becomes_quoted_printable_and_decodes_exactly():
    body = b"<p>" + b"x" * 1990 + b"</p>\r\nsecond line\r\n"
    msg = b"From: a@example.org\r\nSubject: long\r\n\r\n" + body
    out = downgrade(msg, eight_bit_ok=True)
    assert_sendable(out, seven_bit=True)
    head, _ = head_and_body(out)
    assert head == b"From: a@example.org\r\nSubject: long\r\nMIME-Version: 1.0\r\n" \
        b"Content-Transfer-Encoding: quoted-printable"
    assert leaves(out) == [("text/plain", body)]


def test_a_long_line_in_a_non_text_part_becomes_base64():
    data = bytes(range(128, 256)) * 20 + b"\r\n"      # one 2,560-octet "line", 8-bit
    msg = (b"MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
           b"Content-Transfer-Encoding: binary\r\n\r\n" + data)
    for eight_bit_ok in (True, False):
        out = downgrade(msg, eight_bit_ok=eight_bit_ok)
        assert_sendable(out, seven_bit=True)
        assert b"Content-Transfer-Encoding: base64" in out and b"binary" not in out
        assert leaves(out) == [("application/octet-stream", data)]


def test_a_long_quoted_printable_line_gets_soft_breaks_outside_its_escapes():
    text = ("d\u00e9j\u00e0 vu = " * 200).encode()
    one_line = quoted_printable(text).replace(b"=\r\n", b"")      # QP written by a client as one long line
    assert len(one_line) > 2000
    msg = (b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
           b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + one_line + b"\r\n")
    out = downgrade(msg, eight_bit_ok=True)
    assert_sendable(out, seven_bit=True)
    assert longest_line(head_and_body(out)[1]) <= 76
    assert leaves(out) == leaves(msg) == [("text/plain", text + b"\r\n")]


def test_a_long_base64_line_is_rewrapped():
    import base64
    data = bytes(range(256)) * 8
    msg = (b"MIME-Version: 1.0\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + base64.b64encode(data) + b"\r\n")
    out = downgrade(msg, eight_bit_ok=True)
    assert_sendable(out, seven_bit=True)
    assert longest_line(head_and_body(out)[1]) == 76
    assert leaves(out) == [("image/png", data)]


@pytest.mark.parametrize("ctype", [b"message/partial; id=\"x\"; number=1", b"text/plain"])
def test_where_no_encoding_can_be_declared_a_long_line_is_broken_with_crlf(ctype):
    cte = b"" if ctype.startswith(b"message/") else b"Content-Transfer-Encoding: x-uuencode\r\n"
    msg = b"MIME-Version: 1.0\r\nContent-Type: " + ctype + b"\r\n" + cte + b"\r\n" + b"q" * 2100 + b"\r\n"
    out = downgrade(msg, eight_bit_ok=True)
    assert head_and_body(out)[1] == b"q" * 998 + b"\r\n" + b"q" * 998 + b"\r\n" + b"q" * 104 + b"\r\n"


# -- 8-bit to a destination without 8BITMIME ----------------------------------------------------

def test_an_8bit_plain_message_becomes_quoted_printable_with_an_unknown_charset():
    body = "Gr\u00fc\u00dfe aus K\u00f6ln\r\n.\r\nnoch eine Zeile \r\n".encode("latin-1")
    msg = b"From: a@example.org\r\nSubject: hi\r\n\r\n" + body
    out = downgrade(msg, eight_bit_ok=False)
    assert_sendable(out, seven_bit=True)
    head, qp = head_and_body(out)
    assert head == (b"From: a@example.org\r\nSubject: hi\r\nMIME-Version: 1.0\r\n"
                    b"Content-Type: text/plain; charset=unknown-8bit\r\nContent-Transfer-Encoding: quoted-printable")
    assert qp == b"Gr=FC=DFe aus K=F6ln\r\n=2E\r\nnoch eine Zeile=20\r\n"
    assert leaves(out) == [("text/plain", body)]


def test_a_declared_8bit_part_is_relabelled_not_duplicated():
    msg = ("MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
           "X-After: kept\r\n\r\nna\u00efve caf\u00e9\r\n").encode()
    out = downgrade(msg, eight_bit_ok=False)
    assert_sendable(out, seven_bit=True)
    head, _ = head_and_body(out)
    assert head.count(b"Content-Transfer-Encoding") == 1 and b"X-After: kept" in head
    parsed = email.message_from_bytes(out, policy=email.policy.default)
    assert parsed.get_content() == "na\u00efve caf\u00e9\r\n"


NESTED = b"\r\n".join([
    b"From: a@example.org",
    b"MIME-Version: 1.0",
    b'Content-Type: multipart/mixed; boundary="outer"',
    b"Content-Transfer-Encoding: 8bit",
    b"",
    "Pr\u00e4ambel, die niemand liest".encode(),
    b"--outer",
    b'Content-Type: multipart/alternative; boundary="inner"',
    b"",
    b"--inner",
    b"Content-Type: text/plain; charset=utf-8",
    b"Content-Transfer-Encoding: 8bit",
    b"",
    "\u00e9t\u00e9 \u2014 summer".encode(),
    b"--inner",
    b"Content-Type: text/html; charset=utf-8",
    b"",
    b"<p>" + "\u00e9".encode() * 700 + b"</p>",
    b"--inner--",
    b"--outer",
    b"Content-Type: application/octet-stream",
    b"Content-Transfer-Encoding: 8bit",
    b"",
    bytes(range(128, 256)) + b"\r\n" + bytes(range(0, 10)),
    b"--outer",
    b"Content-Type: text/plain; charset=utf-8",
    b"Content-Transfer-Encoding: base64",
    b"",
    b"w6l0w6k=",
    b"--outer",
    b"Content-Type: message/rfc822",
    b"Content-Transfer-Encoding: 8bit",
    b"",
    b"Subject: forwarded",
    b"Content-Type: text/plain; charset=iso-8859-1",
    b"Content-Transfer-Encoding: 8bit",
    b"",
    "Gr\u00fc\u00dfe".encode("latin-1"),
    b"--outer",
    b"",
    "no headers: default text/plain \u00e9".encode(),
    b"--outer--",
    "Epilog \u00fc".encode(),
    b"",
])


def test_nested_multipart_and_an_attached_message_are_converted_leaf_by_leaf():
    out = downgrade(NESTED, eight_bit_ok=False)
    assert_sendable(out, seven_bit=True)
    assert leaves(out) == leaves(NESTED)
    assert [ctype for ctype, _ in leaves(out)] == [
        "text/plain", "text/html", "application/octet-stream", "text/plain", "text/plain", "text/plain"]
    # Composite parts are 7bit now; leaves say how they are encoded.
    assert out.count(b"Content-Transfer-Encoding: 8bit") == 0
    assert out.count(b"Content-Transfer-Encoding: 7bit") == 2
    assert out.count(b"Content-Transfer-Encoding: quoted-printable") == 4
    assert out.count(b"Content-Transfer-Encoding: base64") == 2
    # Delimiters, the untouched base64 part and the forwarded message's headers are as they were.
    for kept in (b"\r\n--outer\r\n", b"\r\n--inner--\r\n", b"\r\nw6l0w6k=\r\n", b"\r\nSubject: forwarded\r\n"):
        assert kept in out
    assert b"Pr??ambel" in out and b"Epilog ??" in out     # preamble and epilogue are to be ignored
    parsed = email.message_from_bytes(out, policy=email.policy.default)
    assert not parsed.defects and all(not p.defects for p in parsed.walk())


def test_a_multipart_that_is_8bit_only_in_long_lines_keeps_8bit():
    out = downgrade(NESTED, eight_bit_ok=True)
    assert_sendable(out, seven_bit=False)
    assert leaves(out) == leaves(NESTED)
    # Only the HTML part (a 1,407-octet line) changed; the 8-bit plain part went as it was.
    assert "\u00e9t\u00e9 \u2014 summer".encode() in out
    assert out.count(b"Content-Transfer-Encoding: quoted-printable") == 1


def test_raw_8bit_inside_encoded_parts_is_made_7bit_without_changing_what_decodes():
    msg = b"\r\n".join([
        b"MIME-Version: 1.0", b'Content-Type: multipart/mixed; boundary="b"', b"", b"--b",
        b"Content-Type: text/plain; charset=latin-1", b"Content-Transfer-Encoding: quoted-printable", b"",
        b"caf=E9 and raw caf\xe9 =3D", b"--b",
        b"Content-Type: application/pdf", b"Content-Transfer-Encoding: base64", b"",
        b"JVBE\xa0Ri0x", b"--b--", b""])
    out = downgrade(msg, eight_bit_ok=False)
    assert_sendable(out, seven_bit=True)
    assert leaves(out) == leaves(msg) == [("text/plain", b"caf\xe9 and raw caf\xe9 ="),
                                          ("application/pdf", b"%PDF-1")]


def test_multipart_digest_parts_default_to_messages():
    msg = b"\r\n".join([
        b"MIME-Version: 1.0", b'Content-Type: multipart/digest; boundary="d"', b"", b"--d", b"",
        b"Subject: one", b"Content-Type: text/plain; charset=utf-8", b"", "\u00e9".encode(), b"--d--", b""])
    out = downgrade(msg, eight_bit_ok=False)
    assert_sendable(out, seven_bit=True)
    # The digest's part is a message: its own header section gets the encoding.
    assert b"\r\n--d\r\n\r\nSubject: one\r\n" in out
    assert leaves(out) == leaves(msg) == [("text/plain", "\u00e9".encode())]


@pytest.mark.parametrize("body", [
    b"",
    b"\r\n",
    b"--b\r\n",                       # a multipart with its only delimiter
    b"--b\r\n--b\r\n--b--\r\n",       # empty parts
    b"no delimiter at all \xe9\r\n",
    b"--b\r\nContent-Type: text/plain\r\n\r\n\xe9",     # never closed
])
def test_odd_multipart_bodies_survive(body):
    msg = b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n' + body
    out = downgrade(msg, eight_bit_ok=False)
    assert longest_line(out) <= LINE_LIMIT and out.isascii()
    assert out.replace(b"?", b"") == msg.replace(b"\xe9", b"") or leaves(out) == leaves(msg)


def test_random_messages_always_come_out_sendable_and_decode_the_same():
    rng = random.Random(9)
    alphabet = [b"a", b" ", b"=", b".", b"\t", b"\xe9", b"\xc3\xa9", b"\x00", b"\xff", b"-"]

    def text():
        lines = []
        for _ in range(rng.randint(0, 6)):
            n = rng.choice([0, 1, 50, 997, 998, 999, 1500, 3000])
            lines.append(b"".join(rng.choice(alphabet) for _ in range(n)))
        return b"\r\n".join(lines)

    for _ in range(150):
        parts = []
        for _ in range(rng.randint(1, 3)):
            ctype = rng.choice([b"text/plain; charset=utf-8", b"text/html", b"application/octet-stream"])
            cte = rng.choice([b"", b"Content-Transfer-Encoding: 8bit\r\n", b"Content-Transfer-Encoding: 7bit\r\n"])
            parts.append(b"Content-Type: " + ctype + b"\r\n" + cte + b"\r\n" + text())
        msg = (b"From: a@example.org\r\nSubject: " + b"s " * rng.randint(0, 700) + b"\r\nMIME-Version: 1.0\r\n"
               b'Content-Type: multipart/mixed; boundary="=_r"\r\n\r\n'
               + b"".join(b"--=_r\r\n" + p + b"\r\n" for p in parts) + b"--=_r--\r\n")
        for eight_bit_ok in (True, False):
            out = downgrade(msg, eight_bit_ok=eight_bit_ok)
            assert_sendable(out, seven_bit=not eight_bit_ok)
            assert leaves(out) == leaves(msg)


# -- the adapter from a stored body ----------------------------------------------------------

async def test_a_stored_body_is_converted_only_when_the_destination_needs_it(tmp_path):
    from relaywatch.deliver.downgrade import body_for_destination
    from relaywatch.model import StoredBody
    raw = b"Subject: x\r\n\r\ncaf\xc3\xa9\r\n"
    inline = StoredBody(size=len(raw), data=raw)
    assert await body_for_destination(inline, {"8BITMIME": ""}) is inline
    spool = tmp_path / "body"
    spool.write_bytes(raw)
    spooled = StoredBody(size=len(raw), path=str(spool))
    assert await body_for_destination(spooled, {"8BITMIME": "", "SIZE": "0"}) is spooled
    for body in (inline, spooled):
        sent = await body_for_destination(body, {"PIPELINING": ""})
        assert sent.data.isascii() and sent.size == len(sent.data)
        assert leaves(sent.data) == leaves(raw)
    assert spool.read_bytes() == raw           # the queue's copy is never altered


async def test_a_conversion_bug_sends_the_message_as_it_is(monkeypatch, caplog):
    from relaywatch.deliver import downgrade as module
    from relaywatch.model import StoredBody

    def broken(message, *, eight_bit_ok):
        raise IndexError("a bug")
    monkeypatch.setattr(module, "downgrade", broken)
    raw = b"Subject: x\r\n\r\n" + b"y" * 2000 + b"\r\n"
    body = StoredBody(size=len(raw), data=raw)
    assert await module.body_for_destination(body, {}) is body
    assert "sending it unchanged" in caplog.text


def test_malformed_structures_never_raise_and_never_leave_a_long_line():
    rng = random.Random(5321)
    atoms = [b"\r\n", b"\r\n\r\n", b"--b", b"--b--", b"--c", b"Content-Type: multipart/mixed; boundary=b",
             b'Content-Type: multipart/alternative; boundary="c"', b"Content-Type: message/rfc822",
             b"Content-Type: multipart/mixed", b"Content-Transfer-Encoding: 8bit",
             b"Content-Transfer-Encoding: quoted-printable", b"Content-Transfer-Encoding: base64",
             b"MIME-Version: 1.0", b"Subject: x", b" ", b"\t", b"=", b"\xe9", b"\xc3\xa9", b"x" * 500,
             b"y" * 999, b"A", b".", b":", b"Content-Type: text/plain"]
    for _ in range(3000):
        msg = b"".join(rng.choice(atoms) for _ in range(rng.randint(0, 40)))
        for eight_bit_ok in (True, False):
            assert longest_line(downgrade(msg, eight_bit_ok=eight_bit_ok)) <= LINE_LIMIT, msg
