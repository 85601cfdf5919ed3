"""SMTP smuggling in both directions, over real sockets.

In: no ending but CRLF . CRLF ends a message's DATA, however the client
spells it (bare LF, bare CR, NUL), so nothing pipelined after a fake end is
ever taken for commands.  Out: whatever relaywatch sends a destination (a
relayed message, a spooled big one, an NDR) has no bare CR or LF and no
unstuffed dot line, so a lenient destination cannot find an earlier end in it.
"""

import asyncio
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import LOOPBACK, RawClient, Scripted, eventually, message
from relaywatch.receive.data import LINE_PIECE, NUL, DataParser
from relaywatch.smtpclient.protocol import DotStuffer

SMUGGLED = (b"MAIL FROM:<evil@evil.test>\r\nRCPT TO:<bob@fabrikam.test>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nx")
# Every end of data a lenient server has been seen to accept, and NUL tricks for servers that drop NULs.
FAKE_ENDINGS = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\n.\r", b"\r\n\r.\r\n",
                b"\n\n.\n\n", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\r\n\x00.\x00\r\n"]
LENIENT_ENDINGS = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\n.\r", b"\x00"]


def connector(name, port, domains):
    return {"name": name, "type": "on_premises", "domains": domains,
            "smart_hosts": [f"{LOOPBACK}:{port}"], "tls": "none"}


async def test_a_fake_end_of_data_never_ends_the_message(relay_factory, sink):
    relay = await relay_factory(connectors=[connector("fabrikam", sink.port, ["fabrikam.test"])])
    for ending in FAKE_ENDINGS:
        client = await RawClient.connect(relay.port)
        assert (await client.envelope("alice@contoso.test", "bob@fabrikam.test")).startswith(b"354")
        client.writer.write(b"Subject: innocent\r\n\r\nhello" + ending + SMUGGLED + b"\r\n.\r\nNOOP\r\n")
        # Had DATA ended at the fake end, the first reply would be a 250 for the innocent message.
        first = await asyncio.wait_for(client.reader.readline(), 10)
        assert first.startswith(b"554 5.6."), (ending, first)
        assert await asyncio.wait_for(client.reader.readline(), 10) == b"250 2.0.0 OK\r\n", ending
        client.close()
    assert await relay.store.counts() == {}
    assert sink.messages == []


class RawDestination:
    """A destination that keeps the exact bytes of every DATA (dot-stuffed, up to
    and including the final dot) and refuses RCPT for ghost@."""

    def __init__(self):
        self.data: list[bytes] = []
        self.commands: list[str] = []
        self.server = Scripted(self.script)

    async def script(self, c) -> None:
        await c.say("220 raw.test ESMTP")
        accepted = 0
        while True:
            line = await c.hear()
            self.commands.append(line)
            verb = line.split(" ")[0].upper()
            if verb == "EHLO":
                await c.say("250-raw.test", "250-8BITMIME", "250 PIPELINING")
            elif verb == "RCPT":
                refused = "ghost@" in line
                accepted += not refused
                await c.say("550 5.1.1 No such user" if refused else "250 2.1.5 OK")
            elif verb == "DATA" and not accepted:
                await c.say("554 5.5.1 No valid recipients")
            elif verb == "DATA":
                accepted = 0
                await c.say("354 go ahead")
                self.data.append(await self.read_data(c.reader))
                await c.say("250 2.0.0 OK")
            elif verb == "QUIT":
                await c.say("221 2.0.0 Bye")
                return
            else:
                accepted = 0 if verb in ("MAIL", "RSET") else accepted
                await c.say("250 2.0.0 OK")


    @staticmethod
    async def read_data(reader) -> bytes:
        # Line by line up to the line "." (CRLF . CRLF), so that an earlier, lenient
        # "end" stays inside what is kept and shows up in the checks.
        lines = [b"\r\n"]
        while lines[-1] != b".\r\n" or not lines[-2].endswith(b"\r\n"):
            line = await reader.readline()
            if not line:
                raise ConnectionError("closed in DATA")
            lines.append(line)
        return b"".join(lines)[2:]


