"""The cluster's decisions, pure: which nodes are alive, whether this one leads, and until when.

Times are the nodes' own clocks (time.time()); nodes of one cluster are
assumed to agree within a fraction of a heartbeat (NTP), and the fencing term
(store/cluster.sql) catches what a skew lets through.

Timeline of a leader that dies (interval i, lapse L, the lease's length L - i):
it last renewed at t0 < death; its lease ends at t0 + L - i; the others try
every i, so one takes over by t0 + L <= death + L: within the lapse.
The leader itself stops acting a half interval before its lease ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from relaywatch.cluster.model import LeaderLease, NodeBeat, NodeState


@dataclass(frozen=True)
class Timing:
    interval: float      # server.heartbeat_interval
    lapse: float         # server.node_lapse (config check: at least 3 intervals)

    @property
    def lease_length(self) -> float:
        return self.lapse - self.interval

    def dead_before(self, now: float) -> float:
        """A running node whose last heartbeat is older than this is dead."""
        return now - self.lapse


_BEATING = (NodeState.RUNNING, NodeState.DRAINING)


def alive(beat: NodeBeat, timing: Timing, now: float) -> bool:
    return beat.state in _BEATING and beat.at >= timing.dead_before(now)


def down(beat: NodeBeat, timing: Timing, now: float) -> bool:
    """Dead without saying goodbye (a clean stop is not down; one killed while draining is)."""
    return beat.state in _BEATING and beat.at < timing.dead_before(now)


def leader_now(lease: LeaderLease, now: float) -> str | None:
    """The instance holding the leader lease now; None once it lapsed (another takes over)."""
    return lease.holder if lease.until >= now else None


class Leadership:
    """Whether this node leads, from the answers of the leader lease (acquire_leader)."""

    def __init__(self, timing: Timing):
        self.timing = timing
        self._term: int | None = None
        self._until = 0.0

    def answered(self, asked_at: float, term: int | None) -> str | None:
        """The store answered the acquire asked at ``asked_at`` (by our clock); what
        changed for the log: "leading", "stopped leading" or None."""
        was = self._term
        if term is None:
            self._term, self._until = None, 0.0
        else:
            self._term, self._until = term, asked_at + self.timing.lease_length - self.timing.interval / 2
        if term is not None and term != was:
            return "leading"
        if term is None and was is not None:
            return "stopped leading"
        return None


    def term(self, now: float) -> int | None:
        """The term to fence leader-only writes with, None when not leading now."""
        return self._term if self._term is not None and now < self._until else None

    def resigned(self) -> None:
        self._term, self._until = None, 0.0
