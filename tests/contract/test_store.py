"""The queue stores against one contract: in memory, real SQLite files and a real PostgreSQL.

``store`` runs a test over all three; ``sql_store`` over the two databases, for
what only a database shared by processes and nodes has.  More of the contract:
tests/contract/test_store_contract.py."""

import asyncio
import os
import threading
import time

import pytest

from relaywatch.errors import LeaseLost, StoreError
from relaywatch.incident import Incident
from relaywatch.model import (
    Attempt, NewMessage, RecipientOutcome, RecipientStatus, Route, RouteKind, StoredBody,
)
from relaywatch.store.base import QueueQuery, Selector
from relaywatch.store.sqlite import SqliteStore
from relaywatch.watch_records import Setting

from helpers import SQL_BACKENDS, STORE_BACKENDS, eventually, make_store

A = Route(RouteKind.CONNECTOR, "a")
B = Route(RouteKind.CONNECTOR, "b")


def msg(recipients, data=b"Subject: x\r\n\r\nbody\r\n", path=None, now=None):
    now = now or time.time()
    body = StoredBody(size=len(data), data=None if path else data, path=path)
    return NewMessage(sender="s@x.test", recipients=tuple(recipients), body=body, received_at=now,
                      expires_at=now + 3600, message_id="<m@x>")


_make = make_store


async def _opened(request, tmp_path):
    s = _make(request.param, tmp_path, request)
    await s.open()
    s.backend = request.param
    return s


@pytest.fixture(params=STORE_BACKENDS)
async def store(request, tmp_path):
    s = await _opened(request, tmp_path)
    yield s
    await s.close()


@pytest.fixture(params=SQL_BACKENDS)
async def sql_store(request, tmp_path):
    s = await _opened(request, tmp_path)
    yield s
    await s.close()


async def test_enqueue_splits_per_route_and_many_commits_group(store):
    ids = await store.enqueue(msg([("1@a", A), ("2@b", B), ("3@a", A)]))
    assert len(ids) == 2
    entries = {e.route.name: e for e in await store.list(QueueQuery())}
    assert [r.address for r in entries["a"].recipients] == ["1@a", "3@a"]
    assert entries["a"].body_id == entries["b"].body_id
    # 500 concurrent enqueues all commit (in a handful of transactions).
    results = await asyncio.gather(*(store.enqueue(msg([(f"{i}@a", A)])) for i in range(500)))
    assert len({i for r in results for i in r}) == 500
    assert (await store.counts())["queued"] == 502


async def test_a_lease_is_exclusive_until_it_lapses(store):
    [entry_id] = await store.enqueue(msg([("1@a", A)]))
    now = time.time()
    first = await store.lease("w1", 10, ttl=30, now=now)
    assert [e.id for e in first] == [entry_id]
    assert await store.lease("w2", 10, ttl=30, now=now + 1) == []
    # w1 died: after the lease time the entry is due again for anyone.
    again = await store.lease("w2", 10, ttl=30, now=now + 31)
    assert [e.id for e in again] == [entry_id]
    with pytest.raises(LeaseLost):
        await store.record(entry_id, "w1", None, [RecipientOutcome("1@a", RecipientStatus.DELIVERED)], None)
    await store.record(entry_id, "w2", None, [RecipientOutcome("1@a", RecipientStatus.DELIVERED)], None)
    assert await store.get(entry_id) is None


async def test_record_keeps_per_recipient_status_and_history(store):
    [entry_id] = await store.enqueue(msg([("1@a", A), ("2@a", A)]))
    [entry] = await store.lease("w", 10, 30, time.time())
    outcomes = [RecipientOutcome("1@a", RecipientStatus.DELIVERED, reply="250 ok"),
                RecipientOutcome("2@a", RecipientStatus.DEFERRED)]
    attempt = Attempt(at=time.time(), duration=0.1, destination=None, outcomes=tuple(outcomes))
    await store.record(entry_id, "w", attempt, outcomes, time.time() + 60)
    e = await store.get(entry_id)
    assert e.status.value == "deferred" and e.attempts == 1 and len(e.history) == 1
    assert {r.address: r.status.value for r in e.recipients} == {"1@a": "delivered", "2@a": "deferred"}
    # Only the deferred one is offered again.
    [again] = await store.lease("w", 10, 30, time.time() + 61)
    assert [r.address for r in again.recipients] == ["2@a"]


