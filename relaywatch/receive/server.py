"""The SMTP server: the listeners, the connection slots, and the parts every session shares.

``Receiver`` listens on the configured addresses (receive/listeners.py: smtp,
submission, submissions and their TLS contexts) and makes one ``SmtpSession``
per connection (receive/session.py, the conversation of receive/
conversation.py on the socket).  The sessions share the parts that decide:
``ReceivePolicy`` (receive/policy.py: RCPT), ``Committer`` (receive/commit.py:
the durable commit, 250 only after it; the store condition), ``Logins``
(receive/login.py: AUTH and client certificates).

Connections are capped globally and per client IP (``421 4.7.0``).  Against
slowloris (receive/admission.py): slots reserved for trusted networks, the
oldest idle pre-MAIL session evicted (``421 4.7.0``) before a client is
refused, and past 80 % of the slots a command must complete within
``server.busy_command_timeout`` until MAIL (``421 4.4.2``).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Callable

from relaywatch.clock import SYSTEM_CLOCK, Clock
from relaywatch.config import Config
from relaywatch.receive.admission import Limits, Refused, SessionTable
from relaywatch.receive.commit import Committer
from relaywatch.receive.listeners import LISTEN_BACKLOG, LISTENER_KEYS, SUBMISSIONS, TLS_HANDSHAKE_TIMEOUT, tls_contexts
from relaywatch.receive.login import Logins
from relaywatch.receive.policy import ReceivePolicy
from relaywatch.receive.session import SmtpSession
from relaywatch.receive.store_condition import ConditionListener
from relaywatch.receive.verify import Callout
from relaywatch.store.base import Store


class Receiver:
    """Listens on the configured addresses and feeds the queue."""

    def __init__(self, config_ref: Callable[[], Config], store: Store, condition_listener: ConditionListener,
                 clock: Clock = SYSTEM_CLOCK, callout: Callout | None = None):
        self.config_ref = config_ref
        self.policy = ReceivePolicy(config_ref, store, clock.now, callout)
        self.committer = Committer(config_ref, store, self.policy.is_trusted, condition_listener, clock.now)
        # Connection slots and who loses one (receive/admission.py).
        self.limiter = SessionTable(Limits.from_server_config(config_ref().server))
        self.logins = Logins(config_ref, self.limiter, clock)
        self._limits_source = config_ref().server
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._sweep_at = 0.0
        self.servers: list[asyncio.base_events.Server] = []
        self.kinds: list[str] = []      # the listener kind of each server
        self.tls_context: ssl.SSLContext | None = None
        self.submission_tls_context: ssl.SSLContext | None = None    # receive/listeners.py tls_contexts
        self.spool_dir = config_ref().server.data_dir / "spool"

    def auth_metrics(self) -> dict[str, int]:
        """Counters for the console: AUTH successes, failures, refusals while blocked, blocks, IPs blocked now."""
        limits, now = self.logins.limits, self.logins.clock.monotonic()
        return {**limits.counters, "auth_blocked_ips": limits.blocked_now(now)}

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
        self.tls_context, self.submission_tls_context = tls_contexts(config.server)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        for kind, key in LISTENER_KEYS.items():
            tls = ({"ssl": self.submission_tls_context, "ssl_handshake_timeout": TLS_HANDSHAKE_TIMEOUT}
                   if kind == SUBMISSIONS else {})
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
        await self.committer.condition_listener.stop()
