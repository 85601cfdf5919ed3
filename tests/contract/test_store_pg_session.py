"""What each PostgreSQL session of a store is set up with: commit durability by role
(server.delivery_sync_commits) and prepared statements (server.store_prepared_statements)."""

from __future__ import annotations

import time

import pytest

from relaywatch.config import parse_config
from relaywatch.model import RecipientOutcome, RecipientStatus
from relaywatch.store import open_store
from tests.contract.test_store import A, msg


def _config(pg_dsn: str, tmp_path, **server):
    return parse_config({"server": {"store": pg_dsn, "data_dir": str(tmp_path), **server}})


async def _writer_setting(store, name: str) -> str:
    return await store.engine.write(lambda conn, cleanup: conn.execute(f"SHOW {name}").fetchone()[0])


def test_the_new_keys_default_and_parse():
    server = parse_config({}).server
    assert server.store_prepared_statements is True
    assert server.delivery_sync_commits is False
    server = parse_config({"server": {"store_prepared_statements": False, "delivery_sync_commits": True}}).server
    assert server.store_prepared_statements is False
    assert server.delivery_sync_commits is True


@pytest.mark.parametrize("delivery_sync_commits, expected", [(False, "off"), (True, "on")])
async def test_the_delivering_process_commits_without_waiting_for_the_disk_unless_told(
        pg_dsn, tmp_path, delivery_sync_commits, expected):
    # Only what the delivering process commits may be forgotten by a crash (a delivery made again);
    # the receiving process's commits, which its 250s follow, always wait for the disk.
    config = _config(pg_dsn, tmp_path, delivery_sync_commits=delivery_sync_commits)
    delivering = open_store(config, sync_commits=False)
    receiving = open_store(config)
    await delivering.open()
    await receiving.open()
    try:
        assert await _writer_setting(delivering, "synchronous_commit") == expected
        assert await _writer_setting(receiving, "synchronous_commit") == "on"
        # And the delivering store still does its work: a lease and a delivery recorded.
        [entry_id] = await receiving.enqueue(msg([("1@a", A)]))
        [entry] = await delivering.lease("n:1:1", 10, 60, time.time())
        assert await delivering.record(entry.id, "n:1:1", None, [RecipientOutcome("1@a", RecipientStatus.DELIVERED)],
                                       None, leased=entry)
        assert await receiving.get(entry_id) is None
    finally:
        await delivering.close()
        await receiving.close()


@pytest.mark.parametrize("prepared", [True, False])
async def test_statements_the_writer_runs_often_are_prepared_unless_turned_off(pg_dsn, tmp_path, prepared):
    store = open_store(_config(pg_dsn, tmp_path, store_prepared_statements=prepared))
    await store.open()
    try:
        for i in range(8):
            await store.enqueue(msg([(f"{i}@a", A)]))

        def prepared_here(conn, cleanup):
            return conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0]
        n = await store.engine.write(prepared_here)
        assert (n > 0) is prepared, n
    finally:
        await store.close()