async def test_hold_release_retry_delete(store, tmp_path):
    spool = tmp_path / "body"
    spool.write_bytes(b"big body")
    [e1] = await store.enqueue(msg([("1@a", A)], path=str(spool)))
    [e2] = await store.enqueue(msg([("2@b", B)]))
    assert await store.hold(e1)
    assert [e.id for e in await store.lease("w", 10, 30, time.time())] == [e2]
    assert await store.release(e1, time.time())
    await store.release_leases("w", time.time())
    assert await store.retry(Selector(connector="b"), time.time()) == 1
    assert await store.delete(e1)
    assert not spool.exists()                      # the last reference removed the spool file
    assert not await store.delete(e1)


async def test_a_failed_operation_does_not_spoil_its_batch(store):
    good = store.enqueue(msg([("1@a", A)]))
    bad = store.record("NOSUCHID", None, None, [], None)
    results = await asyncio.gather(good, bad, return_exceptions=True)
    assert isinstance(results[0], list) and isinstance(results[1], Exception)
    assert (await store.counts())["queued"] == 1


@pytest.mark.parametrize("backend", STORE_BACKENDS)
async def test_a_closed_store_raises_store_error(tmp_path, request, backend):
    s = _make(backend, tmp_path, request)
    with pytest.raises(StoreError):
        await s.enqueue(msg([("1@a", A)]))


async def test_another_process_sees_and_changes_the_same_queue(sql_store, tmp_path, request):
    [entry_id] = await sql_store.enqueue(msg([("1@a", A)]))
    other = _make(sql_store.backend, tmp_path, request)
    await other.open()
    try:
        assert (await other.get(entry_id)).id == entry_id
        assert await other.hold(entry_id)
    finally:
        await other.close()
    assert (await sql_store.get(entry_id)).status.value == "held"
    if sql_store.backend == "sqlite":
        assert os.path.exists(tmp_path / "q.sqlite3-wal")


async def test_two_nodes_never_lease_the_same_entry(sql_store, tmp_path, request):
    """Concurrent leasing from two stores (two nodes, or two processes) on one queue."""
    await asyncio.gather(*(sql_store.enqueue(msg([(f"{i}@a", A)])) for i in range(300)))
    other = _make(sql_store.backend, tmp_path, request)
    await other.open()
    try:
        now = time.time()
        batches = await asyncio.gather(*(s.lease(f"node{i}", 25, 60, now) for i in range(6)
                                         for s in (sql_store, other)))
    finally:
        await other.close()
    ids = [e.id for batch in batches for e in batch]
    assert len(ids) == len(set(ids)) == 300


async def test_watch_state_round_trips(store):
    """Incidents, notifications once per transition, overrides and audit, on either backend."""
    inc = {"id": None, "connector": "a", "code": "4.4.316", "state": "open", "opened_at": 1.0, "messages": 2}
    inc["id"] = await store.save_incident(Incident.from_dict(inc))
    assert await store.add_notification(inc["id"], "open", "email", {"x": 1}, 1.0)
    assert not await store.add_notification(inc["id"], "open", "email", {"x": 1}, 1.0)
    [note] = await store.due_notifications(2.0)
    await store.notification_result(note.id, True, None, 2.0, None)
    assert await store.due_notifications(3.0) == []
    paused = Setting.CONNECTOR_PAUSED.of("a")
    audit = await store.apply_fix("me", "pause", inc["id"], {"undo": {str(paused): None}}, {paused: True}, [], 4.0)
    assert (await store.overrides())[paused].value is True
    assert (await store.last_undoable(inc["id"])).id == audit
    shown = (await store.incident(inc["id"])).to_dict()
    assert shown["messages"] == 2 and shown["notifications"][0]["state"] == "sent" and shown["audit"][0]["who"] == "me"


