"""PostgreSQL queue store (psycopg 3): for several relaywatch nodes sharing one queue.

The operations and their SQL are SqlStore's; this module is the PostgreSQL
Dialect of its engine: a connection that speaks the shared ``?`` placeholder
style, plain ``BEGIN`` (row locks, not a database lock), a lease that skips
rows another node has locked (``FOR UPDATE SKIP LOCKED``), and NOTIFY.

Bodies are kept in the database (``bytea``), since another node must be able
to deliver what this one received; leases of other nodes are never released at
start-up, only when they lapse.

Work made due on one node (a message received, ``queue retry`` from the CLI)
wakes the schedulers of all nodes through ``NOTIFY relaywatch_work``.  A
notification sent while a listener is disconnected is lost, so the listener
wakes the scheduler each time it has reconnected, and the scheduler's
1-second poll stays as the fallback.

When the database goes away, every connection is replaced (the engine: the
writer and the readers; here: the listener), with capped backoff.  Each
connection carries a ``statement_timeout`` (``server.store_statement_timeout``),
a connect timeout and TCP keepalives, so neither a stalled database nor a
silently dropped link can hold a transaction, and the clients waiting on it,
for ever.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import select
import threading
import time
from typing import Callable

import psycopg
from psycopg.conninfo import conninfo_to_dict

from relaywatch.store import message_ids, schema
from relaywatch.store.backoff import Backoff
from relaywatch.store.driver_errors import first_line, is_conflict
from relaywatch.store.sql import SqlStore

SCHEMA = schema.render("postgres")
# What SCHEMA creates: when all of it exists, opening runs none of it, since CREATE INDEX
# IF NOT EXISTS takes a SHARE lock on its table before it looks, so every CLI command
# (queue list ...) and node start waited for the writers' transactions and held new ones up.
SCHEMA_RELATIONS = re.findall(r"CREATE (?:UNIQUE )?(?:TABLE|INDEX) IF NOT EXISTS (\w+)", SCHEMA)
# schema.COUNT_TRIGGERS["postgres"] and message_ids.MESSAGE_ID_TRIGGERS["postgres"]
TRIGGER_NAMES = ("entries_counted", "entries_counted_update", "entries_waiting", "entries_waiting_update",
                 *message_ids.MESSAGE_ID_TRIGGER_NAMES)
# A node whose heartbeat is older than this is gone, for retire_indexes (longer than any server.node_lapse
# worth having: a node of the previous version taken for gone too early would only scan, never fail).
RETIRE_AFTER = 300.0
SCHEMA_LOCK = 0x7277_0001   # pg_advisory_xact_lock key: "rw", the schema
SCHEMA_LOCK_TIMEOUT_MS = 500   # the schema's DDL waits this long for a table lock, then gives way
SCHEMA_TRIES = 20
SCHEMA_RETRY_PAUSE = 0.1       # seconds, times the try

log = logging.getLogger("relaywatch.store")
CHANNEL = "relaywatch_work"
_PLACEHOLDER = re.compile(r"\?")


PREPARE_THRESHOLD = 5          # psycopg's default
CONNECT_TIMEOUT = 5            # seconds (libpq's connect_timeout; it counts whole seconds, at least 2)
LISTEN_RECONNECT_CAP = 2.0
LISTEN_IDLE = 5.0              # seconds the listener sleeps between looks at its stop flag, at most


def connection_params(dsn: str, statement_timeout: float | None) -> dict:
    """What every connection adds to the DSN: bounds on how long it can hang.

    Settings the DSN already has win.  ``statement_timeout`` goes in the
    startup ``options`` (appended to any the DSN has, such as a search_path),
    so it holds from the first statement; ``tcp_user_timeout`` ends a
    connection whose packets go unanswered as long (a cut link, not a slow
    query).  ``idle_in_transaction_session_timeout`` gets the same bound: every
    connection is autocommit and its transactions run statement after statement
    with nothing to wait for in between, so a session idle inside one that long
    is a node that stopped there (SIGSTOP, a paused VM) — PostgreSQL ends it and
    its row locks go, instead of the other nodes' leases and a leader takeover
    waiting until it runs again (docs/cluster.md).  ``None`` or 0 leaves all
    three to the server's settings (for a pooler that refuses startup options)."""
    given = conninfo_to_dict(dsn)
    params: dict = {}
    if "connect_timeout" not in given:
        params["connect_timeout"] = CONNECT_TIMEOUT
    if "keepalives" not in given:
        params.update(keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3)
    if statement_timeout:
        ms = max(1, round(statement_timeout * 1000))
        params["options"] = (f"{given.get('options', '')} -c statement_timeout={ms}"
                             f" -c idle_in_transaction_session_timeout={ms}").strip()
        if "tcp_user_timeout" not in given:
            params["tcp_user_timeout"] = ms
    return params


