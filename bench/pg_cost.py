"""What one message costs PostgreSQL, counted by PostgreSQL: receive -> lease -> deliver -> remove of 1 KB.

Load-independent (unlike msg/s on a shared machine): commits, WAL records and bytes, heap and
index writes per message, read from the server's own counters in a database of its own
(pg_stat_database) and from the WAL the run wrote (pg_walinspect, filtered to that database's
blocks and its transactions' commit records); statements and round-trips counted client-side.

    .venv/bin/python bench/pg_cost.py [--messages 1000] [--sessions 1 --sessions 16] [--message-ids]

``--sessions``: concurrent receivers and recorders (1: every message its own batch, the worst
case; more: what group commit can merge).  Needs a superuser (CREATE DATABASE, pg_walinspect).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import os
import re
import time
import uuid

import psycopg

from relaywatch.model import (
    Attempt, Destination, NewMessage, RecipientOutcome, RecipientStatus, Route, RouteKind, StoredBody,
)
from relaywatch.store import postgres
from relaywatch.store.postgres import PostgresStore

ADMIN = os.environ.get("RELAYWATCH_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
DB = "relaywatch_pg_cost"
DSN = ADMIN.rsplit("/", 1)[0] + "/" + DB
BODY = b"Subject: cost\r\n\r\n" + b"x" * (1024 - 17)
ROUTE = Route(RouteKind.CONNECTOR, "partner", "example.net")

calls = collections.Counter()


def _count(name, original, weight):
    def counted(self, sql, params=()):
        calls["round_trips"] += 1
        calls["statements"] += weight(params)
        return original(self, sql, params)
    setattr(postgres._Connection, name, counted)


_count("execute", postgres._Connection.execute, lambda params: 1)
in_pipeline = False


def _counted_pipeline(original):
    # queries.together: one wait for the fetch inside, one for the sync at the end; the
    # statements inside wait for nothing of their own.
    @contextlib.contextmanager
    def counted(self):
        global in_pipeline
        with original(self):
            before, in_pipeline = calls["round_trips"], True
            try:
                yield
            finally:
                in_pipeline = False
                calls["round_trips"] = before + 2
    return counted


if hasattr(postgres._Connection, "pipeline"):   # not in versions before it
    postgres._Connection.pipeline = _counted_pipeline(postgres._Connection.pipeline)
_count("executemany", postgres._Connection.executemany, lambda rows: len(list(rows)) if isinstance(rows, list) else 1)


def counters(conn) -> dict:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute("SELECT xact_commit, tup_inserted, tup_updated, tup_deleted, tup_fetched "
                       "FROM pg_stat_database WHERE datname = %s", (DB,)).fetchone()
    return dict(zip(("xact_commit", "tup_inserted", "tup_updated", "tup_deleted", "tup_fetched"), row))


def wal(conn, start: str, end: str, db_oid: int) -> dict:
    """Records of our database's blocks, and the commit records of the transactions that wrote them."""
    rows = conn.execute(
        "SELECT resource_manager, record_type, xid::text::bigint, record_length, fpi_length, block_ref, description "
        "FROM pg_get_wal_records_info(%s, %s)", (start, end)).fetchall()
    mine = f"/{db_oid}/"
    xids = {xid for _rm, _t, xid, _l, _f, ref, _d in rows if ref and mine in ref and xid}
    out = collections.Counter()
    for rm, rtype, xid, length, fpi, ref, description in rows:
        # A commit names the subtransactions (savepoints) whose xids wrote the rows.
        subxacts = {int(x) for x in re.findall(r"\d+", description.partition("subxacts:")[2].partition(";")[0])}
        if (ref and mine in ref) or (rm == "Transaction" and (xid in xids or subxacts & xids)):
            out["wal_records"] += 1
            out["wal_bytes"] += length
            out["wal_fpi_bytes"] += fpi   # full-page images: when a checkpoint fell in the run
            out[f"{rm}/{rtype}"] += 1
    return out


MESSAGE_IDS = False     # --message-ids: each message with a Message-ID of its own, as mail has


async def run(n: int, sessions: int) -> None:
    store = PostgresStore(DSN)
    await store.open()
    now = time.time()
    msg = NewMessage(sender="a@example.com", recipients=(("b@example.net", ROUTE),),
                     body=StoredBody(size=len(BODY), data=BODY), received_at=now, expires_at=now + 86400)
    sem = asyncio.Semaphore(sessions)

    async def receive():
        async with sem:
            await store.enqueue(dataclasses.replace(msg, message_id=f"<{uuid.uuid4().hex}@example.com>")
                                if MESSAGE_IDS else msg)

    await asyncio.gather(*(receive() for _ in range(n)))
    dest = Destination(host="mx.example.net", ip="127.0.0.1", port=25)

    async def deliver(entry):
        async with sem:
            outcome = RecipientOutcome(entry.recipients[0].address, RecipientStatus.DELIVERED, reply="250 ok")
            attempt = Attempt(at=time.time(), duration=0.01, destination=dest, outcomes=(outcome,))
            await store.record(entry.id, "cost:1", attempt, [outcome], None)

    left = n
    while left:
        leased = await store.lease("cost:1", 256, 300, time.time() + 1)
        if not leased:
            break
        left -= len(leased)
        await asyncio.gather(*(deliver(e) for e in leased))
    await store.close()


def measure(n: int, sessions: int) -> dict:
    with psycopg.connect(DSN, autocommit=True) as conn:
        db_oid = conn.execute("SELECT oid FROM pg_database WHERE datname = %s", (DB,)).fetchone()[0]
        before = counters(conn)
        start = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
        calls.clear()
        t0 = time.perf_counter()
        asyncio.run(run(n, sessions))
        seconds = time.perf_counter() - t0
        end = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
        time.sleep(1.2)   # backends flush their statistics at most once a second; the WAL is flushed too
        after = counters(conn)
        walstats = wal(conn, str(start), str(end), db_oid)
    out = {k: (after[k] - before[k]) / n for k in after}
    out.update({k: v / n for k, v in walstats.items()})
    out.update({k: v / n for k, v in calls.items()})
    out["msg_per_s"] = n / seconds
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--sessions", type=int, action="append")
    ap.add_argument("--message-ids", action="store_true", help="a Message-ID per message (default: none)")
    args = ap.parse_args()
    global MESSAGE_IDS
    MESSAGE_IDS = args.message_ids
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB}")
        conn.execute(f"CREATE DATABASE {DB}")
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
    asyncio.run(run(0, 1))   # the schema, outside the count
    results = {s: measure(args.messages, s) for s in (args.sessions or [1, 16])}
    keys = sorted({k for r in results.values() for k in r},
                  key=lambda k: (k.count("/"), k))
    print(f"per message, {args.messages} x 1 KB; load average {os.getloadavg()[0]:.1f}")
    print(f"{'':34}" + "".join(f"{'sessions=' + str(s):>14}" for s in results))
    for k in keys:
        print(f"{k:34}" + "".join(f"{results[s].get(k, 0):14.2f}" for s in results))
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB}")


if __name__ == "__main__":
    main()
