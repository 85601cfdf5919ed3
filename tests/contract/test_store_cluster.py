"""The cluster's store operations (ClusterStore, store/base.py) over memory, SQLite and
PostgreSQL: heartbeats, a dead node's leases returned at once, the leader lease and its
fencing term; and on PostgreSQL, stores racing for the lease (one per node)."""

import asyncio
import time

import pytest

from relaywatch.cluster.model import NodeBeat, NodeState
from relaywatch.errors import StaleTerm
from relaywatch.incident import Incident
from relaywatch.model import Route, RouteKind

from helpers import eventually, make_store
from tests.contract.test_store_contract import msg

A = Route(RouteKind.CONNECTOR, "a")


def beat(name, instance=None, at=100.0, **kw):
    return NodeBeat(name=name, instance=instance or f"{name}:1:aa", address="127.0.0.1:2525", role="all",
                    version="1.0", started_at=50.0, at=at, **kw)


async def test_a_heartbeat_registers_and_refreshes_a_node(store):
    await store.heartbeat(beat("n1", at=100.0), first=True)
    await store.heartbeat(beat("n2", at=101.0, leases=3, received=7, delivered=5))
    await store.heartbeat(beat("n1", at=110.0, delivered=2))
    nodes = await store.nodes()
    assert [(n.name, n.at, n.delivered) for n in nodes] == [("n1", 110.0, 2), ("n2", 101.0, 5)]
    assert nodes[1] == beat("n2", at=101.0, leases=3, received=7, delivered=5)
    await store.heartbeat(beat("n1", at=111.0, state=NodeState.STOPPED))
    assert (await store.nodes())[0].state is NodeState.STOPPED


async def test_a_dead_nodes_leases_are_released_at_once_and_a_live_nodes_are_kept(store):
    now = time.time()
    ids = [(await store.enqueue(msg((f"{i}@x", A), now=now)))[0] for i in range(3)]
    await store.heartbeat(beat("dead", at=now - 60))
    await store.heartbeat(beat("live", at=now))
    dead = await store.lease("dead:1:aa", 2, ttl=600, now=now)
    live = await store.lease("live:1:aa", 1, ttl=600, now=now)
    assert len(dead) == 2 and len(live) == 1
    assert await store.lease("other", 10, ttl=600, now=now + 1) == []
    assert await store.release_dead_leases(now - 30, now + 1) == 2
    again = await store.lease("live:1:aa", 10, ttl=600, now=now + 1)   # not their 10-minute timers
    assert sorted(e.id for e in again) == sorted(e.id for e in dead)
    assert {e.id for e in dead + live} == set(ids)
    assert await store.release_dead_leases(now - 30, now + 1) == 0


async def test_a_restarted_node_returns_its_earlier_starts_leases_instead_of_adopting_them(store):
    now = time.time()
    await store.enqueue(msg(("1@x", A), now=now))
    await store.enqueue(msg(("2@x", A), now=now))
    [old] = await store.lease("n1:1:aa", 1, ttl=600, now=now)
    [other] = await store.lease("n10:1:bb", 1, ttl=600, now=now)      # a name n1 is a prefix of
    assert await store.heartbeat(beat("n1", "n1:2:cc", at=now + 1), first=True) == 1
    [back] = await store.lease("n1:2:cc", 10, ttl=600, now=now + 1)
    assert back.id == old.id and back.id != other.id


async def test_the_leader_lease_has_one_holder_and_its_term_grows_when_it_changes_hands(store):
    assert (await store.leader()).holder is None
    assert await store.acquire_leader("a", now=100, until=110) == 1
    assert await store.acquire_leader("b", now=105, until=115) is None      # held
    assert await store.acquire_leader("a", now=108, until=118) == 1         # a renewal keeps the term
    assert await store.acquire_leader("b", now=117, until=127) is None
    assert await store.acquire_leader("b", now=119, until=129) == 2         # lapsed: taken over
    assert await store.acquire_leader("a", now=120, until=130) is None
    lease = await store.leader()
    assert (lease.holder, lease.term, lease.until) == ("b", 2, 129)
    await store.resign_leader("a")                                          # not the holder: nothing
    assert (await store.leader()).until == 129
    await store.resign_leader("b")
    assert await store.acquire_leader("a", now=121, until=131) == 3         # at once, not at 129


