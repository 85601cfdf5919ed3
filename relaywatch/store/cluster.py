"""The cluster's state on SQL: the nodes' heartbeats and the leader lease (relaywatch/cluster/).

Each operation is one statement (cluster.sql); the fence of the leader-only
writes (``check_term``) runs inside the write it guards (store/watch.py).
"""

from __future__ import annotations

from typing import Any

from relaywatch.cluster.model import LeaderLease, NodeBeat, NodeState
from relaywatch.errors import StaleTerm
from relaywatch.store import queries
from relaywatch.store.engine import Dialect, GroupCommitEngine

Q = queries.load("cluster.sql")


class SqlCluster:
    """The cluster's operations; SqlStore (store/sql.py) supplies ``engine`` and ``dialect``."""
    engine: GroupCommitEngine
    dialect: Dialect

    async def heartbeat(self, beat: NodeBeat, first: bool = False) -> int:
        """Write the node's row; ``first`` (its start): also return what earlier
        starts of this node still had leased; how many entries that returned."""
        def op(conn: Any, cleanup: list) -> int:
            conn.execute(Q["heartbeat"], (beat.name, beat.instance, beat.address, beat.role, beat.version,
                                          beat.state.value, beat.started_at, beat.at, beat.leases, beat.received,
                                          beat.delivered, beat.instance))
            if self.dialect.counts_by_delta:   # every few seconds on every node: the deltas stay few
                conn.execute(Q["fold_counts"])
                conn.execute(Q["fold_waiting"])
            if not first:
                return 0
            return conn.execute(self._skipping("release_earlier_instances"), (beat.at, beat.at, beat.name,
                                                                                beat.name, beat.instance)).rowcount
        released = await self.engine.write(op, announce=True)
        if released:
            self._notify()
        return released

    async def nodes(self) -> list[NodeBeat]:
        return await self.engine.read(lambda conn: [_beat(r) for r in conn.execute(Q["nodes"])])

    async def release_dead_leases(self, beat_before: float, now: float) -> int:
        n = await self.engine.write(lambda conn, cleanup: conn.execute(self._skipping("release_dead_leases"),
                                                                       (now, now, beat_before)).rowcount,
                                    announce=True)
        if n:
            self._notify()
        return n

    async def acquire_leader(self, instance: str, now: float, until: float) -> int | None:
        def op(conn: Any, cleanup: list) -> int | None:
            row = conn.execute(Q["acquire_leader"], (instance, instance, until, instance, now)).fetchone()
            return int(row[0]) if row else None
        return await self.engine.write(op, first=True)

    def _skipping(self, name: str) -> str:
        """A statement of cluster.sql that passes over rows other transactions hold (PostgreSQL)."""
        return Q[name].replace("{skip_locked}", self.dialect.lease_lock)

    async def resign_leader(self, instance: str) -> None:
        await self.engine.write(lambda conn, cleanup: conn.execute(Q["resign_leader"], (instance,)))

    async def leader(self) -> LeaderLease:
        def q(conn: Any) -> LeaderLease:
            row = conn.execute(Q["leader"]).fetchone()
            return LeaderLease(row[0], int(row[1]), float(row[2])) if row else LeaderLease(None, 0, 0.0)
        return await self.engine.read(q)


def check_term(conn: Any, row_share: str, term: int | None) -> None:
    """Inside a write: raise StaleTerm unless ``term`` (None: not a leader-only write) is current."""
    if term is None:
        return
    row = conn.execute(Q["leader_term"].replace("{row_share}", row_share)).fetchone()
    current = int(row[0]) if row else 0
    if current != term:
        raise StaleTerm(f"leader term {term} is over (term {current} leads now); the write is refused")


def _beat(row: tuple) -> NodeBeat:
    name, instance, address, role, version, state, started, at, leases, received, delivered = row
    return NodeBeat(name, instance, address, role, version, float(started), float(at), int(leases), int(received),
                    int(delivered), NodeState(state) if state in NodeState._value2member_map_ else NodeState.RUNNING)
