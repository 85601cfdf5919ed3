"""Test parts: real servers on loopback, a DNS server, a TOML writer, waiting.

Every server listens on 127.0.0.1 with an OS-chosen port; nothing here talks
to any other address.
"""

from __future__ import annotations

import asyncio
import contextlib
import collections
import datetime
import json
import os
import random
import re
import signal
import smtplib
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
from aiosmtpd.smtp import SMTP
from click.testing import CliRunner

from relaywatch.app import Relaywatch
from relaywatch.clock import SYSTEM_CLOCK
from relaywatch.cli import main as cli_main
from relaywatch.config import load_config

ROOT = Path(__file__).resolve().parent.parent

LOOPBACK = "127.0.0.1"

# How long a `relaywatch serve` process may take to listen: the interpreter, the imports, the
# store's schema check.  About a second alone; several on a loaded machine.  A start that fails
# ends the wait at once (the process exits), so a long deadline costs nothing.
STARTUP = 60.0


async def eventually(predicate: Callable[[], Any], timeout: float = 15.0, what: str | Callable[[], str] = "condition"):
    """Wait for ``predicate()`` (sync or async) to be truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what() if callable(what) else what}")
        await asyncio.sleep(0.02)


async def clear_of_utc_midnight(margin: float = 60.0) -> None:
    """For a test about one UTC day (TLS-RPT's day of sessions, "failed today"): if midnight
    UTC is less than ``margin`` seconds away, wait until it has passed, so that the whole
    test runs within one day on the relay's wall clock."""
    midnight = (time.time() // 86400 + 1) * 86400
    if midnight - time.time() < margin:
        await eventually(lambda: time.time() >= midnight, timeout=margin + 5, what="midnight UTC to pass")


class FakeClock:
    """relaywatch/clock.py's ``Clock`` that moves only when the test says: ``advance(seconds)``.

    It starts at the real time (so what the store stamps with time.time() is not
    in its future) and stands still; whatever waits on it (``sleep``, ``wait``:
    the scheduler's poll, the watch's tick, the heartbeat, a login block) wakes
    when ``advance`` takes it past its deadline, at once and in deadline order.
    Wall time and monotonic time move together."""

    def __init__(self, start: float | None = None):
        self._now = time.time() if start is None else start
        self._offset = time.monotonic() - self._now     # monotonic() = now() + offset, as on a real host
        self._sleepers: list[tuple[float, asyncio.Future]] = []

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now + self._offset

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "a clock goes forward"
        self._now += seconds
        due = sorted((s for s in self._sleepers if s[0] <= self._now), key=lambda s: s[0])
        self._sleepers = [s for s in self._sleepers if s[0] > self._now]
        for _, future in due:
            if not future.done():
                future.set_result(None)

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future = asyncio.get_running_loop().create_future()
        self._sleepers = [s for s in self._sleepers if not s[1].done()]   # cancelled waits
        self._sleepers.append((self._now + seconds, future))
        await future

    async def wait(self, event: asyncio.Event, timeout: float) -> bool:
        if event.is_set():
            return True
        waiter = asyncio.ensure_future(event.wait())
        sleeper = asyncio.ensure_future(self.sleep(timeout))
        try:
            await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            sleeper.cancel()
        return event.is_set()

    @property
    def waiting(self) -> int:
        """How many sleeps and waits are pending (to wait until a loop is parked on the clock)."""
        return sum(1 for _, f in self._sleepers if not f.done())


async def settle(clock: FakeClock, relay: "Relay") -> None:
    """Wait (with a deadline) until the relay on ``clock`` has done what its clock allows:
    every loop parked on the clock again and nothing being delivered or recorded.
    What has not happened then does not happen until the clock moves.

    A destination's worker that delivered keeps its connection and, while it waits for more of
    that destination's mail, its idle watch waits on the clock (deliver/idle_watch.py, one per
    worker): it is counted beside the loops,
    or its wait would stand in for the scheduler's own while that is still leasing (seen on
    PostgreSQL, whose lease takes longer: the next attempt was found after settle returned)."""
    scheduler = relay.app.scheduler

    def idle() -> bool:
        return (clock.waiting >= relay.parked + len(scheduler._workers) and scheduler.inflight == 0
                and not scheduler._record_tasks)
    await eventually(idle, what="the relay to wait on its clock again")


async def advance(clock: FakeClock, relay: "Relay", seconds: float) -> None:
    """Move ``clock`` on, then let the relay act on it (``settle``)."""
    clock.advance(seconds)
    await settle(clock, relay)


def _ephemeral_ports() -> range:
    """The ports the kernel picks itself: for a bind to port 0 and a connection's own end."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999          # Linux's default
    return range(low, high + 1)


_PORT_CHOICE = random.SystemRandom()      # not the random module's: hypothesis seeds that one
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on: connecting is refused (and a test may listen on it later).

    Never one of the kernel's ephemeral ports: one of those, bound and released, is
    the next port-0 server's with a chance of 1 in ~14,000 per bind (measured: 2 in
    30,000), and every relay, sink and console a test starts binds port 0, so a
    "refused" connector could reach a relay's own listener.  Outside that range only
    this function hands ports out, each once per run; the bind checks nothing else
    (PostgreSQL, another program) holds it."""
    ephemeral = _ephemeral_ports()
    ranges = [r for r in (range(10_000, ephemeral.start), range(ephemeral.stop, 65_536)) if len(r)]
    for _ in range(1000):
        port = _PORT_CHOICE.choice(_PORT_CHOICE.choices(ranges, weights=[len(r) for r in ranges])[0])
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free port outside the ephemeral range")


def make_store(backend: str, tmp_path: Path, request, **kwargs):
    """An unopened store of ``backend`` ("memory", "sqlite" or "postgres": a fresh schema, pg_dsn)."""
    if backend == "memory":
        from relaywatch.store.memory import MemoryStore
        return MemoryStore(**kwargs)
    if backend == "sqlite":
        from relaywatch.store.sqlite import SqliteStore
        return SqliteStore(tmp_path / "q.sqlite3", **kwargs)
    from relaywatch.store.postgres import PostgresStore
    return PostgresStore(request.getfixturevalue("pg_dsn"), **kwargs)


@contextlib.asynccontextmanager
async def opened_store(backend: str, tmp_path: Path, request, **kwargs):
    """``make_store``'s store, opened, and closed afterwards."""
    store = make_store(backend, tmp_path, request, **kwargs)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


STORE_BACKENDS = ["memory", "sqlite", "postgres"]   # the contract suite runs over each
SQL_BACKENDS = ["sqlite", "postgres"]               # the rest: other processes and nodes on one database


# -- destination SMTP servers --------------------------------------------------------

@dataclass
class Received:
    sender: str
    recipients: list[str]
    content: bytes
    mail_options: tuple[str, ...] = ()     # MAIL FROM parameters (SMTPUTF8, BODY=8BITMIME ...)
    rcpt_options: tuple[str, ...] = ()     # RCPT TO parameters of all recipients (aiosmtpd upper-cases them)


class SinkHandler:
    """An aiosmtpd destination that keeps what it receives (or answers as told)."""

    def __init__(self, rcpt_reply: Callable[[str], str | None] | None = None,
                 data_reply: str | None = None, keep_content: bool = True):
        self.messages: list[Received] = []
        self.rcpt_reply = rcpt_reply
        self.data_reply = data_reply
        self.keep_content = keep_content
        self.bytes_received = 0
        self.commands: list[str] = []       # MAIL and RCPT lines as sent (a DsnSmtp keeps them)

    async def handle_RCPT(self, server, session, envelope, address, options):
        reply = self.rcpt_reply(address) if self.rcpt_reply else None
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_reply:
            return self.data_reply
        content = envelope.original_content or b""
        self.bytes_received += len(content)
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                      content if self.keep_content else b"", tuple(envelope.mail_options),
                                      tuple(envelope.rcpt_options)))
        return f"250 2.0.0 Ok: queued as SINK{len(self.messages)}"


