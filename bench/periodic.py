"""What a relay runs against its SQLite queue at start and every few seconds, each timed on a
big queue (bench/big_queue.py makes one): ``big_queue.py periodic N``.

Each through the store's own methods (the statements `serve` runs), five times after a first,
cold one: first, median and max, in ms; with the SQLite plan of the statements that touch
``entries``.  Run on the queue file alone (no server on it).  The writes among them (the
heartbeat, the idle lease, returning leases) change no entry: nothing is due or leased.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import statistics
import time
from pathlib import Path

from relaywatch.cluster.model import NodeBeat
from relaywatch.store.console import Q as CONSOLE
from relaywatch.store.queue import Q as QUEUE, lease_sql
from relaywatch.store.sqlite import SqliteStore
from relaywatch.store.watch import Q as WATCH

REPEAT = 5
FORECAST_CAP = 10_001   # console/pages.py FORECAST_CAP + 1


def calls(store: SqliteStore, now: float) -> dict[str, tuple[str, callable]]:
    """name -> (who runs it and when, the call)."""
    beat = NodeBeat(name="bench", instance="bench:1:x", address="127.0.0.1:25", role="all", version="bench",
                    started_at=now, at=now)
    return {
        "spool_paths": ("serve, at start (orphan sweep)", lambda: store.spool_paths()),
        "release_leases": ("serve, at start (a previous run's leases)", lambda: store.release_leases(None, now)),
        "lease (nothing due)": ("scheduler, every second when idle",
                                lambda: store.lease("bench:1:x", 256, 300.0, now)),
        "deferred_summary": ("watch tick", lambda: store.deferred_summary()),
        "held_notices": ("watch tick", lambda: store.held_notices()),
        "invalid_recipients_since": ("watch tick", lambda: store.invalid_recipients_since(now - 86400)),
        "open_incidents": ("watch tick", lambda: store.open_incidents()),
        "last_good": ("watch tick", lambda: store.last_good()),
        "due_notifications": ("watch tick", lambda: store.due_notifications(now)),
        "nodes": ("watch tick", lambda: store.nodes()),
        "due_tls_report_posts": ("watch tick", lambda: store.due_tls_report_posts(now)),
        "overrides_version": ("every process, polled", lambda: store.overrides_version()),
        "heartbeat": ("every heartbeat", lambda: store.heartbeat(beat)),
        "release_dead_leases": ("leader, every heartbeat", lambda: store.release_dead_leases(now - 60, now)),
        "queue_gauges": ("console /metrics", lambda: store.queue_gauges(now)),
        "count_deferred_before": ("console overview (forecast)",
                                  lambda: store.count_deferred_before("backlog", now - 6 * 3600, now, FORECAST_CAP)),
    }


PLANS = {
    "lease": (lease_sql(), ("x", 1.0, 1.0, 0.0, 256)),
    "deferred_by_cause": (WATCH["deferred_by_cause"], ()),
    "latest_errors": (WATCH["latest_errors"], ("backlog", "4.4.316")),
    "held_notices": (WATCH["held_notices"], ()),
    "spool_paths": (QUEUE["spool_paths"], ()),
    "release_leases": (QUEUE["release_leases"].replace("{where}", QUEUE["leased"]), (0.0, 0.0)),
    "queue_gauges": (CONSOLE["queue_gauges"], (0.0,)),
}


async def _timed(call) -> float:
    started = time.perf_counter()
    await call()
    return (time.perf_counter() - started) * 1000


async def _measure(path: Path) -> dict:
    out: dict = {"loadavg_before": os.getloadavg()}
    for label in ("open_first", "open_again"):   # the first may build what a new version adds
        started = time.perf_counter()
        store = SqliteStore(path)
        await store.open()
        out[f"{label}_ms"] = (time.perf_counter() - started) * 1000
        if label == "open_first":
            await store.close()
    try:
        now = time.time()
        for name, (who, call) in calls(store, now).items():
            first = await _timed(call)
            runs = [await _timed(call) for _ in range(REPEAT)]
            out[name] = {"who": who, "first_ms": round(first, 2), "median_ms": round(statistics.median(runs), 2),
                         "max_ms": round(max(runs), 2)}
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    out["plans"] = {name: "; ".join(r[-1] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params))
                    for name, (sql, params) in PLANS.items()}
    out["entries"] = conn.execute("SELECT sum(n) FROM queue_counts").fetchone()[0]
    conn.close()
    out["loadavg_after"] = os.getloadavg()
    return out


def measure(path: Path) -> dict:
    return asyncio.run(_measure(path))