def unstuff(wire: bytes) -> bytes:
    assert wire.endswith(b"\r\n.\r\n")
    lines = wire[:-3].split(b"\r\n")[:-1]
    assert all(line[:1] != b"." or line[:2] == b".." for line in lines), "an unstuffed dot line"
    return b"".join((line[1:] if line[:1] == b"." else line) + b"\r\n" for line in lines)


def assert_unambiguous(wire: bytes) -> None:
    """Only CRLF line ends, no NUL, and the first CRLF . CRLF is the end."""
    assert wire.count(b"\r") == wire.count(b"\n") == wire.count(b"\r\n"), "a bare CR or LF"
    for ending in LENIENT_ENDINGS:
        assert ending not in wire[:-3], ending     # before the final line "."
    assert wire.find(b"\r\n.\r\n") == len(wire) - 5


async def test_what_the_relay_sends_downstream_has_only_one_end(relay_factory):
    dest = RawDestination()
    await dest.server.start()
    try:
        relay = await relay_factory(connectors=[connector("hybrid", dest.server.port, ["hybrid.test"])],
                                    domains=[{"name": "hybrid.test", "type": "internal_relay"}])
        tricky = (b".\r\n"                  # arrives stuffed ("..") and must leave stuffed
                  b"..\r\n.x\r\n. \r\n .\r\nend .\r\n\r\n.\r\n"
                  b".MAIL FROM:<evil@evil.test>\r\n")
        bodies = [message("tricky", tricky.decode())]
        # Big bodies are spooled and sent in chunks of 1 MiB: lines of three octets
        # around the first boundary put it before a dot, a CR and an LF in one of the three.
        for pad in range(3):
            bodies.append(message("x" * pad, ("y" * 998 + "\r\n") * 1030 + ".\r\n" * 10_000))
        for body in bodies:
            await relay.send("alice@contoso.test", ["bob@hybrid.test"], body)
        # And an NDR: ghost@ is refused, the notice goes back to carol through the same destination.
        await relay.send("carol@hybrid.test", ["ghost@hybrid.test"], message("bounce me", ".\r\n..dots\r\n"))
        await eventually(lambda: len(dest.data) == len(bodies) + 1, timeout=30, what=lambda: f"every message and the NDR: {len(dest.data)} {dest.commands[-8:]}")
        for wire in dest.data:
            assert_unambiguous(wire)
        for body, wire in zip(bodies, dest.data):
            assert unstuff(wire).endswith(body), "the content changed on the way"
        ndr = unstuff(dest.data[-1])
        assert b"multipart/report" in ndr and b"ghost@hybrid.test" in ndr
        verbs = {c.split(" ")[0].split(":")[0].upper() for c in dest.commands}
        assert verbs <= {"EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT"}, verbs
    finally:
        await dest.server.stop()


# -- the stuffer on its own, for every way a body can be cut into chunks ------------------

_line = st.sampled_from([b"", b".", b"..", b".x", b"x", b" .", b"x.", b"\x2e\x2e\x2e", b"MAIL FROM:<a@b>"])


@settings(max_examples=300, deadline=None, database=None)
@given(lines=st.lists(_line, max_size=30), cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_stuffing_in_chunks_is_the_same_as_at_once(lines, cuts):
    body = b"".join(line + b"\r\n" for line in lines)
    stuffer = DotStuffer()
    points = sorted({min(c, len(body)) for c in cuts} | {0, len(body)})
    wire = b"".join(stuffer.stuff(body[a:b]) for a, b in zip(points, points[1:])) + stuffer.end()
    reference = re.sub(rb"(?m)^\.", b"..", body) + b".\r\n"
    assert wire == reference
    assert_unambiguous(b"\r\n" + wire)
    assert unstuff(b"\r\n" + wire) == b"\r\n" + body



def test_a_nul_inside_a_line_longer_than_a_piece_is_refused_too():
    parser = DataParser(None)
    line = b"x" * LINE_PIECE + b"\x00." + b"y" * LINE_PIECE
    kept = b"".join(parser.feed(line[i:i + 4096]) for i in range(0, len(line), 4096))
    kept += parser.feed(b"\r\n.\r\nNOOP\r\n")
    assert parser.done and parser.problem == NUL and parser.leftover == b"NOOP\r\n"
    assert b"\x00" not in kept
