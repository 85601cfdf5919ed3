"""What the queue's writes cost per message: enqueue, lease, record delivered (the mail path).

    .venv/bin/python bench/store_write_cost.py [N] [sqlite|postgresql://...] [--queued M]

Through the store API, as the relay does it (group commit: N messages enqueued
at once, leased in batches of 100, recorded at once), on an empty queue or on
one already holding M deferred entries.  Prints microseconds per message for
each step, the best of three rounds.  Run it on two trees (PYTHONPATH) to see
what a schema change (an index, a trigger) costs the mail path.
"""

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from relaywatch.model import Attempt, NewMessage, RecipientOutcome, RecipientStatus, Route, RouteKind, StoredBody

ROUTES = [Route(RouteKind.CONNECTOR, name) for name in ("onprem", "partner", "fabrikam")]
BODY = b"Subject: x\r\n\r\n" + b"x" * 1000 + b"\r\n"


async def one_round(store, n: int) -> dict[str, float]:
    now = time.time()
    msgs = [NewMessage(sender="s@client.test", recipients=((f"u{i}@d.test", ROUTES[i % 3]),),
                       body=StoredBody(len(BODY), BODY), received_at=now, expires_at=now + 86400) for i in range(n)]
    out = {}
    t = time.perf_counter()
    await asyncio.gather(*(store.enqueue(m) for m in msgs))
    out["enqueue"] = time.perf_counter() - t
    t = time.perf_counter()
    leased = []
    while len(leased) < n:
        batch = await store.lease("bench", 100, ttl=600, now=now + 1)
        if not batch:
            break
        leased += batch
    out["lease"] = time.perf_counter() - t
    t = time.perf_counter()

    async def deliver(entry):
        o = RecipientOutcome(entry.recipients[0].address, RecipientStatus.DELIVERED, None)
        await store.record(entry.id, "bench", Attempt(now, 0.01, None, (o,)), [o], None)
    await asyncio.gather(*(deliver(e) for e in leased))
    out["record"] = time.perf_counter() - t
    return {k: v / n * 1e6 for k, v in out.items()}


async def main(n: int, where: str, queued: int) -> None:
    if where == "sqlite":
        from relaywatch.store.sqlite import SqliteStore
        store = SqliteStore(Path(tempfile.mkdtemp()) / "q.sqlite3")
    else:
        from relaywatch.store.postgres import PostgresStore
        store = PostgresStore(where)
    await store.open()
    now = time.time()
    for start in range(0, queued, 1000):   # a backlog that is not due (a day from now)
        await asyncio.gather(*(store.enqueue(NewMessage(
            sender="s@client.test", recipients=((f"b{i}@d.test", ROUTES[i % 3]),), body=StoredBody(len(BODY), BODY),
            received_at=now + 86400, expires_at=now + 2 * 86400)) for i in range(start, min(queued, start + 1000))))
    rounds = [await one_round(store, n) for _ in range(3)]
    best = {k: min(r[k] for r in rounds) for k in rounds[0]}
    print(f"{where.split('?')[0]}, {queued} queued: " + ", ".join(f"{k} {v:.0f} µs/msg" for k, v in best.items()))
    await store.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("n", type=int, nargs="?", default=5000)
    ap.add_argument("where", nargs="?", default="sqlite")
    ap.add_argument("--queued", type=int, default=0)
    a = ap.parse_args()
    asyncio.run(main(a.n, a.where, a.queued))