def retire_indexes(conn: psycopg.Connection, now: float) -> None:
    """Drop the indexes message_ids replaced (message_ids.RETIRED_INDEXES) once no node of the previous
    version runs: one would look Message-IDs up through them, and scan entries and traces without.
    A node's row says it reads message_ids when its message_ids_by is its instance (this start's
    heartbeat, store/cluster.sql); an earlier version's heartbeat leaves that column as it was.
    Run at a node's start, so the first node started once every other runs this version drops them
    (unless the running nodes hold the tables past the schema's lock wait: then a later start);
    until then every write keeps them too, as before.  A node of the previous version started
    after makes them again (its own schema check), and the next start of this one drops them."""
    (left,) = conn.execute("SELECT count(*) FROM pg_class WHERE relnamespace = current_schema()::regnamespace "
                           "AND relname = ANY(%s)", (list(message_ids.RETIRED_INDEXES),)).fetchone()
    if not left:
        return
    (older,) = conn.execute("SELECT count(*) FROM nodes WHERE state <> 'stopped' AND heartbeat_at >= %s "
                            "AND message_ids_by IS DISTINCT FROM instance", (now - RETIRE_AFTER,)).fetchone()
    if older:
        log.info("keeping the Message-ID indexes of the previous version: %d node(s) of it still run", older)
        return
    try:
        with conn.transaction():   # a savepoint: a start that cannot have the tables now still starts
            for name in message_ids.RETIRED_INDEXES:
                conn.execute(f"DROP INDEX IF EXISTS {name}")
    except psycopg.errors.InsufficientPrivilege:
        log.warning("the Message-ID indexes of the previous version (%s) are left: only the tables' owner may "
                    "drop them", ", ".join(message_ids.RETIRED_INDEXES))
    except psycopg.Error as exc:
        if not is_conflict(exc):
            raise
        log.info("the Message-ID indexes of the previous version are left for a later start (%s)", first_line(exc))


@functools.lru_cache(maxsize=512)
def _translate(sql: str) -> str:
    # The shared SQL has no literal '?' and its only '%' are LIKE patterns.
    return _PLACEHOLDER.sub("%s", sql.replace("%", "%%"))


class _Connection:
    """A psycopg connection with sqlite3's calling convention (``?``, executemany)."""

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn

    def execute(self, sql: str, params=()):
        return self.conn.execute(_translate(sql), params or None)

    def executemany(self, sql: str, rows):
        cur = self.conn.cursor()
        cur.executemany(_translate(sql), list(rows))
        return cur

    def pipeline(self):
        """Statements sent without waiting for each one's answer (store/queue.py ``together``)."""
        return self.conn.pipeline()

    def close(self) -> None:
        self.conn.close()


def _durable_commits(writer: _Connection, sync_commits: bool = True) -> _Connection:
    """The writer commits with ``synchronous_commit`` on, whatever the server or role says.

    relaywatch answers 250 once COMMIT returns; with ``synchronous_commit = off``
    COMMIT returns before the WAL is on disk, and a PostgreSQL crash loses mail
    that was acknowledged.  The other values (local, remote_write, on,
    remote_apply) all wait for the local flush and are left as they are.

    ``sync_commits=False`` (the delivering process, which receives nothing: see
    store/__init__.py open_store) sets it off for the session instead, as the SQLite
    store's delivering process commits with ``synchronous=NORMAL``: what it commits
    (leases, outcomes, the notices that go with a failure) reaches the disk within
    ``wal_writer_delay`` (x 3), and a crash before that forgets a suffix of them,
    whole transactions in order: a delivery made again (a duplicate), a lease that
    lapses, never a message lost.  The receiving process's commits stay synchronous,
    and each flushes every WAL record before its own."""
    if not sync_commits:
        writer.conn.execute("SET synchronous_commit = off")
        return writer
    if writer.conn.execute("SHOW synchronous_commit").fetchone()[0] == "off":
        writer.conn.execute("SET synchronous_commit = on")
        log.warning("PostgreSQL has synchronous_commit = off: relaywatch's writer sets it on for its own "
                    "session (a 250 promises the message is on disk)")
    return writer