async def test_close_waits_for_a_read_in_flight(tmp_path, request):
    """Closing must not pull a connection from under a read still running on another
    thread (that crashed the interpreter); reads after close fail cleanly."""
    s = _make("sqlite", tmp_path, request)
    await s.open()
    started = threading.Event()

    def slow_read(conn):
        started.set()
        time.sleep(0.5)       # still reading while close() runs
        return conn.execute("SELECT 1").fetchone()
    slow = asyncio.create_task(s._read(slow_read))
    await eventually(started.is_set, what="the read to start")   # (a fixed pause closed first on a loaded machine)
    await s.close()
    assert await slow == (1,)
    with pytest.raises(StoreError):
        await s.counts()


async def test_postgres_nodes_hear_of_new_work_through_notify(pg_dsn):
    from relaywatch.store.postgres import PostgresStore
    woken = asyncio.Event()
    scheduler_node = PostgresStore(pg_dsn, on_work=woken.set)
    receiving_node = PostgresStore(pg_dsn)
    await scheduler_node.open()
    await receiving_node.open()
    try:
        # The listener wakes its scheduler once when it starts listening (work may
        # have been announced before); only NOTIFY can wake it after that.
        await asyncio.wait_for(woken.wait(), 10)
        woken.clear()
        await receiving_node.enqueue(msg([("1@a", A)]))
        await asyncio.wait_for(woken.wait(), 10)
    finally:
        await receiving_node.close()
        await scheduler_node.close()


async def test_postgres_writer_commits_durably_when_the_server_says_synchronous_commit_off(pg_dsn, caplog):
    # 250 follows COMMIT: with synchronous_commit off a PostgreSQL crash would lose acknowledged mail.
    from relaywatch.store.postgres import PostgresStore
    careless = pg_dsn + "%20-csynchronous_commit%3Doff"    # as a role or database default would set it
    store = PostgresStore(careless)
    await store.open()
    try:
        def show(conn, cleanup):
            return conn.execute("SHOW synchronous_commit").fetchone()[0]
        assert await store.engine.write(show) == "on"
        # The premise holds: a reader (which commits no mail) still has the server's setting.
        assert await store._read(lambda conn: conn.execute("SHOW synchronous_commit").fetchone()[0]) == "off"
        assert any("synchronous_commit = off" in r.getMessage() for r in caplog.records)
    finally:
        await store.close()


async def test_a_queue_from_before_the_waiting_column_is_migrated(sql_store, tmp_path, request):
    """Queues made by an earlier version lack entries.waiting: opening adds and fills it."""
    [entry_id] = await sql_store.enqueue(msg([("1@a", A), ("2@a", A), ("3@a", A)]))
    await sql_store.record(entry_id, None, None, [RecipientOutcome("1@a", RecipientStatus.DELIVERED)], time.time())
    await sql_store.close()
    if sql_store.backend == "sqlite":
        import sqlite3
        conn = sqlite3.connect(tmp_path / "q.sqlite3")
        # What came after the column and reads it: queue_waiting and its triggers.
        for sql in ("DROP TRIGGER entries_waiting_insert", "DROP TRIGGER entries_waiting_delete",
                    "DROP TRIGGER entries_waiting_update", "DROP TABLE queue_waiting", "DROP TABLE queue_waiting_deltas",
                    "ALTER TABLE entries DROP COLUMN waiting"):
            conn.execute(sql)
        conn.commit()
    else:
        import psycopg
        conn = psycopg.connect(request.getfixturevalue("pg_dsn"), autocommit=True)
        conn.execute("DROP TABLE queue_waiting, queue_waiting_deltas")
        conn.execute("DROP FUNCTION queue_waiting_track CASCADE")   # its triggers go with it
        conn.execute("ALTER TABLE entries DROP COLUMN waiting")
    conn.close()
    await sql_store.open()
    summary_source = await sql_store._read(lambda c: c.execute("SELECT waiting FROM entries").fetchall())
    assert [tuple(r) for r in summary_source] == [(2,)]
    waiting = await sql_store._read(lambda c: c.execute(
        "SELECT sum(n) FROM (SELECT n FROM queue_waiting UNION ALL SELECT delta FROM queue_waiting_deltas) w").fetchall())
    assert [tuple(r) for r in waiting] == [(2,)]


