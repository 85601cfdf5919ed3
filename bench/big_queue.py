"""A big deferred queue on SQLite for the big_queue scenario (bench/run.py), and what a relay
running on it does every few seconds, statement by statement.

    flock /tmp/bench.lock .venv/bin/python bench/big_queue.py fill 10000000     # once (minutes)
    flock /tmp/bench.lock .venv/bin/python bench/run.py --scenario big_queue --big-queue 10000000 --repeat 1
    flock /tmp/bench.lock .venv/bin/python bench/big_queue.py periodic 10000000  # EXPLAIN + time each
    flock /tmp/bench.lock .venv/bin/python bench/big_queue.py upgrade 10000000   # a previous version's queue, opened
    .venv/bin/python bench/big_queue.py remove 10000000                          # the file is GBs

The fill is SQL (a recursive CTE, no Python per row), into a file kept as
bench/work/big_queue-<N>.sqlite3 so that each phase can take the bench lock on
its own: `run.py` moves it into the relay's data directory for the full run and
back afterwards (the probe messages come and go; the watch's incidents stay).
Rows go in without indexes or triggers, with the journal and syncs off; then the
store's own schema text (store/schema.py, as `serve` runs it on opening) builds
every index and trigger and counts the entries into queue_counts, as it does for
a queue made before those counts.  One connector (`backlog`), one code
(4.4.316), received over the last day in id order, expiring five days after,
nothing due for a day; one recipient each; a body each, of 17 bytes (ten million bodies
of a kilobyte would be ten gigabytes, and their size is not what is measured; their number is,
since `serve` looks for spooled bodies at start).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WORK = ROOT / "bench" / "work"
HOST = "127.0.0.1"
CONNECTOR = "backlog"
CODE = "4.4.316"
CHUNK = 1_000_000
BODY = b"Subject: b\r\n\r\nx\r\n"


def cached(size: int) -> Path:
    return WORK / f"big_queue-{size}.sqlite3"


def error_json(now: float) -> str:
    return json.dumps({"code": CODE, "smtp_code": 450, "title": "Connection refused", "subtype": "refused",
                       "detail": "refused", "phase": "connect", "permanent": False, "at": now,
                       "kind": "connect.refused", "destination": {"host": HOST, "ip": HOST, "port": 1,
                                                                  "index": 1, "count": 1},
                       "reply": None, "errno": "ECONNREFUSED", "dns": None, "tls": None}, separators=(",", ":"))


_ENTRIES = f"""
WITH RECURSIVE s(i) AS (SELECT :lo UNION ALL SELECT i + 1 FROM s WHERE i + 1 < :hi),
t(i, at) AS (SELECT i, :start + i * 86400.0 / :n FROM s)
INSERT INTO entries (id, body_id, sender, received_at, expires_at, status, attempts, next_attempt_at,
    route_kind, route_name, route_domain, size, message_id, first_failure_at, last_code, waiting)
SELECT printf('%011X%05X', CAST(at * 1000 AS INTEGER), i % 1048576), printf('B%015X', i),
    'bench@client.test', at, at + 5 * 86400, 'deferred', 3, :due, 'connector', '{CONNECTOR}', '', {len(BODY)},
    printf('<%d@client.test>', i), at + 1, '{CODE}', 1 FROM t
