"""Deadlocks on PostgreSQL (issue 12): the lock order of the nodes' transactions, and the one
place a deadlock that still happens is retried (store/batch.py ``_run_ops``).

Each test builds the cycle the soak logged as ``deadlock detected`` with real stores (one
engine and connection each, as nodes have) on one schema, and checks that no caller sees it:
not the node recording a delivery, not the leader, not a node opening the store.
"""

import asyncio
import threading
import time

import pytest

from helpers import eventually
from relaywatch.cluster.model import NodeBeat
from relaywatch.errors import LeaseLost
from relaywatch.model import NewMessage, RecipientOutcome, RecipientStatus, Route, RouteKind, StoredBody

ROUTE = Route(RouteKind.CONNECTOR, "onprem", "fabrikam.test")


def beat(name: str, instance: str, at: float) -> NodeBeat:
    return NodeBeat(name=name, instance=instance, address="", role="all", version="test", started_at=at, at=at)


def message(now: float) -> NewMessage:
    return NewMessage(sender="a@contoso.test", recipients=(("b@fabrikam.test", ROUTE),),
                      body=StoredBody(size=5, data=b"hello"), received_at=now, expires_at=now + 3600)


class Held:
    """An op that holds its store's writer until released: the ops queued meanwhile go in
    the next batch together, in the order they were queued."""

    def __init__(self, store):
        self.running, self.go = threading.Event(), threading.Event()
        self.task = asyncio.ensure_future(store.engine.write(self._op))

    def _op(self, conn, cleanup):
        self.running.set()
        self.go.wait(10)

    async def started(self):
        await eventually(self.running.is_set, what="the writer to hold")


def pause(seconds):
    """An op standing for the rest of a batch's work, between the two that lock."""
    def op(conn, cleanup):
        time.sleep(seconds)
    return op


async def _stores(pg_dsn, n):
    from relaywatch.store.postgres import PostgresStore
    stores = [PostgresStore(pg_dsn) for _ in range(n)]
    for s in stores:
        await s.open()
    return stores


async def test_postgres_a_node_taken_for_dead_recording_while_the_leader_returns_its_leases(pg_dsn):
    """A node whose heartbeat was late records two deliveries in one batch while the leader
    returns its leases.  The record held the second entry and then wanted the first; the
    return, going through the rows in its own order, held the first and waited for the second:
    a deadlock, and the leader's return failed.  Now the return passes over rows another
    transaction holds (the next round gets them if they are still the dead node's)."""
    node, leader = await _stores(pg_dsn, 2)
    try:
        now = time.time()
        await node.enqueue(message(now))
        await node.enqueue(message(now))
        assert len(await node.lease("n1:1:aa", 10, 600.0, now)) == 2
        # The order the return's scan meets the rows in (their place in the table).
        first_id, second_id = await node._read(lambda conn: [r[0] for r in conn.execute(
            "SELECT id FROM entries ORDER BY ctid")])
        await node.heartbeat(beat("n1", "n1:1:aa", now - 60), first=True)     # late: taken for dead
        delivered = [RecipientOutcome("b@fabrikam.test", RecipientStatus.DELIVERED)]

        held_node, held_leader = Held(node), Held(leader)
        await held_node.started()
        await held_leader.started()
        # The node's batch: the second entry's record, other work, the first's record.
        second = asyncio.ensure_future(node.record(second_id, "n1:1:aa", None, delivered, None))
        node_pause = asyncio.ensure_future(node.engine.write(pause(0.6)))
        first = asyncio.ensure_future(node.record(first_id, "n1:1:aa", None, delivered, None))
        # The leader's: other work, then the return, once the node holds the second entry.
        leader_pause = asyncio.ensure_future(leader.engine.write(pause(0.2)))
        returned = asyncio.ensure_future(leader.release_dead_leases(now - 30, now))
        await asyncio.sleep(0.2)            # every op above is queued behind its store's held one
        held_node.go.set()
        held_leader.go.set()
        results = await asyncio.gather(second, first, returned, node_pause, leader_pause,
                                       held_node.task, held_leader.task, return_exceptions=True)
        recorded_second, recorded_first, released = results[:3]
        assert recorded_second is True, results
        # The first: returned by the leader before the node's record came to it (which then finds
        # the lease lost, a possible duplicate), or recorded first (nothing left to return).
        assert (isinstance(recorded_first, LeaseLost) and released == 1
                or recorded_first is True and released == 0), results
        assert not [r for r in results[3:] if isinstance(r, BaseException)], results
        assert node.engine.conflicts_retried == leader.engine.conflicts_retried == 0
    finally:
        for s in (node, leader):
            await s.close()