async def test_tls_counts_from_before_the_detail_column_are_migrated_and_read_without_one(sql_store, tmp_path,
                                                                                          request):
    """tls_counts.detail (the report's failure-reason-code) came later: opening adds it, old rows read ''."""
    from relaywatch.tls_results import TlsCount
    old = TlsCount("2026-11-30", "partner.test", "sts", ("mode: enforce",), "validation-failure", "mx.p.test",
                   "127.0.0.2", "127.0.0.1", 1)
    await sql_store.add_tls_counts([old])
    await sql_store.close()
    if sql_store.backend == "sqlite":
        import sqlite3
        conn = sqlite3.connect(tmp_path / "q.sqlite3")
        conn.execute("ALTER TABLE tls_counts DROP COLUMN detail")
        conn.commit()
    else:
        import psycopg
        conn = psycopg.connect(request.getfixturevalue("pg_dsn"), autocommit=True)
        conn.execute("ALTER TABLE tls_counts DROP COLUMN detail")
    conn.close()
    await sql_store.open()
    assert await sql_store.tls_counts("2026-11-30") == [old]
    await sql_store.add_tls_counts([TlsCount(**{**old.__dict__, "detail": "no TLSA record matches"})])
    [row] = await sql_store.tls_counts("2026-11-30")
    assert (row.count, row.detail) == (2, "no TLSA record matches")

async def test_the_delivery_marks_of_an_entry_are_kept_through_lease_and_reroute(store):
    """is_tls_report (our RFC 8460 report) and utf8_headers (RFC 6532 headers) stay with the entry."""
    from dataclasses import replace
    [report] = await store.enqueue(replace(msg([("1@a", A), ("2@a", A)]), is_tls_report=True, utf8_headers=True))
    [plain] = await store.enqueue(msg([("3@a", A)]))
    assert {e.id: e.is_tls_report for e in await store.list(QueueQuery())} == {report: True, plain: False}
    moved = await store.move_recipients(report, ["2@a"], B, time.time())
    leased = {e.id: e.is_tls_report for e in await store.lease("me", 10, 60, time.time() + 1)}
    assert leased == {report: True, plain: False, moved: True}
    assert {e.id: e.utf8_headers for e in await store.list(QueueQuery())} == {report: True, plain: False, moved: True}


# What a node of the version before DSN wrote (store/queue.sql then): no DSN columns named.
_OLD_INSERT_ENTRY = ("INSERT INTO entries (id, body_id, sender, received_at, expires_at, status, attempts, "
                     "next_attempt_at, route_kind, route_name, route_domain, size, message_id, client, is_dsn, "
                     "waiting) VALUES ('OLD1', 'B1', 's@x', 1, 9999999999, 'queued', 0, 1, 'connector', 'a', '', "
                     "4, '', '', 0, 1)")
_OLD_INSERT_RECIPIENT = "INSERT INTO recipients (entry_id, position, address, status) VALUES ('OLD1', 0, 'o@a', 'pending')"
_OLD_INSERT_BODY = "INSERT INTO bodies (id, data, path, size, refs) VALUES ('B1', NULL, NULL, 4, 1)"


