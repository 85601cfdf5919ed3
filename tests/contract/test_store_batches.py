"""The group commit's batches (store/batch.py): one transaction, no savepoint unless an op fails.

A batch runs its ops straight in its transaction; when one fails, the others run
again each in a savepoint and the failed one keeps its error.  The ops here are
the engine's own kind, ``fn(conn, cleanup)``, on real SQLite and PostgreSQL."""

import asyncio
import itertools
import threading

import pytest

from relaywatch.errors import StoreError

from helpers import SQL_BACKENDS, opened_store


@pytest.fixture(params=SQL_BACKENDS)
async def sql_store(request, tmp_path):
    async with opened_store(request.param, tmp_path, request) as store:
        yield store


async def one_batch(store, *ops):
    """Run ``ops`` in one batch: the writer is held inside an op of its own until all are queued."""
    inside, go_on = threading.Event(), threading.Event()

    def hold(conn, cleanup):
        inside.set()
        go_on.wait(30)
    held = asyncio.ensure_future(store.engine.write(hold))
    await asyncio.to_thread(inside.wait, 30)

    async def release():     # gather starts the writes first, in order: all are queued by now
        go_on.set()
    results = await asyncio.gather(*(store.engine.write(op) for op in ops), release(), return_exceptions=True)
    await held
    return results[:-1]


def insert(key):
    def op(conn, cleanup):
        conn.execute("INSERT INTO overrides (key, value, set_at) VALUES (?, '1', 0)", (key,))
        return key
    return op


def failing(exc_type):
    def op(conn, cleanup):
        conn.execute("INSERT INTO overrides (key, value, set_at) VALUES ('failed', '1', 0)")
        if exc_type is None:
            conn.execute("SELECT * FROM no_such_table")   # a driver error: PostgreSQL aborts the transaction
        raise exc_type("this op fails")
    return op


async def keys(store):
    return sorted(k for (k,) in await store._read(lambda c: c.execute("SELECT key FROM overrides").fetchall()))


@pytest.mark.parametrize("error", [ValueError, None], ids=["op-error", "driver-error"])
async def test_a_failed_op_leaves_nothing_and_the_others_commit_once(sql_store, error):
    results = await one_batch(sql_store, insert("a"), failing(error),
                              insert("b"), failing(ValueError), insert("c"))
    assert results[0] == "a" and results[2] == "b" and results[4] == "c"
    assert isinstance(results[1], ValueError if error else StoreError)
    assert isinstance(results[3], ValueError)
    assert await keys(sql_store) == ["a", "b", "c"]


async def test_ops_of_a_batch_write_in_its_own_transaction_not_in_subtransactions(request, tmp_path):
    """On PostgreSQL a savepoint per op cost two round-trips, and an XID per op that writes."""
    keys = itertools.count()

    def op(conn, cleanup):
        # xmin is a 32-bit xid; pg_current_xact_id() also counts the epoch.
        xmin = conn.execute("INSERT INTO overrides (key, value, set_at) VALUES (?, '1', 0) "
                            "RETURNING xmin::text::bigint", (f"k{next(keys)}",)).fetchone()[0]
        top = conn.execute("SELECT mod(pg_current_xact_id()::text::bigint, 4294967296)").fetchone()[0]
        return xmin, top
    async with opened_store("postgres", tmp_path, request) as store:
        results = await one_batch(store, op, op, op)
    assert all(xmin == top for xmin, top in results), results
    assert len({top for _xmin, top in results}) == 1


async def test_opening_a_postgres_queue_that_exists_waits_for_no_writer(pg_dsn):
    """The CLI (queue list ...) and a node starting open the store beside busy writers: opening
    an existing queue creates nothing, so it takes no table lock that waits for their transactions."""
    import psycopg

    from relaywatch.store.postgres import SCHEMA, SCHEMA_RELATIONS, PostgresStore
    assert len(SCHEMA_RELATIONS) == SCHEMA.count("CREATE ")   # every table and index is looked for
    first = PostgresStore(pg_dsn)
    await first.open()
    await first.close()
    writer = psycopg.connect(pg_dsn, autocommit=True)
    writer.execute("BEGIN")
    writer.execute("UPDATE entries SET attempts = attempts WHERE id = 'none'")   # a lock on entries
    second = PostgresStore(pg_dsn)
    try:
        await asyncio.wait_for(second.open(), 10)
        assert await second.counts() == {}
    finally:
        writer.execute("ROLLBACK")   # lets a blocked open go on, so that it can be closed
        writer.close()
        await second.close()


async def test_a_postgres_queue_gets_autovacuum_settings_for_its_churn_and_keeps_an_operators(pg_dsn):
    """The queue tables vacuum after 1,000 dead rows, not 20 % of the live ones (docs/cluster.md); a
    table with settings of its own keeps them, and a table being vacuumed (its SHARE UPDATE EXCLUSIVE
    lock held) is left for a later start instead of holding the open up."""
    import psycopg

    from relaywatch.store.postgres import PostgresStore
    from relaywatch.store.schema import AUTOVACUUM

    def options() -> dict[str, list[str]]:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            return {name: sorted(opts or []) for name, opts in conn.execute(
                "SELECT relname, reloptions FROM pg_class WHERE relnamespace = current_schema()::regnamespace "
                "AND relname = ANY(%s)", (list(AUTOVACUUM),))}

    async def open_once() -> None:
        store = PostgresStore(pg_dsn)
        await store.open()
        await store.close()

    await open_once()
    made = options()
    assert set(made) == set(AUTOVACUUM)
    assert all("autovacuum_vacuum_threshold=1000" in opts for opts in made.values()), made
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE recipients RESET (autovacuum_vacuum_threshold, autovacuum_vacuum_cost_delay, "
                     "autovacuum_analyze_scale_factor, autovacuum_vacuum_scale_factor)")
        conn.execute("ALTER TABLE recipients SET (autovacuum_vacuum_scale_factor = 0.5)")   # the operator's
        conn.execute("ALTER TABLE entries RESET (autovacuum_vacuum_threshold, autovacuum_vacuum_cost_delay, "
                     "autovacuum_analyze_scale_factor, autovacuum_vacuum_scale_factor)")
    vacuum = psycopg.connect(pg_dsn, autocommit=True)
    try:
        vacuum.execute("BEGIN")
        vacuum.execute("LOCK TABLE entries IN SHARE UPDATE EXCLUSIVE MODE")   # what a running vacuum holds
        await asyncio.wait_for(open_once(), 20)
        assert options()["entries"] == []
    finally:
        vacuum.execute("ROLLBACK")
        vacuum.close()
    assert options()["recipients"] == ["autovacuum_vacuum_scale_factor=0.5"]
    await open_once()
    assert options()["entries"] == made["entries"]


async def test_a_role_that_does_not_own_the_queue_tables_opens_them_without_their_autovacuum_settings(pg_dsn):
    """Tables made by another role (a DBA's) and granted to relaywatch's: only an owner may ALTER
    TABLE SET, so the settings are left out and the store opens as before."""
    import psycopg

    from helpers import open_as_a_role_granted_the_tables
    from relaywatch.store.schema import AUTOVACUUM
    options = ", ".join(o.split("=")[0].strip() for o in AUTOVACUUM["entries"].split(","))
    await open_as_a_role_granted_the_tables(pg_dsn, lambda conn: conn.execute(f"ALTER TABLE entries RESET ({options})"))
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT reloptions FROM pg_class WHERE oid = 'entries'::regclass").fetchone()[0] is None
