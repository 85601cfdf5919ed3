"""The relay is not open: an untrusted client (bound to 127.0.0.2, outside
trusted_networks) gets a 5xx at RCPT for every classic relaying and
backscatter trick, and nothing is queued; postmaster and the accepted domains
stay reachable (RFC 5321 4.5.1).  Real sockets, real SQLite queue, a real
aiosmtpd destination for the on-premises connector."""

import asyncio

import pytest

from helpers import LOOPBACK, Sink, SinkHandler, eventually, free_port, message
from relaywatch.config import parse_config
from relaywatch.errors import ConfigError
from relaywatch.route import Refusal, decide, normalize, sender_routing

pytestmark = pytest.mark.both_loops   # delivery end to end: asyncio and uvloop (serve runs uvloop)


UNTRUSTED = "127.0.0.2"
TRUSTED = LOOPBACK


class Client:
    """Raw SMTP from a chosen source address (smtplib would fix up what we send)."""

    @classmethod
    async def connect(cls, port: int, source: str) -> "Client":
        self = cls()
        self.reader, self.writer = await asyncio.open_connection(LOOPBACK, port, local_addr=(source, 0))
        assert (await self.reply()).startswith("220")
        return self

    async def reply(self) -> str:
        lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 10)).decode("latin-1")
            assert line.endswith("\r\n"), f"connection closed after {lines!r}"
            lines.append(line[:-2])
            if line[3:4] != "-":
                return "\r\n".join(lines)

    async def cmd(self, line: bytes | str) -> str:
        self.writer.write(line.encode() if isinstance(line, str) else line)
        await self.writer.drain()
        return await self.reply()

    async def send(self, rcpt: str, body: bytes) -> str:
        """MAIL, RCPT, DATA, body; the last reply."""
        assert (await self.cmd("MAIL FROM:<x@example.org>\r\n")).startswith("250")
        reply = await self.cmd(f"RCPT TO:{rcpt}\r\n")
        assert reply.startswith("250"), (rcpt, reply)
        assert (await self.cmd("DATA\r\n")).startswith("354")
        return await self.cmd(body + b".\r\n")

    def close(self) -> None:
        self.writer.close()


def relay_config(sink_port: int, **server) -> dict:
    return dict(
        server={"trusted_networks": ["127.0.0.1/32"], **server},
        # Mail for the internet (an NDR to x@example.org, were one sent) looks up MX on loopback only.
        dns={"nameservers": [f"{LOOPBACK}:{free_port()}"], "timeout": "1s"},
        domains=[{"name": "contoso.test", "type": "authoritative", "mailboxes": ["alice"]},
                 {"name": "hybrid.test", "type": "internal_relay", "mailboxes": []}],
        connectors=[{"name": "onprem", "type": "on_premises", "domains": ["hybrid.test"],
                     "smart_hosts": [f"{LOOPBACK}:{sink_port}"], "tls": "none"}])


