"""The group-commit engine: the only writer of a queue store, and its readers.

It runs functions on connections and knows nothing of queues; the operations
(store/queue.py, store/watch.py) hand it ``fn(conn, cleanup)`` to write
(``cleanup``: spool files to remove once the batch is committed) and
``fn(conn)`` to read.  What differs between databases is a ``Dialect``
(store/sqlite.py, store/postgres.py), composed in, not subclassed.

One writer thread owns the only write connection.  Concurrent writes queue up
behind it and are committed together (group commit): the thread takes every
operation waiting, runs them in one transaction, commits once (durably) and
only then resolves the callers' futures.  A failing operation fails alone: the
others run again, each in a SAVEPOINT (``_run_ops``).

Reads run on other threads with their own connections, so they never wait
for the writer.

Connections that break are replaced.  When a batch fails as a whole (the
database went away, a disk error, a lock held too long) its callers get
StoreError (StoreFull when the disk is full: driver_error); the writer drops the
connection and opens a new one with capped exponential backoff (``Backoff``),
failing what arrives meanwhile at once rather than letting it wait.  A reader
connection that broke is dropped and the read tried once more on a new one.
The store logs one line when it goes away and one when a commit works again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import random
import threading
import time
from typing import Any, Callable, Protocol

from relaywatch import meters
from relaywatch.errors import StoreError, StoreFull
from relaywatch.store.backoff import Backoff
from relaywatch.store.driver_errors import FULL_CODES, driver_error, error_code, first_line, is_conflict

_MAX_BATCH = 256
CONFLICT_RETRIES = 5       # a batch that lost a lock conflict runs again this often before its ops fail
CONFLICT_PAUSE = 0.02      # seconds before the first run again (jittered, growing with each)

log = logging.getLogger("relaywatch.store")

_RECONNECT = object()   # the writer woke with nothing to do but reconnect


class _Conflict(Exception):
    """An op lost a lock conflict (a deadlock): its batch runs again."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


class _RunAgain(Exception):
    """An op failed alone: the rest of its batch runs again without it."""


