"""queue_gauges (/metrics, the overview) equal a count of the entries, after any mix of status changes.

The SQL stores keep the counts in queue_counts, by triggers (store/schema.py),
and find the oldest entry of each group by an index seek; here a random mix of
every operation that changes an entry's connector, status or code (enqueue,
lease, deferral, delivery, bounce, expiry, hold, release, delete, reroute,
retry, released leases, a dead node's leases, and on PostgreSQL the heartbeat
that folds the count deltas) is checked against a count of
the rows themselves after each step, on SQLite and PostgreSQL.
"""

import random
import time

import pytest

from relaywatch.cluster.model import NodeBeat
from relaywatch.model import Attempt, Failure, NewMessage, RecipientOutcome, RecipientStatus, Route, RouteKind, StoredBody
from relaywatch.store.base import QueryPage, Selector

from helpers import SQL_BACKENDS, STORE_BACKENDS, make_store

ROUTES = [Route(RouteKind.CONNECTOR, "a"), Route(RouteKind.CONNECTOR, "b"), Route(RouteKind.LOCAL, "local")]
CODES = ("4.4.316", "4.4.315", "4.7.320")

# What queue_gauges answered before queue_counts: every row counted, at scrape time.
BRUTE_FORCE = ("SELECT route_name, status, last_code, count(*), "
               "sum(CASE WHEN lease_until > ? THEN 1 ELSE 0 END), min(received_at) "
               "FROM entries GROUP BY route_name, status, last_code")


async def counted(store, now: float) -> list[tuple]:
    rows = await store._read(lambda conn: conn.execute(BRUTE_FORCE, (now,)).fetchall())
    return sorted((c, s, code, int(n), int(leased or 0), oldest) for c, s, code, n, leased, oldest in rows)


async def gauges(store, now: float) -> list[tuple]:
    return sorted((c, s, code, int(n), int(leased), oldest) for c, s, code, n, leased, oldest
                  in await store.queue_gauges(now))


def message(rng: random.Random, received_at: float) -> NewMessage:
    body = b"Subject: x\r\n\r\nbody\r\n"
    recipients = tuple((f"u{rng.randrange(1000)}-{i}@x.test", rng.choice(ROUTES)) for i in range(rng.randint(1, 3)))
    return NewMessage(sender="s@x.test", recipients=recipients, body=StoredBody(len(body), body),
                      received_at=received_at, expires_at=received_at + 86400, message_id="<m@x>")


def failure(code: str, at: float) -> Failure:
    return Failure(code=code, smtp_code=450 if code.startswith("4") else 550, title="t", subtype=None, detail="d",
                   phase="connect", permanent=code.startswith("5"), at=at, kind="connect.refused")


@pytest.fixture(params=STORE_BACKENDS)
async def store(request, tmp_path):
    s = make_store(request.param, tmp_path, request)
    await s.open()
    yield s
    await s.close()