# (what follows RCPT TO:, the reply's code and enhanced code)
RELAY_TRICKS = [
    (b"<user%elsewhere.test@hybrid.test>", "554 5.7.1"),           # percent hack via the on-premises server
    (b"<user%elsewhere.test@contoso.test>", "554 5.7.1"),
    (b"user%elsewhere.test@hybrid.test", "554 5.7.1"),             # the same without brackets
    (b"<elsewhere.test!user@hybrid.test>", "554 5.7.1"),           # bang path
    (b"<elsewhere.test!user@contoso.test>", "554 5.7.1"),
    (b'<"user@elsewhere.test"@hybrid.test>', "554 5.7.1"),         # quoted local part with @
    (b'<"user%elsewhere.test"@hybrid.test>', "554 5.7.1"),
    (b'<"user\\@elsewhere.test"@hybrid.test>', "554 5.7.1"),       # ... with a quoted pair
    (b'<"elsewhere.test!user"@hybrid.test>', "554 5.7.1"),
    (b'<"user@elsewhere.test">', "501 5.1.3"),                     # quoted, no domain
    (b"<@hybrid.test:user@elsewhere.test>", "554 5.7.1"),          # source route out
    (b"<@relay.test,@hybrid.test:user@hybrid.test>", "554 5.7.1"),  # source route, even to us
    (b"<USER%ELSEWHERE.TEST@HYBRID.TEST.>", "554 5.7.1"),
    (b"<user@elsewhere.test>", "554 5.7.1"),                       # plain relaying
    (b"<user@ELSEWHERE.TEST>", "554 5.7.1"),                       # upper case
    (b"<user@elsewhere.test.>", "554 5.7.1"),                      # trailing dot
    (b"<user@elsewhere.test..>", "501 5.1.3"),
    (b'<"user"@elsewhere.test>', "554 5.7.1"),
    (b"<postmaster@elsewhere.test>", "554 5.7.1"),                 # someone else's postmaster
    (b"<user@relay.test>", "554 5.7.1"),                           # our host name is not a mail domain
    (b"<user@[127.0.0.1]>", "550 5.1.2"),                          # address literals
    (b"<user@[127.0.0.2]>", "550 5.1.2"),
    (b"<user@[IPv6:::1]>", "550 5.1.2"),
    (b"<user@[hybrid.test]>", "550 5.1.2"),
    (b"<user@127.0.0.1>", "501 5.1.3"),                            # an IP address without brackets
    (b"<user@>", "501 5.1.3"),                                     # empty domain
    (b"<user@.>", "501 5.1.3"),                                    # only a dot
    (b"<@>", "501 5.1.3"),
    (b"<user>", "501 5.1.3"),                                      # no domain (only postmaster may)
    (b"<>", "501 5.1.3"),
    (b"<user@hybrid.test@elsewhere.test>", "501 5.1.3"),           # two @
    (b"<user\\@elsewhere.test@hybrid.test>", "501 5.1.3"),         # backslash outside quotes
    (b"<user@elsewhere.test%hybrid.test>", "501 5.1.3"),
    (b"<user@-hybrid.test>", "501 5.1.3"),
    (b"<user@" + b"a" * 64 + b".hybrid.test>", "501 5.1.3"),       # a label longer than DNS allows
    ("<üser@hybrid.test>".encode(), "553 5.6.7"),                  # UTF-8 without SMTPUTF8 (RFC 6531 3.5)
    ("<user@hÿbrid.test>".encode("latin-1"), "500 5.5.2"),
    (b"<user@hybrid.test\x00.elsewhere.test>", "500 5.5.2"),       # NUL
    (b"<user@sub.contoso.test>", "554 5.7.1"),                     # an accepted domain's subdomain
    (b"<user@sub.hybrid.test>", "554 5.7.1"),
    (b"<user@contoso.test.elsewhere.test>", "554 5.7.1"),          # accepted domain as a prefix
    (b"<user@xcontoso.test>", "554 5.7.1"),                        # ... as a suffix
    (b"<user@localhost>", "554 5.7.1"),
    (b"<nobody@contoso.test>", "550 5.1.10"),                      # authoritative: unknown user
    (b"<nobody@CONTOSO.TEST.>", "550 5.1.10"),
    (b"<user@hybrid.test> NOTIFY=NEVER", "555 5.5.4"),
    (b"<user@hybrid.test>,<user@elsewhere.test>", "555 5.5.4"),
]


async def test_open_relay_matrix_from_an_untrusted_client(relay_factory, sink):
    relay = await relay_factory(**relay_config(sink.port))
    wrong = []
    for rcpt, expected in RELAY_TRICKS:
        # A session per trick: errors count towards the 20 after which a client is cut off.
        client = await Client.connect(relay.port, UNTRUSTED)
        assert (await client.cmd("HELO client.test\r\n")).startswith("250")
        assert (await client.cmd("MAIL FROM:<x@example.org>\r\n")).startswith("250")
        reply = await client.cmd(b"RCPT TO:" + rcpt + b"\r\n")
        if not reply.startswith(expected):
            wrong.append((rcpt, expected, reply))
        data = await client.cmd("DATA\r\n")
        if not data.startswith("554 5.5.1"):
            wrong.append((rcpt, "no DATA", data))
        client.close()
    assert wrong == []
    assert len(RELAY_TRICKS) >= 40
    assert await relay.store.counts() == {}
    assert sink.messages == []


