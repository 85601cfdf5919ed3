"""The SMTP server: aiosmtpd's protocol, with our policy and a durable DATA.

What we change in aiosmtpd (see shared/STACK.md for why):
- DATA streams into a ``BodySpool`` instead of a list of lines in memory,
  refuses bare CR/LF (SMTP smuggling), and answers 250 only after the queue
  commit returned; a store failure answers ``451 4.3.0``.
- Any unexpected error answers ``451 4.3.0``, never aiosmtpd's default 500.
- EHLO also advertises PIPELINING and ENHANCEDSTATUSCODES.
- Connections are capped globally and per client IP (``421 4.7.0``).
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import logging
import re
import ssl
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from aiosmtpd.smtp import SMTP, syntax

from relaywatch import events
from relaywatch.config import Config
from relaywatch.errors import StoreError
from relaywatch.model import NewMessage, Route
from relaywatch.receive.data import DataParser
from relaywatch.receive.spool import BodySpool
from relaywatch.route import decide
from relaywatch.store.base import QueueStore

log = logging.getLogger("relaywatch.receive")

MAX_RECIPIENTS = 1000
_HEADER_SCAN_LIMIT = 64 * 1024
_READ_SIZE = 256 * 1024
# <local@domain> as nearly every client sends it: a dot-atom local part and a
# plain domain.  Anything else (quoted local parts, comments...) goes through
# aiosmtpd's full RFC 5322 parser, which builds a class per call and costs
# more than the rest of MAIL and RCPT together.
_SIMPLE_PATH = re.compile(
    r"^\s*<((?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*)"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*))>(.*)$")
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*?)\s*$", re.I | re.M)


class ReceivePolicy:
    """aiosmtpd hooks: who may send to whom, and committing what arrives."""

    def __init__(self, config_ref: Callable[[], Config], store: QueueStore, clock=time.time):
        self.config_ref = config_ref
        self.store = store
        self.clock = clock

    def is_trusted(self, peer) -> bool:
        try:
            ip = ipaddress.ip_address(peer[0])
        except (ValueError, TypeError, IndexError):
            return False
        return any(ip in net for net in self.config_ref().server.trusted_networks)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        last = responses.pop()  # "250 HELP"
        responses += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", last]
        return responses

    async def handle_MAIL(self, server, session, envelope, address, options):
        # aiosmtpd needs a truthy mail_from to accept RCPT, so the null sender
        # stays "<>" in the envelope and becomes "" only in the queue.
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        envelope.routes = []
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(self, server, session, envelope, address, options):
        config = self.config_ref()
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return f"452 4.5.3 Too many recipients (at most {MAX_RECIPIENTS} per message)"
        if "@" not in address:
            return "501 5.1.3 Recipient address must include a domain"
        decision = decide(config, address)
        if decision.route is None:
            events.emit("rejected", **{"to": address, "from": envelope.mail_from, "client": session.peer[0],
                                      "code": "5.1.10", "detail": "recipient not found"})
            if config.alerts.invalid_recipient_quota:
                try:
                    await self.store.add_invalid_recipients(
                        [(self.clock(), address.rsplit("@", 1)[1].lower(), "rcpt", "rcpt")])
                except StoreError:
                    pass   # counting must never affect the SMTP answer
            return "550 5.1.10 Recipient not found"
        if not decision.accepted_domain and not self.is_trusted(session.peer):
            events.emit("rejected", **{"to": address, "from": envelope.mail_from, "client": session.peer[0],
                                      "code": "5.7.1", "detail": "relaying denied"})
            return "554 5.7.1 Relaying denied"
        if address.lower() in (a.lower() for a in envelope.rcpt_tos):
            return "250 2.1.5 Recipient OK (duplicate ignored)"
        envelope.rcpt_tos.append(address)
        envelope.routes.append(decision.route)
        return "250 2.1.5 Recipient OK"

    async def handle_exception(self, error: Exception) -> str:
        log.exception("SMTP session error")
        return "451 4.3.0 Temporary server error, please try again later"

    def received_header(self, session, envelope, tls: bool) -> bytes:
        peer_ip = session.peer[0] if session.peer else "unknown"
        helo = session.host_name or "unknown"
        proto = "ESMTPS" if tls else ("ESMTP" if session.extended_smtp else "SMTP")
        rcpt = f"\r\n\tfor <{envelope.rcpt_tos[0]}>" if len(envelope.rcpt_tos) == 1 else ""
        stamp = email.utils.formatdate(self.clock(), localtime=False)
        hostname = self.config_ref().server.hostname
        return (f"Received: from {helo} ([{peer_ip}])\r\n\tby {hostname} (relaywatch) with {proto}"
                f"{rcpt}; {stamp}\r\n").encode("ascii", "replace")

    async def commit(self, session, envelope, spool: BodySpool, header_block: bytes) -> str:
        config = self.config_ref()
        now = self.clock()
        # Only the header section: the first block read may run into the body.
        headers = (b"\r\n" + header_block).split(b"\r\n\r\n", 1)[0]
        match = _MESSAGE_ID.search(headers)
        message_id = match.group(1).decode("ascii", "replace") if match else ""
        body = await spool.finish(inline=getattr(self.store, "inline_bodies", False))
        msg = NewMessage(
            sender="" if envelope.mail_from == "<>" else envelope.mail_from,
            recipients=tuple(zip(envelope.rcpt_tos, envelope.routes)),
            body=body, received_at=now, expires_at=now + config.queue.message_expiration,
            message_id=message_id, client=session.peer[0] if session.peer else "")
        try:
            ids = await self.store.enqueue(msg)
        except StoreError as exc:
            log.error("could not queue a message from %s: %s", envelope.mail_from, exc)
            if body.path:
                Path(body.path).unlink(missing_ok=True)
            return "451 4.3.0 Could not queue the message; please try again later"
        for entry_id, route in zip(ids, _unique_routes(envelope.routes)):
            rcpts = [a for a, r in zip(envelope.rcpt_tos, envelope.routes) if r.key == route.key]
            events.emit("received", **{"id": entry_id, "msgid": message_id or None, "from": envelope.mail_from,
                                       "to": rcpts, "connector": route.name, "size": body.size,
                                       "client": msg.client})
        return f"250 2.0.0 Queued as {' '.join(ids)}"


def _unique_routes(routes: list[Route]) -> list[Route]:
    seen: dict[str, Route] = {}
    for r in routes:
        seen.setdefault(r.key, r)
    return list(seen.values())


# aiosmtpd's own replies carry no enhanced status code; since we advertise
# ENHANCEDSTATUSCODES, every reply must (RFC 2034), except to HELO/EHLO.
_ENHANCED_DEFAULTS = {250: "2.0.0", 221: "2.0.0", 421: "4.3.0", 500: "5.5.2", 501: "5.5.4", 502: "5.5.1",
                      503: "5.5.1", 504: "5.5.4", 530: "5.7.0", 552: "5.3.4", 553: "5.1.3", 554: "5.3.0",
                      555: "5.5.4"}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")


def with_enhanced_code(status: str) -> str:
    if _HAS_ENHANCED.match(status) or len(status) < 4 or not status[:3].isdigit():
        return status
    default = _ENHANCED_DEFAULTS.get(int(status[:3]))
    if default is None:
        return status
    text = status[4:]
    if text.startswith("Error: "):
        text = text[len("Error: "):]
    return f"{status[:3]}{status[3]}{default} {text[:1].upper()}{text[1:]}"


class RelaySMTP(SMTP):
    """aiosmtpd's protocol with a streaming, durable DATA."""

    def __init__(self, policy: ReceivePolicy, spool_dir: Path, on_close: Callable[[], None], **kwargs):
        super().__init__(policy, decode_data=False, **kwargs)
        self.policy = policy
        self.spool_dir = spool_dir
        self._on_close = on_close
        self._greeting = False

    def _getaddr(self, arg: str):
        m = _SIMPLE_PATH.match(arg)
        if m is not None:
            return m.group(1), m.group(2).lstrip()
        if arg.strip().startswith("<>"):
            return "<>", arg.strip()[2:]
        return super()._getaddr(arg)

    async def push(self, status):
        if isinstance(status, str) and not self._greeting:
            status = with_enhanced_code(status)
        await super().push(status)

    async def smtp_EHLO(self, hostname):
        self._greeting = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._greeting = False

    async def smtp_HELO(self, hostname):
        self._greeting = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._greeting = False

    def connection_lost(self, error):
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
        super().connection_lost(error)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        spool = BodySpool(self.spool_dir)
        tls = self.session.ssl is not None
        spool.write(self.policy.received_header(self.session, self.envelope, tls))
        header_block = bytearray()
        parser = DataParser(self.data_size_limit)
        try:
            while not parser.done:
                data = await self._reader.read(_READ_SIZE)
                if not data:
                    raise ConnectionResetError("connection closed during DATA")
                # aiosmtpd's idle timer restarts only on commands; a long upload
                # that keeps moving must not be cut off (the timer bounds a stall).
                self._reset_timeout()
                content = parser.feed(data)
                if parser.problem:
                    spool.discard()
                    continue
                spool.write(content)
                if len(header_block) < _HEADER_SCAN_LIMIT and b"\r\n\r\n" not in header_block:
                    header_block += content[:_HEADER_SCAN_LIMIT]
        except BaseException:
            spool.discard()
            raise
        if parser.leftover:
            # Commands the client pipelined after the final dot: give them back to
            # aiosmtpd's reader (it reads lines from this buffer; no public unread).
            self._reader._buffer[0:0] = parser.leftover
        problem = parser.problem
        if problem:
            events.emit("rejected", **{"from": self.envelope.mail_from, "to": self.envelope.rcpt_tos,
                                       "client": self.session.peer[0], "detail": problem})
            self._set_post_data_state()
            await self.push(problem)
            return
        try:
            status = await self.policy.commit(self.session, self.envelope, spool, bytes(header_block))
        except Exception:
            spool.discard()
            log.exception("could not queue a message")
            status = "451 4.3.0 Could not queue the message; please try again later"
        self._set_post_data_state()
        await self.push(status)


