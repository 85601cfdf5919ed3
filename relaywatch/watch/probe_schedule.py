"""When the watch next probes a connector with deferred mail: pure, table-tested.

A destination that failed a moment ago is likely to be back soon (a restart,
a failover, a full disk cleaned up), and probing it costs one connection; one
that has been down for an hour will not be back in the next second.  So the
gap between two probes is an eighth of how long the current failure pattern
has lasted, at least ``alerts.probe_min_interval`` and at most
``alerts.probe_interval``: with the defaults (2 s, 30 s) a dead host sees a
probe every 2 s for the first 16 s, then a little less often each time (2.2,
2.6, 2.8 ... s: 30 probes in the first four minutes), and every 30 s from then on; a destination that
comes back is noticed within an eighth of the outage's length.  Each connector's gaps are stretched by up
to a tenth, by a fixed share from its name, so that connectors that failed
together do not probe in step.

A failure pattern is the set of codes a connector's deferred mail has.  It
starts anew, and the probes with it, when a code appears that the pattern did
not have, or when mail fails after a probe passed.  After a probe passed,
the released mail itself shows whether the destination is back, so the next
probe waits the longest gap unless a new failure starts a new pattern.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import Sequence

from relaywatch.incident import BacklogSummary

AGE_SHARE = 0.125      # the gap, as a share of how long the pattern has lasted
SPREAD = 0.1           # each connector's gaps are up to this share longer


@dataclass(frozen=True, slots=True)
class ProbeTiming:
    shortest: float    # alerts.probe_min_interval (never more than longest)
    longest: float     # alerts.probe_interval

    @classmethod
    def of(cls, probe_min_interval: float, probe_interval: float) -> "ProbeTiming":
        return cls(min(probe_min_interval, probe_interval), probe_interval)


@dataclass(frozen=True, slots=True)
class FailurePattern:
    """What the watch knows of one connector's failing: since when, and its probes."""
    codes: frozenset[str]
    since: float                        # when this pattern started, as far as the watch knows
    probed_at: float | None = None      # the last probe, of this pattern or an earlier one
    passed_at: float | None = None      # the last probe, if it passed


def spread(connector: str) -> float:
    """A fixed share in [0, 1) per connector name (the same on every node and start)."""
    return zlib.crc32(connector.encode()) / 2 ** 32


def probe_gap(failing_for: float, timing: ProbeTiming) -> float:
    """The wait after a failed probe, ``failing_for`` seconds into the pattern."""
    return min(max(failing_for * AGE_SHARE, timing.shortest), timing.longest)


def follow(previous: FailurePattern | None, backlog: Sequence[BacklogSummary], now: float) -> FailurePattern | None:
    """A connector's pattern after the watch read its deferred mail (``backlog``:
    its (connector, code) groups); None when nothing is deferred any more."""
    if not backlog:
        return None
    codes = frozenset(s.code for s in backlog)
    if previous is None:
        # First seen (a new backlog, or this node just started to watch): the
        # newest group's first failure is the latest the pattern can have begun.
        started = [s.first_failure_at for s in backlog if s.first_failure_at is not None]
        return FailurePattern(codes, min(max(started), now) if started else now)
    failed_at = [s.latest_error.at for s in backlog if s.latest_error is not None and s.latest_error.at]
    if previous.passed_at is not None and failed_at and max(failed_at) > previous.passed_at:
        return FailurePattern(codes, min(max(failed_at), now), previous.probed_at)
    if not codes <= previous.codes:
        return FailurePattern(codes, now, previous.probed_at)
    return previous


def probed(pattern: FailurePattern, ok: bool, at: float) -> FailurePattern:
    """The pattern after a probe at ``at``."""
    return replace(pattern, probed_at=at, passed_at=at if ok else None)


def next_probe_at(pattern: FailurePattern, timing: ProbeTiming, share: float = 0.0) -> float:
    """When the connector is probed next (``share``: its ``spread``)."""
    stretch = 1 + SPREAD * share
    if pattern.passed_at is not None:
        return pattern.passed_at + timing.longest * stretch
    if pattern.probed_at is None or pattern.probed_at < pattern.since:
        return pattern.since + timing.shortest * stretch
    return pattern.probed_at + probe_gap(pattern.probed_at - pattern.since, timing) * stretch