LEGITIMATE = [
    # (RCPT TO:, where it must arrive: a Maildir address or "sink:<address>")
    ("<alice@contoso.test>", "alice@contoso.test"),
    ("<Alice@CONTOSO.TEST.>", "alice@contoso.test"),
    ('<"alice"@contoso.test>', "alice@contoso.test"),
    ("<bob@hybrid.test>", "sink:bob@hybrid.test"),
    ("<Bob@HYBRID.Test.>", "sink:Bob@hybrid.test"),    # normalised before the connector sees it
    ("<postmaster>", "postmaster@relay.test"),
    ("<POSTMASTER>", "postmaster@relay.test"),
    ("<PostMaster@Relay.Test>", "postmaster@relay.test"),
    ("<postmaster@relay.test.>", "postmaster@relay.test"),
    ("<postmaster@contoso.test>", "postmaster@relay.test"),   # authoritative domain without that mailbox
]


@pytest.mark.parametrize("source", [UNTRUSTED, TRUSTED])
async def test_accepted_domains_and_postmaster_are_reachable(relay_factory, source):
    # Recipients the on-premises server does not know exactly as we send them are refused there:
    # had relaywatch passed on "Bob@HYBRID.Test." it would be bouncing to a sender it never verified.
    sink = await Sink(SinkHandler(rcpt_reply=lambda a: None if a in ("bob@hybrid.test", "Bob@hybrid.test")
                                  else "550 5.1.3 Bad recipient address syntax")).start()
    try:
        relay = await relay_factory(**relay_config(sink.port))
        client = await Client.connect(relay.port, source)
        assert (await client.cmd("HELO client.test\r\n")).startswith("250")
        for i, (rcpt, _) in enumerate(LEGITIMATE):
            reply = await client.send(rcpt, message(f"legit {i}"))
            assert reply.startswith("250 2.0.0"), (rcpt, reply)
        client.close()
        maildirs = {}
        for _, where in LEGITIMATE:
            if not where.startswith("sink:"):
                maildirs[where] = maildirs.get(where, 0) + 1
        await eventually(lambda: all(len(relay.maildir(a)) == n for a, n in maildirs.items())
                         and len(sink.messages) == 2, what="every legitimate message delivered")
        assert sorted(m.recipients[0] for m in sink.messages) == ["Bob@hybrid.test", "bob@hybrid.test"]
        # Nothing was refused downstream, so no NDR is queued for the (unverified) sender.
        await eventually(lambda: _empty(relay), what="the queue to empty (no NDR)")
        assert b"Delivered-To: postmaster@relay.test\r\n" in relay.maildir("postmaster@relay.test")[0]
    finally:
        await sink.stop()


async def _empty(relay):
    return await relay.store.counts() == {}


async def test_trusted_clients_may_still_route_through_an_accepted_domain(relay_factory, sink):
    relay = await relay_factory(**relay_config(sink.port))
    client = await Client.connect(relay.port, TRUSTED)
    await client.cmd("HELO client.test\r\n")
    assert (await client.send("<user%elsewhere.test@hybrid.test>", message())).startswith("250")
    assert (await client.send("<@relay.test:carol@hybrid.test>", message())).startswith("250")   # route dropped
    client.close()
    await eventually(lambda: len(sink.messages) == 2, what="both relayed")
    assert sorted(m.recipients[0] for m in sink.messages) == ["carol@hybrid.test", "user%elsewhere.test@hybrid.test"]


async def test_postmaster_goes_where_server_postmaster_says(relay_factory, sink):
    relay = await relay_factory(**relay_config(sink.port, postmaster="hostmaster@hybrid.test"))
    client = await Client.connect(relay.port, UNTRUSTED)
    await client.cmd("HELO client.test\r\n")
    assert (await client.cmd("MAIL FROM:<x@example.org>\r\n")).startswith("250")
    assert (await client.cmd("RCPT TO:<Postmaster>\r\n")).startswith("250")
    assert (await client.cmd("RCPT TO:<postmaster@relay.test>\r\n")) == "250 2.1.5 Recipient OK (duplicate ignored)"
    assert (await client.cmd("DATA\r\n")).startswith("354")
    assert (await client.cmd(message() + b".\r\n")).startswith("250")
    client.close()
    await eventually(lambda: sink.messages, what="postmaster mail at the on-premises server")
    assert sink.messages[0].recipients == ["hostmaster@hybrid.test"]