class _Refuse(asyncio.Protocol):
    """Says 421 and hangs up: the connection limit was reached."""

    def __init__(self, reason: str):
        self.reason = reason

    def connection_made(self, transport):
        transport.write(f"421 4.7.0 {self.reason}\r\n".encode())
        transport.close()


class ConnectionLimiter:
    def __init__(self, config_ref: Callable[[], Config]):
        self.config_ref = config_ref
        self.total = 0
        self.per_ip: Counter[str] = Counter()

    def admit(self, ip: str) -> str | None:
        """None when admitted, else the reason to refuse."""
        server = self.config_ref().server
        if self.total >= server.max_connections:
            return "Too many connections, try again later"
        if self.per_ip[ip] >= server.max_connections_per_ip:
            return f"Too many connections from {ip}, try again later"
        self.total += 1
        self.per_ip[ip] += 1
        return None

    def release(self, ip: str) -> None:
        self.total -= 1
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]


def make_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


class Receiver:
    """Listens on the configured addresses and feeds the queue."""

    def __init__(self, config_ref: Callable[[], Config], store: QueueStore, clock=time.time):
        self.config_ref = config_ref
        self.policy = ReceivePolicy(config_ref, store, clock)
        self.limiter = ConnectionLimiter(config_ref)
        self.servers: list[asyncio.base_events.Server] = []
        self.tls_context: ssl.SSLContext | None = None

    def spool_dir(self) -> Path:
        return self.config_ref().server.data_dir / "spool"

    def _factory(self):
        config = self.config_ref()
        limiter = self.limiter
        policy = self.policy
        spool_dir = self.spool_dir()
        tls_context = self.tls_context

        def factory():
            return _Admission(limiter, lambda on_close: RelaySMTP(
                policy, spool_dir, on_close,
                hostname=config.server.hostname,
                ident="relaywatch ESMTP",
                data_size_limit=config.server.max_message_size,
                tls_context=tls_context,
                timeout=config.server.idle_timeout,
                auth_require_tls=True,
            ))
        return factory

    async def start(self) -> None:
        config = self.config_ref()
        if config.server.tls_cert and config.server.tls_key:
            self.tls_context = make_tls_context(config.server.tls_cert, config.server.tls_key)
        self.spool_dir().mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        for host, port in config.server.listen:
            server = await loop.create_server(self._factory(), host, port, reuse_address=True)
            self.servers.append(server)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.sockets[0].getsockname()[:2] for s in self.servers]

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()
        self.servers.clear()


