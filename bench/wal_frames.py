"""WAL frames (4 KB pages written) per message on the mail path, and what each table or index adds.

    .venv/bin/python bench/wal_frames.py                 # the schema as it is
    .venv/bin/python bench/wal_frames.py base notrace prune drop:traces_ended notriggers
    .venv/bin/python bench/wal_frames.py --size 51200 --messages 1000     # 50 KB bodies
    .venv/bin/python bench/wal_frames.py --one --messages 300             # one message per transaction

Through the store API, as store_write_cost.py: N messages enqueued (20 at a time),
leased in batches of 100, recorded delivered (20 at a time), each with a random
Message-ID.  No checkpoint runs meanwhile, so the WAL holds every frame those commits
wrote; the frames are counted from the WAL file itself.  Unlike CPU time, the count
does not depend on the machine's load.  Variants: ``notrace`` (queue.trace_retention
off), ``notriggers`` (queue_counts' triggers dropped), ``drop:INDEX``, and ``prune``: not the
mail path but the frames of the traces' prune (store/trace.py) that then deletes every trace
kept, per trace, with what goes with them (before message_ids: traces_message_id; now message_ids).
"""

import argparse
import asyncio
import inspect
import struct
import tempfile
import time
import uuid
from pathlib import Path

import relaywatch.store.sqlite as sqlite_store
from relaywatch.model import Attempt, Destination, NewMessage, RecipientOutcome, RecipientStatus, Route, RouteKind, \
    StoredBody

BODY = b"Subject: x\r\n\r\n" + b"x" * 1000 + b"\r\n"


def body_of(size: int) -> bytes:
    """A message of ``size`` bytes in lines of 78 (as smtp-source's ``-l``)."""
    head = b"Subject: x\r\n\r\n"
    lines = (b"x" * 76 + b"\r\n") * (size // 78 + 1)
    return head + lines[:max(size - len(head) - 2, 0)] + b"\r\n"
ROUTE = Route(RouteKind.CONNECTOR, "sink")


async def one_round(store, n: int) -> None:
    now = time.time()
    msgs = [NewMessage(sender="s@client.test", recipients=(("rcpt@sink.test", ROUTE),), body=StoredBody(len(BODY), BODY),
                       received_at=now, expires_at=now + 86400, message_id=f"<{uuid.uuid4().hex}@client.test>")
            for _ in range(n)]
    for i in range(0, n, 20):
        await asyncio.gather(*(store.enqueue(m) for m in msgs[i:i + 20]))
    leased = []
    while len(leased) < n and (batch := await store.lease("bench", 100, ttl=600, now=now + 1)):
        leased += batch
    dest = Destination("127.0.0.1", "127.0.0.1", 25)
    kw = {"leased": None} if "leased" in inspect.signature(store.record).parameters else None   # older trees

    async def deliver(entry):
        o = RecipientOutcome(entry.recipients[0].address, RecipientStatus.DELIVERED, None, "250 2.0.0 Ok")
        await store.record(entry.id, "bench", Attempt(now, 0.01, dest, (o,)), [o], None,
                           **({"leased": entry} if kw is not None else {}))
    for i in range(0, len(leased), 20):
        await asyncio.gather(*(deliver(e) for e in leased[i:i + 20]))


async def frames(variant: str, n: int) -> tuple[float, float]:
    sqlite_store._WAL_SAFETY_PAGES = 10 ** 9      # no checkpoint: the WAL keeps every frame
    path = Path(tempfile.mkdtemp()) / "q.sqlite3"
    store = sqlite_store.SqliteStore(path)
    await store.open()
    for part in variant.split(","):
        ddl = {"notriggers": [f"DROP TRIGGER entries_counted_{t}" for t in ("insert", "delete", "update")],
               "notrace": []}.get(part, [f"DROP INDEX {part[5:]}"] if part.startswith("drop:") else [])
        if part == "notrace":
            store.trace_retention = 0
        for sql in ddl:
            await store.engine.write(lambda conn, cleanup, sql=sql: conn.execute(sql))
    await one_round(store, 200)      # warm: the tables exist, the pages are cached
    wal = path.with_name(path.name + "-wal")
    start = wal.stat().st_size
    await one_round(store, n)
    if "prune" in variant.split(","):
        start = wal.stat().st_size
        n = await store.engine.write(lambda conn, cleanup: conn.execute("DELETE FROM traces WHERE ended_at < ?",
                                                                        (time.time() + 86400,)).rowcount)
    data = wal.read_bytes()
    await store.close()
    page = struct.unpack(">I", data[8:12])[0]
    count = commits = 0
    for off in range(start, len(data) - 24 - page + 1, 24 + page):
        count += 1
        commits += struct.unpack(">I", data[off + 4:off + 8])[0] != 0
    return count / n, n / commits


async def frames_one_at_a_time(n: int) -> dict[str, float]:
    """Frames per message when every enqueue, lease and record is a transaction of its own (one
    message in flight: nothing shares the pages a commit writes), by phase."""
    sqlite_store._WAL_SAFETY_PAGES = 10 ** 9
    path = Path(tempfile.mkdtemp()) / "q.sqlite3"
    store = sqlite_store.SqliteStore(path)
    await store.open()
    await one_round(store, 200)
    wal = path.with_name(path.name + "-wal")
    page = struct.unpack(">I", wal.read_bytes()[8:12])[0]
    totals = {"enqueue": 0, "lease": 0, "record": 0}
    dest = Destination("127.0.0.1", "127.0.0.1", 25)

    def grew(before: int) -> int:
        return (wal.stat().st_size - before) // (24 + page)
    for _ in range(n):
        now = time.time()
        size = wal.stat().st_size
        await store.enqueue(NewMessage(sender="s@client.test", recipients=(("rcpt@sink.test", ROUTE),),
                                       body=StoredBody(len(BODY), BODY), received_at=now, expires_at=now + 86400,
                                       message_id=f"<{uuid.uuid4().hex}@client.test>"))
        totals["enqueue"] += grew(size)
        size = wal.stat().st_size
        (entry,) = await store.lease("bench", 1, ttl=600, now=now + 1)
        totals["lease"] += grew(size)
        size = wal.stat().st_size
        o = RecipientOutcome(entry.recipients[0].address, RecipientStatus.DELIVERED, None, "250 2.0.0 Ok")
        await store.record(entry.id, "bench", Attempt(now, 0.01, dest, (o,)), [o], None, leased=entry)
        totals["record"] += grew(size)
    await store.close()
    return {phase: frames / n for phase, frames in totals.items()}


def main() -> None:
    global BODY
    ap = argparse.ArgumentParser()
    ap.add_argument("variant", nargs="*", default=["base"])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--size", type=int, default=len(BODY), help="bytes per body (default 1 KB)")
    ap.add_argument("--one", action="store_true", help="one message per transaction (one in flight), by phase")
    a = ap.parse_args()
    BODY = body_of(a.size) if a.size != len(BODY) else BODY
    if a.one:
        by_phase = asyncio.run(frames_one_at_a_time(a.messages))
        print(", ".join(f"{phase} {f:.1f}" for phase, f in by_phase.items()),
              f"= {sum(by_phase.values()):.1f} WAL frames per message, one per transaction, {len(BODY)} B bodies")
        return
    for variant in a.variant:
        per_msg, per_commit = asyncio.run(frames(variant, a.messages))
        print(f"{variant}: {per_msg:.2f} WAL frames per message ({per_commit:.1f} messages per commit), "
              f"{len(BODY)} B bodies")


if __name__ == "__main__":
    main()