async def random_step(store, rng: random.Random, t0: float, ids: list[str]) -> str:
    """One operation, picked at random; what it was (for the assertion's message)."""
    op = rng.choice(("enqueue", "enqueue", "lease", "record", "record", "redefer", "hold", "release", "delete",
                     "bounce", "expire", "reroute", "retry", "release_leases", "dead_node"))
    received = t0 - rng.randrange(1, 5000)
    if op == "enqueue" or not ids:
        ids += await store.enqueue(message(rng, received))
        return "enqueue"
    entry_id = rng.choice(ids)
    if op == "redefer":   # deferred again with another code: only last_code changes
        deferred = [e for e in await store.queue_page(QueryPage(status="deferred"), t0) if e.pending]
        if not deferred:
            return "redefer (nothing)"
        entry = rng.choice(deferred)
        code = rng.choice([c for c in CODES if c != entry.pending[0].last_error.code])
        outcomes = [RecipientOutcome(r.address, RecipientStatus.DEFERRED, failure(code, t0)) for r in entry.pending]
        await store.record(entry.id, None, Attempt(t0, 0.1, None, tuple(outcomes)), outcomes, t0 + 600)
    elif op == "lease":
        # Some leases lapse before the gauges are read (leased in the past): those are not active.
        when = t0 - rng.choice((0, 0, 1000))
        await store.lease(rng.choice(("node-1:1:x", "node-2:1:y")), rng.randint(1, 4), ttl=300, now=when)
    elif op == "record":
        entry = await store.get(entry_id)
        if entry is None or entry.lease_owner is not None or not entry.pending:
            return "record (nothing)"
        outcomes = [RecipientOutcome(r.address, rng.choice((RecipientStatus.DELIVERED, RecipientStatus.DEFERRED)),
                                     failure(rng.choice(CODES), t0)) for r in entry.pending]
        outcomes = [RecipientOutcome(o.address, o.status, o.failure if o.status is RecipientStatus.DEFERRED else None)
                    for o in outcomes]
        await store.record(entry_id, None, Attempt(t0, 0.1, None, tuple(outcomes)), outcomes, t0 + 600)
    elif op in ("bounce", "expire"):
        entry = await store.get(entry_id)
        if entry is None or entry.lease_owner is not None or not entry.pending:
            return f"{op} (nothing)"
        status = RecipientStatus.FAILED if op == "bounce" else RecipientStatus.EXPIRED
        outcomes = [RecipientOutcome(r.address, status, failure("5.4.316", t0)) for r in entry.pending]
        ndr = NewMessage(sender="", recipients=(("s@x.test", ROUTES[2]),), body=StoredBody(4, b"ndr\n"),
                         received_at=t0, expires_at=t0 + 86400, is_dsn=True)
        await store.record(entry_id, None, None, outcomes, None, notices=(ndr,))
    elif op == "hold":
        await store.hold(entry_id)
    elif op == "release":
        await store.release(entry_id, t0)
    elif op == "delete":
        try:
            await store.delete(entry_id)
        except Exception:   # leased right now: the store refuses, which is the contract
            return "delete (refused)"
    elif op == "reroute":
        entry = await store.get(entry_id)
        if entry is None or entry.lease_owner is not None or not entry.pending:
            return "reroute (nothing)"
        await store.move_recipients(entry_id, [entry.pending[0].address], rng.choice(ROUTES), t0)
    elif op == "retry":
        await store.retry(Selector(connector=rng.choice(ROUTES).name), t0)
    elif op == "release_leases":
        await store.release_leases(rng.choice(("node-1:1:x", None)), t0)
    elif op == "dead_node":
        await store.heartbeat(NodeBeat(name="node-2", instance="node-2:1:y", address="127.0.0.1:25", role="all",
                                       version="t", started_at=t0 - 9000, at=t0 - 9000))
        await store.release_dead_leases(beat_before=t0 - 60, now=t0)
    return op


@pytest.mark.parametrize("store", SQL_BACKENDS, indirect=True)
async def test_gauges_equal_a_count_of_the_entries_after_every_kind_of_status_change(store):
    """(The memory store's queue_gauges is that count: it has no other way.)"""
    rng = random.Random(11)
    t0 = time.time()
    ids: list[str] = []
    seen, statuses = set(), set()
    for step in range(200):
        op = await random_step(store, rng, t0, ids)
        seen.add(op)
        found = await gauges(store, t0)
        assert found == await counted(store, t0), f"after step {step}: {op}"
        statuses |= {g[1] for g in found} | {"active" for g in found if g[4]}
    assert {"enqueue", "lease", "record", "redefer", "hold", "release", "delete", "bounce", "expire", "reroute", "retry",
            "release_leases", "dead_node"} <= seen
    assert {"queued", "deferred", "held", "active"} <= statuses, "the mix had every status in the queue"


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_a_queue_made_before_the_counts_is_counted_once_when_opened(backend, tmp_path, request):
    """An existing queue (no queue_counts, no triggers) gets its counts when a new version opens it."""
    rng = random.Random(3)
    t0 = time.time()
    store = make_store(backend, tmp_path, request)
    await store.open()
    ids: list[str] = []
    for _ in range(40):
        await random_step(store, rng, t0, ids)
    if backend == "sqlite":
        drop = ["DROP TRIGGER entries_counted_insert", "DROP TRIGGER entries_counted_delete",
                "DROP TRIGGER entries_counted_update", "DROP TABLE queue_counts", "DROP TABLE queue_count_deltas"]
    else:
        drop = ["DROP TABLE queue_counts", "DROP TABLE queue_count_deltas", "DROP FUNCTION queue_counts_track CASCADE"]
    await store._read(lambda conn: [conn.execute(sql) for sql in drop])
    await store.close()
    for _ in range(2):   # opened again, and again: counted once, not twice
        store = make_store(backend, tmp_path, request)
        await store.open()
        assert await gauges(store, t0) == await counted(store, t0)
        await random_step(store, rng, t0, ids)
        assert await gauges(store, t0) == await counted(store, t0)
        await store.close()


