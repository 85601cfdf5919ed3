"""The cluster's state of the in-memory store (store/memory.py): the nodes'
heartbeats and the leader lease, as store/cluster.sql keeps them."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from relaywatch.cluster.model import LeaderLease, NodeBeat
from relaywatch.errors import StaleTerm


class MemoryCluster:
    """The cluster's half of MemoryStore, which supplies ``_check``, ``_entries`` and ``_notify``."""
    _check: Callable[[], None]
    _notify: Callable[[], None]
    _entries: dict

    def __init__(self) -> None:
        self._nodes: dict[str, NodeBeat] = {}
        self._leader = LeaderLease(None, 0, 0.0)

    async def heartbeat(self, beat: NodeBeat, first: bool = False) -> int:
        self._check()
        self._nodes[beat.name] = beat
        if not first:
            return 0
        prefix = beat.name + ":"
        return self._release(lambda owner: owner.startswith(prefix) and owner != beat.instance, beat.at)

    async def nodes(self) -> list[NodeBeat]:
        self._check()
        return [self._nodes[n] for n in sorted(self._nodes)]

    async def release_dead_leases(self, beat_before: float, now: float) -> int:
        self._check()
        dead = {b.instance for b in self._nodes.values() if b.at < beat_before}
        return self._release(lambda owner: owner in dead, now)

    def _release(self, whose: Callable[[str], bool], now: float) -> int:
        rows = [r for r in self._entries.values() if r.lease_owner is not None and whose(r.lease_owner)]
        for r in rows:
            r.lease_owner, r.lease_until = None, None
            r.next_attempt_at = min(r.next_attempt_at, now) if r.next_attempt_at is not None else now
        if rows:
            self._notify()
        return len(rows)

    async def acquire_leader(self, instance: str, now: float, until: float) -> int | None:
        self._check()
        lease = self._leader
        if lease.holder is not None and lease.holder != instance and lease.until >= now:
            return None
        term = lease.term if lease.holder == instance else lease.term + 1
        self._leader = LeaderLease(instance, term, until)
        return term

    async def resign_leader(self, instance: str) -> None:
        self._check()
        if self._leader.holder == instance:
            self._leader = replace(self._leader, until=0.0)

    async def leader(self) -> LeaderLease:
        self._check()
        return self._leader

    def _check_term(self, term: int | None) -> None:
        if term is not None and term != self._leader.term:
            raise StaleTerm(f"leader term {term} is over (term {self._leader.term} leads now); the write is refused")
