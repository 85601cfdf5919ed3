"""Who gets a connection slot, and who loses one: the defence against slowloris.

Pure bookkeeping, no I/O and no clock: the server (receive/server.py, session.py) says
what happened to each session and when, and acts on the answers; the rules are
table-tested without sockets (tests/unit/test_admission.py).

An idle connection costs an attacker nothing, so a relay that only counts
connections is locked out by a thousand of them, each trickling one byte every
few seconds to keep its idle timer from firing.  The rules:

1. **Reserved slots.**  ``reserved_trusted`` of the ``max_connections`` slots
   are only for clients in ``trusted_networks``: untrusted clients together
   hold at most ``max_connections - reserved_trusted``.  The per-IP limit is
   checked first and is never a reason to evict anyone.
2. **Eviction before refusal.**  A client that finds no free slot for itself
   takes the slot of the *oldest idle pre-MAIL* session: the one that has gone
   longest without completing a command and has not started a transaction.  An
   untrusted client only ever displaces an untrusted session; a trusted client
   displaces an untrusted one first, a trusted one only if there is none.
   Only when no such session exists is the client refused (``421 4.7.0``).
3. **Busy timeout.**  From ``high_water`` sessions on (80 % of
   ``max_connections``), a session that has not started a transaction must
   complete a command line within ``busy_command_timeout`` of its previous one
   (the greeting counts as the first).  Bytes that do not end a line do not
   count: a trickle no longer holds a slot.
4. **Transactions are never cut.**  After MAIL, through DATA and its commit, a
   session is neither evicted nor held to the busy timeout: only the ordinary
   idle timeout (no byte at all for ``idle_timeout``, kept by the server)
   applies, so a slow upload that keeps moving always finishes.

Sessions are identified by any hashable key (the server uses the session
object itself).  ``now`` is a monotonic clock (the event loop's) that never goes
back, so the order sessions were last active in is the order they are kept in,
and eviction and the next deadline cost O(1).  A session the table evicts or
expires is forgotten at once, so its slot is free before its connection has
finished closing; what the server says later about that key is ignored.

Why these: Postfix under the same attack greets nobody for 60 s (its stress
mode shortens timeouts but evicts no one).  Evicting the least recently
active session before MAIL almost never hits a legitimate client, which
completes its commands in milliseconds and so is never the oldest, while an
attacker must keep completing commands to keep a pre-MAIL slot.  What is left
to an attacker is a transaction (MAIL is free): that holds an untrusted slot
until ``idle_timeout``, which is why trusted clients have slots of their own.
"""

from __future__ import annotations

import enum
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Hashable

# Past this share of max_connections the relay is busy (rule 3).
HIGH_WATER_SHARE = 0.8


class Phase(enum.Enum):
    PRE_MAIL = "pre-MAIL"          # greeted, EHLO, STARTTLS, RSET, NOOP...: no transaction yet
    TRANSACTION = "transaction"    # from MAIL until the reply to the final dot


@dataclass(frozen=True)
class Limits:
    max_connections: int
    max_per_ip: int
    reserved_trusted: int
    busy_command_timeout: float

    @property
    def untrusted_share(self) -> int:
        return self.max_connections - self.reserved_trusted

    @property
    def high_water(self) -> int:
        return max(1, int(self.max_connections * HIGH_WATER_SHARE))

    @classmethod
    def from_server_config(cls, server) -> "Limits":
        reserved = server.reserved_trusted_connections
        if reserved is None:
            reserved = server.max_connections // 10
        return cls(max_connections=server.max_connections, max_per_ip=server.max_connections_per_ip,
                   reserved_trusted=min(reserved, server.max_connections - 1),
                   busy_command_timeout=server.busy_command_timeout)


@dataclass(frozen=True)
class Admitted:
    evicted: Hashable | None = None    # close this session (421 4.7.0): its slot is now the newcomer's


@dataclass(frozen=True)
class Refused:
    reason: str                        # for "421 4.7.0 <reason>"


@dataclass
class _Session:
    ip: str
    trusted: bool
    last_command_at: float
    phase: Phase = Phase.PRE_MAIL