async def test_a_queue_from_before_the_dsn_columns_is_migrated_and_old_nodes_rows_read_as_no_dsn(
        sql_store, tmp_path, request):
    """Upgrading adds the DSN columns (nullable); rows written before, and rows an old node
    still writes beside upgraded ones (its statements name their columns), read as "no DSN"."""
    from relaywatch.dsn_params import MessageDsn, RecipientDsn
    [entry_id] = await sql_store.enqueue(msg([("1@a", A)]))
    await sql_store.close()
    columns = [("entries", "dsn_ret"), ("entries", "dsn_envid"), ("recipients", "dsn_notify"),
               ("recipients", "dsn_orcpt"), ("entries", "is_tls_report"),
               ("entries", "utf8_headers")]
    if sql_store.backend == "sqlite":
        import sqlite3
        conn = sqlite3.connect(tmp_path / "q.sqlite3")
    else:
        import psycopg
        conn = psycopg.connect(request.getfixturevalue("pg_dsn"), autocommit=True)
    for table, column in columns:
        conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    if sql_store.backend == "sqlite":
        conn.commit()
    conn.close()
    await sql_store.open()
    def old_node(c, cleanup):
        for sql in (_OLD_INSERT_BODY, _OLD_INSERT_ENTRY, _OLD_INSERT_RECIPIENT):
            c.execute(sql)
    await sql_store.engine.write(old_node)
    for id_ in (entry_id, "OLD1"):
        entry = await sql_store.get(id_)
        assert entry.dsn == MessageDsn() and [r.dsn for r in entry.recipients] == [RecipientDsn()]
        assert not entry.is_tls_report and not entry.utf8_headers
    leased = await sql_store.lease("w", 10, 30, time.time())
    assert {e.id for e in leased} == {entry_id, "OLD1"}


async def test_deferred_summary_counts_messages_and_the_recipients_still_waiting(store):
    from relaywatch.model import Failure
    refused = Failure(code="4.4.316", smtp_code=450, title="Connection refused", subtype="refused",
                      detail="refused", phase="connect", permanent=False, at=time.time(), kind="connect.refused")
    two = (await store.enqueue(msg([("1@a", A), ("2@a", A)])))[0]
    three = (await store.enqueue(msg([("3@a", A), ("4@a", A), ("5@a", A)])))[0]
    await store.enqueue(msg([("6@a", A)]))                      # queued, not deferred: not counted
    now = time.time()
    await store.record(two, None, None, [RecipientOutcome(a, RecipientStatus.DEFERRED, failure=refused)
                                         for a in ("1@a", "2@a")], now + 60)
    await store.record(three, None, None, [RecipientOutcome("3@a", RecipientStatus.DELIVERED)] +
                       [RecipientOutcome(a, RecipientStatus.DEFERRED, failure=refused) for a in ("4@a", "5@a")],
                       now + 60)
    [summary] = await store.deferred_summary()
    assert (summary.connector, summary.code, summary.messages, summary.recipients) == \
        ("a", "4.4.316", 2, 4)
    assert summary.latest_error.code == "4.4.316"


async def test_sqlite_checkpoints_run_beside_the_commits_not_inside_them(tmp_path):
    """Only the store with ``checkpoints`` copies the WAL into the database file; a
    COMMIT never does (below 64 MB of WAL), so no client's 250 waits for it."""
    big = b"Subject: x\r\n\r\n" + b"y" * 20_000 + b"\r\n"
    sizes = {}
    for checkpoints in (False, True):
        path = tmp_path / f"q-{checkpoints}.sqlite3"
        store = SqliteStore(path, checkpoints=checkpoints)
        await store.open()
        try:
            await asyncio.gather(*(store.enqueue(msg([(f"{i}@a", A)], data=big)) for i in range(300)))
            if checkpoints:
                # 6 MB went into the WAL; the checkpoint thread copies it within ~100 ms.
                deadline = time.monotonic() + 10
                while path.stat().st_size < 4_000_000 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
            sizes[checkpoints] = path.stat().st_size
            flags = await store._read(lambda c: c.execute("PRAGMA secure_delete").fetchone()[0])
            assert flags == 0   # Debian builds SQLite zero-filling deleted pages; we turn it off
        finally:
            await store.close()
    assert sizes[False] < 1_000_000 < 4_000_000 <= sizes[True]