"""
_BODIES = f"""
WITH RECURSIVE s(i) AS (SELECT :lo UNION ALL SELECT i + 1 FROM s WHERE i + 1 < :hi)
INSERT INTO bodies (id, data, path, size, refs) SELECT printf('B%015X', i), :body, NULL, {len(BODY)}, 1 FROM s
"""
_RECIPIENTS = """
INSERT INTO recipients (entry_id, position, address, status, last_error, domain)
SELECT id, 0, 'rcpt@backlog.test', 'deferred', :error, 'backlog.test' FROM entries WHERE id > :after ORDER BY id
"""


def fill(size: int, path: Path | None = None) -> float:
    """Make the queue file (a new one, at ``path`` or the cache); returns seconds taken."""
    from relaywatch.store import schema
    from relaywatch.store.sqlite import SCHEMA, SqliteStore
    path = path or cached(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".filling")
    for stale in (partial, Path(f"{partial}-wal"), Path(f"{partial}-shm")):
        stale.unlink(missing_ok=True)
    started, now = time.monotonic(), time.time()
    conn = sqlite3.connect(partial, isolation_level=None)
    conn.execute("PRAGMA journal_mode=OFF")      # the fill only: the store turns WAL on when it opens
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-2000000")   # 2 GB for the index builds' sorts
    conn.executescript(SCHEMA)
    # The rows first, then the indexes and triggers (a sort each rather than a random insert per row).
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('index', 'trigger') "
                                "AND sql IS NOT NULL AND tbl_name IN ('entries', 'recipients')").fetchall():
        kind = conn.execute("SELECT type FROM sqlite_master WHERE name = ?", (name,)).fetchone()[0]
        conn.execute(f"DROP {kind.upper()} {name}")
    error = error_json(now)
    for lo in range(0, size, CHUNK):
        after = conn.execute("SELECT coalesce(max(id), '') FROM entries").fetchone()[0]
        conn.execute("BEGIN")
        conn.execute(_ENTRIES, {"lo": lo, "hi": min(lo + CHUNK, size), "n": size, "start": now - 86400,
                                "due": now + 86400})
        conn.execute(_RECIPIENTS, {"error": error, "after": after})
        conn.execute(_BODIES, {"lo": lo, "hi": min(lo + CHUNK, size), "body": BODY})
        conn.execute("COMMIT")
        print(f"fill: {min(lo + CHUNK, size):,} rows, {time.monotonic() - started:.0f} s", flush=True)
    conn.executescript(f"BEGIN;\n{SCHEMA}\n{schema.counting('sqlite')}\nCOMMIT;")
    print(f"fill: indexes, triggers and counts, {time.monotonic() - started:.0f} s", flush=True)
    conn.close()
    asyncio.run(_open(partial))    # as serve opens it: WAL, migrations (none), schema (present)
    partial.rename(path)
    return time.monotonic() - started


async def _open(path: Path) -> None:
    from relaywatch.store.sqlite import SqliteStore
    store = SqliteStore(path)
    await store.open()
    await store.close()
    Path(f"{path}-writelock").unlink(missing_ok=True)


def upgrade(size: int) -> dict:
    """The first start of this version on a big queue of the previous one (which had entries_deferred
    and no queue_waiting, bodies_spooled, entries_deferred_expiry or _failure): the queue made to
    look like that, then opened, timed.  It ends as it was."""
    path = cached(size)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript("DROP TRIGGER entries_waiting_insert; DROP TRIGGER entries_waiting_delete; "
                       "DROP TRIGGER entries_waiting_update; DROP TABLE queue_waiting; DROP TABLE queue_waiting_deltas; "
                       "DROP INDEX bodies_spooled; DROP INDEX entries_deferred_expiry; "
                       "DROP INDEX entries_deferred_failure; CREATE INDEX entries_deferred ON entries "
                       "(route_name, last_code, received_at, expires_at, first_failure_at, waiting) "
                       "WHERE status = 'deferred' AND last_code IS NOT NULL;")
    conn.close()
    started = time.monotonic()
    asyncio.run(_open(path))
    return {"upgrade_open_s": time.monotonic() - started, "loadavg": os.getloadavg()}


def remove(size: int) -> None:
    for suffix in ("", "-wal", "-shm", "-writelock", ".filling"):
        Path(f"{cached(size)}{suffix}").unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("action", choices=("fill", "periodic", "upgrade", "remove"))
    ap.add_argument("size", type=int)
    a = ap.parse_args()
    if a.action == "fill":
        print(json.dumps({"fill_s": fill(a.size), "bytes": cached(a.size).stat().st_size,
                          "loadavg": os.getloadavg()}))
    elif a.action == "upgrade":
        print(json.dumps(upgrade(a.size)))
    elif a.action == "remove":
        remove(a.size)
    else:
        from periodic import measure
        print(json.dumps(measure(cached(a.size)), indent=2))


if __name__ == "__main__":
    main()
