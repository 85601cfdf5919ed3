"""Long lines and 8-bit bodies, end to end over loopback: accepted on receipt,
made to fit on the way out (relaywatch/mime.py), delivered, not bounced.

The destinations are real aiosmtpd servers: its default refuses lines over
1,000 octets (``500 Line too long``), and one here does not offer 8BITMIME
and refuses 8-bit data, as a strict 7-bit server does.
"""

import email
import email.policy

import pytest

from helpers import LOOPBACK, RawClient, Sink, SinkHandler, eventually

pytestmark = pytest.mark.both_loops   # delivery end to end: asyncio and uvloop (serve runs uvloop)


SENDER = "alice@contoso.test"     # a local mailbox: a bounce would land in her Maildir


def connector(port):
    return [{"name": "fabrikam", "type": "on_premises", "domains": ["fabrikam.test"],
             "smart_hosts": [f"{LOOPBACK}:{port}"], "tls": "none"}]


class SevenBitHandler(SinkHandler):
    """Does not offer 8BITMIME, and refuses 8-bit data (RFC 6152: it may)."""

    def __init__(self):
        super().__init__()
        self.seen: list[bytes] = []     # everything sent to it, refused or not

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        return [r for r in responses if r != "250-8BITMIME"]

    async def handle_DATA(self, server, session, envelope):
        content = envelope.original_content or b""
        self.seen.append(content)
        if not content.isascii():
            return "554 5.6.1 8-bit data refused: 8BITMIME was not offered"
        return await super().handle_DATA(server, session, envelope)


def mime_message(subject: str, text: str, charset: str = "utf-8") -> bytes:
    return (f"From: {SENDER}\r\nTo: bob@fabrikam.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <{abs(hash(subject))}@client.test>\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset={charset}\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            ).encode() + text.encode(charset)


def decoded_text(content: bytes) -> str:
    return email.message_from_bytes(content, policy=email.policy.default).get_content()


async def delivered_or_bounced(relay, sink):
    await eventually(lambda: sink.messages or relay.maildir(SENDER), timeout=20,
                     what="delivery to the destination or a bounce to the sender")
    assert sink.messages, f"bounced instead of delivered: {relay.maildir(SENDER)[0][-1500:]!r}"
    assert not relay.maildir(SENDER)
    return sink.messages[0].content


async def test_a_2000_octet_line_is_delivered_folded_not_bounced(relay_factory, sink):
    relay = await relay_factory(connectors=connector(sink.port))
    subject = " ".join(f"part{i}" for i in range(300))                 # a 2,589-octet header line
    body = "<p>" + "x" * 1993 + "</p>\r\nthe next line\r\n"           # a 2,000-octet body line
    original = (f"From: {SENDER}\r\nTo: bob@fabrikam.test\r\nSubject: {subject}\r\n"
                f"Message-ID: <long@client.test>\r\n\r\n{body}").encode()
    await relay.send(SENDER, ["bob@fabrikam.test"], original)
    got = await delivered_or_bounced(relay, sink)
    assert max(len(line) for line in got.split(b"\r\n")) <= 998
    parsed = email.message_from_bytes(got, policy=email.policy.default)
    assert parsed["Subject"] == subject
    assert parsed.get_payload(decode=True) == body.encode()


async def test_an_8bit_message_reaches_a_7bit_destination_as_quoted_printable(relay_factory):
    sink = await Sink(SevenBitHandler()).start()
    try:
        relay = await relay_factory(connectors=connector(sink.port))
        text = "Gr\u00fc\u00dfe aus K\u00f6ln \u2014 \u00e9t\u00e9 \u20ac\r\n" * 20
        await relay.send(SENDER, ["bob@fabrikam.test"], mime_message("umlauts", text))
        got = await delivered_or_bounced(relay, sink)
        assert all(content.isascii() for content in sink.handler.seen)   # no byte >= 0x80 reached it
        assert b"Content-Transfer-Encoding: quoted-printable" in got
        assert decoded_text(got) == text
    finally:
        await sink.stop()


async def test_a_spooled_8bit_message_reaches_a_7bit_destination_as_quoted_printable(relay_factory):
    # Over the inline limit (128 KB), so the body is a spool file scanned in chunks.
    sink = await Sink(SevenBitHandler()).start()
    try:
        relay = await relay_factory(connectors=connector(sink.port))
        text = "ligne num\u00e9ro %d: caf\u00e9, na\u00efve, d\u00e9j\u00e0 vu\r\n"
        text = "".join(text % i for i in range(6000))
        await relay.send(SENDER, ["bob@fabrikam.test"], mime_message("big", text, "iso-8859-1"))
        got = await delivered_or_bounced(relay, sink)
        assert all(content.isascii() for content in sink.handler.seen)
        assert decoded_text(got) == text
    finally:
        await sink.stop()


async def test_an_8bitmime_destination_gets_the_bytes_verbatim(relay_factory, sink):
    relay = await relay_factory(connectors=connector(sink.port))
    original = mime_message("verbatim", "na\u00efve caf\u00e9\r\n" * 10)
    await relay.send(SENDER, ["bob@fabrikam.test"], original)
    got = await delivered_or_bounced(relay, sink)
    assert got.startswith(b"Received: ") and got.endswith(original)


async def test_a_1_mb_line_is_accepted_on_receipt_and_delivered(relay_factory, sink):
    # Lines are bounded only by the message size (once 64 KiB); command lines stay at 2,048.
    # A megabyte cannot arrive in one read, so the server sees the line in pieces.
    relay = await relay_factory(connectors=connector(sink.port))
    client = await RawClient.connect(relay.port)
    try:
        assert (await client.envelope(SENDER, "bob@fabrikam.test")).startswith(b"354")
        line = b"y" * 1_000_000
        client.writer.write(b"Subject: one long line\r\n\r\n" + line + b"\r\n.\r\n")
        await client.writer.drain()
        assert (await client.reader.readline()).startswith(b"250 ")
        assert (await client.cmd(b"NOOP " + b"z" * 2100 + b"\r\n")).startswith(b"500 5.5.2 Command line too long")
    finally:
        client.close()
    got = await delivered_or_bounced(relay, sink)
    assert max(len(line) for line in got.split(b"\r\n")) <= 998
    assert email.message_from_bytes(got).get_payload(decode=True) == line + b"\r\n"


async def test_a_line_longer_than_the_message_size_limit_is_refused_552(relay_factory, sink):
    relay = await relay_factory(server={"max_message_size": "100KB"}, connectors=connector(sink.port))
    client = await RawClient.connect(relay.port)
    try:
        assert (await client.envelope(SENDER, "bob@fabrikam.test")).startswith(b"354")
        client.writer.write(b"Subject: too long\r\n\r\n" + b"y" * 1_000_000 + b"\r\n.\r\n")
        await client.writer.drain()
        assert (await client.reader.readline()).startswith(b"552 5.3.4")
        assert (await client.cmd(b"NOOP\r\n")).startswith(b"250")    # the session goes on
    finally:
        client.close()