class PostgresStore(SqlStore):
    """A queue several nodes share; ``statement_timeout``: server.store_statement_timeout."""

    def __init__(self, dsn: str, on_work=None, statement_timeout: float | None = 30.0,
                 clock: Callable[[], float] = time.time, sync_commits: bool = True, prepare: bool = True):
        super().__init__(PostgresDialect(dsn, statement_timeout, sync_commits, prepare), on_work, clock)
        self.dsn = dsn


class PostgresDialect:
    name = "postgres"
    errors = (psycopg.Error,)
    lease_lock = " FOR UPDATE SKIP LOCKED"
    last_reply = "(r.last_error::json ->> 'reply')"
    row_share = " FOR SHARE"
    row_lock = " FOR UPDATE"
    single_node = False
    inline_bodies = True
    counts_by_delta = True
    forget_message_id = None     # its trigger on entries does (store/message_ids.py)
    announce = f"NOTIFY {CHANNEL}"

    def __init__(self, dsn: str, statement_timeout: float | None = 30.0, sync_commits: bool = True,
                 prepare: bool = True):
        self.dsn = dsn
        self.params = connection_params(dsn, statement_timeout)
        self.sync_commits = sync_commits
        # psycopg's default: a statement run a fifth time on a connection is prepared
        # there (parsed and planned once); None never prepares (a pooler without them).
        self.prepare_threshold = PREPARE_THRESHOLD if prepare else None
        self._listener: threading.Thread | None = None
        self._stop_listening = threading.Event()
        # Written to by stop(): the listener waits on its connection and this pipe
        # at once, so a close never waits for a poll to time out (it did 0.5 s).
        self._stop_pipe: tuple[int, int] | None = None

    def start(self, loop: asyncio.AbstractEventLoop, wake) -> None:
        if wake is not None:   # a scheduler wants to hear of work from other nodes
            self._stop_listening.clear()
            self._stop_pipe = os.pipe()
            self._listener = threading.Thread(target=self._listen, args=(loop, wake, self._stop_pipe[0]),
                                              name="relaywatch-listen", daemon=True)
            self._listener.start()

    def stop(self) -> None:
        if self._listener is not None:
            self._stop_listening.set()
            os.write(self._stop_pipe[1], b"!")
            self._listener.join()
            self._listener = None
            for fd in self._stop_pipe:
                os.close(fd)
            self._stop_pipe = None

    def release(self) -> None:
        pass

    def _listen(self, loop: asyncio.AbstractEventLoop, wake, stop_fd: int) -> None:
        backoff = Backoff(cap=LISTEN_RECONNECT_CAP)
        while not self._stop_listening.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, **self.params) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    down = backoff.succeeded(time.monotonic())
                    if down is not None:
                        log.warning("listening for work from other nodes again (after %.1f s)", down)
                    # Work may have been announced while we were not listening.
                    loop.call_soon_threadsafe(wake)
                    poll = select.poll()   # not select(): a busy relay's descriptors pass 1024
                    poll.register(conn.fileno(), select.POLLIN)
                    poll.register(stop_fd, select.POLLIN)
                    while not self._stop_listening.is_set():
                        if any(fd == stop_fd for fd, _ in poll.poll(LISTEN_IDLE * 1000)):
                            break
                        # Readable: notifications, or the connection's end (raised here).
                        if any(True for _ in conn.notifies(timeout=0)):
                            loop.call_soon_threadsafe(wake)
            except psycopg.Error as exc:
                if backoff.failed(time.monotonic(), first_line(exc)):
                    log.warning("not listening for work from other nodes (%s); polling until reconnected",
                                first_line(exc))
                self._stop_listening.wait(backoff.delay)
            except RuntimeError:
                return   # the event loop is closed

    @property
    def where(self) -> str:
        # Never print a password: neither the URL's user:password@ nor a ?password= parameter.
        return re.sub(r"([?&]password=)[^&]*", r"\1***", re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", self.dsn))

    def _connect(self) -> _Connection:
        # autocommit: transactions are explicit (BEGIN ... COMMIT in store/batch.py BatchRunner.run).
        # Prepared statements (server.store_prepared_statements) need a pooler that keeps them
        # in transaction mode (pgbouncer 1.21 and later, max_prepared_statements > 0).
        return _Connection(psycopg.connect(self.dsn, autocommit=True, prepare_threshold=self.prepare_threshold,
                                           **self.params))

    def reconnect_writer(self) -> _Connection:
        return _durable_commits(self._connect(), self.sync_commits)

    def broken(self, conn: _Connection) -> bool:
        return conn.conn.closed or conn.conn.broken

    def connect_writer(self) -> _Connection:
        conn = self._connect()
        for attempt in range(1, SCHEMA_TRIES + 1):
            try:
                with conn.conn.transaction():
                    self._make_schema(conn)
                break
            except psycopg.Error as exc:
                # The schema's DDL waited too long for a table lock (55P03) or was chosen to end a
                # deadlock: running nodes' transactions hold the tables it needs, in their order.
                # It gives way to them (they are mail) and tries again.
                if not is_conflict(exc) or attempt == SCHEMA_TRIES:
                    conn.close()
                    raise
                log.info("creating or migrating the schema waited for the running nodes (%s); trying again",
                         first_line(exc))
                time.sleep(SCHEMA_RETRY_PAUSE * attempt)
        return _durable_commits(conn, self.sync_commits)

    @staticmethod
    def _make_schema(conn: _Connection) -> None:
        # Nodes of a cluster start together: one at a time creates or migrates the
        # schema (two CREATE TABLE IF NOT EXISTS racing fail on PostgreSQL's catalog).
        conn.conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        # Each DDL statement below locks its table until this commits, one table after the other,
        # while running nodes' batches lock the same tables in their own order (entries, then
        # recipients, bodies ...): waiting for a lock without end deadlocked (seen at a node's start).
        # A wait shorter than the deadlock check (deadlock_timeout, 1 s by default) gives way first.
        conn.conn.execute(f"SET LOCAL lock_timeout = '{SCHEMA_LOCK_TIMEOUT_MS}ms'")
        columns: dict[str, set[str]] = {}
        for table, column in conn.conn.execute(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = ANY(%s)", (list(schema.MIGRATED_TABLES),)):
            columns.setdefault(table, set()).add(column)
        for table, column, definition, fill in schema.missing_columns(columns):   # made by an earlier version
            with conn.conn.transaction():
                # Filling a column of a big queue may well take longer than a statement may.
                conn.conn.execute("SET LOCAL statement_timeout = 0")
                conn.conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
                conn.conn.execute(fill)
        present = {name for (name,) in conn.conn.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = current_schema()::regnamespace "
            "AND relname = ANY(%s)", (SCHEMA_RELATIONS,))}
        (triggers,) = conn.conn.execute(
            "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "WHERE c.relnamespace = current_schema()::regnamespace AND t.tgname = ANY(%s)",
            (list(TRIGGER_NAMES),)).fetchone()
        if present != set(SCHEMA_RELATIONS) or triggers != len(TRIGGER_NAMES):
            # A big queue from an earlier version gets new indexes, is counted once (queue_counts)
            # and has its Message-IDs filled in (message_ids): longer than a statement may take, once.
            # An existing, complete schema runs no DDL, which would wait for every open writer (and
            # block new ones).
            conn.conn.execute("SET LOCAL statement_timeout = 0")
            conn.conn.execute(SCHEMA)
            conn.conn.execute(schema.counting("postgres"))   # queue_counts' triggers, and a count from before them
            conn.conn.execute(message_ids.triggers("postgres"))
        retire_indexes(conn.conn, time.time())
        PostgresDialect._autovacuum_settings(conn)

    @staticmethod
    def _autovacuum_settings(conn: _Connection) -> None:
        """schema.AUTOVACUUM for each queue table that has no autovacuum settings yet.  ALTER TABLE
        SET waits for a vacuum running on the table (not for writers): then it is left to a later
        start; and only the table's owner may: a role that was given the tables goes without."""
        for (table,) in conn.conn.execute(
                "SELECT relname FROM pg_class WHERE relnamespace = current_schema()::regnamespace "
                "AND relname = ANY(%s) AND NOT EXISTS (SELECT 1 FROM unnest(reloptions) o "
                "WHERE o LIKE 'autovacuum%%')", (list(schema.AUTOVACUUM),)).fetchall():
            try:
                with conn.conn.transaction():
                    conn.conn.execute(f"ALTER TABLE {table} SET ({schema.AUTOVACUUM[table]})")
            except psycopg.errors.LockNotAvailable:
                log.info("autovacuum settings of %s left for a later start: the table is being vacuumed", table)
            except psycopg.errors.InsufficientPrivilege:
                log.warning("autovacuum settings of %s not set: this role does not own it (docs/cluster.md, "
                            "Autovacuum of the queue tables)", table)

    def connect_reader(self) -> _Connection:
        return self._connect()

    def begin(self, conn: _Connection) -> None:
        conn.execute("BEGIN")

    def end(self, conn: _Connection) -> None:
        pass
