"""deferred_summary (the watch's backlog, every few seconds) equals a pass over the deferred entries.

The SQL stores read the groups and their entries from queue_counts, the recipients
waiting from queue_waiting (both kept by triggers, store/schema.py) and the oldest,
first-to-expire and first-failed entry of each group by an index seek each, so that
the summary costs the same with ten million deferred as with ten (bench/README.md).
Here test_queue_gauges' random mix of every operation that changes an entry's
connector, status, code or waiting recipients is checked against what the summary
read before: every deferred entry, aggregated.
"""

import random
import time

import pytest

from helpers import SQL_BACKENDS, make_store
from test_queue_gauges import random_step

# What deferred_by_cause was before queue_waiting: every deferred entry read.
BRUTE_FORCE = ("SELECT route_name, last_code, count(*), sum(waiting), min(received_at), min(expires_at), "
               "min(first_failure_at) FROM entries WHERE status = 'deferred' AND last_code IS NOT NULL "
               "GROUP BY route_name, last_code")


async def aggregated(store) -> list[tuple]:
    rows = await store._read(lambda conn: conn.execute(BRUTE_FORCE).fetchall())
    return sorted((c, code, int(n), int(w), oldest, expiry, failure) for c, code, n, w, oldest, expiry, failure
                  in rows)


async def summarised(store) -> list[tuple]:
    return sorted((s.connector, s.code, s.messages, s.recipients, s.oldest_received_at, s.first_expires_at,
                   s.first_failure_at) for s in await store.deferred_summary())


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_the_summary_equals_a_pass_over_the_deferred_entries_after_every_kind_of_change(backend, tmp_path,
                                                                                            request):
    store = make_store(backend, tmp_path, request)
    await store.open()
    try:
        rng = random.Random(5)
        t0 = time.time()
        ids: list[str] = []
        seen = set()
        for step in range(200):
            op = await random_step(store, rng, t0, ids)
            seen.add(op)
            assert await summarised(store) == await aggregated(store), f"after step {step}: {op}"
        assert {"record", "redefer", "reroute", "bounce"} <= seen
        assert await aggregated(store), "the mix left some mail deferred"
    finally:
        await store.close()


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_a_queue_made_before_queue_waiting_is_summed_once_when_opened(backend, tmp_path, request):
    rng = random.Random(8)
    t0 = time.time()
    store = make_store(backend, tmp_path, request)
    await store.open()
    ids: list[str] = []
    for _ in range(60):
        await random_step(store, rng, t0, ids)
    if backend == "sqlite":
        drop = ["DROP TRIGGER entries_waiting_insert", "DROP TRIGGER entries_waiting_delete",
                "DROP TRIGGER entries_waiting_update", "DROP TABLE queue_waiting", "DROP TABLE queue_waiting_deltas"]
    else:
        drop = ["DROP TABLE queue_waiting", "DROP TABLE queue_waiting_deltas",
                "DROP FUNCTION queue_waiting_track CASCADE"]
    await store._read(lambda conn: [conn.execute(sql) for sql in drop])
    await store.close()
    for _ in range(2):   # opened again, and again: summed once, not twice
        store = make_store(backend, tmp_path, request)
        await store.open()
        try:
            assert await summarised(store) == await aggregated(store)
            for _ in range(10):
                await random_step(store, rng, t0, ids)
            assert await summarised(store) == await aggregated(store)
        finally:
            await store.close()
