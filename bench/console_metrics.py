"""What a /metrics scrape costs the store: queue_gauges (and a first API page) with N queued.

    .venv/bin/python bench/console_metrics.py [N] [sqlite|postgresql://...]

Seeds through the store API (enqueue; a fifth leased and recorded as deferred
with a catalog code; one in a hundred held), over three connectors, then
times store.queue_gauges and store.queue_page ten times each: min / median / max.
"""

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from relaywatch.model import (Attempt, Failure, NewMessage, RecipientOutcome, RecipientStatus, Route, RouteKind,
                              StoredBody)
from relaywatch.store.base import QueryPage

ROUTES = [Route(RouteKind.CONNECTOR, name) for name in ("onprem", "partner", "fabrikam")]
BODY = b"Subject: x\r\n\r\n" + b"x" * 1000 + b"\r\n"


async def seed(store, n: int) -> None:
    now = time.time()
    ids: list[str] = []
    for start in range(0, n, 1000):
        batch = [NewMessage(sender="s@contoso.test", recipients=((f"u{i}@d{i % 50}.test", ROUTES[i % 3]),),
                            body=StoredBody(len(BODY), BODY), received_at=now - n + i, expires_at=now + 86400)
                 for i in range(start, min(n, start + 1000))]
        for r in await asyncio.gather(*(store.enqueue(m) for m in batch)):
            ids += r
    for start in range(0, n // 5, 1000):
        leased = await store.lease("seed", 1000, ttl=600, now=now)
        async def defer(entry):
            f = Failure(code=("4.4.316", "4.4.315", "4.7.320")[int(entry.id, 16) % 3],
                        smtp_code=450, title="t", subtype=None, detail="d", phase="connect", permanent=False,
                        at=now, kind="connect.refused")
            o = RecipientOutcome(entry.recipients[0].address, RecipientStatus.DEFERRED, f)
            await store.record(entry.id, "seed", Attempt(now, 0.1, None, (o,)), [o], now + 3600)
        await asyncio.gather(*(defer(e) for e in leased))
    for entry_id in ids[::100]:
        await store.hold(entry_id)


async def timed(fn, times: int = 10) -> str:
    samples = []
    for _ in range(times):
        t = time.perf_counter()
        await fn()
        samples.append((time.perf_counter() - t) * 1000)
    return f"min {min(samples):.1f} ms, median {statistics.median(samples):.1f} ms, max {max(samples):.1f} ms"


async def main(n: int, where: str) -> None:
    if where == "sqlite":
        from relaywatch.store.sqlite import SqliteStore
        store = SqliteStore(Path(tempfile.mkdtemp()) / "q.sqlite3")
    else:
        from relaywatch.store.postgres import PostgresStore
        store = PostgresStore(where)
    await store.open()
    t = time.perf_counter()
    await seed(store, n)
    print(f"seeded {n} in {time.perf_counter() - t:.1f} s ({where.split('?')[0]})")
    rows = await store.queue_gauges(time.time())
    print(f"{len(rows)} groups: {sum(r[3] for r in rows)} entries")
    print("queue_gauges:", await timed(lambda: store.queue_gauges(time.time())))
    print("queue_page first 100:", await timed(lambda: store.queue_page(QueryPage(), time.time())))
    print("queue_page status=held:", await timed(lambda: store.queue_page(QueryPage(status="held"), time.time())))
    await store.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000, sys.argv[2] if len(sys.argv) > 2 else "sqlite"))
