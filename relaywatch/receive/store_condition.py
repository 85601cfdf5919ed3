"""Can the relay queue mail?  One condition per outage, not one log line per message.

Pure.  Before its 250 a message is written to two places: the spool directory
(bodies over ``INLINE_LIMIT``, receive/spool.py) and the queue store.  The
receiver maps what either raised to a ``StoreProblem`` (the one place those
errors become replies: ``452 4.3.1`` for a full disk or quota, ``451 4.3.0``
for anything else, never a 5xx) and tells the ``StoreCondition`` about every
refused message and every write that succeeded.  What comes back is what
changed: the first refusal starts the condition, another place or another
error changes it, and it ends once every place that failed has been written
again.  A place recovers only by a write there: on a nearly full disk small
messages may still fit in the queue while big ones fail in the spool, and
the condition must not flap with them.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass
from typing import Protocol

from relaywatch.errors import StoreError, StoreFull
from relaywatch.receive.spool import INLINE_LIMIT

FULL_REPLY = "452 4.3.1 Insufficient system storage; please try again later"
FAILED_REPLY = "451 4.3.0 Could not queue the message; please try again later"

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


class Place(enum.Enum):
    SPOOL = "spool"     # the spool directory: bodies too big to keep in the queue row
    QUEUE = "queue"     # the queue store itself


@dataclass(frozen=True)
class StoreProblem:
    place: Place
    path: str        # the spool directory, the queue file or the store's address (no password)
    code: str        # ENOSPC, EDQUOT, SQLITE_FULL, 53100, EIO, ...; "?" when nobody said
    detail: str      # the OS's or the driver's own words
    full: bool       # the disk or the quota is full

    @property
    def reply(self) -> str:
        return FULL_REPLY if self.full else FAILED_REPLY

    @property
    def refusing(self) -> str:
        """What this problem makes the relay refuse."""
        what = ("every message" if self.place is Place.QUEUE
                else f"messages over {INLINE_LIMIT // 1024} KiB (they need a spool file)")
        return f"{what} with {self.reply[:9]}"


def problem_from_os_error(exc: OSError, place: Place, path: str) -> StoreProblem:
    """``path`` names the place (the spool directory, not the temporary file that
    failed: each message has its own, and they are one condition)."""
    code = errno.errorcode.get(exc.errno, "?") if exc.errno is not None else "?"
    detail = exc.strerror or str(exc) or type(exc).__name__
    return StoreProblem(place, path, code, detail, exc.errno in _FULL_ERRNOS)


def problem_from_store_error(exc: StoreError, path: str) -> StoreProblem:
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.errno is not None:
        return problem_from_os_error(cause, Place.QUEUE, path)
    return StoreProblem(Place.QUEUE, path, exc.code or "?", str(exc) or type(exc).__name__,
                        isinstance(exc, StoreFull))


# -- what changed ----------------------------------------------------------------------

@dataclass(frozen=True)
class ConditionStarted:
    problem: StoreProblem
    at: float


@dataclass(frozen=True)
class ConditionChanged:
    """Another place fails too, or a place fails in another way."""
    problem: StoreProblem
    at: float


@dataclass(frozen=True)
class PlaceRecovered:
    """One place can be written again; others still fail."""
    place: Place
    path: str
    still: tuple[StoreProblem, ...]
    at: float


@dataclass(frozen=True)
class ConditionEnded:
    since: float
    at: float
    refused: int                        # messages answered 4xx during the condition
    problems: tuple[StoreProblem, ...]  # each distinct (place, code) seen, in order

    @property
    def duration(self) -> float:
        return self.at - self.since


Change = ConditionStarted | ConditionChanged | PlaceRecovered | ConditionEnded


class StoreCondition:
    def __init__(self) -> None:
        self.failing: dict[Place, StoreProblem] = {}
        self.since: float | None = None
        self.refused = 0
        self.problems: list[StoreProblem] = []

    @property
    def active(self) -> bool:
        return bool(self.failing)

    def refused_message(self, problem: StoreProblem, now: float) -> Change | None:
        self.refused += 1
        before = self.failing.get(problem.place)
        self.failing[problem.place] = problem
        if not any((p.place, p.code) == (problem.place, problem.code) for p in self.problems):
            self.problems.append(problem)
        if self.since is None:
            self.since = now
            return ConditionStarted(problem, now)
        if before is None or (before.code, before.path) != (problem.code, problem.path):
            return ConditionChanged(problem, now)
        return None

    def written(self, place: Place, now: float) -> Change | None:
        """A write to ``place`` succeeded."""
        problem = self.failing.pop(place, None)
        if problem is None:
            return None
        if self.failing:
            return PlaceRecovered(place, problem.path, tuple(self.failing.values()), now)
        ended = ConditionEnded(self.since, now, self.refused, tuple(self.problems))
        self.since, self.refused, self.problems = None, 0, []
        return ended


class ConditionListener(Protocol):
    """Who else hears of the condition besides the log: the runtime wires the relay's
    own ``store`` incident here (watch/store_incident.py), which the receiver cannot
    import (it sits above receiving) and cannot reach through the store (the store
    may be what fails)."""

    def on_change(self, change: Change, failing: list[StoreProblem], refused: int) -> None:
        """The condition changed; ``failing`` is every place failing now, ``refused`` the count so far."""

    def wrote(self) -> None:
        """A message was committed (called once per message, on the receive path: keep it cheap)."""

    async def stop(self) -> None:
        """The receiver stops."""


def describe(change: Change) -> str:
    """The one log line for a change."""
    if type(change) is ConditionStarted or type(change) is ConditionChanged:
        p = change.problem
        also = "also " if type(change) is ConditionChanged else ""
        return f"{also}cannot write {p.path}: {p.code} ({p.detail}); refusing {p.refusing} until it can"
    if type(change) is PlaceRecovered:
        still = "; ".join(f"{p.path}: {p.code}, refusing {p.refusing}" for p in change.still)
        return f"{change.path} can be written again; still failing: {still}"
    return (f"the queue can be written again after {span(change.duration)}: "
            f"{change.refused} message(s) were refused meanwhile (senders retry a 4xx)")


def span(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"

