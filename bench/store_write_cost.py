"""What the queue's writes cost per message: enqueue, lease, record delivered (the mail path).

    .venv/bin/python bench/store_write_cost.py [N] [sqlite|postgresql://...] [--queued M] [--retried]

Through the store API, as the relay does it (group commit: N messages enqueued
at once, leased in batches of 100, recorded at once), on an empty queue or on
one already holding M deferred entries.  Prints microseconds per message for
each step, the best of three rounds, and the process's CPU (all threads) per
message for lease and record together.  Run it on two trees (PYTHONPATH) to see
what a schema change (an index, a trigger) costs the mail path.  --retried: the
messages were deferred once (connection refused) and are due again, as a backlog
is when its destination comes back; lease and record are of that second try.
"""

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from relaywatch.model import (Attempt, Destination, Failure, NewMessage, RecipientOutcome, RecipientStatus, Route,
                              RouteKind, StoredBody)
from relaywatch.store.base import Selector

ROUTES = [Route(RouteKind.CONNECTOR, name) for name in ("onprem", "partner", "fabrikam")]
BODY = b"Subject: x\r\n\r\n" + b"x" * 1000 + b"\r\n"


def refused(address: str, now: float) -> RecipientOutcome:
    """What a destination that is down leaves on a recipient (as the backlog scenario's)."""
    host = Destination("127.0.0.1", "127.0.0.1", 2525, 1, 1)
    return RecipientOutcome(address, RecipientStatus.DEFERRED, Failure(
        code="4.4.316", smtp_code=451, title="Connection refused", subtype="refused",
        detail="127.0.0.1[127.0.0.1]:2525 refused the connection (nothing listens on that port)",
        phase="connect", permanent=False, at=now, kind="connect.refused", destination=host, errno="ECONNREFUSED"))


async def defer_once(store, n: int, now: float) -> float:
    """Every due message tried once and deferred, then due again (a backlog released):
    how long the release (QueueStore.retry, all n in one statement) took."""
    leased = []
    while len(leased) < n and (batch := await store.lease("bench", 100, ttl=600, now=now)):
        leased += batch

    async def defer(entry):
        o = refused(entry.recipients[0].address, now)
        await store.record(entry.id, "bench", Attempt(now, 0.001, o.failure.destination, (o,)), [o], now + 60)
    await asyncio.gather(*(defer(e) for e in leased))
    t = time.perf_counter()
    await store.retry(Selector(all=True), now)
    return time.perf_counter() - t


async def one_round(store, n: int, retried: bool) -> dict[str, float]:
    now = time.time()
    msgs = [NewMessage(sender="s@client.test", recipients=((f"u{i}@d.test", ROUTES[i % 3]),),
                       body=StoredBody(len(BODY), BODY), received_at=now, expires_at=now + 86400) for i in range(n)]
    out = {}
    t = time.perf_counter()
    await asyncio.gather(*(store.enqueue(m) for m in msgs))
    out["enqueue"] = time.perf_counter() - t
    if retried:
        out["release"] = await defer_once(store, n, now + 1)
    cpu = time.process_time()
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
        await store.record(entry.id, "bench", Attempt(now, 0.01, None, (o,)), [o], None, leased=entry)
    await asyncio.gather(*(deliver(e) for e in leased))
    out["record"] = time.perf_counter() - t
    out["lease+record CPU"] = time.process_time() - cpu
    return {k: v / n * 1e6 for k, v in out.items()}


async def main(n: int, where: str, queued: int, retried: bool) -> None:
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
    rounds = [await one_round(store, n, retried) for _ in range(3)]
    best = {k: min(r[k] for r in rounds) for k in rounds[0]}
    print(f"{where.split('?')[0]}, {queued} queued{', retried' if retried else ''}: " + ", ".join(f"{k} {v:.0f} µs/msg" for k, v in best.items()))
    await store.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("n", type=int, nargs="?", default=5000)
    ap.add_argument("where", nargs="?", default="sqlite")
    ap.add_argument("--queued", type=int, default=0)
    ap.add_argument("--retried", action="store_true", help="lease and record a second try (a released backlog)")
    a = ap.parse_args()
    asyncio.run(main(a.n, a.where, a.queued, a.retried))