class RecordingHandler(SinkHandler):
    """A sink that also notes every MAIL FROM and whether the session was under TLS."""

    def __init__(self):
        super().__init__()
        self.mail_from: list[tuple[str, bool]] = []

    async def handle_MAIL(self, server, session, envelope, address, options):
        self.mail_from.append((address, session.ssl is not None))
        envelope.mail_from = address
        return "250 2.1.0 OK"


class DsnSmtp(SMTP):
    """aiosmtpd offering DSN (RFC 3461), which it does not by default (it refuses RET,
    ENVID, NOTIFY and ORCPT with 555); it keeps the MAIL and RCPT lines as sent, since
    aiosmtpd hands on the parameters upper-cased."""

    async def push(self, status: str) -> None:
        if status == "250 HELP":            # the last line of aiosmtpd's EHLO reply
            await super().push("250-DSN")
        await super().push(status)

    def _getparams(self, params):
        result = super()._getparams(params)
        for key in ("RET", "ENVID", "NOTIFY", "ORCPT"):
            if result is not None:
                result.pop(key, None)
        return result

    async def smtp_MAIL(self, arg):
        self.event_handler.commands.append(f"MAIL {arg}")
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg):
        self.event_handler.commands.append(f"RCPT {arg}")
        await super().smtp_RCPT(arg)