class _Admission(asyncio.Protocol):
    """Wraps the SMTP protocol: checks the connection limits first.

    asyncio builds the protocol before the peer address is known, so this
    thin proxy decides in ``connection_made`` and then hands the transport
    to the real SMTP protocol (or to ``_Refuse``).
    """

    def __init__(self, limiter: ConnectionLimiter, make_smtp):
        self.limiter = limiter
        self.make_smtp = make_smtp
        self.inner: asyncio.Protocol | None = None

    def connection_made(self, transport):
        peer = transport.get_extra_info("peername") or ("?", 0)
        ip = peer[0]
        reason = self.limiter.admit(ip)
        if reason is not None:
            events.emit("rejected", client=ip, code="4.7.0", detail=reason)
            self.inner = _Refuse(reason)
        else:
            released = False

            def on_close():
                nonlocal released
                if not released:
                    released = True
                    self.limiter.release(ip)
            self.inner = self.make_smtp(on_close)
        transport.set_protocol(self.inner)
        self.inner.connection_made(transport)

    # Nothing below runs once set_protocol() has swapped us out; they are here
    # for the instant between construction and connection_made.
    def data_received(self, data):
        self.inner.data_received(data)

    def eof_received(self):
        return self.inner.eof_received()

    def connection_lost(self, exc):
        if self.inner is not None:
            self.inner.connection_lost(exc)