async def test_a_stale_terms_leader_only_writes_are_refused_and_change_nothing(store):
    assert await store.acquire_leader("a", now=100, until=110) == 1
    inc = {"id": None, "connector": "a", "code": "4.4.316", "state": "open", "opened_at": 1.0, "title": "t"}
    inc["id"] = await store.save_incident(Incident.from_dict(inc), term=1)
    assert await store.add_notification(inc["id"], "open", "webhook", {"x": 1}, 1.0, term=1)
    assert await store.acquire_leader("b", now=111, until=121) == 2
    with pytest.raises(StaleTerm):
        await store.save_incident(Incident.from_dict(dict(inc, state="resolved", resolved_at=2.0)), term=1)
    with pytest.raises(StaleTerm):
        await store.save_incident(Incident.from_dict(dict(inc, id=None, code="5.0.0")), term=1)
    with pytest.raises(StaleTerm):
        await store.add_notification(inc["id"], "resolve", "webhook", {"x": 1}, 2.0, term=1)
    [still] = [i.to_dict() for i in await store.incidents(include_resolved=True)]
    assert (still["id"], still["state"]) == (inc["id"], "open")
    assert [n.transition for n in (await store.incident(inc["id"])).notifications] == ["open"]
    await store.save_incident(Incident.from_dict(dict(inc, state="resolved", resolved_at=2.0)), term=2)
    assert await store.open_incidents() == []


async def test_postgres_stores_racing_for_the_leader_lease_one_wins_per_term(pg_dsn):
    from relaywatch.store.postgres import PostgresStore
    stores = [PostgresStore(pg_dsn) for _ in range(3)]
    for s in stores:
        await s.open()
    try:
        now = time.time()
        for round_ in range(5):
            at = now + round_ * 20      # each round the last lease has lapsed (new instances: a new term)
            won = await asyncio.gather(*(s.acquire_leader(f"node{i}:{round_}", at, at + 10) for i, s in enumerate(stores)))
            assert [t for t in won if t is not None] == [round_ + 1], won
            assert (await stores[0].leader()).term == round_ + 1
    finally:
        for s in stores:
            await s.close()


async def test_postgres_a_takeover_waits_for_the_old_leaders_write_in_flight(pg_dsn):
    """The fence holds the leader row (the dialect's FOR SHARE) until the write commits: a node
    taking the lease meanwhile waits, and then reads the incident the old leader wrote."""
    import psycopg
    from relaywatch.store.cluster import check_term
    from relaywatch.store.postgres import PostgresDialect, PostgresStore
    old, new = PostgresStore(pg_dsn), PostgresStore(pg_dsn)
    await old.open()
    await new.open()
    try:
        assert await old.acquire_leader("old", 100, 110) == 1
        # The old leader's write, in flight: fenced, not committed yet.
        writer = psycopg.connect(pg_dsn)
        check_term(writer, PostgresDialect.row_share, 1)
        writer.execute("INSERT INTO incidents (connector, code, state, opened_at, data) "
                       "VALUES ('a', '4.4.316', 'open', 1.0, '{}')")
        takeover = asyncio.ensure_future(new.acquire_leader("new", 111, 121))
        watcher = psycopg.connect(pg_dsn, autocommit=True)

        def waiting_on_a_lock():
            return watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                   "AND datname = current_database()").fetchone()[0]
        await eventually(lambda: takeover.done() or waiting_on_a_lock(), what="the takeover to run")
        assert not takeover.done(), "the takeover did not wait for the old leader's write"
        writer.commit()
        assert await takeover == 2
        assert len(await new.open_incidents()) == 1     # what the old leader wrote, seen by the new one
    finally:
        for conn in ("writer", "watcher"):
            if conn in locals():
                locals()[conn].close()
        await old.close()
        await new.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_queue_made_before_the_cluster_tables_gets_them_when_opened(backend, tmp_path, request):
    s = make_store(backend, tmp_path, request)
    await s.open()
    now = time.time()
    [entry_id] = await s.enqueue(msg(("1@x", A), now=now))

    def drop(conn, cleanup):        # as the previous version left it
        conn.execute("DROP TABLE nodes")
        conn.execute("DROP TABLE leader")
    await s.engine.write(drop)
    await s.close()
    s = make_store(backend, tmp_path, request)
    await s.open()
    try:
        assert await s.acquire_leader("a", now, now + 10) == 1
        await s.heartbeat(beat("n1", at=now), first=True)
        assert [n.name for n in await s.nodes()] == ["n1"]
        assert (await s.get(entry_id)) is not None
    finally:
        await s.close()


async def test_postgres_nodes_starting_together_on_a_new_database_all_open_it(pg_dsn):
    """One at a time creates the schema (advisory lock): CREATE TABLE IF NOT EXISTS racing
    fails on PostgreSQL's catalog (pg_type_typname_nsp_index) without it."""
    from relaywatch.store.postgres import PostgresStore
    stores = [PostgresStore(pg_dsn) for _ in range(4)]
    results = await asyncio.gather(*(s.open() for s in stores), return_exceptions=True)
    for s, r in zip(stores, results):
        if r is None:
            await s.close()
    assert [r for r in results if r is not None] == []
