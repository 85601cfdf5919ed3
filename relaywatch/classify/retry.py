"""The retry decision: pure, from one attempt's outcomes to what happens next.

Given an entry, what its attempt did for each recipient, the queue's retry
policy and the time, ``decide`` says when the entry is tried again, which
recipients expire now (deferred past the message's expiry) and which bounce
(the NDR is about them).  No I/O, no clock: the scheduler records what it
decides, the operator's expire and bounce use it too, and tests/unit/test_retry.py
tables it.

An NDR that could not be built (``notice_pending`` on the entry) is retried
on the same intervals, counting its own tries (``notice_retry``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from relaywatch.model import Entry, RecipientOutcome, RecipientStatus


class RetryPolicy(Protocol):
    """What the decision reads of the config (config.QueueConfig is one)."""
    retry_intervals: tuple[float, ...]
    message_expiration: float


@dataclass(frozen=True, slots=True)
class RetryDecision:
    outcomes: list[RecipientOutcome]   # as recorded: deferred ones past the expiry are EXPIRED
    attempts: int                      # the entry's attempts, this one counted
    next_attempt_at: float             # when the deferred recipients are tried again
    expires_at: float                  # the expiry in force (``now`` for an operator's expire)
    bounced: list[RecipientOutcome]    # FAILED or EXPIRED now: the NDR is about them
    delayed: list[RecipientOutcome]    # DEFERRED: tried again at next_attempt_at

    def next_attempt(self, notice_pending: dict | None) -> float:
        """When the entry is due again: an NDR held back with no recipient
        left waiting is due on its own schedule."""
        if notice_pending is not None and not self.delayed:
            return notice_pending["retry_at"]
        return self.next_attempt_at


def retry_interval(tries: int, intervals: tuple[float, ...]) -> float:
    """The wait after the ``tries``-th failure (1-based); the last interval repeats."""
    return intervals[min(tries, len(intervals)) - 1]


def next_attempt_at(attempts: int, now: float, expires_at: float, intervals: tuple[float, ...]) -> float:
    """After the ``attempts``-th failed attempt: the schedule's interval, but
    never later than the expiry, so the last try is made then."""
    return min(now + retry_interval(attempts, intervals), max(expires_at, now))


def settle(outcomes: list[RecipientOutcome], now: float, expires_at: float) -> list[RecipientOutcome]:
    """Deferred recipients of an entry past its expiry become EXPIRED."""
    if now < expires_at:
        return outcomes
    return [RecipientOutcome(o.address, RecipientStatus.EXPIRED, o.failure, o.reply)
            if o.status is RecipientStatus.DEFERRED else o for o in outcomes]


def decide(entry: Entry, outcomes: list[RecipientOutcome], policy: RetryPolicy, now: float, *,
           counted: bool = True, expire: bool = False) -> RetryDecision:
    """What follows from an attempt's ``outcomes``.

    ``counted=False``: no delivery attempt was made (an operator's bounce or
    expire, a held-back NDR tried alone), so the attempt count stays.
    ``expire=True``: the operator gives up now; the entry's expiry is now."""
    expires_at = min(entry.expires_at, now) if expire else entry.expires_at
    outcomes = settle(outcomes, now, expires_at)
    attempts = entry.attempts + (1 if counted else 0)
    return RetryDecision(
        outcomes=outcomes, attempts=attempts, expires_at=expires_at,
        next_attempt_at=next_attempt_at(max(attempts, 1), now, expires_at, policy.retry_intervals),
        bounced=[o for o in outcomes if o.status in (RecipientStatus.FAILED, RecipientStatus.EXPIRED)],
        delayed=[o for o in outcomes if o.status is RecipientStatus.DEFERRED])


# -- an NDR that could not be built ---------------------------------------------------------

def notice_given_up(notice_pending: dict | None, now: float, policy: RetryPolicy) -> bool:
    """A held-back NDR that still fails after a message lifetime goes without
    the original's headers (the part that can depend on its bytes), so the
    sender still learns; if even that fails it is dropped."""
    return bool(notice_pending) and now - notice_pending.get("since", now) >= policy.message_expiration


@dataclass(frozen=True, slots=True)
class NoticeRetry:
    tries: int          # this failure counted
    since: float        # when the NDR first failed
    retry_at: float


def notice_retry(notice_pending: dict | None, now: float, policy: RetryPolicy) -> NoticeRetry | None:
    """When a failed NDR is tried again (the queue's intervals, counting its
    own tries); None once it is given up (``notice_given_up``)."""
    if notice_given_up(notice_pending, now, policy):
        return None
    held = notice_pending or {}
    tries = held.get("tries", 0) + 1
    return NoticeRetry(tries, held.get("since", now), now + retry_interval(tries, policy.retry_intervals))
