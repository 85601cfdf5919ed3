"""The in-process meters /metrics reads (console/metrics.py) besides the mail
event counts (events.counts): attempt durations, SMTP sessions, replies
refused, store commit latency, notification failures.

Kept cheap because they sit on the mail path: a counter is an int add in a
dict, a histogram a bisect into a fixed bucket list and two adds; no locks.
The event loop is the only writer of everything here except
``commit_seconds``, whose only writer is the store's writer thread (the GIL
makes its adds whole; a scrape reading it mid-batch is at most one batch
behind).  Labels are bounded: connector names, listener kinds, channels and
reply codes; never an address or a domain.
"""

from __future__ import annotations

import re
from bisect import bisect_left

# SMTP attempts: a local sink answers in milliseconds, a tarpit in tens of seconds.
ATTEMPT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A batch's COMMIT: an fsync on SQLite, a round trip and WAL flush on PostgreSQL.
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """Fixed buckets (upper bounds, ``le``); the last slot is +Inf."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def merge(self, counts: list[int], total: float) -> None:
        """Add another process's counts (same buckets) into this one."""
        if len(counts) == len(self.counts):
            self.counts = [a + int(b) for a, b in zip(self.counts, counts)]
            self.sum += float(total)

    def snapshot(self) -> list:
        return [list(self.counts), self.sum]


attempt_seconds: dict[str, Histogram] = {}      # by connector
commit_seconds = Histogram(COMMIT_BUCKETS)      # every committed batch of this process's store
sessions_opened: dict[str, int] = {}            # by listener kind (smtp, submission, submissions)
sessions_open: dict[str, int] = {}
replies_refused: dict[tuple[str, str], int] = {}   # (3-digit reply, enhanced code) of each 4xx/5xx sent
notification_failures: dict[str, int] = {}      # by channel (email, webhook)


def observe_attempt(connector: str, seconds: float) -> None:
    h = attempt_seconds.get(connector)
    if h is None:
        h = attempt_seconds[connector] = Histogram(ATTEMPT_BUCKETS)
    h.observe(seconds)


def session_opened(kind: str) -> None:
    sessions_opened[kind] = sessions_opened.get(kind, 0) + 1
    sessions_open[kind] = sessions_open.get(kind, 0) + 1


def session_closed(kind: str) -> None:
    sessions_open[kind] = sessions_open.get(kind, 0) - 1


_REPLY = re.compile(r"([45][0-9][0-9])[ -](?:([245]\.[0-9]{1,3}\.[0-9]{1,3}) )?")


def refused(reply: str) -> None:
    """Count one reply the SMTP server sent if it refuses (4xx/5xx).  The
    labels are only what a strict pattern finds, so a reply quoting an
    upstream's text cannot make new label values beyond codes."""
    if reply[:1] not in ("4", "5"):
        return
    m = _REPLY.match(reply)
    key = (m[1], m[2] or "") if m else ("", "")
    replies_refused[key] = replies_refused.get(key, 0) + 1


def notification_failed(channel: str) -> None:
    notification_failures[channel] = notification_failures.get(channel, 0) + 1


# -- the delivery process's export (console/metrics.py write_export) --------------------

def snapshot() -> dict:
    """What another process needs to add these to its own (JSON-able)."""
    return {"attempt_seconds": {c: h.snapshot() for c, h in attempt_seconds.items()},
            "commit_seconds": commit_seconds.snapshot(),
            "notification_failures": dict(notification_failures)}


def reset() -> None:
    """For tests: forget everything counted so far."""
    attempt_seconds.clear()
    commit_seconds.counts = [0] * len(commit_seconds.counts)   # in place: the writer thread holds it
    commit_seconds.sum = 0.0
    sessions_opened.clear()
    sessions_open.clear()
    replies_refused.clear()
    notification_failures.clear()