async def test_postmaster_defaults_to_the_first_alert_address(relay_factory, sink):
    relay = await relay_factory(**relay_config(sink.port), alerts={"notify": ["ops@hybrid.test", "b@x.test"]})
    assert relay.app.config.server.postmaster == "ops@hybrid.test"
    client = await Client.connect(relay.port, UNTRUSTED)
    await client.cmd("HELO client.test\r\n")
    assert (await client.send("<postmaster>", message())).startswith("250")
    client.close()
    await eventually(lambda: sink.messages, what="postmaster mail for the admin")
    assert sink.messages[0].recipients == ["ops@hybrid.test"]


# -- the pure parts ---------------------------------------------------------------------------

@pytest.mark.parametrize("address, expected", [
    ("user@Contoso.TEST.", "user@contoso.test"),
    ("User@contoso.test", "User@contoso.test"),          # local parts keep their case
    ('"alice"@contoso.test', "alice@contoso.test"),      # quotes that are not needed go
    ('"al\\ice"@contoso.test', "alice@contoso.test"),
    ('"john doe"@contoso.test', '"john doe"@contoso.test'),
    ("PostMaster", "postmaster"),
    ('"PostMaster"', "postmaster"),
    ("bob", "501 5.1.3"),
    ("a@[192.0.2.1]", "550 5.1.2"),
    ("a@192.0.2.1", "501 5.1.3"),
    ("a@" + "b" * 64 + ".test", "501 5.1.3"),
    ("a@" + "b." * 127 + "test", "501 5.1.3"),            # 258 octets: longer than a domain name may be
])
def test_normalize(address, expected):
    result = normalize(address)
    assert (result.reply[:9] if isinstance(result, Refusal) else result) == expected


@pytest.mark.parametrize("address, route, expected", [
    ("a%b@c.test", "", "a % in the local part"),
    ("b!a@c.test", "", "a ! (bang path) in the local part"),
    ('"a@b"@c.test', "", "an @ in the local part"),
    ("a@c.test", "@x.test", "a source route"),
    ('"a b"@c.test', "", None),
    ("a.b+tag@c.test", "", None),
])
def test_sender_routing(address, route, expected):
    assert sender_routing(address, route) == expected


def test_server_postmaster_is_validated_and_named():
    cases = [
        ({"server": {"postmaster": "nobody"}}, "server.postmaster: 'nobody' is not an email address"),
        ({"server": {"postmaster": "a@b@"}}, "server.postmaster: "),
        ({"server": {"postmaster": "x@contoso.test"}, "domains": [{"name": "contoso.test"}]},
         "server.postmaster: x@contoso.test is not a mailbox of the authoritative domain contoso.test"),
        ({"alerts": {"notify": ["ops@contoso.test"]}, "domains": [{"name": "contoso.test"}]},
         "server.postmaster: not set, and its default, the first alerts.notify address, ops@contoso.test"),
    ]
    for raw, error in cases:
        with pytest.raises(ConfigError) as exc:
            parse_config(raw)
        assert str(exc.value).startswith(error), (raw, str(exc.value))
    assert parse_config({"server": {"hostname": "MX1.Contoso.Test"}}).server.postmaster == "postmaster@mx1.contoso.test"
    config = parse_config({"server": {"postmaster": "admin@contoso.test"},
                           "domains": [{"name": "contoso.test", "mailboxes": ["admin"]}]})
    assert decide(config, "postmaster").address == "admin@contoso.test"
    assert decide(config, "postmaster").route.kind.value == "local"


async def test_the_sender_is_normalised_too(relay_factory, sink):
    relay = await relay_factory(**relay_config(sink.port))
    client = await Client.connect(relay.port, UNTRUSTED)
    await client.cmd("HELO client.test\r\n")
    assert (await client.cmd("MAIL FROM:<Carol@HYBRID.TEST.>\r\n")).startswith("250")
    assert (await client.cmd("RCPT TO:<bob@hybrid.test>\r\n")).startswith("250")
    assert (await client.cmd("DATA\r\n")).startswith("354")
    assert (await client.cmd(message() + b".\r\n")).startswith("250")
    client.close()
    await eventually(lambda: sink.messages, what="delivery")
    assert sink.messages[0].sender == "Carol@hybrid.test"