class LoopbackServer:
    """Something a test started listening on loopback: ``server`` (an asyncio Server), ``port``."""
    server: asyncio.base_events.Server | None = None
    port: int = 0

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None


class Sink(LoopbackServer):
    def __init__(self, handler: SinkHandler | None = None, tls_context=None, port: int = 0,
                 data_size_limit: int = 64 * 1024 * 1024, smtputf8: bool = False, dsn: bool = False):
        self.handler = handler or SinkHandler()
        self.smtputf8 = smtputf8      # offer SMTPUTF8 (RFC 6531); aiosmtpd does not by default
        self.dsn = dsn                # offer DSN (RFC 3461): DsnSmtp
        self.tls_context = tls_context
        self.port = port
        self.server: asyncio.base_events.Server | None = None
        self.data_size_limit = data_size_limit

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    async def start(self) -> "Sink":
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: (DsnSmtp if self.dsn else SMTP)(self.handler, hostname="sink.test", tls_context=self.tls_context,
                         data_size_limit=self.data_size_limit, timeout=30, enable_SMTPUTF8=self.smtputf8),
            LOOPBACK, self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self


class Scripted:
    """A destination that misbehaves as its script says (asyncio.start_server)."""

    def __init__(self, script: Callable[["ScriptedConnection"], Awaitable[None]]):
        self.script = script
        self.server = None
        self.port = 0
        self.connections = 0
        self._tasks: set = set()

    async def start(self) -> "Scripted":
        async def handle(reader, writer):
            self.connections += 1
            task = asyncio.current_task()
            self._tasks.add(task)
            try:
                await self.script(ScriptedConnection(reader, writer))
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                self._tasks.discard(task)
                writer.close()
        self.server = await asyncio.start_server(handle, LOOPBACK, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.server.close()
        for t in list(self._tasks):
            t.cancel()
        await self.server.wait_closed()


class ScriptedConnection:
    """One connection to a ``Scripted`` server, as its script speaks it (say, hear); not the
    relay's receive/conversation.py ``Conversation``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    async def say(self, *lines: str) -> None:
        self.writer.write("".join(line + "\r\n" for line in lines).encode())
        await self.writer.drain()

    async def hear(self) -> str:
        line = await self.reader.readline()
        if not line:
            raise ConnectionError("client closed")
        return line.decode().rstrip("\r\n")

    async def greet_and_ehlo(self, extensions=("8BITMIME",)) -> None:
        await self.say("220 scripted.test ESMTP")
        await self.hear()
        await self.say("250-scripted.test", *[f"250-{e}" for e in extensions[:-1]], f"250 {extensions[-1]}")

    async def until_data(self) -> None:
        """Answer MAIL and RCPTs with 250 until DATA, answer 354."""
        while True:
            cmd = await self.hear()
            if cmd.upper() == "DATA":
                await self.say("354 go ahead")
                return
            await self.say("250 2.0.0 OK")

    async def read_body(self) -> bytes:
        data = await self.reader.readuntil(b"\r\n.\r\n")
        return data

    def reset(self) -> None:
        """Close with RST instead of FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def hang(self) -> None:
        await asyncio.sleep(3600)

    async def misbehave(self, how: str) -> None:
        """End the session as a broken server would: "reset" (RST), "close" (FIN),
        "silent" (keep the connection, say nothing) or "garbage" (not SMTP, not TLS)."""
        if how == "reset":
            self.reset()
        elif how == "close":
            self.writer.close()
        elif how == "silent":
            await self.hang()
        elif how == "garbage":
            await self.say("XXXX this is not what you think it is")
            await self.hang()
        else:
            raise ValueError(how)

    async def answer_tls_with_an_alert(self, context: ssl.SSLContext) -> str:
        """Play the server side of the client's TLS handshake with ``context`` over
        memory BIOs and send what OpenSSL says, alert included, then close.

        asyncio's own start_tls (and so aiosmtpd) drops the connection on a failed
        handshake without sending the alert; real MTAs send it.  Returns the
        server-side reason (UNSUPPORTED_PROTOCOL, NO_SHARED_CIPHER)."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_side=True)
        while True:
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("client closed during the handshake")
            incoming.write(data)
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                self.writer.write(outgoing.read())
                continue
            except ssl.SSLError as exc:
                self.writer.write(outgoing.read())
                await self.writer.drain()
                self.writer.close()
                return exc.reason
            raise AssertionError("the handshake succeeded; the context was meant to refuse it")


class FullBacklog:
    """A listening socket whose accept queue is full, so new SYNs are dropped:
    connecting to it times out (no root needed)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers: list[socket.socket] = []
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect((LOOPBACK, self.port))
            except BlockingIOError:
                pass
            self.fillers.append(s)

    def close(self) -> None:
        for s in self.fillers:
            s.close()
        self.sock.close()


# -- DNS on loopback ---------------------------------------------------------------------

class WebhookReceiver:
    """A real HTTP server on loopback that keeps every POST."""

    def __init__(self, status: int = 200):
        self.posts: list[tuple[dict, bytes]] = []
        self.status = status

    async def start(self):
        async def handle(reader, writer):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:] if l)}
            body = await reader.readexactly(int(headers.get("content-length", 0)))
            self.posts.append((headers, body))
            writer.write(f"HTTP/1.1 {self.status} X\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
            writer.close()
        self.server = await asyncio.start_server(handle, LOOPBACK, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self):
        self.server.close()
        await self.server.wait_closed()

    def events(self):
        return [json.loads(body)["transition"] for _, body in self.posts]


class DnsServer(asyncio.DatagramProtocol):
    """Answers from ``zone``: {(name, TYPE): [rdata, ...] | "NXDOMAIN" | "SERVFAIL" |
    "REFUSED" | "DROP" | "BOGUS"}.  A name present under another type answers NODATA.

    As a validating resolver would: answers for names in ``secure`` (or every
    name, ``secure=True``) carry the AD bit when the query asked for DNSSEC
    (DO or AD); "BOGUS" is SERVFAIL with the Extended DNS Error "DNSSEC Bogus"
    (RFC 8914 code 6).  A name with a CNAME entry answers any other type with
    the whole chain and the target's records, as a recursive resolver does;
    AD then only when every name of the chain is secure."""

    def __init__(self, zone: dict[tuple[str, str], Any], secure: set[str] | bool = frozenset()):
        self.zone = {(n.lower().rstrip("."), t.upper()): v for (n, t), v in zone.items()}
        self.secure = secure if secure is True else {n.lower().rstrip(".") for n in secure}
        self.transport = None
        self.port = 0
        self.queries: list[tuple[str, str]] = []
        self.dnssec_asked: list[bool] = []      # per query: did it ask for DNSSEC (DO or AD)?

    async def start(self) -> "DnsServer":
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(LOOPBACK, 0))
        self.port = self.transport.get_extra_info("sockname")[1]
        return self

    def stop(self) -> None:
        self.transport.close()

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        qtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, qtype))
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        asked = bool(query.ednsflags & dns.flags.DO) or bool(query.flags & dns.flags.AD)
        self.dnssec_asked.append(asked)
        owner, chain = question.name, [name]
        while qtype != "CNAME" and (chain[-1], "CNAME") in self.zone and len(chain) < 8:
            target = self.zone[(chain[-1], "CNAME")][0]
            response.answer.append(dns.rrset.from_text(owner, 300, "IN", "CNAME", target))
            owner = dns.name.from_text(target)
            chain.append(owner.to_text(omit_final_dot=True).lower())
        name = chain[-1]
        if asked and (self.secure is True or all(n in self.secure for n in chain)):
            response.flags |= dns.flags.AD
        entry = self.zone.get((name, qtype))
        if entry == "DROP":
            return
        if entry == "BOGUS":
            response.flags &= ~dns.flags.AD
            response.set_rcode(dns.rcode.SERVFAIL)
            response.use_edns(0, options=[dns.edns.EDEOption(dns.edns.EDECode.DNSSEC_BOGUS, "signature expired")])
        elif entry in ("NXDOMAIN", "SERVFAIL", "REFUSED"):
            response.set_rcode(dns.rcode.from_text(entry))
        elif entry is None:
            if not any(n == name for n, _ in self.zone):
                response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            response.answer.append(dns.rrset.from_text(owner, 300, "IN", qtype, *entry))
        self.transport.sendto(response.to_wire(), addr)


