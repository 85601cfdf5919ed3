"""PostgreSQL queue store (psycopg 3): for several relaywatch nodes sharing one queue.

The operations and their SQL are SqlStore's; this module supplies what
differs: the schema's types, a connection that speaks the shared ``?``
placeholder dialect, plain ``BEGIN`` (row locks, not a database lock), and a
lease that skips rows another node has locked (``FOR UPDATE SKIP LOCKED``).

Bodies are kept in the database (``bytea``), since another node must be able
to deliver what this one received; leases of other nodes are never released at
start-up, only when they lapse.

Work made due on one node (a message received, ``queue retry`` from the CLI)
wakes the schedulers of all nodes through ``NOTIFY relaywatch_work``.  A
notification sent while a listener is disconnected is lost, so the listener
wakes the scheduler each time it has reconnected, and the scheduler's
1-second poll stays as the fallback.

When the database goes away, every connection is replaced (SqlStore: the
writer and the readers; here: the listener), with capped backoff.  Each
connection carries a ``statement_timeout`` (``server.store_statement_timeout``),
a connect timeout and TCP keepalives, so neither a stalled database nor a
silently dropped link can hold a transaction, and the clients waiting on it,
for ever.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time

import psycopg
from psycopg.conninfo import conninfo_to_dict

from relaywatch.store import schema
from relaywatch.store.sql import Backoff, SqlStore, first_line, lease_sql

SCHEMA = schema.render("postgres")

log = logging.getLogger("relaywatch.store")
CHANNEL = "relaywatch_work"
_PLACEHOLDER = re.compile(r"\?")


CONNECT_TIMEOUT = 5            # seconds (libpq's connect_timeout; it counts whole seconds, at least 2)
LISTEN_RECONNECT_CAP = 2.0


def connection_params(dsn: str, statement_timeout: float | None) -> dict:
    """What every connection adds to the DSN: bounds on how long it can hang.

    Settings the DSN already has win.  ``statement_timeout`` goes in the
    startup ``options`` (appended to any the DSN has, such as a search_path),
    so it holds from the first statement; ``tcp_user_timeout`` ends a
    connection whose packets go unanswered as long (a cut link, not a slow
    query).  ``None`` or 0 leaves both to the server's settings (for a pooler
    that refuses startup options)."""
    given = conninfo_to_dict(dsn)
    params: dict = {}
    if "connect_timeout" not in given:
        params["connect_timeout"] = CONNECT_TIMEOUT
    if "keepalives" not in given:
        params.update(keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3)
    if statement_timeout:
        ms = max(1, round(statement_timeout * 1000))
        params["options"] = f"{given.get('options', '')} -c statement_timeout={ms}".strip()
        if "tcp_user_timeout" not in given:
            params["tcp_user_timeout"] = ms
    return params


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

    def close(self) -> None:
        self.conn.close()


class PostgresStore(SqlStore):
    db_errors = (psycopg.Error,)
    single_node = False
    inline_bodies = True
    LEASE_SQL = lease_sql(" FOR UPDATE SKIP LOCKED")

    def __init__(self, dsn: str, on_work=None, statement_timeout: float | None = 30.0):
        super().__init__(on_work)
        self.dsn = dsn
        self.params = connection_params(dsn, statement_timeout)
        self._listener: threading.Thread | None = None
        self._stop_listening = threading.Event()
        self._notify_pending = False

    async def open(self) -> None:
        await super().open()
        if self.on_work is not None:   # a scheduler wants to hear of work from other nodes
            self._stop_listening.clear()
            self._listener = threading.Thread(target=self._listen, args=(asyncio.get_running_loop(),),
                                              name="relaywatch-listen", daemon=True)
            self._listener.start()

    async def close(self) -> None:
        if self._listener is not None:
            self._stop_listening.set()
            await asyncio.to_thread(self._listener.join)
            self._listener = None
        await super().close()

    def _listen(self, loop: asyncio.AbstractEventLoop) -> None:
        backoff = Backoff(cap=LISTEN_RECONNECT_CAP)
        while not self._stop_listening.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, **self.params) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    down = backoff.succeeded(time.monotonic())
                    if down is not None:
                        log.warning("listening for work from other nodes again (after %.1f s)", down)
                    # Work may have been announced while we were not listening.
                    loop.call_soon_threadsafe(self._wake_scheduler)
                    while not self._stop_listening.is_set():
                        if any(True for _ in conn.notifies(timeout=0.5, stop_after=1)):
                            loop.call_soon_threadsafe(self._wake_scheduler)
            except psycopg.Error as exc:
                if backoff.failed(time.monotonic(), first_line(exc)):
                    log.warning("not listening for work from other nodes (%s); polling until reconnected",
                                first_line(exc))
                self._stop_listening.wait(backoff.delay)
            except RuntimeError:
                return   # the event loop is closed

    def _wake_scheduler(self) -> None:
        if self.on_work is not None:
            self.on_work()

    def _notify(self) -> None:
        super()._notify()
        # Tell every node (this one's other process included) after the commit;
        # one NOTIFY per writer batch, however many messages it holds.
        if self._writer is None or self._notify_pending:
            return
        self._notify_pending = True

        def op(conn, cleanup) -> None:
            self._notify_pending = False
            conn.execute(f"NOTIFY {CHANNEL}")
        task = asyncio.ensure_future(self._write(op))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())   # best effort: polling remains

    @property
    def where(self) -> str:
        return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", self.dsn)   # never print a password

    def _connect(self) -> _Connection:
        # autocommit: transactions are explicit (BEGIN ... COMMIT in SqlStore._run_batch);
        # prepare_threshold=None keeps it usable behind pgbouncer in transaction mode.
        return _Connection(psycopg.connect(self.dsn, autocommit=True, prepare_threshold=None, **self.params))

    def _reopen_writer(self) -> _Connection:
        return self._connect()

    def _broken(self, conn: _Connection) -> bool:
        return conn.conn.closed or conn.conn.broken

    def _writer_connection(self) -> _Connection:
        conn = self._connect()
        columns = {row[0] for row in conn.conn.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = 'entries'")}
        for column, definition, fill in schema.missing_columns(columns):   # a queue made by an earlier version
            with conn.conn.transaction():
                # Filling a column of a big queue may well take longer than a statement may.
                conn.conn.execute("SET LOCAL statement_timeout = 0")
                conn.conn.execute(f"ALTER TABLE entries ADD COLUMN {column} {definition}")
                conn.conn.execute(fill)
        conn.conn.execute(SCHEMA)
        return conn

    def _reader_connection(self) -> _Connection:
        return self._connect()

    def _begin(self, conn: _Connection) -> None:
        conn.execute("BEGIN")
