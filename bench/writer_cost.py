"""The store writer thread's CPU per message, and the whole process's, for lease + record of a second try.

    .venv/bin/python bench/writer_cost.py TREE [N] [ROUNDS]     # e.g. /work/main 4000 4

store_write_cost.py --retried's phase (N messages deferred once, released, leased 256 at a
time as the scheduler does, recorded delivered at once), on SQLite with synchronous=NORMAL as
the delivering process has it, run from TREE's code.  The writer thread's CPU is read around
each batch it runs (time.thread_time); the process's covers the event loop too.  Prints the
minimum over ROUNDS rounds on one queue, and every round's pair: per message these move with
the machine's load, so run two trees alternately.
"""

import asyncio
import sys
import tempfile
import time
from pathlib import Path

tree = sys.argv[1]
sys.path[:0] = [tree, str(Path(tree) / "bench")]

from store_write_cost import BODY, ROUTES, defer_once  # noqa: E402
from relaywatch.model import Attempt, NewMessage, RecipientOutcome, RecipientStatus, StoredBody  # noqa: E402
from relaywatch.store import batch, sqlite  # noqa: E402

LEASE = 256
writer_cpu = [0.0]
measuring = [False]
_run = batch.BatchRunner.run


def timed_run(self, conn, ops, may_defer=False):
    started = time.thread_time()
    try:
        return _run(self, conn, ops, may_defer)
    finally:
        if measuring[0]:
            writer_cpu[0] += time.thread_time() - started


batch.BatchRunner.run = timed_run


async def one_round(store, n: int) -> tuple[float, float]:
    now = time.time()
    await asyncio.gather(*(store.enqueue(NewMessage(
        sender="s@client.test", recipients=((f"u{i}@d.test", ROUTES[i % 3]),), body=StoredBody(len(BODY), BODY),
        received_at=now, expires_at=now + 86400)) for i in range(n)))
    await defer_once(store, n, now + 1)
    writer_cpu[0], measuring[0], cpu = 0.0, True, time.process_time()
    leased = []
    while batch_ := await store.lease("bench", LEASE, ttl=600, now=now + 1):
        leased += batch_

    async def deliver(entry):
        o = RecipientOutcome(entry.recipients[0].address, RecipientStatus.DELIVERED, None)
        await store.record(entry.id, "bench", Attempt(now, 0.01, None, (o,)), [o], None, leased=entry)
    await asyncio.gather(*(deliver(e) for e in leased))
    measuring[0] = False
    return writer_cpu[0] / n * 1e6, (time.process_time() - cpu) / n * 1e6


async def main(n: int, rounds: int) -> None:
    store = sqlite.SqliteStore(Path(tempfile.mkdtemp()) / "q.sqlite3", sync_commits=False)
    await store.open()
    results = [await one_round(store, n) for _ in range(rounds)]
    await store.close()
    print(f"{tree}: writer {min(w for w, _ in results):.0f} µs/msg, process {min(p for _, p in results):.0f} µs/msg "
          f"(min of {rounds}; each: {' '.join(f'{w:.0f}/{p:.0f}' for w, p in results)})")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[2]) if len(sys.argv) > 2 else 4000, int(sys.argv[3]) if len(sys.argv) > 3 else 4))
