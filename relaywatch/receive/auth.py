"""Who may authenticate: the users file, the password check and brute-force limits.

The SASL exchange itself is in receive/conversation.py; this module is the
I/O behind its ``Authenticate`` event.

The users file (``server.users_file``) has one user a line, as
``relaywatch user add`` writes it::

    # name:password hash[:senders]
    alice:$argon2id$v=19$m=65536,t=3,p=4$...:alice@contoso.test,@fabrikam.test
    scanner:$argon2id$v=19$...

``senders`` (optional) lists the MAIL FROM addresses (``alice@contoso.test``)
and domains (``@contoso.test``) the user may send as, like Postfix's
smtpd_sender_login_maps; without it the user may use any.  Hashes are
Argon2id (argon2-cffi).  The file is parsed once and again when it changes
(size, mtime or inode), so ``user add`` takes effect without a reload.
The format's parser is config/users_file.py, since ``config check`` reads
the file too.
Checking a hash costs tens of milliseconds of CPU: it runs in a thread.

Brute force (``FailureLimits``): every failed password from an IP delays the
reply to its next failures (``server.auth_failure_delay`` times the count so
far), and ``server.auth_max_failures`` failures within
``server.auth_block_time`` block AUTH from that IP for that long (``454
4.7.0``, even with the right password).  A success forgets the IP's count.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from relaywatch.config.users_file import User, UsersFileError, load_users, parse_users

_HASHER = PasswordHasher()

@functools.cache
def _dummy_hash() -> str:
    """Checked for a user that does not exist, so the reply takes as long as for a wrong password.

    Made on first use, not at import: a hash costs 64 MiB, which a relay without users never needs."""
    return _HASHER.hash("relaywatch: no such user")

# A check costs ~64 MiB and tens of ms of CPU (argon2-cffi's defaults): two at a time, in threads
# of their own, so a burst of logins neither eats memory nor delays other thread work (the store).
_CHECKS = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="relaywatch-auth")


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def format_user(user: User) -> str:
    senders = ":" + ",".join(sorted(user.senders)) if user.senders else ""
    return f"{user.name}:{user.password_hash}{senders}"


def write_user(path: Path, user: User) -> bool:
    """Add ``user`` to the file, or replace the line of the user of that name; True if it was new.

    The file is replaced atomically and is readable by its owner only (0600)."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    parse_users("\n".join(lines), str(path))     # never rewrite a file we cannot read back
    new = True
    for i, line in enumerate(lines):
        if line.strip().partition(":")[0] == user.name and not line.lstrip().startswith("#"):
            lines[i] = format_user(user)
            new = False
    if new:
        lines.append(format_user(user))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return new


class UserDirectory:
    """The users file, parsed once and again whenever it changes on disk."""

    def __init__(self, path: Path):
        self.path = path
        self._stamp: tuple | None = None
        self._users: dict[str, User] = {}

    def users(self) -> dict[str, User]:
        """The users as the file has them now; a broken file keeps the last good version (logged by the caller)."""
        try:
            st = self.path.stat()
        except OSError as exc:
            raise UsersFileError(f"cannot read {self.path}: {exc.strerror}") from None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self._stamp:
            self._users = load_users(self.path)
            self._stamp = stamp
        return self._users

    async def check(self, name: str, password: str) -> User | None:
        """The user if ``password`` is theirs, else None.  Raises UsersFileError if the file is unusable."""
        user = self.users().get(name)
        return await asyncio.get_running_loop().run_in_executor(_CHECKS, _verify, user, password)


def _verify(user: User | None, password: str) -> User | None:
    try:
        _HASHER.verify(user.password_hash if user else _dummy_hash(), password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    return user


# -- brute force ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    max_failures: int = 5
    failure_delay: float = 1.0
    block_time: float = 600.0


@dataclass
class _Record:
    failures: list[float] = field(default_factory=list)   # when, within block_time
    blocked_until: float = 0.0


class FailureLimits:
    """Per-IP failed-password counts, the delay they earn and the block (pure; the caller passes the time).

    ``counters`` is for the console's metrics: ``auth_succeeded``,
    ``auth_failed``, ``auth_refused_blocked`` (AUTH refused during a block),
    ``auth_blocks`` (blocks started); ``blocked_now(now)`` counts the IPs
    blocked at the moment."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self._by_ip: dict[str, _Record] = {}
        self.counters = {"auth_succeeded": 0, "auth_failed": 0, "auth_refused_blocked": 0, "auth_blocks": 0}

    def blocked(self, ip: str, now: float) -> float:
        """Seconds the IP stays blocked (0: not blocked)."""
        record = self._by_ip.get(ip)
        if record is None or record.blocked_until <= now:
            return 0.0
        return record.blocked_until - now

    def refused(self) -> None:
        self.counters["auth_refused_blocked"] += 1

    def failed(self, ip: str, now: float) -> tuple[float, bool]:
        """Count a wrong password: (the delay before the reply, whether a block starts now)."""
        self.counters["auth_failed"] += 1
        record = self._by_ip.setdefault(ip, _Record())
        record.failures = [t for t in record.failures if t > now - self.limits.block_time]
        record.failures.append(now)
        delay = self.limits.failure_delay * min(len(record.failures), self.limits.max_failures)
        if len(record.failures) >= self.limits.max_failures:
            record.failures.clear()
            record.blocked_until = now + self.limits.block_time
            self.counters["auth_blocks"] += 1
            return delay, True
        self._forget_old(now)
        return delay, False

    def succeeded(self, ip: str) -> None:
        self.counters["auth_succeeded"] += 1
        self._by_ip.pop(ip, None)

    def blocked_now(self, now: float) -> int:
        return sum(1 for r in self._by_ip.values() if r.blocked_until > now)

    def _forget_old(self, now: float) -> None:
        # Bounded memory against a botnet: records with nothing recent and no block go.
        if len(self._by_ip) < 10_000:
            return
        cutoff = now - self.limits.block_time
        for ip in [ip for ip, r in self._by_ip.items() if r.blocked_until <= now
                   and (not r.failures or r.failures[-1] <= cutoff)]:
            del self._by_ip[ip]
