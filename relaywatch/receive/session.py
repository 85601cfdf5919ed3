"""One SMTP connection: the conversation (receive/conversation.py) on an asyncio socket.

``SmtpSession`` is callback-driven (``asyncio.Protocol``): bytes go into the
conversation, its events are acted on, and every reply decided in one pass
goes out in one write.  The only waits are the commit after the final dot
(receive/commit.py: 250 only once it is durable), a recipient verification,
an AUTH check and the TLS handshake; input that arrives meanwhile waits in
the conversation, and reading pauses if it piles up.

We own this layer instead of subclassing aiosmtpd: on the 2-core bench
machine aiosmtpd alone cost about 540 µs of CPU per message, more than the
rest of receiving together (bench/README.md), and it read DATA line by line.
A client that stalls for ``server.idle_timeout`` is disconnected
(``421 4.4.2``); the receiver (receive/server.py) may take the session's slot
back (``shed``).  If the disk refuses a message being read, the rest is read
and dropped and the answer comes after the final dot (``452 4.3.1`` when
full, else ``451 4.3.0``); an error nobody foresaw ends the session with
``421 4.3.0``, never a 5xx.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING

from relaywatch import events, meters
from relaywatch.model import Route
from relaywatch.receive.admission import Phase
from relaywatch.receive.conversation import Conversation
from relaywatch.receive.conversation_events import (NEED_DATA, Authenticate, BodyData, MessageEnd, MessageStart,
                                                    Recipient, Reply, StartTls)
from relaywatch.receive.listeners import SMTP, SUBMISSIONS, TLS_HANDSHAKE_TIMEOUT
from relaywatch.receive.message import HEADER_SCAN_LIMIT
from relaywatch.receive.spool import BodySpool
from relaywatch.receive.store_condition import FAILED_REPLY, Place, StoreProblem, problem_from_os_error

if TYPE_CHECKING:
    from relaywatch.receive.server import Receiver

log = logging.getLogger("relaywatch.receive")

# Unprocessed input kept while a commit or handshake is running; above this the
# socket is not read until the session catches up.
_MAX_BUFFERED = 256 * 1024
# After an error we did not foresee, the session's state cannot be trusted (a
# message half read would be taken for commands): say so and hang up.
UNEXPECTED_ERROR = "421 4.3.0 Temporary server error; closing the connection, please try again later"


class SmtpSession(asyncio.Protocol):
    """One client connection."""

    def __init__(self, receiver: "Receiver", kind: str = SMTP):
        self.receiver = receiver
        self.kind = kind
        self.policy = receiver.policy
        self.committer = receiver.committer
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
        # The loop, kept: on Python 3.11 each get_running_loop() is a getpid() system call, and
        # a message asked for it nine times here (every block read, every reply's progress report).
        self._loop: asyncio.AbstractEventLoop | None = None

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
        users = self.receiver.logins.user_directory(config.server) is not None and self.receiver.tls_context is not None
        self.conv = Conversation(config.server.hostname, config.server.max_message_size,
                                 tls_available=self.receiver.tls_context is not None and self.kind != SUBMISSIONS,
                                 tls_active=self.kind == SUBMISSIONS, auth_available=users,
                                 auth_required=self.kind != SMTP)
        self._idle_timeout = config.server.idle_timeout
        self._loop = loop = asyncio.get_running_loop()
        self._last_input = loop.time()
        self._idle_timer = loop.call_later(self._idle_timeout, self._check_idle)
        if self.kind == SUBMISSIONS:
            self.receiver.logins.certificate_login(self)
        self._advance()

    def data_received(self, data: bytes) -> None:
        if self.conv is None:
            return
        self._last_input = self._loop.time()
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
                    self._body(self.committer.received_header(conv, self.client_ip))
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
        if len(block) < HEADER_SCAN_LIMIT and b"\r\n\r\n" not in block:
            block += data[:HEADER_SCAN_LIMIT]

    def _message_end(self, end: MessageEnd) -> None:
        if self._spool_error is not None and not end.problem:
            self._out.append(self.committer.refuse(end, self.client_ip, self._spool_error))
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
        self._loop.create_task(coro)

    async def _commit(self, end: MessageEnd, spool: BodySpool, header_block: bytes) -> None:
        try:
            reply = await self.committer.commit(end, self.client_ip, spool, header_block)
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
        reply = await self.receiver.logins.authenticate(self, event)
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
                                                  server_side=True, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
            log.info("TLS handshake with %s failed: %s", self.client_ip, exc)
            if self.transport is not None:
                self.transport.abort()
            return
        self.conv.tls_started()
        self.receiver.logins.certificate_login(self)
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
        now = self._loop.time()
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