async def test_postgres_a_deadlock_is_retried_by_the_engine_not_seen_by_its_caller(pg_dsn):
    """Whatever lock cycle is left (an operator's command against a node's batch, an upgrade's
    DDL): the transaction PostgreSQL ends is run again, and the caller gets its result."""
    import psycopg
    [store] = await _stores(pg_dsn, 1)
    other = psycopg.connect(pg_dsn)
    try:
        setup = psycopg.connect(pg_dsn, autocommit=True)
        setup.execute("CREATE TABLE pair (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
        setup.execute("INSERT INTO pair VALUES (1, 0), (2, 0)")
        setup.close()
        holds_one, other_holds_two = threading.Event(), threading.Event()
        runs = []

        def op(conn, cleanup):
            runs.append(1)
            # This transaction is the one that notices the cycle (and is ended), not the other.
            conn.execute("SET LOCAL deadlock_timeout = '50ms'")
            conn.execute("UPDATE pair SET n = n + 1 WHERE id = 1")
            holds_one.set()
            other_holds_two.wait(10)
            conn.execute("UPDATE pair SET n = n + 1 WHERE id = 2")
            return len(runs)

        write = asyncio.ensure_future(store.engine.write(op))
        await eventually(holds_one.is_set, what="the store's transaction to hold row 1")
        other.execute("UPDATE pair SET n = n + 10 WHERE id = 2")
        other_holds_two.set()
        # Waits for row 1: the cycle, which the store's transaction notices first and is ended;
        # then this one gets row 1 and commits, and the store's runs again after it.
        await asyncio.to_thread(other.execute, "UPDATE pair SET n = n + 10 WHERE id = 1")
        other.commit()
        assert await write == 2
        assert store.engine.conflicts_retried == 1
        check = psycopg.connect(pg_dsn, autocommit=True)
        assert check.execute("SELECT n FROM pair ORDER BY id").fetchall() == [(11,), (11,)]
        check.close()
    finally:
        other.close()
        await store.close()


async def test_postgres_opening_the_store_gives_way_to_running_nodes_instead_of_deadlocking(pg_dsn):
    """A node starting on a schema it must complete (an upgrade: a new index) locks table after
    table until it commits, while running nodes' transactions lock the same tables in another
    order.  It waited for them without end and deadlocked (and failed to start); now its wait is
    bounded below the deadlock check, and it tries again after they are through."""
    import psycopg
    from relaywatch.store.postgres import PostgresStore
    [first] = await _stores(pg_dsn, 1)
    await first.close()
    admin = psycopg.connect(pg_dsn, autocommit=True)
    admin.execute("DROP INDEX entries_leased")          # as a previous version left it
    running = psycopg.connect(pg_dsn)                   # a running node's batch, mid-way
    starting = PostgresStore(pg_dsn)
    try:
        running.execute("LOCK TABLE recipients IN ROW EXCLUSIVE MODE")     # it wrote recipients ...
        opened = asyncio.ensure_future(starting.open())

        def waiting():   # on this schema's table (other tests share the database)
            return admin.execute("SELECT count(*) FROM pg_locks WHERE NOT granted "
                                 "AND relation = 'recipients'::regclass").fetchone()[0] > 0
        await eventually(waiting, what="the start to wait for the recipients table")
        # ... and now writes entries, which the start's DDL holds: the cycle.
        await asyncio.to_thread(running.execute, "LOCK TABLE entries IN ROW EXCLUSIVE MODE")
        running.commit()
        await asyncio.wait_for(opened, 30)
        assert admin.execute("SELECT count(*) FROM pg_indexes WHERE indexname = 'entries_leased' "
                             "AND schemaname = current_schema()").fetchone()[0] == 1
    finally:
        running.close()
        admin.close()
        await starting.close()


@pytest.mark.timeout(120)
async def test_postgres_nodes_leasing_recording_and_returning_at_once_see_no_deadlock(pg_dsn):
    """Three nodes' stores on one queue, for a few seconds: each leases, records, beats and asks
    for the leader lease, and a fourth plays a leader returning every node's leases as if all
    were dead.  No operation fails with anything but LeaseLost (a record whose lease the
    leader returned first), and no engine had to run a batch again: no deadlock among them
    (PostgreSQL ends one of the transactions of a cycle, and all of them are these stores')."""
    stores = await _stores(pg_dsn, 4)
    nodes, leader = stores[:3], stores[3]
    failures: list[BaseException] = []
    counts = {"recorded": 0, "lost": 0, "returned": 0}
    try:
        now = time.time()
        for i in range(200):
            await nodes[i % 3].enqueue(message(now))
        until = time.monotonic() + 6

        async def node_loop(i, store):
            instance = f"n{i}:1:{i:02x}"
            while time.monotonic() < until:
                t = time.time()
                try:
                    leased = await store.lease(instance, 8, 600.0, t - 1)
                    tasks = [store.record(e.id, instance, None, [RecipientOutcome(
                        r.address, RecipientStatus.DEFERRED)], t - 1) for e in leased for r in e.pending[:1]]
                    tasks += [store.heartbeat(beat(f"n{i}", instance, t - 60)),     # always late
                              store.acquire_leader(instance, t, t + 25)]
                    for result in await asyncio.gather(*tasks, return_exceptions=True):
                        if isinstance(result, LeaseLost):
                            counts["lost"] += 1
                        elif isinstance(result, BaseException):
                            failures.append(result)
                        elif result is True:
                            counts["recorded"] += 1
                except Exception as exc:   # noqa: BLE001 - collected, asserted below
                    failures.append(exc)

        async def leader_loop():
            while time.monotonic() < until:
                t = time.time()
                try:
                    results = await asyncio.gather(leader.acquire_leader("n9:1:99", t, t + 25),
                                                   leader.release_dead_leases(t - 30, t),
                                                   leader.heartbeat(beat("n9", "n9:1:99", t)))
                    counts["returned"] += results[1]
                except Exception as exc:   # noqa: BLE001 - collected, asserted below
                    failures.append(exc)
                await asyncio.sleep(0.01)
        await asyncio.gather(*(node_loop(i, s) for i, s in enumerate(nodes)), leader_loop())
        assert not failures, failures[:5]
        assert counts["recorded"] > 0 and counts["returned"] > 0, counts
        assert [s.engine.conflicts_retried for s in stores] == [0] * 4, counts
    finally:
        for s in stores:
            await s.close()
