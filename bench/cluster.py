"""The PostgreSQL scenarios of bench/run.py (issue 12): relaywatch on PostgreSQL against
relaywatch on SQLite and Postfix, one to three nodes on one queue, a million-message backlog.

    throughput_1k_pg   relaywatch on PostgreSQL vs Postfix (the harness's ratio), with
                       relaywatch on SQLite in the same call (pg_over_sqlite)
    cluster_nodes      1, 2 and 3 nodes on one PostgreSQL schema, the load split over them
    big_queue_pg       1,000,000 deferred entries: lease and `queue list` times, sizes, vacuum

Every run gets a schema of its own in the database RELAYWATCH_BENCH_PG (default
``relaywatch_bench`` on 127.0.0.1, created when missing), dropped afterwards, so the
database's counters (pg_stat_database) count the run and nothing else.

Queries per message: ``pg_stat_statements`` when the server preloads it (calls per
message); else what pg_stat_database counts: transactions, and rows read and written,
per message.  Lease contention: how often a backend of the run waited on a lock (sampled
from pg_stat_activity every 50 ms), deadlocks, and rolled-back transactions.  ``SKIP
LOCKED`` skips leave no trace in PostgreSQL's statistics; the lock waits are what a
contended lease would cost instead.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from relays import HOST, ROOT, Relaywatch, process_tree

SCENARIOS = ("throughput_1k_pg", "cluster_nodes", "big_queue_pg")
PG_URL = os.environ.get("RELAYWATCH_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/relaywatch_bench")
SAMPLE_EVERY = 0.05


def _psycopg():
    sys.path.insert(0, str(ROOT))
    import psycopg
    return psycopg


@contextmanager
def pg_schema():
    """A fresh schema in the bench database; yields the relaywatch store URL naming it."""
    psycopg = _psycopg()
    base, _, dbname = PG_URL.rpartition("/")
    with psycopg.connect(f"{base}/postgres", autocommit=True) as admin:
        if not admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone():
            admin.execute(f'CREATE DATABASE "{dbname}"')
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG_URL}?options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


class RelaywatchPg(Relaywatch):
    """relaywatch with its queue on PostgreSQL (one node of a cluster)."""
    name = "relaywatch"
    start_timeout = 90.0     # and a schema to create or check

    def __init__(self, sink_port: int, store: str, node: str = "bench1", **kw):
        super().__init__(sink_port, **kw)
        self.store, self.node = store, node

    def prepare(self) -> None:
        super().prepare()
        path = self.dir / "relaywatch.toml"
        # (Nodes side by side: each has a console port of its own, as Relaywatch.prepare gives.)
        path.write_text(path.read_text().replace(
            "[server]\n", f'[server]\nstore = "{self.store}"\nnode_name = "{self.node}"\n', 1))

    def queue_size(self) -> int:
        with _psycopg().connect(self.store) as conn:
            return conn.execute("SELECT count(*) FROM entries").fetchone()[0]


def _cpu_ticks(pids) -> int:
    """utime + stime of ``pids`` (clock ticks), those still running."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        total += int(fields[11]) + int(fields[12])
    return total


def _postgres_pids() -> list[int]:
    """Every process of the PostgreSQL server (its backends, WAL writer, checkpointer ...)."""
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() in ("postgres", "postmaster"):
                pids.append(int(comm.parent.name))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return pids


TABLE_COUNTERS = ("seq_scan", "seq_tup_read", "idx_scan", "idx_tup_fetch", "n_tup_ins", "n_tup_upd",
                  "n_tup_hot_upd", "n_tup_del")


