"""The SMTP server: the conversation (receive/conversation.py) on asyncio sockets.

One ``SmtpSession`` per connection, callback-driven (``asyncio.Protocol``):
bytes go into the conversation, its events are acted on, and every reply
decided in one pass goes out in one write.  The only waits are the queue
commit after the final dot (250 only once it is durable; a store failure
answers ``452 4.3.1`` for a full disk, else ``451 4.3.0``) and the TLS
handshake; input that arrives meanwhile waits in the conversation, and
reading pauses if it piles up.

We own this layer instead of subclassing aiosmtpd: on the 2-core bench
machine aiosmtpd alone cost about 540 µs of CPU per message, more than the
rest of receiving together (bench/README.md), and it read DATA line by line.
Connections are capped globally and per client IP (``421 4.7.0``); a client
that stalls for ``server.idle_timeout`` is disconnected (``421 4.4.2``).
Against slowloris (receive/admission.py): slots reserved for trusted networks,
the oldest idle pre-MAIL session evicted (``421 4.7.0``) before a client is
refused, and past 80 % of the slots a command must complete within
``server.busy_command_timeout`` until MAIL (``421 4.4.2``). If the
disk refuses a message being read, the rest is read and dropped and the
answer comes after the final dot (``452 4.3.1`` when full, else ``451 4.3.0``);
an error nobody foresaw ends the session with ``421 4.3.0``, never a 5xx.
Clients that authenticate (AUTH after STARTTLS, receive/auth.py) relay as
trusted networks do, within their sender addresses; the listeners are
``server.listen`` (smtp), ``server.submission_listen`` (AUTH required) and
``server.submissions_listen`` (implicit TLS, RFC 8314).  Wrong passwords are
counted per IP (``Receiver.auth_limits.counters`` for metrics): the replies slow
down, then AUTH from that IP is blocked for a while (``454 4.7.0``).
Refusals because the disk or the store fails are one condition, not one log
line per message (receive/store_condition.py), and the relay's own incident
(watch/store_incident.py).
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import ipaddress
import logging
import re
import ssl
import time
from pathlib import Path
from typing import Callable

from relaywatch import events, meters
from relaywatch.config import Config
from relaywatch.errors import StoreError
from relaywatch.model import NewMessage, RecipientAnswer, Route, RouteKind
from relaywatch.receive import auth
from relaywatch.receive.admission import Limits, Phase, Refused, SessionTable
from relaywatch.receive.conversation import (AUTH_INVALID, AUTH_SUCCEEDED, AUTH_UNAVAILABLE, NEED_DATA, Authenticate,
                                             BodyData, Conversation, MessageEnd, MessageStart, Recipient, Reply,
                                             StartTls)
from relaywatch.receive.spool import BodySpool
from relaywatch.receive.store_condition import (FAILED_REPLY, ConditionEnded, Place, PlaceRecovered, StoreCondition,
                                                StoreProblem, describe, problem_from_os_error,
                                                problem_from_store_error)
from relaywatch.receive.verify import Callout, RecipientVerifier, rcpt_reply
from relaywatch.route import Refusal, decide, normalize, normalize_sender, sender_routing, split_address
from relaywatch.store.base import Store
from relaywatch.watch.store_incident import StoreIncidentReporter

log = logging.getLogger("relaywatch.receive")

MAX_RECIPIENTS = 1000
_HEADER_SCAN_LIMIT = 64 * 1024
# Unprocessed input kept while a commit or handshake is running; above this the
# socket is not read until the session catches up.
_MAX_BUFFERED = 256 * 1024
# Connections the kernel holds for us to accept.  asyncio's default of 100 is
# too few for a burst: 1,000 connections at once left about 500 of them
# connected but never accepted, with no greeting, for as long as they waited
# (tests/test_slowloris.py); a legitimate client caught in such a burst would
# hang like that too.  The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*?)\s*$", re.I | re.M)
# After an error we did not foresee, the session's state cannot be trusted (a
# message half read would be taken for commands): say so and hang up.
UNEXPECTED_ERROR = "421 4.3.0 Temporary server error; closing the connection, please try again later"
# Listener kinds: the config key each comes from.
SMTP, SUBMISSION, SUBMISSIONS = "smtp", "submission", "submissions"
LISTENER_KEYS = {SMTP: "listen", SUBMISSION: "submission_listen", SUBMISSIONS: "submissions_listen"}


class ReceivePolicy:
    """Who may send to whom, and committing what arrives."""

    def __init__(self, config_ref: Callable[[], Config], store: Store, clock=time.time,
                 callout: Callout | None = None, alert_routes=None):
        self.config_ref = config_ref
        self.store = store
        self.clock = clock
        self.verifier = RecipientVerifier(callout) if callout is not None else None
        self._background: set[asyncio.Task] = set()
        self.store_condition = StoreCondition()
        self.store_incidents = StoreIncidentReporter(config_ref, store, alert_routes, clock)

    def is_trusted(self, ip: str, user: str | None = None) -> bool:
        """May relay and gets signed: an authenticated ``user``, or a client in trusted_networks."""
        if user is not None:
            return True
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.config_ref().server.trusted_networks)

    def recipient(self, conv: Conversation, client_ip: str, address: str,
                  source_route: str = "") -> tuple[str, str, Route | None]:
        """The reply to RCPT TO and, when accepted, the address to keep and its route.

        The address kept is normalised (route.normalize) and, for postmaster,
        the address that stands for it (``server.postmaster``)."""
        config = self.config_ref()
        sender = conv.sender or "<>"

        def refuse(reply: str, code: str, detail: str) -> tuple[str, str, None]:
            events.emit("rejected", **{"to": address, "from": sender, "client": client_ip,
                                      "code": code, "detail": detail})
            return reply, address, None
        if len(conv.recipients) >= MAX_RECIPIENTS:
            return f"452 4.5.3 Too many recipients (at most {MAX_RECIPIENTS} per message)", address, None
        normalized = normalize(address)
        if isinstance(normalized, Refusal):
            return refuse(normalized.reply, normalized.reply[4:9], normalized.detail)
        trusted = self.is_trusted(client_ip, conv.user)
        if not trusted:
            routing = sender_routing(normalized, source_route)
            if routing is not None:
                return refuse(f"554 5.7.1 Relaying denied: sender-specified routing ({routing}) is not "
                              f"accepted from this client", "5.7.1", f"relaying denied: {routing}")
        decision = decide(config, normalized)
        if any(decision.address.lower() == a.lower() for a, _ in conv.recipients):
            return "250 2.1.5 Recipient OK (duplicate ignored)", decision.address, None
        if decision.route is None:
            if config.alerts.invalid_recipient_quota:
                self._count_invalid(split_address(normalized)[1])
            return refuse("550 5.1.10 Recipient not found", "5.1.10", "recipient not found")
        if not decision.accepted_domain and not trusted:
            return refuse("554 5.7.1 Relaying denied", "5.7.1", "relaying denied")
        return "250 2.1.5 Recipient OK", decision.address, decision.route

    def must_verify(self, client_ip: str, address: str, route: Route, user: str | None = None) -> bool:
        """An accepted recipient whose existence only the connector's server knows."""
        if self.verifier is None or route.kind is not RouteKind.CONNECTOR:
            return False
        domain = self.config_ref().domain(split_address(address)[1])
        return domain is not None and domain.verify_recipients and not self.is_trusted(client_ip, user)

    async def verify(self, conv: Conversation, client_ip: str, address: str, route: Route) -> tuple[str, Route | None]:
        """The reply to RCPT TO once the connector's server was asked (or the cache answered)."""
        config = self.config_ref()
        verdict = await self.verifier.check(route, address, config.verify)
        reply = rcpt_reply(verdict, address)
        if verdict.answer is RecipientAnswer.EXISTS:
            return reply, route
        events.emit("rejected", **{"to": address, "from": conv.sender or "<>", "client": client_ip,
                                  "connector": route.name, "code": reply.split(" ", 2)[1],
                                  "detail": verdict.detail})
        if verdict.answer is RecipientAnswer.UNKNOWN and config.alerts.invalid_recipient_quota:
            self._count_invalid(split_address(address)[1], route.name, "verify")
        return reply, None

    def _count_invalid(self, domain: str, connector: str = "rcpt", source: str = "rcpt") -> None:
        async def count() -> None:
            try:
                await self.store.add_invalid_recipients([(self.clock(), domain, connector, source)])
            except StoreError:
                pass   # counting must never affect the SMTP answer
        task = asyncio.get_running_loop().create_task(count())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def received_header(self, conv: Conversation, client_ip: str) -> bytes:
        # RFC 3848: ESMTPA/ESMTPSA once the client authenticated; who it was, as Postfix writes it.
        proto = "ESMTPS" if conv.tls_active else ("ESMTP" if conv.esmtp else "SMTP")
        if conv.user is not None:
            proto = "ESMTPSA" if conv.tls_active else "ESMTPA"
        if conv.smtputf8:
            proto = "UTF8" + proto[1:]    # RFC 6531 4.3: UTF8SMTP, UTF8SMTPS, UTF8SMTPA, UTF8SMTPSA
        who = f"\r\n\t(Authenticated sender: {conv.user})" if conv.user is not None else ""
        rcpt = f"\r\n\tfor <{conv.recipients[0][0]}>" if len(conv.recipients) == 1 else ""
        stamp = email.utils.formatdate(self.clock(), localtime=False)
        hostname = self.config_ref().server.hostname
        return (f"Received: from {conv.helo or 'unknown'} ([{client_ip}]){who}\r\n\tby {hostname} (relaywatch) "
                f"with {proto}{rcpt}; {stamp}\r\n").encode("utf-8" if conv.smtputf8 else "ascii", "replace")

    async def commit(self, end: MessageEnd, client_ip: str, spool: BodySpool, header_block: bytes) -> str:
        config = self.config_ref()
        now = self.clock()
        # Only the header section: the first block read may run into the body.
        headers = (b"\r\n" + header_block).split(b"\r\n\r\n", 1)[0]
        match = _MESSAGE_ID.search(headers)
        message_id = match.group(1).decode("ascii", "replace") if match else ""
        signed_by: list[str] = []
        try:
            # Never sign what an outsider sent; an authenticated user's senders were checked at MAIL.
            if config.dkim and self.is_trusted(client_ip, end.user):
                from relaywatch.receive.dkim import sign_spool
                spool, signed_by = await sign_spool(config.dkim, spool)
            body = await spool.finish(inline=self.store.inline_bodies)
        except OSError as exc:
            return self.refuse(end, client_ip, problem_from_os_error(exc, Place.SPOOL, str(spool.spool_dir)))
        sender = normalize_sender(end.sender)
        msg = NewMessage(
            sender=sender, recipients=end.recipients, body=body, received_at=now,
            expires_at=now + config.queue.message_expiration, message_id=message_id, client=client_ip)
        try:
            ids = await self.store.enqueue(msg)
        except StoreError as exc:
            if body.path:
                Path(body.path).unlink(missing_ok=True)
            return self.refuse(end, client_ip, problem_from_store_error(exc, self.store.where))
        if spool.spilled:
            self._written(Place.SPOOL)
        self._written(Place.QUEUE)
        self.store_incidents.wrote()
        for entry_id, (route, rcpts) in zip(ids, msg.by_route()):
            events.emit("received", **{"id": entry_id, "msgid": message_id or None, "from": sender or "<>",
                                       "to": rcpts, "connector": route.name, "size": body.size,
                                       "client": msg.client, "auth": end.user,
                                       **({"dkim": signed_by} if signed_by else {})})
        return f"250 2.0.0 Queued as {' '.join(ids)}"

    def refuse(self, end: MessageEnd, client_ip: str, problem: StoreProblem) -> str:
        """The reply to a message the disk or the store would not take."""
        self._changed(self.store_condition.refused_message(problem, self.clock()))
        events.emit("rejected", **{"from": end.sender or "<>", "to": [a for a, _ in end.recipients],
                                   "client": client_ip, "code": problem.reply[4:9], "detail": problem.reply})
        return problem.reply

    def _written(self, place: Place) -> None:
        if self.store_condition.active:
            self._changed(self.store_condition.written(place, self.clock()))

    def _changed(self, change) -> None:
        if change is None:
            return
        level = (logging.INFO if type(change) is ConditionEnded else
                 logging.WARNING if type(change) is PlaceRecovered else logging.ERROR)
        log.log(level, "%s", describe(change))
        self.store_incidents.on_change(change, list(self.store_condition.failing.values()),
                                       self.store_condition.refused)