class _Unstarted(Exception):
    """A batch that never began: its connection was found broken first."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


class Dialect(Protocol):
    """What one database does its own way; the engine and the operations do the rest."""
    name: str                   # the schema's flavour (store/schema.py TYPES)
    errors: tuple               # the driver's exception classes
    lease_lock: str             # added to the lease's subquery (PostgreSQL: skip rows another node locked)
    last_reply: str             # SQL for the reply in a recipient's last_error JSON (console.sql has_text)
    row_share: str              # locks the leader row against a takeover until commit (PostgreSQL: FOR SHARE)
    row_lock: str               # locks a row read before writing it, until commit (PostgreSQL: FOR UPDATE)
    single_node: bool           # one delivering process owns the queue (leases of a dead run are stale)
    inline_bodies: bool         # bodies always in the database (no node-local spool files)
    counts_by_delta: bool       # queue_counts' triggers append deltas, which heartbeats fold (store/schema.py)

    @property
    def where(self) -> str: ...             # the database, for messages (never a password)

    def connect_writer(self) -> Any: ...    # the first write connection: creates or migrates the schema
    def reconnect_writer(self) -> Any: ...  # a new one after the last broke (the schema exists)
    def connect_reader(self) -> Any: ...
    def begin(self, conn: Any) -> None: ...  # take the write lock, open the batch's transaction
    def end(self, conn: Any) -> None: ...    # after COMMIT or ROLLBACK (and after a failed begin)
    def broken(self, conn: Any) -> bool: ...  # after a driver error: replace this connection?

    # Around the engine's life: helper threads (SQLite's checkpoints, PostgreSQL's
    # listener) and what the writer's connections share (SQLite's lock file).
    def start(self, loop: asyncio.AbstractEventLoop, wake: Callable[[], None] | None) -> None: ...
    def stop(self) -> None: ...              # before the engine closes (joins the helpers; blocking)
    def release(self) -> None: ...           # after it closed

    # A statement telling other nodes that work is due (PostgreSQL: NOTIFY), or None.
    announce: str | None


class GroupCommitEngine:
    def __init__(self, dialect: Dialect):
        self.dialect = dialect
        self._ops: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._local = threading.local()
        self._readers: list[Any] = []
        self._readers_lock = threading.Lock()
        self._readers_idle = threading.Condition()
        self._reads_in_flight = 0
        self._closed = False
        self._reader_backoff = Backoff()
        self._reader_backoff_lock = threading.Lock()
        self._down_since: float | None = None    # the last batch failed as a whole (see _write_loop)
        self._down_code: str | None = None      # the driver error code of that failure (full disk?)
        self.conflicts_retried = 0              # batches run again after a lost lock conflict (_run_ops)

    @property
    def where(self) -> str:
        return self.dialect.where

    @property
    def is_open(self) -> bool:
        return self._writer is not None

    # -- lifecycle -----------------------------------------------------------

    async def open(self) -> None:
        self._closed = False
        self._local = threading.local()    # no reader connection from an earlier open
        try:
            conn = await asyncio.to_thread(self.dialect.connect_writer)
        except self.dialect.errors as exc:
            raise StoreError(f"cannot open queue store {self.dialect.where}: {exc}") from exc
        self._writer = threading.Thread(target=self._write_loop, args=(conn,),
                                        name="relaywatch-store-writer", daemon=True)
        self._writer.start()

    async def close(self) -> None:
        if self._writer is not None:
            self._ops.put(None)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        # A read still running on an executor thread (its task was cancelled, the
        # thread was not) must finish before its connection is closed: closing a
        # connection another thread is using crashes the interpreter.
        def close_readers() -> None:
            with self._readers_idle:
                self._closed = True
                self._readers_idle.wait_for(lambda: self._reads_in_flight == 0, timeout=30)
                for conn in self._readers:
                    conn.close()
                self._readers.clear()
        await asyncio.to_thread(close_readers)

    # -- the writer thread ---------------------------------------------------

    def _write_loop(self, conn: Any) -> None:
        backoff = Backoff()
        while True:
            # Without a connection, wake for the next try even if nothing waits.
            timeout = None if conn is not None else max(0.0, backoff.next_try - time.monotonic())
            try:
                first = self._ops.get(timeout=timeout)
            except queue.Empty:
                first = _RECONNECT
            if first is None:
                _close_quietly(conn)
                return
            batch = [] if first is _RECONNECT else [first]
            stop = False
            while batch and len(batch) < _MAX_BATCH:
                try:
                    op = self._ops.get_nowait()
                except queue.Empty:
                    break
                if op is None:
                    stop = True
                    break
                batch.append(op)
            # The lock order of every batch: the leader row first, then the rest (a batch that
            # waited for the leader row holding an entry the leader's batch waits for deadlocked).
            batch.sort(key=lambda op: not op[4])
            if conn is None and backoff.due(time.monotonic()):
                conn = self._try_reconnect(backoff)
            if batch:
                conn = self._commit(conn, batch, backoff)
            if stop:
                _close_quietly(conn)
                return

    def _commit(self, conn: Any, batch: list, backoff: Backoff) -> Any:
        """Run ``batch`` on ``conn`` (None: there is none now); the connection to go on with."""
        if conn is None:
            # Not a wait for the next try: the client is answered 451 now.
            self._settle_all(batch, self._unavailable(backoff))
            return None
        failure = self._run_batch(conn, batch, may_defer=True)
        if isinstance(failure, _Unstarted):
            # The connection died while idle (a failover, a cut link, a DBA's
            # pg_terminate_backend): nothing of the batch ran, so it goes to a
            # new connection at once rather than failing.
            _close_quietly(conn)
            conn = self._try_reconnect(backoff)
            if conn is None:
                self._store_failed(failure.cause)
                self._settle_all(batch, self._unavailable(backoff))
                return None
            failure = self._run_batch(conn, batch)
        if failure is None:
            self._store_works()
            return conn
        self._store_failed(failure)
        # Whatever broke it (a cut connection, a disk error, a lock that was
        # never released), a new connection starts clean.
        _close_quietly(conn)
        backoff.failed(time.monotonic(), first_line(failure))
        return None

    def _unavailable(self, backoff: Backoff) -> StoreError:
        # While reconnecting, writes fail as the last one did: a full disk stays
        # StoreFull (452 4.3.1 to clients), anything else StoreError (451 4.3.0).
        full = self._down_code in FULL_CODES
        return (StoreFull if full else StoreError)(
            f"queue store {self.dialect.where} is unavailable ({backoff.error}); reconnecting", code=self._down_code)

    def _try_reconnect(self, backoff: Backoff) -> Any:
        try:
            conn = self.dialect.reconnect_writer()
        except (*self.dialect.errors, OSError, StoreError) as exc:
            backoff.failed(time.monotonic(), first_line(exc))
            return None
        backoff.succeeded(time.monotonic())
        return conn

    def _store_failed(self, exc: BaseException) -> None:
        self._down_code = error_code(exc)
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.error("queue store %s is unavailable: %s; writes fail until it is back, reconnecting "
                      "(one line when it is back)", self.dialect.where, first_line(exc))

    def _store_works(self) -> None:
        if self._down_since is not None:
            log.warning("queue store %s is back after %.1f s: commits work again",
                        self.dialect.where, time.monotonic() - self._down_since)
            self._down_since = None
            self._down_code = None

    def _settle_all(self, batch: list, exc: BaseException) -> None:
        for _fn, _announce, loop, fut, _first in batch:
            loop.call_soon_threadsafe(_settle, fut, False, exc)

    def _run_batch(self, conn: Any, batch: list, may_defer: bool = False) -> BaseException | None:
        """Run and commit one batch; the driver error if it failed as a whole.

        ``may_defer``: if the connection turns out broken before anything ran,
        settle nothing and return _Unstarted, so the batch can run elsewhere."""
        results: list[tuple[bool, Any]] = []
        cleanup: list[str] = []
        failure = None
        started = time.perf_counter()   # /metrics: one pair per batch, not per op
        try:
            self.dialect.begin(conn)
        except (*self.dialect.errors, OSError) as exc:
            self.dialect.end(conn)
            if may_defer and self.dialect.broken(conn):
                return _Unstarted(exc)
            self._settle_all(batch, driver_error("queue store write failed", exc))
            return exc
        try:
            results = self._run_ops(conn, batch, cleanup)
            if self.dialect.announce is not None and any(
                    ok and announce and value for (_fn, announce, _l, _f, _first), (ok, value) in zip(batch, results)):
                # In the batch's own transaction (and round-trip): other nodes hear of it when it
                # commits, and never of work that did not (a NOTIFY of its own took a commit, an fsync).
                conn.execute(f"{self.dialect.announce}; COMMIT")
            else:
                conn.execute("COMMIT")
            meters.commit_seconds.observe(time.perf_counter() - started)
        except (*self.dialect.errors, OSError) as exc:
            try:
                conn.execute("ROLLBACK")
            except (*self.dialect.errors, OSError):
                pass
            err = driver_error("queue store write failed", exc)
            results = [(False, err)] * len(batch)
            cleanup = []
            failure = exc
        finally:
            self.dialect.end(conn)
        for path in cleanup:  # only after the commit that dropped the last reference
            try:
                os.unlink(path)
            except OSError:
                pass
        for (_fn, _announce, loop, fut, _first), (ok, value) in zip(batch, results):
            loop.call_soon_threadsafe(_settle, fut, ok, value)
        return failure

    def _run_ops(self, conn: Any, batch: list, cleanup: list) -> list[tuple[bool, Any]]:
        """Each op's (ok, result or error); an op that failed left nothing behind.

        The ops run without a savepoint each at first: ops seldom fail, and on
        PostgreSQL every SAVEPOINT and RELEASE is a round-trip (two of an op's
        five on the receiving path), and every subtransaction that writes draws
        an XID of its own (past 64 in one transaction, other sessions' snapshots
        overflow to pg_subtrans).  When one fails, the transaction is rolled
        back and the others run again, each in its own savepoint; the failed
        one keeps its error and does not run again.

        An op that lost a lock conflict (driver_errors.is_conflict: PostgreSQL
        chose this transaction to end a deadlock) did nothing wrong: the whole
        batch runs again in a new transaction, up to CONFLICT_RETRIES times,
        after a short pause in which the other transaction finishes.  This is
        the one place a deadlock is retried; its callers (a client's DATA, a
        delivery's record, a lease) never see it."""
        failed: dict[int, Exception] = {}     # ops that failed alone: they keep their error
        conflicts = 0
        while True:
            apart = bool(failed)
            results: list[tuple[bool, Any]] = []
            try:
                for i, (fn, _announce, _loop, _fut, _first) in enumerate(batch):
                    if i in failed:
                        results.append((False, failed[i]))
                        continue
                    if apart:
                        conn.execute("SAVEPOINT op")
                    try:
                        result = fn(conn, cleanup)
                    except Exception as exc:
                        if is_conflict(exc) and conflicts < CONFLICT_RETRIES:
                            raise _Conflict(exc) from exc
                        if not apart:      # the op fails alone: the others again, in savepoints
                            failed[i] = self._op_error(exc)
                            raise _RunAgain() from exc
                        conn.execute("ROLLBACK TO op")
                        conn.execute("RELEASE op")
                        results.append((False, self._op_error(exc)))
                        continue
                    if apart:
                        conn.execute("RELEASE op")
                    results.append((True, result))
                return results
            except (_Conflict, _RunAgain) as again:
                conn.execute("ROLLBACK")
                cleanup.clear()
                if isinstance(again, _Conflict):
                    conflicts += 1
                    self.conflicts_retried += 1
                    log.info("queue store: %s; the batch of %d operation(s) runs again (%d of %d)",
                             first_line(again.cause), len(batch), conflicts, CONFLICT_RETRIES)
                    time.sleep(random.uniform(0.5, 1.5) * CONFLICT_PAUSE * conflicts)
                self.dialect.begin(conn)

    def _op_error(self, exc: Exception) -> Exception:
        # Driver errors stay inside the store (errors.py): callers see StoreError.
        if isinstance(exc, self.dialect.errors):
            return driver_error("queue store operation failed", exc)
        return exc

    async def write(self, fn: Callable[[Any, list], Any], announce: bool = False, first: bool = False) -> Any:
        """``fn``'s result once committed.  ``announce``: if that result is true, it made
        work due, which the batch tells other nodes of (the dialect's ``announce``).
        ``first``: ``fn`` locks the leader row (store/cluster.py), which every transaction
        takes before any other row: it runs ahead of the rest of its batch."""
        if self._writer is None:
            raise StoreError("queue store is not open")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._ops.put((fn, announce, loop, fut, first))
        return await fut

    # -- readers ---------------------------------------------------------------

    def _reader(self) -> tuple[Any, bool]:
        """This thread's read connection, and whether it was made just now."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, False
        with self._reader_backoff_lock:
            backoff = self._reader_backoff
            if not backoff.due(time.monotonic()):
                raise StoreError(f"queue store {self.dialect.where} is unavailable ({backoff.error}); reconnecting")
            try:
                conn = self.dialect.connect_reader()
            except self.dialect.errors as exc:
                backoff.failed(time.monotonic(), first_line(exc))
                raise
            backoff.succeeded(time.monotonic())
        self._local.conn = conn
        with self._readers_lock:
            self._readers.append(conn)
        return conn, True

    def _drop_reader(self, conn: Any) -> None:
        self._local.conn = None
        with self._readers_lock:
            if conn in self._readers:
                self._readers.remove(conn)
        _close_quietly(conn)

    def _run_read(self, fn: Callable[[Any], Any]) -> Any:
        conn, fresh = self._reader()
        try:
            return fn(conn)
        except self.dialect.errors:
            if not self.dialect.broken(conn):
                raise    # the query failed, not the connection
            self._drop_reader(conn)
            if fresh:
                raise
        # A connection kept from earlier died meanwhile (the database restarted,
        # the network was cut): reads change nothing, so once more on a new one.
        conn, _ = self._reader()
        try:
            return fn(conn)
        except self.dialect.errors:
            if self.dialect.broken(conn):
                self._drop_reader(conn)
            raise

    async def read(self, fn: Callable[[Any], Any]) -> Any:
        def run():
            with self._readers_idle:
                if self._closed:
                    raise StoreError("queue store is closed")
                self._reads_in_flight += 1
            try:
                return self._run_read(fn)
            except self.dialect.errors as exc:
                raise driver_error("queue store read failed", exc) from exc
            finally:
                with self._readers_idle:
                    self._reads_in_flight -= 1
                    self._readers_idle.notify_all()
        return await asyncio.to_thread(run)


def _close_quietly(conn: Any) -> None:
    if conn is None:
        return
    try:
        conn.close()
    except Exception:   # closing a connection that already broke may fail too
        pass


def _settle(fut: asyncio.Future, ok: bool, value: Any) -> None:
    if fut.cancelled():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)