class SessionTable:
    def __init__(self, limits: Limits):
        self.limits = limits
        self.per_ip: Counter[str] = Counter()
        self.untrusted = 0
        self._sessions: dict[Hashable, _Session] = {}
        # Pre-MAIL sessions by trust, least recently active first (a completed
        # command moves a session to the end), so eviction and the next busy
        # deadline only ever look at the heads.
        self._pre_mail: dict[bool, OrderedDict[Hashable, _Session]] = {True: OrderedDict(), False: OrderedDict()}

    @property
    def total(self) -> int:
        return len(self._sessions)

    @property
    def busy(self) -> bool:
        return self.total >= self.limits.high_water

    def __contains__(self, key: Hashable) -> bool:
        return key in self._sessions

    # -- admission -----------------------------------------------------------------

    def admit(self, key: Hashable, ip: str, trusted: bool, now: float) -> Admitted | Refused:
        limits = self.limits
        if self.per_ip[ip] >= limits.max_per_ip:
            return Refused(f"Too many connections from {ip}, try again later")
        evicted = None
        if not self._has_room(trusted):
            evicted = self._oldest_idle(trusted)
            if evicted is None:
                return Refused("Too many connections, try again later")
            self.release(evicted)
        self._add(key, _Session(ip, trusted, now))
        return Admitted(evicted)

    def _has_room(self, trusted: bool) -> bool:
        if self.total >= self.limits.max_connections:
            return False
        return trusted or self.untrusted < self.limits.untrusted_share

    def _oldest_idle(self, trusted: bool) -> Hashable | None:
        """The session a newcomer may displace: never a trusted one for an untrusted newcomer."""
        for pool in ((False, True) if trusted else (False,)):
            if self._pre_mail[pool]:
                return next(iter(self._pre_mail[pool]))
        return None

    def _add(self, key: Hashable, session: _Session) -> None:
        self._sessions[key] = session
        self.per_ip[session.ip] += 1
        if not session.trusted:
            self.untrusted += 1
        self._pre_mail[session.trusted][key] = session

    def release(self, key: Hashable) -> None:
        """The session has ended (or was evicted or expired): free its slot."""
        session = self._sessions.pop(key, None)
        if session is None:
            return
        self._pre_mail[session.trusted].pop(key, None)
        self.per_ip[session.ip] -= 1
        if self.per_ip[session.ip] <= 0:
            del self.per_ip[session.ip]
        if not session.trusted:
            self.untrusted -= 1

    # -- what the session did ------------------------------------------------------

    def mark_trusted(self, key: Hashable) -> None:
        """The client authenticated: it counts as trusted from now on (its slot leaves the untrusted share)."""
        session = self._sessions.get(key)
        if session is None or session.trusted:
            return
        self.untrusted -= 1
        if self._pre_mail[False].pop(key, None) is not None:
            self._pre_mail[True][key] = session
        session.trusted = True

    def command_completed(self, key: Hashable, now: float) -> None:
        """A whole command line arrived and was answered."""
        session = self._sessions.get(key)
        if session is None:
            return
        session.last_command_at = now
        if session.phase is Phase.PRE_MAIL:
            self._pre_mail[session.trusted].move_to_end(key)

    def set_phase(self, key: Hashable, phase: Phase, now: float) -> None:
        session = self._sessions.get(key)
        if session is None or session.phase is phase:
            return
        session.phase = phase
        if phase is Phase.TRANSACTION:
            self._pre_mail[session.trusted].pop(key, None)
        else:
            # The transaction ended with a reply: the busy timeout counts from it.
            session.last_command_at = now
            self._pre_mail[session.trusted][key] = session

    # -- deadlines -----------------------------------------------------------------

    def deadline(self, key: Hashable) -> float | None:
        """When this session is expired by the busy timeout; None while that cannot happen."""
        session = self._sessions.get(key)
        if session is None or session.phase is not Phase.PRE_MAIL or not self.busy:
            return None
        return session.last_command_at + self.limits.busy_command_timeout

    def next_deadline(self) -> float | None:
        """The earliest deadline of any session (when the server should call ``expire``)."""
        if not self.busy:
            return None
        heads = [next(iter(pool.values())).last_command_at for pool in self._pre_mail.values() if pool]
        return min(heads) + self.limits.busy_command_timeout if heads else None

    def expire(self, now: float) -> list[Hashable]:
        """Forget and return the sessions whose busy deadline has passed.

        The table stays busy while it expires: the mark is judged by the load
        that was there when the round started, so one round cuts every
        session that is over its deadline."""
        if not self.busy:
            return []
        cutoff = now - self.limits.busy_command_timeout
        expired = []
        for pool in self._pre_mail.values():
            for key, session in pool.items():    # least recently active first: stop at the first in time
                if session.last_command_at > cutoff:
                    break
                expired.append(key)
        for key in expired:
            self.release(key)
        return expired