async def test_the_expiry_forecast_counts_what_a_filtered_queue_page_lists(store):
    """count_deferred_before (the overview) = the deferred, unleased entries a queue page of that filter lists."""
    rng = random.Random(7)
    t0 = time.time()
    for i in range(60):
        route = ROUTES[i % 2]
        (entry_id,) = await store.enqueue(NewMessage(
            sender="s@x.test", recipients=((f"u{i}@x.test", route),), body=StoredBody(4, b"x\r\n"),
            received_at=t0 - rng.randrange(1, 6000), expires_at=t0 + 86400))
        if i % 5:   # deferred, by one of the codes or (a fifth of them) by none
            code = rng.choice(CODES) if i % 5 != 1 else None
            o = RecipientOutcome(f"u{i}@x.test", RecipientStatus.DEFERRED, failure(code, t0) if code else None)
            await store.record(entry_id, None, Attempt(t0, 0.1, None, (o,)), [o], t0 - 1)
    await store.lease("node-1:1:x", 5, ttl=300, now=t0)   # being delivered: not counted
    most = 0
    for connector in ("a", "b", "local"):
        for older_than in (0, 1000, 2500, 6000):
            listed = await store.queue_page_ids(QueryPage(status="deferred", connector=connector,
                                                          older_than=older_than, limit=1000), t0)
            assert await store.count_deferred_before(connector, t0 - older_than, t0, 1000) == len(listed)
            assert await store.count_deferred_before(connector, t0 - older_than, t0, 3) == min(3, len(listed))
            most = max(most, len(listed))
    assert most > 3, "some filter matched more than the small cap"


async def test_sqlite_replaces_the_triggers_that_made_every_entry_delete_keep_a_statement_journal(tmp_path, request):
    """A queue opened by the previous version has count triggers that upsert and a message_ids
    trigger on entries that calls trim(): either makes SQLite journal each entry's DELETE (to a temp
    file past 64 KiB, bench/README.md backlog_default).  Opening it replaces them; the counts and
    message_ids stay right."""
    import sqlite3
    rng = random.Random(5)
    t0 = time.time()
    store = make_store("sqlite", tmp_path, request)
    await store.open()
    ids: list[str] = []
    for _ in range(20):
        await random_step(store, rng, t0, ids)
    await store.close()
    conn = sqlite3.connect(tmp_path / "q.sqlite3", isolation_level=None)
    conn.executescript("""
DROP TRIGGER entries_counted_delete;
CREATE TRIGGER entries_counted_delete AFTER DELETE ON entries BEGIN
INSERT INTO queue_counts VALUES (OLD.route_name, OLD.status, COALESCE(OLD.last_code, ''), -1)
ON CONFLICT (route_name, status, last_code) DO UPDATE SET n = n + -1; END;
CREATE TRIGGER entries_message_ids_gone AFTER DELETE ON entries
WHEN trim(trim(OLD.message_id), '<>') <> '' AND NOT EXISTS (SELECT 1 FROM traces WHERE entry_id = OLD.id) BEGIN
DELETE FROM message_ids WHERE message_id = trim(trim(OLD.message_id), '<>') AND entry_id = OLD.id; END;
""")
    store = make_store("sqlite", tmp_path, request)
    await store.open()
    triggers = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'entries'"))
    assert "entries_message_ids_gone" not in triggers
    assert not [name for name, sql in triggers.items() if "ON CONFLICT" in sql or
                (name != "entries_message_ids" and "trim(" in sql)]
    for _ in range(20):
        await random_step(store, rng, t0, ids)
    assert await gauges(store, t0) == await counted(store, t0)
    await store.close()
    conn.close()