class PgCounters:
    """The bench database's counters before and after a run, and a lock-wait sampler.

    ``relays``: the relaywatch processes whose CPU time is counted (their process trees),
    beside every process of the PostgreSQL server's (the server is shared: what other
    sessions' backends used meanwhile is in ``pg_cpu_ms_per_msg`` too, those alive at the end;
    ``pg_run_cpu_ms_per_msg`` is this database's backends alone, and ``cpu_ms_per_msg`` that and
    relaywatch's: the server's WAL writer and checkpointer are left out of it, other sessions too)."""

    def __init__(self, store: str, relays=()):
        self.store = store
        self.relays = list(relays)
        self.conn = _psycopg().connect(store, autocommit=True)
        self.samples = self.waiting = self.any_waiting = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def snapshot(self) -> dict:
        time.sleep(1.2)     # backends flush their statistics at most once a second (PGSTAT_MIN_INTERVAL)
        self.conn.execute("SELECT pg_stat_clear_snapshot()")
        row = self.conn.execute(
            "SELECT xact_commit, xact_rollback, tup_returned, tup_fetched, tup_inserted, tup_updated, "
            "tup_deleted, deadlocks FROM pg_stat_database WHERE datname = current_database()").fetchone()
        out = dict(zip(("xact_commit", "xact_rollback", "tup_returned", "tup_fetched", "tup_inserted",
                        "tup_updated", "tup_deleted", "deadlocks"), map(int, row)))
        for relname, *values in self.conn.execute(
                f"SELECT relname, {', '.join(f'coalesce({c}, 0)' for c in TABLE_COUNTERS)} "
                "FROM pg_stat_user_tables WHERE schemaname = current_schema()"):
            out.update({f"{relname}.{c}": int(v) for c, v in zip(TABLE_COUNTERS, values)})
        # CPU by process, so that one which ended meanwhile (another session's backend) takes
        # nothing away: a delta is a process's ticks since the start, or since its own start.
        self.cpu = {"relaywatch": {p: _cpu_ticks([p]) for r in self.relays for p in process_tree(r.proc.pid)},
                    "postgres": {p: _cpu_ticks([p]) for p in _postgres_pids()},
                    "run_backends": {p: _cpu_ticks([p]) for (p,) in self.conn.execute(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid()")}}
        try:
            out["statements"] = int(self.conn.execute(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE dbid = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())").fetchone()[0])
        except Exception:   # not installed or not preloaded: the transaction counts stand in
            pass
        return out

    def start(self) -> "PgCounters":
        self.before = self.snapshot()
        self.cpu_before = self.cpu
        self._thread.start()
        return self

    def _sample(self) -> None:
        with _psycopg().connect(self.store, autocommit=True) as conn:
            while not self._stop.wait(SAMPLE_EVERY):
                n = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                 "AND wait_event_type = 'Lock'").fetchone()[0]
                self.samples += 1
                self.waiting += n
                self.any_waiting += 1 if n else 0

    def per_message(self, messages: int) -> dict:
        self._stop.set()
        self._thread.join()
        after = self.snapshot()
        self.conn.close()
        d = {k: after[k] - self.before.get(k, 0) for k in after}
        for kind, ticks in self.cpu.items():
            d[f"cpu.{kind}"] = sum(t - self.cpu_before[kind].get(pid, 0) for pid, t in ticks.items())
        tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
        out = {"xact_per_msg": d["xact_commit"] / messages, "rollbacks": d["xact_rollback"],
               "rows_read_per_msg": (d["tup_returned"] + d["tup_fetched"]) / messages,
               "rows_written_per_msg": (d["tup_inserted"] + d["tup_updated"] + d["tup_deleted"]) / messages,
               "deadlocks": d["deadlocks"],
               "lock_wait_share": self.any_waiting / self.samples if self.samples else 0.0,
               "lock_waiters_mean": self.waiting / self.samples if self.samples else 0.0}
        if "statements" in d:
            out["statements_per_msg"] = d["statements"] / messages
        out["relaywatch_cpu_ms_per_msg"] = d["cpu.relaywatch"] * tick_ms / messages
        out["pg_cpu_ms_per_msg"] = d["cpu.postgres"] * tick_ms / messages
        out["pg_run_cpu_ms_per_msg"] = d["cpu.run_backends"] * tick_ms / messages
        out["cpu_ms_per_msg"] = out["relaywatch_cpu_ms_per_msg"] + out["pg_run_cpu_ms_per_msg"]
        out["tables_per_msg"] = {k: round(v / messages, 2) for k, v in sorted(d.items())
                                 if "." in k and not k.startswith("cpu.") and v}
        return out


# -- throughput_1k_pg --------------------------------------------------------------------------

def throughput_pg(run, relay_cls, messages: int, sessions: int, size: int) -> dict:
    """Postfix as in throughput_1k; relaywatch on SQLite, then on PostgreSQL (its numbers
    are the headline, so the harness's ratio is PostgreSQL over Postfix)."""
    if relay_cls is not Relaywatch:
        return run.throughput(relay_cls, messages, sessions, size)
    sqlite = run.throughput(Relaywatch, messages, sessions, size)
    with pg_schema() as store:
        counters: dict = {}

        def watch(relay):
            counters["pg"] = PgCounters(store, [relay]).start()
            return lambda: counters["pg"].per_message(messages)
        pg = run.throughput(lambda port: RelaywatchPg(port, store), messages, sessions, size, watch=watch)
    return {**pg, "sqlite_end_to_end_per_s": sqlite["end_to_end_per_s"],
            "sqlite_inject_per_s": sqlite["inject_per_s"],
            "pg_over_sqlite": pg["end_to_end_per_s"] / sqlite["end_to_end_per_s"]}


# -- cluster_nodes -----------------------------------------------------------------------------

def cluster_nodes(run, relay_cls, messages: int, sessions: int, size: int, counts=(1, 2, 3)) -> dict:
    """n nodes on one schema, each sent messages/n over sessions/n sessions at once."""
    if relay_cls is not Relaywatch:
        return {}
    out: dict = {}
    for n in counts:
        with pg_schema() as store:
            sink = run.SmtpSink().start()
            nodes = []
            try:
                for i in range(n):
                    nodes.append(RelaywatchPg(sink.port, store, node=f"bench{i + 1}").start())
                counters = PgCounters(store, nodes).start()
                share = messages // n
                t0 = time.monotonic()
                threads = [threading.Thread(target=run.smtp_source,
                                            args=(node.port, share, max(sessions // n, 1), size))
                           for node in nodes]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                done = sink.wait_for(share * n, timeout=600)
                run.wait_queue_empty(nodes[0], timeout=60)
                if sink.count() != share * n:
                    raise RuntimeError(f"{n} nodes: the sink got {sink.count()} messages for {share * n} sent")
                out[f"nodes{n}_end_to_end_per_s"] = share * n / (done - t0)
                out.update({f"nodes{n}_{k}": v for k, v in counters.per_message(share * n).items()})
            finally:
                for node in nodes:
                    node.stop()
                sink.stop()
    if 1 in counts and counts[-1] != 1:
        out[f"nodes{counts[-1]}_over_nodes1"] = (out[f"nodes{counts[-1]}_end_to_end_per_s"]
                                                 / out["nodes1_end_to_end_per_s"])
    return out


# -- big_queue_pg ------------------------------------------------------------------------------

_FILL = """
INSERT INTO bodies (id, data, path, size, refs)
  SELECT 'B' || lpad(g::text, 11, '0'), convert_to(repeat('x', 1000), 'UTF8'), NULL, 1000, 1
  FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) g;
INSERT INTO entries (id, body_id, sender, received_at, expires_at, status, attempts, next_attempt_at,
                     route_kind, route_name, route_domain, size, message_id, first_failure_at, last_code)
  SELECT 'E' || lpad(g::text, 11, '0'), 'B' || lpad(g::text, 11, '0'), 'bench@client.test',
         %(now)s::float8 - 3600 + g * 0.001, %(now)s::float8 + 80000, 'deferred', 1,
         %(now)s::float8 + 80000, 'connector', 'backlog', '', 1000, '', %(now)s::float8 - 3600, '4.4.316'
  FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) g;
INSERT INTO recipients (entry_id, position, address, status, last_error)
  SELECT 'E' || lpad(g::text, 11, '0'), 0, 'rcpt@backlog.test', 'deferred', NULL
  FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) g;
"""
TABLES = ("entries", "recipients", "bodies")


def big_queue_pg(run, relay_cls, size: int, probe_messages: int, sessions: int, settle: float = 60.0) -> dict:
    """`size` deferred entries on PostgreSQL (not due for a day), one node running:
    the time of a lease that finds nothing due (every scheduler poll), of leases of 256
    when 10,000 are due, of `queue list --limit 50`; mail through the full queue; the
    tables' and indexes' sizes; dead rows and autovacuum runs over ``settle`` seconds."""
    if relay_cls is not Relaywatch:
        return {}
    psycopg = _psycopg()
    out: dict = {}
    with pg_schema() as store:
        sink = run.SmtpSink().start()
        relay = RelaywatchPg(sink.port, store, extra_connectors=run.BACKLOG_CONNECTOR,
                             queue_extra='retry_intervals = ["24h"]')
        relay.start()           # creates the tables
        try:
            with psycopg.connect(store, autocommit=True) as conn:
                started = time.monotonic()
                for lo in range(1, size + 1, 100_000):
                    for statement in _FILL.strip().split(";\n"):
                        conn.execute(statement, {"lo": lo, "hi": min(lo + 99_999, size), "now": time.time()})
                out["fill_s"] = time.monotonic() - started
                out.update(_sizes(conn))
                before = _vacuum_stats(conn)
                out["lease_none_due_ms"] = _lease_ms(store, ahead=0, tries=20)
                # 10,000 due twelve hours from now: due for the probe's clock, not for the node's.
                conn.execute("UPDATE entries SET next_attempt_at = %s WHERE id IN (SELECT id FROM entries "
                             "ORDER BY id LIMIT 10000)", (time.time() + 3600 * 12,))
                out["lease_256_of_10k_due_ms"] = _lease_ms(store, ahead=3600 * 13, tries=8)
                # Right after a bulk change the planner has no statistics for it (autovacuum's
                # analyze comes within a minute or so; never with autovacuum off); then again with
                # them.  Without them for recipients (a composite key: entry_id alone looks far from
                # unique), the lease's read of 256 entries' recipients was a scan of all of them.
                conn.execute("ANALYZE entries, recipients, bodies")
                out["lease_256_of_10k_due_analyzed_ms"] = _lease_ms(store, ahead=3600 * 13, tries=8)
                out.update(run.queue_list_times(relay.dir / "relaywatch.toml"))
                t0 = time.monotonic()
                inject = run.smtp_source(relay.port, probe_messages, sessions, 1024)
                sink.wait_for(probe_messages, timeout=600)
                out["inject_per_s_full"] = probe_messages / inject
                out["end_to_end_per_s_full"] = probe_messages / (time.monotonic() - t0)
                time.sleep(settle)   # autovacuum's naptime is a minute by default
                after = _vacuum_stats(conn)
                for t in TABLES:
                    out[f"{t}_dead_rows"] = after[t]["n_dead_tup"]
                    out[f"{t}_autovacuums"] = after[t]["autovacuum_count"] - before[t]["autovacuum_count"]
                    out[f"{t}_autoanalyzes"] = after[t]["autoanalyze_count"] - before[t]["autoanalyze_count"]
                # The CI server of this machine runs with autovacuum = off (conf.d/90-ci.conf): then nothing
                # is vacuumed whatever the tables' settings say.
                out["autovacuum"] = conn.execute("SHOW autovacuum").fetchone()[0]
                out["entries_autovacuum_settings"] = str(conn.execute(
                    "SELECT reloptions FROM pg_class WHERE oid = 'entries'::regclass").fetchone()[0] or "defaults")
                out["due_query_plan"] = " / ".join(r[0].strip() for r in conn.execute(
                    "EXPLAIN SELECT id FROM entries WHERE status IN ('queued', 'deferred') AND next_attempt_at <= %s "
                    "ORDER BY next_attempt_at LIMIT 256 FOR UPDATE SKIP LOCKED", (time.time(),)))
        finally:
            relay.stop()
            sink.stop()
    return out


def _sizes(conn) -> dict:
    out = {}
    for t in TABLES:
        heap, idx, total = conn.execute("SELECT pg_relation_size(%s), pg_indexes_size(%s), "
                                        "pg_total_relation_size(%s)", (t, t, t)).fetchone()
        out[f"{t}_heap_mb"], out[f"{t}_indexes_mb"] = heap / 2**20, idx / 2**20
        out[f"{t}_total_mb"] = total / 2**20
    return out


def _vacuum_stats(conn) -> dict:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    rows = conn.execute("SELECT relname, n_live_tup, n_dead_tup, autovacuum_count, autoanalyze_count "
                        "FROM pg_stat_user_tables WHERE schemaname = current_schema()").fetchall()
    return {r[0]: {"n_live_tup": r[1], "n_dead_tup": r[2], "autovacuum_count": r[3], "autoanalyze_count": r[4]}
            for r in rows}


def _lease_ms(store: str, ahead: float, tries: int) -> float:
    """The median time of the scheduler's lease of 256 (store.lease) by a clock ``ahead``
    seconds of now.  What it leases stays leased (to nobody running) until the schema goes."""
    from relaywatch.store.postgres import PostgresStore

    async def measure() -> float:
        s = PostgresStore(store)
        await s.open()
        try:
            times = []
            for _ in range(max(tries, 1)):
                t = time.monotonic()
                await s.lease("bench-probe:0:0", 256, 600, time.time() + ahead)
                times.append((time.monotonic() - t) * 1000)
            return sorted(times)[len(times) // 2]
        finally:
            await s.close()
    return asyncio.run(measure())