# -- the relay under test ---------------------------------------------------------------------

def to_toml(data: dict) -> str:
    """Enough TOML for test configs: scalars, lists, tables, arrays of tables."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):      # a table inside a table: inline
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(v)
    out = []
    for key, v in data.items():
        if v == []:
            continue   # an empty array of tables is no key at all
        if isinstance(v, dict):
            out.append(f"[{key}]")
            out += [f"{k} = {value(x)}" for k, x in v.items()]
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                out.append(f"[[{key}]]")
                out += [f"{k} = {value(x)}" for k, x in item.items()]
        else:
            out.append(f"{key} = {value(v)}")
        out.append("")
    return "\n".join(out)


def base_config(tmp_path: Path, **sections) -> dict:
    config = {
        "server": {"hostname": "relay.test", "listen": [f"{LOOPBACK}:0"], "data_dir": str(tmp_path / "data"),
                   "shutdown_grace": "2s"},
        "queue": {"retry_intervals": ["1s"], "message_expiration": "1h"},
        "delivery": {"connect_timeout": "2s", "command_timeout": "2s", "data_timeout": "2s",
                     "final_timeout": "2s", "connection_idle": "0.2s"},
        "domains": [{"name": "contoso.test", "type": "authoritative", "mailboxes": ["alice", "postmaster"]}],
        "connectors": [],
        # The console on a port of its own (its default, 8025, would collide between tests).
        "http": {"listen": f"{LOOPBACK}:0"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    return config


class Relay:
    """relaywatch itself, in this event loop, with a config file on disk (and the
    real clock, or the test's ``FakeClock``)."""

    def __init__(self, tmp_path: Path, config: dict, clock=None):
        self.tmp_path = tmp_path
        self.raw = config
        self.clock = clock
        self.config_path = tmp_path / "relaywatch.toml"
        self.app: Relaywatch | None = None

    def write_config(self) -> None:
        self.config_path.write_text(to_toml(self.raw))

    async def start(self) -> "Relay":
        self.write_config()
        self.app = Relaywatch(load_config(self.config_path), clock=self.clock or SYSTEM_CLOCK)
        await self.app.start()
        if isinstance(self.clock, FakeClock):
            # Its loops (the scheduler's poll, the watch's tick and its backlog prober, the
            # heartbeat) park on the clock: how many do is what settle() waits for after an advance.
            prober = self.app.monitor.prober if self.app.monitor is not None else None
            self.parked = sum(1 for loop in (self.app.scheduler, self.app.monitor, prober, self.app.node)
                              if loop is not None)
            await eventually(lambda: self.clock.waiting >= self.parked, what="the relay's loops to wait on the clock")
        return self

    async def stop(self) -> None:
        if self.app is not None:
            await self.app.stop()
            self.app = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    @property
    def port(self) -> int:
        return self.app.receiver.addresses[0][1]

    @property
    def store(self):
        return self.app.store

    @property
    def data_dir(self) -> Path:
        return Path(self.raw["server"]["data_dir"])

    async def send(self, sender: str, recipients: list[str], body: bytes | str, mail_options=()) -> dict:
        """Submit over SMTP (stdlib smtplib, in a thread); returns refused recipients."""
        if isinstance(body, str):
            body = body.encode()
        port = self.port

        def submit():
            with smtplib.SMTP(LOOPBACK, port, timeout=30) as client:
                return client.sendmail(sender, recipients, body, mail_options=list(mail_options))
        return await asyncio.to_thread(submit)

    async def cli(self, *args: str, expect: int | None = 0):
        result = await asyncio.to_thread(CliRunner().invoke, cli_main, [*args, "-c", str(self.config_path)])
        if expect is not None:
            assert result.exit_code == expect, (result.output, result.exception)
        return result

    async def cli_json(self, *args: str):
        result = await self.cli(*args, "--json")
        return json.loads(result.output)

    async def attempts(self) -> int:
        """Delivery attempts recorded on the entries still queued."""
        from relaywatch.store.base import QueueQuery
        return sum(e.attempts for e in await self.store.list(QueueQuery()))

    async def queue(self) -> list[dict]:
        return (await self.cli_json("queue", "list"))["messages"]

    async def show(self, entry_id: str) -> dict:
        return await self.cli_json("queue", "show", entry_id)

    def maildir(self, address: str) -> list[bytes]:
        local, _, domain = address.partition("@")
        new = self.data_dir / "mailboxes" / domain / local / "new"
        return [p.read_bytes() for p in sorted(new.glob("*"))] if new.exists() else []


async def first_error(relay: "Relay") -> dict:
    """The last error of the first queued message's first recipient, once an attempt is recorded."""
    async def recorded():
        q = await relay.queue()
        return q[0] if q and q[0]["attempts"] >= 1 else None
    entry = await eventually(recorded, what="a recorded attempt")
    return (await relay.show(entry["id"]))["recipients"][0]["last_error"]


def message(subject: str = "test", body: str = "hello\r\n", message_id: str | None = None) -> bytes:
    mid = message_id or f"<{time.time_ns()}@client.test>"
    return (f"From: sender@example.org\r\nTo: someone\r\nSubject: {subject}\r\nMessage-ID: {mid}\r\n"
            f"Date: Thu, 26 Nov 2026 10:00:00 +0000\r\n\r\n{body}").encode()


def https_files(tmp_path: Path) -> tuple[str, str, str]:
    """A certificate for 127.0.0.1 from a fresh CA: (cert.pem, key.pem, ca.pem) paths in ``tmp_path``."""
    import trustme
    ca = trustme.CA()
    cert = ca.issue_cert(LOOPBACK)
    paths = tuple(str(tmp_path / name) for name in ("cert.pem", "key.pem", "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(paths[0])
    cert.private_key_pem.write_to_path(paths[1])
    ca.cert_pem.write_to_path(paths[2])
    return paths


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class RawClient:
    """Speaks SMTP byte by byte, for what smtplib will not send (bare LF, slow uploads)."""

    @classmethod
    async def connect(cls, port: int) -> "RawClient":
        self = cls()
        self.reader, self.writer = await asyncio.open_connection(LOOPBACK, port)
        await self.reader.readline()
        return self

    async def cmd(self, line: bytes) -> bytes:
        self.writer.write(line)
        await self.writer.drain()
        return await self.reader.readline()

    async def envelope(self, sender: str, rcpt: str) -> bytes:
        """HELO, MAIL, RCPT, DATA; returns the reply to DATA."""
        await self.cmd(b"HELO client.test\r\n")
        assert (await self.cmd(f"MAIL FROM:<{sender}>\r\n".encode())).startswith(b"250")
        assert (await self.cmd(f"RCPT TO:<{rcpt}>\r\n".encode())).startswith(b"250")
        return await self.cmd(b"DATA\r\n")

    def close(self) -> None:
        self.writer.close()


# -- a connection that can be cut -----------------------------------------------------------

class CuttableProxy:
    """A loopback TCP proxy to a real server (PostgreSQL) whose link can be cut.

    ``cut(seconds)`` resets every connection through it at once and refuses
    (accepts and resets) new ones until the time is up; then it forwards again,
    on the same port.  What a client sees is what a network partition or a
    database failover shows it: established connections die, reconnecting fails
    for a while, then works.
    """

    def __init__(self, target_port: int, target_host: str = LOOPBACK):
        self.target = (target_host, target_port)
        self.port = 0
        self.server: asyncio.base_events.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._cut_until = 0.0
        self.cuts = 0                       # connections reset or refused
        self.restored = asyncio.Event()     # set when a cut ends (and before any)
        self.restored.set()
        self._restore_handle: asyncio.TimerHandle | None = None

    @property
    def is_cut(self) -> bool:
        return time.monotonic() < self._cut_until

    async def start(self) -> "CuttableProxy":
        self.server = await asyncio.start_server(self._accept, LOOPBACK, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._restore_handle is not None:
            self._restore_handle.cancel()
        self.server.close()
        for pair in list(self._pairs):
            for w in pair:
                w.transport.abort()
        await self.server.wait_closed()

    def cut(self, seconds: float | None = None) -> None:
        """Reset every connection now; refuse new ones for ``seconds`` (None: until restore())."""
        self._cut_until = time.monotonic() + (seconds if seconds is not None else float("inf"))
        self.restored.clear()
        for pair in list(self._pairs):
            for w in pair:
                _reset(w)
            self.cuts += 1
        self._pairs.clear()
        if seconds is not None:
            self._restore_handle = asyncio.get_running_loop().call_later(seconds, self.restore)

    def restore(self) -> None:
        """Forward again."""
        self._cut_until = 0.0
        self.restored.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_cut:
            self.cuts += 1
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()   # one side ended: end the other (a no-op after a reset)
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._pairs.discard(pair)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a dropped link or a killed server does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class Server:
    """``python -m relaywatch serve`` as a real process on a free loopback port."""

    def __init__(self, tmp_path: Path, **sections):
        self.port = free_port()
        sections.setdefault("server", {})
        sections["server"] = {"listen": [f"{LOOPBACK}:{self.port}"], **sections["server"]}
        self.raw = base_config(tmp_path, **sections)
        self.config_path = tmp_path / "relaywatch.toml"
        self.config_path.write_text(to_toml(self.raw))
        self.data_dir = Path(self.raw["server"]["data_dir"])
        self.log_path = tmp_path / "relaywatch.log"
        self.proc: subprocess.Popen | None = None
        self.log = None

    async def start(self, timeout: float = STARTUP) -> "Server":
        if self.log is not None:
            self.log.close()
        self.log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-m", "relaywatch", "serve", "-c", str(self.config_path)],
                                     stdout=self.log, stderr=self.log, env=env)
        await eventually(self._listening, timeout=timeout, what="the server to listen")
        return self

    def _listening(self) -> bool:
        assert self.proc.poll() is None, self.log_path.read_text()
        try:
            with smtplib.SMTP(LOOPBACK, self.port, timeout=2) as c:
                return c.noop()[0] == 250
        except OSError:
            return False

    async def cli(self, *args: str) -> None:
        """A relaywatch command in its own process, as an admin would run it."""
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "relaywatch", *args,
                                                 "-c", str(self.config_path)], env=env, check=True)

    def status(self, key: str) -> int:
        """VmHWM / VmRSS of the server process, in kB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    async def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = await asyncio.to_thread(self.proc.wait, 30)
        self.log.close()
        return code


# -- load under kills (test_crash_loop.py, test_cluster_soak.py) -----------------------

_MESSAGE_ID = re.compile(rb"^Message-ID: (<[^>\r\n]+>)", re.M | re.I)


class CountingSink(SinkHandler):
    """The destination: counts each Message-ID it accepted."""

    def __init__(self):
        super().__init__(keep_content=False)
        self.seen: collections.Counter = collections.Counter()

    async def handle_DATA(self, server, session, envelope):
        match = _MESSAGE_ID.search(envelope.original_content or b"")
        self.seen[match.group(1).decode() if match else "?"] += 1
        return "250 2.0.0 Ok"


class Load:
    """Client threads sending one message after another to ``ports`` (a thread moves to
    the next port when one fails); a message counts as acknowledged only once DATA got
    250.  ``acked``: Message-ID -> the queue ids of the 250."""

    def __init__(self, *ports: int, threads: int = 2, tag: str = "crash"):
        self.ports = ports
        self.tag = tag
        self.acked: dict[str, list[str]] = {}
        self.failures = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]

    def start(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _run(self, thread: int) -> None:
        n = 0
        client = None
        port = thread
        while not self._stop.is_set():
            try:
                if client is None:
                    client = smtplib.SMTP(LOOPBACK, self.ports[port % len(self.ports)], timeout=10)
                    client.ehlo("client.test")
                n += 1
                mid = f"<{self.tag}-{thread}-{n}@client.test>"
                client.mail("alice@contoso.test")
                client.rcpt("bob@fabrikam.test")
                code, reply = client.data(f"From: alice@contoso.test\r\nSubject: {self.tag}\r\n"
                                          f"Message-ID: {mid}\r\n\r\nmessage {n}\r\n".encode())
                if code != 250:
                    raise smtplib.SMTPDataError(code, reply)
                with self._lock:
                    self.acked[mid] = reply.decode().split("Queued as ", 1)[-1].split()
            except (OSError, smtplib.SMTPException):
                # Refused, reset or 4xx while the server is down: not acknowledged, not counted.
                self.failures += 1
                port += 1
                if client is not None:
                    try:
                        client.close()
                    except OSError:
                        pass
                client = None
                self._stop.wait(0.02)
        if client is not None:
            try:
                client.quit()
            except (OSError, smtplib.SMTPException):
                pass


async def every_acknowledged_delivered(load: Load, sink: CountingSink, timeout: float) -> set[str]:
    """Wait until every message ``load`` got a 250 for is at ``sink``; the acknowledged Message-IDs."""
    acked = set(load.acked)
    await eventually(lambda: acked <= set(sink.seen), timeout=timeout,
                     what=lambda: f"every acknowledged message at the destination "
                                  f"({len(acked - set(sink.seen))} missing)")
    return acked


async def insert_stored_incident(store, stored: dict) -> int:
    """An incidents row as a version of relaywatch wrote it (its columns, the rest as the JSON
    ``data``), not through Incident: what the store must still read.  SQL stores only."""
    from relaywatch.store.watch import Q
    columns = ("id", "connector", "code", "state", "opened_at", "resolved_at")
    data = json.dumps({k: v for k, v in stored.items() if k not in columns})
    return await store.engine.write(lambda conn, cleanup: conn.execute(Q["insert_incident"], (
        stored["connector"], stored["code"], stored["state"], stored["opened_at"], stored.get("resolved_at"),
        data)).fetchone()[0])


async def open_as_a_role_granted_the_tables(pg_dsn: str, prepare=None) -> None:
    """The queue made by its owner, then opened by a role granted its tables by that owner (a DBA's
    set-up): ``prepare(conn)`` runs as the owner first.  The second store must open and count."""
    import uuid

    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from relaywatch.store.postgres import PostgresStore
    first = PostgresStore(pg_dsn)
    await first.open()
    await first.close()
    role = f"rw_test_user_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        schema_name = conn.execute("SELECT current_schema()").fetchone()[0]
        if prepare is not None:
            prepare(conn)
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT USAGE ON SCHEMA {schema_name} TO {role}")
        conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA {schema_name} TO {role}")
    try:
        other = PostgresStore(make_conninfo(**dict(conninfo_to_dict(pg_dsn), user=role)))
        await asyncio.wait_for(other.open(), 20)
        try:
            assert await other.counts() == {}
        finally:
            await other.close()
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")
