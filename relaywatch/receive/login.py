"""Logging a session in: AUTH (receive/auth.py's users file and failure limits) and client certificates.

A client that authenticates relays as trusted networks do, within its sender
addresses (checked at MAIL by the conversation), and its session is marked
trusted in the session table (receive/admission.py).  Wrong passwords are
counted per IP (``Logins.limits.counters`` for metrics): the replies slow
down, then AUTH from that IP is blocked for a while (``454 4.7.0``).  A client
certificate listed in ``server.client_certs`` logs the session in as its user
when the handshake is done.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Callable

from relaywatch import events
from relaywatch.clock import SYSTEM_CLOCK, Clock
from relaywatch.config import Config
from relaywatch.receive import auth
from relaywatch.receive.admission import SessionTable
from relaywatch.receive.conversation_events import Authenticate
from relaywatch.receive.sasl import AUTH_INVALID, AUTH_SUCCEEDED, AUTH_UNAVAILABLE

if TYPE_CHECKING:
    from relaywatch.receive.session import SmtpSession

log = logging.getLogger("relaywatch.receive")


def _limits(server) -> auth.Limits:
    return auth.Limits(server.auth_max_failures, server.auth_failure_delay, server.auth_block_time)


class Logins:
    def __init__(self, config_ref: Callable[[], Config], sessions: SessionTable, clock: Clock = SYSTEM_CLOCK):
        self.config_ref = config_ref
        self.sessions = sessions
        self.clock = clock         # how long a block lasts, and the delay a wrong password earns
        # Who may authenticate (None: nobody, AUTH is not offered) and the brute-force counts.
        self.users: auth.UserDirectory | None = None
        self.limits = auth.FailureLimits(_limits(config_ref().server))

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
        self.sessions.mark_trusted(session)
        self.limits.succeeded(session.client_ip)
        events.emit("auth", client=session.client_ip, user=user.name, mechanism="certificate")

    async def authenticate(self, session: SmtpSession, event: Authenticate) -> str:
        """The reply to a completed AUTH exchange; on success the session is trusted from now on."""
        server = self.config_ref().server
        users = self.user_directory(server)
        if users is None:
            return AUTH_UNAVAILABLE     # reloaded without users meanwhile
        self.limits.limits = _limits(server)
        ip, limits = session.client_ip, self.limits
        name = event.username[:64].encode("unicode_escape").decode("ascii")   # the client's text, for the log
        left = limits.blocked(ip, self.clock.monotonic())
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
            delay, blocked = limits.failed(ip, self.clock.monotonic())
            events.emit("auth_failed", client=ip, user=name, mechanism=event.mechanism,
                        detail="wrong password or unknown user")
            if blocked:
                events.emit("auth_blocked", client=ip, detail=f"{limits.limits.max_failures} failed logins; AUTH "
                                                              f"refused for {limits.limits.block_time:g}s")
            await self.clock.sleep(delay)
            return AUTH_INVALID
        limits.succeeded(ip)
        session.conv.authenticated(user.name, user.senders)
        self.sessions.mark_trusted(session)
        events.emit("auth", client=ip, user=user.name, mechanism=event.mechanism)
        return AUTH_SUCCEEDED