class SmtpSession(asyncio.Protocol):
    """One client connection."""

    def __init__(self, receiver: "Receiver", kind: str = SMTP):
        self.receiver = receiver
        self.kind = kind
        self.policy = receiver.policy
        self.transport: asyncio.Transport | None = None
        self.conv: Conversation | None = None
        self.client_ip = "?"
        self._admitted = False
        self._busy = False          # a commit or TLS handshake is running
        self._paused = False
        self._out: list[str] = []
        self._spool: BodySpool | None = None
        self._spool_error: StoreProblem | None = None   # the disk refused the message being read
        self._header_block = bytearray()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._last_input = 0.0
        self._eof = False           # the client has shut down its sending side
        self._phase = Phase.PRE_MAIL
        self._committing = False    # from the final dot until its reply: still in the transaction

    # -- asyncio callbacks ---------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.client_ip = peer[0]
        meters.session_opened(self.kind)
        refused = self.receiver.admit(self)
        if refused is not None:
            events.emit("rejected", client=self.client_ip, code="4.7.0", detail=refused.reason)
            meters.refused("421 4.7.0 ")
            transport.write(f"421 4.7.0 {refused.reason}\r\n".encode())
            transport.close()
            return
        self._admitted = True
        config = self.receiver.config_ref()
        users = self.receiver.user_directory(config.server) is not None and self.receiver.tls_context is not None
        self.conv = Conversation(config.server.hostname, config.server.max_message_size,
                                 tls_available=self.receiver.tls_context is not None and self.kind != SUBMISSIONS,
                                 tls_active=self.kind == SUBMISSIONS, auth_available=users,
                                 auth_required=self.kind != SMTP)
        self._idle_timeout = config.server.idle_timeout
        loop = asyncio.get_running_loop()
        self._last_input = loop.time()
        self._idle_timer = loop.call_later(self._idle_timeout, self._check_idle)
        if self.kind == SUBMISSIONS:
            self.receiver.certificate_login(self)
        self._advance()

    def data_received(self, data: bytes) -> None:
        if self.conv is None:
            return
        self._last_input = asyncio.get_running_loop().time()
        self.conv.receive(data)
        if not self._busy:
            self._advance()
        if self.conv.buffered > _MAX_BUFFERED and not self._paused and not self.transport.is_closing():
            self._paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        # A client may send its message and QUIT, then shut down its side: the
        # replies still go out (a lost 250 means the message is sent again).
        self._eof = True
        return self._busy and self.conv is not None and not self.conv.tls_active   # else close ours too

    def connection_lost(self, exc) -> None:
        meters.session_closed(self.kind)
        if self._admitted:
            self._admitted = False
            self.receiver.limiter.release(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self._spool is not None and not self._busy:
            self._spool.discard()   # hung up in the middle of DATA
            self._spool = None

    def pause_writing(self) -> None:
        # The client is not reading our replies: stop reading its commands.
        if not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._resume_reading()

    # -- the conversation ----------------------------------------------------------

    def _advance(self) -> None:
        """Act on events until the conversation needs more input or we must wait."""
        conv = self.conv
        commands = False
        try:
            while not self._busy:
                event = conv.next_event()
                if event is NEED_DATA:
                    break
                commands = commands or type(event) is Reply or type(event) is Recipient   # a line was answered
                if type(event) is BodyData:
                    self._body(event.data)
                elif type(event) is Reply:
                    self._out.append(event.text)
                    if event.close:
                        self._flush()
                        self.transport.close()
                        return
                elif type(event) is Recipient:
                    reply, address, route = self.policy.recipient(conv, self.client_ip, event.address,
                                                                   event.source_route)
                    if route is not None and self.policy.must_verify(self.client_ip, address, route, conv.user):
                        self._start(self._verify(address, route))
                        break
                    if route is not None:
                        conv.accept_recipient(address, route)
                    self._out.append(reply)
                elif type(event) is MessageStart:
                    self._spool = BodySpool(self.receiver.spool_dir)
                    self._spool_error = None
                    self._header_block = bytearray()
                    self._body(self.policy.received_header(conv, self.client_ip))
                elif type(event) is MessageEnd:
                    self._message_end(event)
                elif type(event) is Authenticate:
                    self._start(self._authenticate(event))
                elif type(event) is StartTls:
                    # Nothing more is read in the clear: the conversation has dropped
                    # what came with STARTTLS, and start_tls() reads encrypted.
                    self.transport.pause_reading()
                    self._start(self._start_tls())
        except Exception:
            log.exception("SMTP session error (client %s)", self.client_ip)
            self._drop_spool()
            self._out.append(UNEXPECTED_ERROR)
            self._flush()
            self.transport.close()
            return
        self._report_progress(commands)
        self._flush()
        if self._eof and not self._busy:
            self.transport.close()   # the client hung up its side and has had every reply
            return
        if not self._busy and self.conv.buffered <= _MAX_BUFFERED:
            self._resume_reading()

    def _body(self, data: bytes) -> None:
        if self._spool is None:
            return   # the disk refused this message: read the rest, answer at the end
        try:
            self._spool.write(data)
        except OSError as exc:
            self._spool_error = problem_from_os_error(exc, Place.SPOOL, str(self._spool.spool_dir))
            self._drop_spool()
            return
        block = self._header_block
        if len(block) < _HEADER_SCAN_LIMIT and b"\r\n\r\n" not in block:
            block += data[:_HEADER_SCAN_LIMIT]

    def _message_end(self, end: MessageEnd) -> None:
        if self._spool_error is not None and not end.problem:
            self._out.append(self.policy.refuse(end, self.client_ip, self._spool_error))
            return
        if end.problem:
            self._drop_spool()
            events.emit("rejected", **{"from": end.sender or "<>", "to": [a for a, _ in end.recipients],
                                       "client": self.client_ip, "detail": end.problem})
            self._out.append(end.problem)
            return
        spool, self._spool = self._spool, None
        self._committing = True
        self._start(self._commit(end, spool, bytes(self._header_block)))

    def _start(self, coro) -> None:
        self._busy = True
        self._flush()
        asyncio.get_running_loop().create_task(coro)

    async def _commit(self, end: MessageEnd, spool: BodySpool, header_block: bytes) -> None:
        try:
            reply = await self.policy.commit(end, self.client_ip, spool, header_block)
        except Exception:
            spool.discard()
            log.exception("could not queue a message from %s", self.client_ip)
            reply = FAILED_REPLY
        self._busy = False
        self._committing = False
        if self.transport.is_closing():
            return
        self._out.append(reply)
        self._advance()

    async def _verify(self, address: str, route: Route) -> None:
        try:
            reply, route = await self.policy.verify(self.conv, self.client_ip, address, route)
        except Exception:
            log.exception("could not verify <%s> for %s", address, self.client_ip)
            reply, route = f"451 4.3.0 <{address}>: Cannot verify the recipient now; try again later", None
        self._busy = False
        if self.transport.is_closing():
            return
        if route is not None:
            self.conv.accept_recipient(address, route)
        self._out.append(reply)
        self._advance()

    async def _authenticate(self, event: Authenticate) -> None:
        """Check the password (or refuse during a block), slow down after failures, reply."""
        reply = await self.receiver.authenticate(self, event)
        self._busy = False
        if self.transport.is_closing():
            return
        self._out.append(reply)
        self._advance()

    async def _start_tls(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            context = self.receiver.tls_context if self.kind == SMTP else self.receiver.submission_tls_context
            self.transport = await loop.start_tls(self.transport, self, context,
                                                  server_side=True, ssl_handshake_timeout=30)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
            log.info("TLS handshake with %s failed: %s", self.client_ip, exc)
            if self.transport is not None:
                self.transport.abort()
            return
        self.conv.tls_started()
        self.receiver.certificate_login(self)
        self._busy = False
        self._advance()

    def _flush(self) -> None:
        if self._out:
            for reply in self._out:
                if reply.startswith(("4", "5")):
                    meters.refused(reply)    # /metrics: refusals by reply code
            self.transport.write(("\r\n".join(self._out) + "\r\n").encode())
            self._out.clear()

    def _drop_spool(self) -> None:
        if self._spool is not None:
            self._spool.discard()
            self._spool = None

    def _resume_reading(self) -> None:
        if self._paused and not self.transport.is_closing():
            self._paused = False
            self.transport.resume_reading()

    def _report_progress(self, commands_completed: bool) -> None:
        """Tell the session table what counts against slowloris: completed lines and the phase."""
        phase = Phase.TRANSACTION if self.conv.sender is not None or self._committing else Phase.PRE_MAIL
        if not commands_completed and phase is self._phase:
            return      # body data: nothing to tell (this runs for every block of an upload)
        table = self.receiver.limiter
        now = asyncio.get_running_loop().time()
        if commands_completed:
            table.command_completed(self, now)
        if phase is not self._phase:
            self._phase = phase
            table.set_phase(self, phase, now)
            self.receiver.arm_sweep()

    def shed(self, reply: str, detail: str) -> None:
        """The receiver took this session's slot back (evicted or too slow while busy): say why, hang up."""
        events.emit("rejected", client=self.client_ip, code=reply.split(" ", 2)[1], detail=detail)
        self._drop_spool()
        if self.transport.is_closing():
            return
        if self._busy:
            self.transport.abort()      # in a TLS handshake: no place for a reply
            return
        meters.refused(reply)
        self.transport.write(f"{reply}\r\n".encode())
        self.transport.close()

    def _check_idle(self) -> None:
        loop = asyncio.get_running_loop()
        idle = loop.time() - self._last_input
        if self._busy or idle < self._idle_timeout:
            # Only a stall counts: a long upload that keeps moving is fine.
            self._idle_timer = loop.call_later(max(self._idle_timeout - idle, 0.05), self._check_idle)
            return
        self._idle_timer = None
        self._drop_spool()
        if not self.transport.is_closing():
            meters.refused("421 4.4.2 ")
            self.transport.write(f"421 4.4.2 {self.conv.hostname} Idle for too long; closing the "
                                 f"connection\r\n".encode())
            self.transport.close()


def make_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


class Receiver:
    """Listens on the configured addresses and feeds the queue."""

    def __init__(self, config_ref: Callable[[], Config], store: Store, clock=time.time,
                 callout: Callout | None = None, alert_routes=None):
        self.config_ref = config_ref
        self.policy = ReceivePolicy(config_ref, store, clock, callout, alert_routes)
        # Connection slots and who loses one (receive/admission.py).
        self.limiter = SessionTable(Limits.from_server_config(config_ref().server))
        self._limits_source = config_ref().server
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._sweep_at = 0.0
        self.servers: list[asyncio.base_events.Server] = []
        self.kinds: list[str] = []      # the listener kind of each server
        self.tls_context: ssl.SSLContext | None = None
        # The submission ports' context: asks for a client certificate when server.tls_client_ca is set.
        # Never on the smtp port, where a server's certificate from another CA would fail the handshake.
        self.submission_tls_context: ssl.SSLContext | None = None
        self.spool_dir = config_ref().server.data_dir / "spool"
        # Who may authenticate (None: nobody, AUTH is not offered) and the brute-force counts.
        self.users: auth.UserDirectory | None = None
        self.auth_limits = auth.FailureLimits(self._auth_limits(config_ref().server))

    @staticmethod
    def _auth_limits(server) -> auth.Limits:
        return auth.Limits(server.auth_max_failures, server.auth_failure_delay, server.auth_block_time)

    def auth_metrics(self) -> dict[str, int]:
        """Counters for the console: AUTH successes, failures, refusals while blocked, blocks, IPs blocked now."""
        now = asyncio.get_running_loop().time()
        return {**self.auth_limits.counters, "auth_blocked_ips": self.auth_limits.blocked_now(now)}

    def user_directory(self, server) -> auth.UserDirectory | None:
        """The users of ``server.users_file`` as the config has it now (a reload may set or change it)."""
        if server.users_file is None:
            self.users = None
        elif self.users is None or self.users.path != server.users_file:
            self.users = auth.UserDirectory(server.users_file)
        return self.users

    def certificate_login(self, session: SmtpSession) -> None:
        """A client certificate listed in server.client_certs logs the session in as its user."""
        server = self.config_ref().server
        ssl_object = session.transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        users = self.user_directory(server)
        if not der or not server.client_certs or users is None:
            return
        fingerprint = hashlib.sha256(der).hexdigest()
        name = dict(server.client_certs).get(fingerprint)
        try:
            user = users.users().get(name) if name else None
        except auth.UsersFileError as exc:
            log.error("certificate login unavailable: server.users_file: %s", exc)
            return
        if user is None:
            events.emit("auth_failed", client=session.client_ip, mechanism="certificate",
                        detail=f"client certificate {fingerprint} is not in server.client_certs")
            return
        session.conv.authenticated(user.name, user.senders)
        self.limiter.mark_trusted(session)
        self.auth_limits.succeeded(session.client_ip)
        events.emit("auth", client=session.client_ip, user=user.name, mechanism="certificate")

    async def authenticate(self, session: SmtpSession, event: Authenticate) -> str:
        """The reply to a completed AUTH exchange; on success the session is trusted from now on."""
        server = self.config_ref().server
        users = self.user_directory(server)
        if users is None:
            return AUTH_UNAVAILABLE     # reloaded without users meanwhile
        self.auth_limits.limits = self._auth_limits(server)
        ip, limits = session.client_ip, self.auth_limits
        loop = asyncio.get_running_loop()
        name = event.username[:64].encode("unicode_escape").decode("ascii")   # the client's text, for the log
        left = limits.blocked(ip, loop.time())
        if left:
            limits.refused()
            events.emit("auth_refused", client=ip, user=name, detail="blocked after failed logins")
            return f"454 4.7.0 Too many failed logins from {ip}; try again in {left:.0f}s"
        try:
            user = await users.check(event.username, event.password)
        except auth.UsersFileError as exc:
            log.error("AUTH unavailable: server.users_file: %s", exc)
            return AUTH_UNAVAILABLE
        if user is None:
            delay, blocked = limits.failed(ip, loop.time())
            events.emit("auth_failed", client=ip, user=name, mechanism=event.mechanism,
                        detail="wrong password or unknown user")
            if blocked:
                events.emit("auth_blocked", client=ip, detail=f"{limits.limits.max_failures} failed logins; AUTH "
                                                              f"refused for {limits.limits.block_time:g}s")
            await asyncio.sleep(delay)
            return AUTH_INVALID
        limits.succeeded(ip)
        session.conv.authenticated(user.name, user.senders)
        self.limiter.mark_trusted(session)
        events.emit("auth", client=ip, user=user.name, mechanism=event.mechanism)
        return AUTH_SUCCEEDED

    def admit(self, session: SmtpSession) -> Refused | None:
        """Give a new connection a slot, evicting the oldest idle pre-MAIL session if need be."""
        server = self.config_ref().server
        if server is not self._limits_source:     # reloaded
            self._limits_source = server
            self.limiter.limits = Limits.from_server_config(server)
        now = asyncio.get_running_loop().time()
        verdict = self.limiter.admit(session, session.client_ip, self.policy.is_trusted(session.client_ip), now)
        if type(verdict) is Refused:
            return verdict
        if verdict.evicted is not None:
            verdict.evicted.shed(f"421 4.7.0 {server.hostname} Server busy; closing an idle connection "
                                 f"to make room", "idle before MAIL while the server is full; evicted")
        self.arm_sweep()
        return None

    def arm_sweep(self) -> None:
        """Have ``_sweep`` run at the earliest busy deadline (no timer while not busy)."""
        when = self.limiter.next_deadline()
        if when is None or (self._sweep_timer is not None and self._sweep_at <= when):
            return
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
        self._sweep_at = when
        self._sweep_timer = asyncio.get_running_loop().call_at(when, self._sweep)

    def _sweep(self) -> None:
        # May run early (sessions completed commands since it was armed): it then only re-arms.
        self._sweep_timer = None
        timeout = self.limiter.limits.busy_command_timeout
        for session in self.limiter.expire(asyncio.get_running_loop().time()):
            session.shed(f"421 4.4.2 {session.conv.hostname} No command completed in {timeout:g}s while "
                         f"the server is busy; closing the connection",
                         f"no command completed in {timeout:g}s before MAIL while busy")
        self.arm_sweep()

    async def start(self) -> None:
        config = self.config_ref()
        self.spool_dir = config.server.data_dir / "spool"   # a reload keeps data_dir (app.reload)
        if config.server.tls_cert and config.server.tls_key:
            self.tls_context = make_tls_context(config.server.tls_cert, config.server.tls_key)
            self.submission_tls_context = self.tls_context
            if config.server.tls_client_ca is not None:
                # Only this CA vouches for client certificates (not the system's store).
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.load_cert_chain(config.server.tls_cert, config.server.tls_key)
                ctx.load_verify_locations(cafile=str(config.server.tls_client_ca))
                ctx.verify_mode = ssl.CERT_OPTIONAL
                self.submission_tls_context = ctx
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        for kind, key in LISTENER_KEYS.items():
            tls = {"ssl": self.submission_tls_context, "ssl_handshake_timeout": 30} if kind == SUBMISSIONS else {}
            for host, port in getattr(config.server, key):
                server = await loop.create_server(lambda kind=kind: SmtpSession(self, kind), host, port,
                                                  reuse_address=True, backlog=LISTEN_BACKLOG, **tls)
                self.servers.append(server)
                self.kinds.append(kind)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.sockets[0].getsockname()[:2] for s in self.servers]

    def addresses_of(self, kind: str) -> list[tuple[str, int]]:
        """The addresses of the listeners of one kind (smtp, submission, submissions)."""
        return [a for a, k in zip(self.addresses, self.kinds) if k == kind]

    async def stop(self) -> None:
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()
        self.servers.clear()
        self.kinds.clear()
        await self.policy.store_incidents.stop()