async def test_queue_ids_follow_the_clock_and_a_taken_one_is_drawn_again(tmp_path, monkeypatch):
    from relaywatch.store import queue
    first = queue.new_id()
    time.sleep(0.002)
    second = queue.new_id()
    assert len(first) == 16 and first[:11] < second[:11]
    store = SqliteStore(tmp_path / "q.sqlite3")
    await store.open()
    try:
        [taken] = await store.enqueue(msg([("1@a", A)]))
        # The body gets the first draw; the entry's first draw is taken, its second is free.
        drawn = iter(["B" * 16, taken, "0" * 16])
        monkeypatch.setattr(queue, "new_id", lambda: next(drawn))
        [again] = await store.enqueue(msg([("2@a", A)]))
        assert again == "0" * 16 and {e.id for e in await store.list(QueueQuery())} == {taken, again}
    finally:
        await store.close()


async def test_an_unusable_lock_file_is_a_store_error_naming_it(tmp_path):
    (tmp_path / "q.sqlite3-writelock").mkdir()      # as unusable as a file we may not write
    store = SqliteStore(tmp_path / "q.sqlite3")
    with pytest.raises(StoreError, match="lock file .*q.sqlite3-writelock"):
        await store.open()


async def test_a_stored_failure_of_a_shape_this_version_cannot_read_still_leases_and_delivers(sql_store):
    """Recipients' last failures are read into Failures only when asked for (model.py _StoredFailure),
    not at lease: a backlog's lease parsed failures its delivery never reads, and one written by a
    newer version in a shape this one cannot read stopped the whole lease batch."""
    from relaywatch.model import Failure
    [odd, newer] = [(await sql_store.enqueue(msg([(address, A)])))[0] for address in ("1@a", "2@a")]
    now = time.time()
    assert len(await sql_store.lease("w", 10, 30, now)) == 2
    stored = {odd: '["a failure", "as a newer version keeps it"]',
              newer: '{"v": 9, "code": "4.4.316", "destination": "mx.a", "hops": [1, 2]}'}
    for entry_id, outcome in ((odd, RecipientOutcome("1@a", RecipientStatus.DEFERRED)),
                              (newer, RecipientOutcome("2@a", RecipientStatus.DEFERRED))):
        await sql_store.record(entry_id, "w", Attempt(now, 0.1, None, (outcome,)), [outcome], now + 1)
        await sql_store.engine.write(lambda conn, cleanup, entry_id=entry_id: conn.execute(
            f"UPDATE recipients SET last_error = '{stored[entry_id]}' WHERE entry_id = '{entry_id}'"))
    leased = {e.id: e for e in await sql_store.lease("w", 10, 30, now + 2)}
    assert sorted(leased) == sorted([odd, newer])
    assert leased[newer].recipients[0].last_error == Failure.from_dict(
        {"code": "4.4.316", "destination": "mx.a"})     # what this version reads of it, once asked
    for entry in leased.values():
        [r] = entry.recipients
        delivered = RecipientOutcome(r.address, RecipientStatus.DELIVERED)
        assert await sql_store.record(entry.id, "w", Attempt(now + 2, 0.1, None, (delivered,)), [delivered], None,
                                      leased=entry)
    assert await sql_store.get(odd) is None and await sql_store.get(newer) is None
    assert (await sql_store.trace(odd))["end"]["event"] == "delivered"
