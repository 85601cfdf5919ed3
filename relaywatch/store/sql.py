"""The SQL queue store: every queue and watch operation, for SQLite and PostgreSQL.

One writer thread owns the only write connection.  Concurrent writes queue up
behind it and are committed together (group commit): the thread takes every
operation waiting, runs each in its own SAVEPOINT inside one transaction,
commits once (durably) and only then resolves the callers' futures.  A failing
operation rolls back to its savepoint and fails alone.

Reads (``get``, ``list``) run on other threads with their own connections, so
they never wait for the writer.  Other processes (the CLI, a second node) open
their own store on the same database.

Leasing moves ``next_attempt_at`` to the lease's end, so an entry whose worker
died simply becomes due again: there is no separate reclaim pass.

Connections that break are replaced.  When a batch fails as a whole (the
database went away, a disk error, a lock held too long) its callers get
StoreError, which the receiver answers with 451 4.3.0; the writer drops the
connection and opens a new one with capped exponential backoff (``Backoff``),
failing what arrives meanwhile at once rather than letting it wait.  A reader
connection that broke is dropped and the read tried once more on a new one.
The store logs one line when it goes away and one when a commit works again.

The SQL is written once, with ``?`` placeholders, in the dialect both
databases share (``ON CONFLICT``, ``RETURNING``, ``CASE``); what differs —
connecting, the schema's types, taking the write lock, leasing with ``SKIP
LOCKED`` — is in the two subclasses (store/sqlite.py, store/postgres.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import secrets
import threading
import time
from typing import Any, Callable, Sequence

from relaywatch.errors import LeaseLost, StoreError, StoreFull, UnknownEntry
from relaywatch.model import (
    Attempt, Entry, EntryStatus, Failure, NewMessage, Recipient, RecipientOutcome,
    RecipientStatus, Route, RouteKind, StoredBody, dest_label,
)
from relaywatch.store.base import QueueQuery, Selector

_ENTRY_COLUMNS = ("id, body_id, sender, received_at, expires_at, status, attempts, next_attempt_at, "
                  "route_kind, route_name, route_domain, size, message_id, client, is_dsn, "
                  "first_failure_at, lease_owner, lease_until, delay_notified, notice_pending")

_MAX_BATCH = 256

log = logging.getLogger("relaywatch.store")

RECONNECT_FIRST = 0.05      # seconds before the first try at a new connection
RECONNECT_CAP = 1.0         # never longer between tries: the store is used again within this once it is back


class Backoff:
    """When to try a lost connection again: capped exponential backoff.

    Pure bookkeeping (the caller passes the time), shared by the writer thread,
    the readers and the PostgreSQL listener."""

    def __init__(self, first: float = RECONNECT_FIRST, cap: float = RECONNECT_CAP):
        self.first, self.cap = first, cap
        self.delay = 0.0
        self.next_try = 0.0
        self.down_since: float | None = None
        self.error = ""

    def due(self, now: float) -> bool:
        return now >= self.next_try

    def failed(self, now: float, error: str) -> bool:
        """A try failed; True if it is the first since the last success."""
        first = self.down_since is None
        if first:
            self.down_since = now
        self.delay = self.first if self.delay == 0 else min(self.delay * 2, self.cap)
        self.next_try = now + self.delay
        self.error = error
        return first

    def succeeded(self, now: float) -> float | None:
        """A try worked; how long it had been failing (None: it had not)."""
        down = None if self.down_since is None else now - self.down_since
        self.delay, self.next_try, self.down_since, self.error = 0.0, 0.0, None, ""
        return down


_RECONNECT = object()   # the writer woke with nothing to do but reconnect


class _Unstarted(Exception):
    """A batch that never began: its connection was found broken first."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


def lease_sql(row_lock: str = "") -> str:
    """The lease: the oldest due entries, stamped with our lease in one statement.
    ``row_lock`` is what the backend adds to the subquery (PostgreSQL: skip rows
    another node is leasing right now)."""
    return (f"UPDATE entries SET lease_owner = ?, lease_until = ?, next_attempt_at = ? "
            f"WHERE id IN (SELECT id FROM entries WHERE status IN ('queued', 'deferred') "
            f"AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?{row_lock}) "
            f"RETURNING {_ENTRY_COLUMNS}")


def new_id() -> str:
    """A queue id: milliseconds since 1970, then 20 random bits (16 hex digits).

    Time first, so new rows go to the right edge of every index keyed by id:
    with random ids each message dirtied a random page of each of three
    indexes, and with a million messages queued those pages were no longer
    cached (the big_queue bench: enqueue rate 0.74 of an empty queue's).
    Two processes may draw the same id in the same millisecond: see
    _insert_with_new_id."""
    return f"{time.time_ns() // 1_000_000:011X}{secrets.randbits(20):05X}"


def _insert_with_new_id(conn: Any, sql: str, params: tuple) -> str:
    """Run ``sql`` (an INSERT whose first parameter is the id, ending in ON CONFLICT
    (id) DO NOTHING) under a fresh id; draw again in the rare case it is taken."""
    for _ in range(16):
        id_ = new_id()
        if conn.execute(sql, (id_, *params)).rowcount == 1:
            return id_
    raise StoreError("could not draw an unused queue id")


_INSERT_ENTRY = (
    "INSERT INTO entries (id, body_id, sender, received_at, expires_at, status, attempts, "
    "next_attempt_at, route_kind, route_name, route_domain, size, message_id, client, is_dsn, waiting) "
    "VALUES (?, ?, ?, ?, ?, 'queued', 0, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING")


class SqlStore:
    # Set by the backends:
    db_errors: tuple = ()        # the driver's exception classes
    single_node = True           # one delivering process owns the queue (leases of a dead run are stale)
    inline_bodies = False        # bodies always in the database (no node-local spool files)
    LEASE_SQL = ""               # UPDATE ... RETURNING _ENTRY_COLUMNS, params (owner, until, until, now, limit)

    def _writer_connection(self):
        raise NotImplementedError

    def _reader_connection(self):
        raise NotImplementedError

    def _begin(self, conn) -> None:
        raise NotImplementedError

    def _end(self, conn) -> None:
        """After COMMIT or ROLLBACK (and after a failed _begin)."""

    def _reopen_writer(self):
        """A new write connection after the last one broke (the schema exists)."""
        return self._writer_connection()

    def _broken(self, conn) -> bool:
        """After a driver error: is this connection beyond use (replace it)?"""
        return False

    @property
    def where(self) -> str:
        raise NotImplementedError

    def __init__(self, on_work: Callable[[], None] | None = None):
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
        # Called (on the event loop) after a commit that made work due, so the
        # scheduler wakes at once instead of at its next poll.
        self.on_work = on_work

    # -- lifecycle -----------------------------------------------------------

    async def open(self) -> None:
        self._closed = False
        self._local = threading.local()    # no reader connection from an earlier open
        try:
            conn = await asyncio.to_thread(self._writer_connection)
        except self.db_errors as exc:
            raise StoreError(f"cannot open queue store {self.where}: {exc}") from exc
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
        full = self._down_code in _FULL_CODES
        return (StoreFull if full else StoreError)(
            f"queue store {self.where} is unavailable ({backoff.error}); reconnecting", code=self._down_code)

    def _try_reconnect(self, backoff: Backoff) -> Any:
        try:
            conn = self._reopen_writer()
        except (*self.db_errors, OSError, StoreError) as exc:
            backoff.failed(time.monotonic(), first_line(exc))
            return None
        backoff.succeeded(time.monotonic())
        return conn

    def _store_failed(self, exc: BaseException) -> None:
        self._down_code = getattr(exc, "sqlite_errorname", None) or getattr(exc, "sqlstate", None)
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.error("queue store %s is unavailable: %s; writes fail until it is back, reconnecting "
                      "(one line when it is back)", self.where, first_line(exc))

    def _store_works(self) -> None:
        if self._down_since is not None:
            log.warning("queue store %s is back after %.1f s: commits work again",
                        self.where, time.monotonic() - self._down_since)
            self._down_since = None
            self._down_code = None

    def _settle_all(self, batch: list, exc: BaseException) -> None:
        for _fn, loop, fut in batch:
            loop.call_soon_threadsafe(_settle, fut, False, exc)

    def _run_batch(self, conn: Any, batch: list, may_defer: bool = False) -> BaseException | None:
        """Run and commit one batch; the driver error if it failed as a whole.

        ``may_defer``: if the connection turns out broken before anything ran,
        settle nothing and return _Unstarted, so the batch can run elsewhere."""
        results: list[tuple[bool, Any]] = []
        cleanup: list[str] = []
        failure = None
        try:
            self._begin(conn)
        except (*self.db_errors, OSError) as exc:
            self._end(conn)
            if may_defer and self._broken(conn):
                return _Unstarted(exc)
            self._settle_all(batch, _driver_error("queue store write failed", exc))
            return exc
        try:
            for fn, _loop, _fut in batch:
                conn.execute("SAVEPOINT op")
                try:
                    result = fn(conn, cleanup)
                    conn.execute("RELEASE op")
                    results.append((True, result))
                except Exception as exc:  # the op fails alone
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    if isinstance(exc, self.db_errors):
                        # Driver errors stay inside the store (errors.py): callers see StoreError.
                        exc = _driver_error("queue store operation failed", exc)
                    results.append((False, exc))
            conn.execute("COMMIT")
        except (*self.db_errors, OSError) as exc:
            try:
                conn.execute("ROLLBACK")
            except (*self.db_errors, OSError):
                pass
            err = _driver_error("queue store write failed", exc)
            results = [(False, err)] * len(batch)
            cleanup = []
            failure = exc
        finally:
            self._end(conn)
        for path in cleanup:  # only after the commit that dropped the last reference
            try:
                os.unlink(path)
            except OSError:
                pass
        for (fn, loop, fut), (ok, value) in zip(batch, results):
            loop.call_soon_threadsafe(_settle, fut, ok, value)
        return failure

    async def _write(self, fn: Callable[[Any, list], Any]) -> Any:
        if self._writer is None:
            raise StoreError("queue store is not open")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._ops.put((fn, loop, fut))
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
                raise StoreError(f"queue store {self.where} is unavailable ({backoff.error}); reconnecting")
            try:
                conn = self._reader_connection()
            except self.db_errors as exc:
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
        except self.db_errors:
            if not self._broken(conn):
                raise    # the query failed, not the connection
            self._drop_reader(conn)
            if fresh:
                raise
        # A connection kept from earlier died meanwhile (the database restarted,
        # the network was cut): reads change nothing, so once more on a new one.
        conn, _ = self._reader()
        try:
            return fn(conn)
        except self.db_errors:
            if self._broken(conn):
                self._drop_reader(conn)
            raise

    async def _read(self, fn: Callable[[Any], Any]) -> Any:
        def run():
            with self._readers_idle:
                if self._closed:
                    raise StoreError("queue store is closed")
                self._reads_in_flight += 1
            try:
                return self._run_read(fn)
            except self.db_errors as exc:
                raise _driver_error("queue store read failed", exc) from exc
            finally:
                with self._readers_idle:
                    self._reads_in_flight -= 1
                    self._readers_idle.notify_all()
        return await asyncio.to_thread(run)

    def _notify(self) -> None:
        if self.on_work is not None:
            self.on_work()

    # -- queue operations --------------------------------------------------------

    async def enqueue(self, msg: NewMessage) -> list[str]:
        def op(conn: Any, cleanup: list) -> list[str]:
            return _insert_message(conn, msg)
        ids = await self._write(op)
        self._notify()
        return ids

    async def lease(self, owner: str, limit: int, ttl: float, now: float) -> list[Entry]:
        def op(conn: Any, cleanup: list) -> list[Entry]:
            rows = conn.execute(self.LEASE_SQL, (owner, now + ttl, now + ttl, now, limit)).fetchall()
            entries = [_entry(row) for row in rows]
            _attach_recipients(conn, entries)
            _attach_bodies(conn, entries)
            return entries
        return await self._write(op)

    async def read_body(self, body_id: str) -> StoredBody:
        def q(conn: Any) -> StoredBody:
            row = conn.execute("SELECT data, path, size FROM bodies WHERE id = ?", (body_id,)).fetchone()
            if row is None:
                raise StoreError(f"message body {body_id} is missing from the store")
            return StoredBody(size=row[2], data=_bytes(row[0]), path=row[1])
        return await self._read(q)

    async def record(self, entry_id: str, owner: str | None, attempt: Attempt | None,
                     outcomes: Sequence[RecipientOutcome], next_attempt_at: float | None,
                     notices: Sequence[NewMessage] = (), delay_notified: bool = False,
                     notice_pending: dict | None = None, attempts_before: int | None = None) -> bool:
        held_notice = json.dumps(notice_pending, separators=(",", ":")) if notice_pending else None

        def op(conn: Any, cleanup: list) -> bool:
            now = time.time()
            row = conn.execute("SELECT lease_owner, lease_until, body_id, attempts, first_failure_at "
                               "FROM entries WHERE id = ?", (entry_id,)).fetchone()
            if row is None:
                if attempts_before is not None:
                    return False   # recorded (delivered to all) before, or deleted
                raise UnknownEntry(entry_id)
            lease_owner, lease_until, body_id, attempts, first_failure_at = row
            leased = lease_owner is not None and (lease_until or 0) > now
            if attempts_before is not None:
                # A record tried again (store/pending.py): still ours, lapsed or
                # not, or returned unrecorded (start-up returns an SQLite run's
                # leases); not if an attempt was recorded since, since then
                # this one already was (its commit went through after all) or
                # another worker has had the entry.
                if lease_owner is None and attempts != attempts_before:
                    return False
                if lease_owner is not None and lease_owner != owner:
                    raise LeaseLost(f"entry {entry_id} is now leased by {lease_owner}")
            elif owner is not None and lease_owner != owner:
                raise LeaseLost(f"entry {entry_id} is now leased by {lease_owner}")
            if owner is None and leased:
                raise StoreError(f"message {entry_id} is being delivered right now; try again in a moment")
            by_address = {o.address: o for o in outcomes}
            if not notices and held_notice is None and outcomes and all(o.status is RecipientStatus.DELIVERED for o in outcomes):
                # The common case, delivered to everyone still waiting: the entry goes
                # at once, without first recording statuses and an attempt it drops.
                waiting = conn.execute("SELECT address FROM recipients WHERE entry_id = ? AND status IN "
                                       "('pending', 'deferred')", (entry_id,)).fetchall()
                if all(address in by_address for (address,) in waiting):
                    _remove(conn, entry_id, body_id, cleanup, had_attempts=attempts > 0)
                    return True
            failed_now = False
            for position, address, status in conn.execute(
                    "SELECT position, address, status FROM recipients WHERE entry_id = ?", (entry_id,)).fetchall():
                o = by_address.get(address)
                if o is None or RecipientStatus(status).is_final:
                    continue
                if o.status is not RecipientStatus.DELIVERED:
                    failed_now = True
                conn.execute("UPDATE recipients SET status = ?, last_error = COALESCE(?, last_error) "
                             "WHERE entry_id = ? AND position = ?",
                             (o.status.value, o.failure.to_json() if o.failure else None, entry_id, position))
            if attempt is not None:
                attempts += 1
                conn.execute("INSERT INTO attempts (entry_id, n, data) VALUES (?, ?, ?)",
                             (entry_id, attempts, json.dumps(attempt.to_dict(), separators=(",", ":"))))
            for notice in notices:
                _insert_message(conn, notice)
            pending = conn.execute("SELECT count(*) FROM recipients WHERE entry_id = ? AND status IN "
                                   "('pending', 'deferred')", (entry_id,)).fetchone()[0]
            if pending == 0 and held_notice is None:
                _remove(conn, entry_id, body_id, cleanup)
                return True
            # Still here: recipients wait, or only a notice that could not be built
            # yet (notice_pending; retried on its own, never by delivering again).
            if failed_now and first_failure_at is None:
                first_failure_at = now
            last_code = next((o.failure.code for o in outcomes
                              if o.status is RecipientStatus.DEFERRED and o.failure), None)
            conn.execute(
                "UPDATE entries SET status = CASE WHEN status = 'held' THEN 'held' ELSE 'deferred' END, "
                "attempts = ?, next_attempt_at = ?, first_failure_at = ?, lease_owner = NULL, "
                "lease_until = NULL, last_code = CASE WHEN ? = 0 THEN NULL ELSE COALESCE(?, last_code) END, "
                "waiting = ?, notice_pending = ?, "
                "delay_notified = CASE WHEN ? > delay_notified THEN ? ELSE delay_notified END WHERE id = ?",
                (attempts, next_attempt_at if next_attempt_at is not None else now,
                 first_failure_at, pending, last_code, pending, held_notice,
                 int(delay_notified), int(delay_notified), entry_id))
            return True
        applied = await self._write(op)
        if notices and applied:
            self._notify()
        return applied

    async def release_leases(self, owner: str | None, now: float, keep: Sequence[str] = ()) -> int:
        def op(conn: Any, cleanup: list) -> int:
            where, args = ("lease_owner = ?", (owner,)) if owner else ("lease_owner IS NOT NULL", ())
            if keep:
                where += f" AND id NOT IN ({','.join('?' * len(keep))})"
                args = (*args, *keep)
            return conn.execute(f"UPDATE entries SET lease_owner = NULL, lease_until = NULL, "
                                f"next_attempt_at = CASE WHEN next_attempt_at < ? THEN next_attempt_at ELSE ? END "
                                f"WHERE {where}", (now, now, *args)).rowcount
        n = await self._write(op)
        if n:
            self._notify()
        return n

    async def renew_leases(self, owner: str, ids: Sequence[str], until: float) -> set[str]:
        """Extend ``owner``'s leases on ``ids`` (lapsed or not) to ``until``; the
        ids renewed (an entry another worker leased meanwhile is not)."""
        def op(conn: Any, cleanup: list) -> set[str]:
            marks = ",".join("?" * len(ids))
            return {i for (i,) in conn.execute(
                f"UPDATE entries SET lease_until = ?, next_attempt_at = ? WHERE lease_owner = ? "
                f"AND id IN ({marks}) RETURNING id", (until, until, owner, *ids)).fetchall()}
        return await self._write(op) if ids else set()

    async def get(self, entry_id: str) -> Entry | None:
        def q(conn: Any) -> Entry | None:
            row = conn.execute(f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id = ?",
                               (entry_id.upper(),)).fetchone()
            if row is None:
                return None
            entry = _entry(row)
            _attach_recipients(conn, [entry], include_final=True)
            entry.history = [json.loads(data) for (data,) in conn.execute(
                "SELECT data FROM attempts WHERE entry_id = ? ORDER BY n", (entry.id,))]
            return entry
        return await self._read(q)

    async def list(self, query: QueueQuery) -> list[Entry]:
        def q(conn: Any) -> list[Entry]:
            where, args = [], []
            if query.connector:
                where.append("route_name = ?")
                args.append(query.connector)
            if query.status == "active":
                where.append("lease_until > ?")
                args.append(time.time())
            elif query.status:
                where.append("status = ? AND (lease_until IS NULL OR lease_until <= ?)")
                args += [query.status, time.time()]
            sql = f"SELECT {_ENTRY_COLUMNS} FROM entries"
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += " ORDER BY received_at, id LIMIT ?"
            entries = [_entry(r) for r in conn.execute(sql, (*args, query.limit))]
            _attach_recipients(conn, entries, include_final=True)
            return entries
        return await self._read(q)

    async def retry(self, selector: Selector, now: float) -> int:
        def op(conn: Any, cleanup: list) -> int:
            where, args = _select(selector)
            # Due at once, and in order of age: leasing takes the smallest
            # next_attempt_at first, so the oldest message goes first.
            return conn.execute(
                f"UPDATE entries SET next_attempt_at = CASE WHEN received_at < ? THEN received_at ELSE ? END "
                f"WHERE status != 'held' AND (lease_until IS NULL OR lease_until <= ?) AND {where}",
                (now, now, now, *args)).rowcount
        n = await self._write(op)
        if n:
            self._notify()
        return n

    async def hold(self, entry_id: str) -> bool:
        def op(conn: Any, cleanup: list) -> bool:
            return conn.execute("UPDATE entries SET status = 'held' WHERE id = ?",
                                (entry_id.upper(),)).rowcount == 1
        return await self._write(op)

    async def release(self, entry_id: str, now: float) -> bool:
        def op(conn: Any, cleanup: list) -> bool:
            return conn.execute(
                "UPDATE entries SET status = CASE WHEN attempts = 0 THEN 'queued' ELSE 'deferred' END, "
                "next_attempt_at = ? WHERE id = ? AND status = 'held'", (now, entry_id.upper())).rowcount == 1
        ok = await self._write(op)
        if ok:
            self._notify()
        return ok

    async def delete(self, entry_id: str) -> bool:
        def op(conn: Any, cleanup: list) -> bool:
            row = conn.execute("SELECT body_id, lease_until FROM entries WHERE id = ?",
                               (entry_id.upper(),)).fetchone()
            if row is None:
                return False
            if row[1] and row[1] > time.time():
                raise StoreError(f"message {entry_id} is being delivered right now; try again in a moment")
            _remove(conn, entry_id.upper(), row[0], cleanup)
            return True
        return await self._write(op)

    async def next_due(self) -> float | None:
        def q(conn: Any) -> float | None:
            return conn.execute("SELECT min(next_attempt_at) FROM entries "
                                "WHERE status IN ('queued', 'deferred')").fetchone()[0]
        return await self._read(q)

    async def spool_paths(self) -> set[str]:
        """Every body file a queue row points at (the rest are crash leftovers)."""
        def q(conn: Any) -> set[str]:
            return {p for (p,) in conn.execute("SELECT path FROM bodies WHERE path IS NOT NULL")}
        return await self._read(q)

    async def counts(self) -> dict[str, int]:
        def q(conn: Any) -> dict[str, int]:
            return dict(conn.execute("SELECT status, count(*) FROM entries GROUP BY status").fetchall())
        return await self._read(q)


    # -- mail flow watch: incidents, notifications, overrides -------------------------
    # Kept beside the queue so one file holds all state and the CLI can read
    # it while the server runs; none of it is on the message path.

    async def deferred_summary(self) -> list[dict]:
        """Deferred mail grouped by (connector, code), with the newest evidence."""
        def q(conn: Any) -> list[dict]:
            # One pass over the entries_deferred index, never the table: this runs
            # every few seconds, also with a million messages deferred.
            rows = conn.execute(
                "SELECT route_name, last_code, count(*), sum(waiting), min(received_at), min(expires_at), "
                "min(first_failure_at) FROM entries "
                "WHERE status = 'deferred' AND last_code IS NOT NULL GROUP BY route_name, last_code").fetchall()
            out = []
            for connector, code, messages, recipients, oldest, first_expiry, first_failure in rows:
                errors = [json.loads(x) for (x,) in conn.execute(
                    "SELECT last_error FROM recipients r JOIN entries e ON e.id = r.entry_id "
                    "WHERE e.status = 'deferred' AND e.route_name = ? AND e.last_code = ? "
                    "AND r.last_error IS NOT NULL ORDER BY e.received_at DESC LIMIT 20", (connector, code))]
                errors.sort(key=lambda e: e.get("at") or 0)
                out.append({"connector": connector, "code": code, "messages": messages, "recipients": recipients,
                            "oldest_received_at": oldest, "first_expires_at": first_expiry,
                            "first_failure_at": first_failure, "latest_error": errors[-1] if errors else None,
                            "destinations": sorted({dest_label(e.get("destination")) for e in errors if e.get("destination")})})
            return out
        return await self._read(q)

    async def held_notices(self, limit: int = 20) -> list[dict]:
        """Entries whose NDR could not be built yet, latest failure first
        (through the entries_notice index: the watch asks every few seconds)."""
        def q(conn: Any) -> list[dict]:
            rows = conn.execute("SELECT id, sender, route_name, notice_pending FROM entries "
                                "WHERE notice_pending IS NOT NULL").fetchall()
            held = [{"id": id_, "sender": sender, "connector": connector, **json.loads(data)}
                    for id_, sender, connector, data in rows]
            return sorted(held, key=lambda h: -(h.get("retry_at") or 0))[:limit]
        return await self._read(q)

    async def entry_ids(self, connector: str, code: str | None = None, status: str = "deferred") -> list[str]:
        def q(conn: Any) -> list[str]:
            sql = "SELECT id FROM entries WHERE route_name = ? AND status = ?"
            args: list = [connector, status]
            if code is not None:
                sql += " AND last_code = ?"
                args.append(code)
            return [i for (i,) in conn.execute(sql + " ORDER BY received_at", args)]
        return await self._read(q)

    async def move_recipients(self, entry_id: str, addresses: Sequence[str], route: Route, now: float) -> str | None:
        """Give some recipients of an (unleased) entry a new route, as a new entry
        sharing the body.  Returns the new entry id (None if nothing moved)."""
        def op(conn: Any, cleanup: list) -> str | None:
            row = conn.execute(f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id = ?", (entry_id,)).fetchone()
            if row is None or not addresses:
                return None
            entry = _entry(row)
            if entry.lease_owner is not None:
                raise StoreError(f"message {entry_id} is being delivered right now; try again in a moment")
            marks = ",".join("?" * len(addresses))
            moved = conn.execute(f"DELETE FROM recipients WHERE entry_id = ? AND address IN ({marks}) "
                                 f"AND status IN ('pending', 'deferred') RETURNING address",
                                 (entry_id, *addresses)).fetchall()
            if not moved:
                return None
            new = _insert_with_new_id(conn, _INSERT_ENTRY, (
                entry.body_id, entry.sender, entry.received_at, entry.expires_at, now, route.kind.value,
                route.name, route.domain, entry.size, entry.message_id, entry.client, int(entry.is_dsn),
                len(moved)))
            conn.execute("UPDATE entries SET waiting = waiting - ? WHERE id = ?", (len(moved), entry_id))
            conn.executemany("INSERT INTO recipients (entry_id, position, address, status) VALUES (?, ?, ?, 'pending')",
                             [(new, i, a) for i, (a,) in enumerate(moved)])
            conn.execute("UPDATE bodies SET refs = refs + 1 WHERE id = ?", (entry.body_id,))
            if not conn.execute("SELECT 1 FROM recipients WHERE entry_id = ? LIMIT 1", (entry_id,)).fetchone():
                _remove(conn, entry_id, entry.body_id, cleanup)
            return new
        new = await self._write(op)
        if new:
            self._notify()
        return new

    async def open_incidents(self) -> list[dict]:
        return await self._read(lambda conn: [_incident(r) for r in conn.execute(
            f"SELECT {_INCIDENT_COLUMNS} FROM incidents WHERE state = 'open' ORDER BY id")])

    async def incidents(self, include_resolved: bool = False, limit: int = 200) -> list[dict]:
        where = "" if include_resolved else "WHERE state = 'open'"
        return await self._read(lambda conn: [_incident(r) for r in conn.execute(
            f"SELECT {_INCIDENT_COLUMNS} FROM incidents {where} ORDER BY id DESC LIMIT ?", (limit,))])

    async def incident(self, incident_id: int) -> dict | None:
        def q(conn: Any) -> dict | None:
            row = conn.execute(f"SELECT {_INCIDENT_COLUMNS} FROM incidents WHERE id = ?", (incident_id,)).fetchone()
            if row is None:
                return None
            inc = _incident(row)
            inc["notifications"] = [
                {"transition": t, "channel": c, "state": st, "attempts": a, "last_error": e, "sent_at": sa}
                for t, c, st, a, e, sa in conn.execute(
                    "SELECT transition, channel, state, attempts, last_error, sent_at FROM notifications "
                    "WHERE incident_id = ? ORDER BY id", (incident_id,))]
            inc["audit"] = [{"id": i, "at": at, "who": who, "action": act, "detail": json.loads(d), "undone_at": u}
                            for i, at, who, act, d, u in conn.execute(
                                "SELECT id, at, who, action, detail, undone_at FROM audit WHERE incident_id = ? "
                                "ORDER BY id", (incident_id,))]
            return inc
        return await self._read(q)

    async def save_incident(self, incident: dict) -> int:
        """Insert (no id) or update an incident; returns its id."""
        def op(conn: Any, cleanup: list) -> int:
            data = {k: v for k, v in incident.items()
                    if k not in ("id", "connector", "code", "state", "opened_at", "resolved_at",
                                 "notifications", "audit")}
            blob = json.dumps(data, separators=(",", ":"))
            if incident.get("id") is None:
                return conn.execute(
                    "INSERT INTO incidents (connector, code, state, opened_at, resolved_at, data) "
                    "VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                    (incident["connector"], incident["code"], incident["state"], incident["opened_at"],
                     incident.get("resolved_at"), blob)).fetchone()[0]
            conn.execute("UPDATE incidents SET state = ?, resolved_at = ?, data = ? WHERE id = ?",
                         (incident["state"], incident.get("resolved_at"), blob, incident["id"]))
            return incident["id"]
        return await self._write(op)

    async def add_notification(self, incident_id: int, transition: str, channel: str, payload: dict,
                               now: float) -> bool:
        """Queue one notification; False if this transition was already notified."""
        def op(conn: Any, cleanup: list) -> bool:
            return conn.execute(
                "INSERT INTO notifications (incident_id, transition, channel, state, next_try, payload) "
                "VALUES (?, ?, ?, 'pending', ?, ?) ON CONFLICT DO NOTHING",
                (incident_id, transition, channel, now, json.dumps(payload))).rowcount == 1
        return await self._write(op)

    async def add_notification_outcome(self, incident_id: int, transition: str, channel: str, payload: dict,
                                       attempts: int, sent_at: float | None, last_error: str | None) -> None:
        """Record a notification that was sent (or tried) before this store could be
        written: the relay's own "cannot queue" incident (watch/store_incident.py)."""
        def op(conn: Any, cleanup: list) -> None:
            conn.execute(
                "INSERT INTO notifications (incident_id, transition, channel, state, attempts, next_try, "
                "last_error, sent_at, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (incident_id, transition, channel, "sent" if sent_at is not None else "failed", attempts,
                 sent_at or 0, last_error, sent_at, json.dumps(payload)))
        await self._write(op)

    async def due_notifications(self, now: float) -> list[dict]:
        return await self._read(lambda conn: [
            {"id": i, "incident_id": inc, "transition": t, "channel": c, "attempts": a, "payload": json.loads(p)}
            for i, inc, t, c, a, p in conn.execute(
                "SELECT id, incident_id, transition, channel, attempts, payload FROM notifications "
                "WHERE state = 'pending' AND next_try <= ? ORDER BY id", (now,))])

    async def notification_result(self, notification_id: int, ok: bool, error: str | None, now: float,
                                  retry_at: float | None) -> None:
        def op(conn: Any, cleanup: list) -> None:
            state = "sent" if ok else ("pending" if retry_at is not None else "failed")
            conn.execute("UPDATE notifications SET state = ?, attempts = attempts + 1, last_error = ?, "
                         "sent_at = ?, next_try = COALESCE(?, next_try) WHERE id = ?",
                         (state, error, now if ok else None, retry_at, notification_id))
        await self._write(op)

    async def set_last_good(self, connector: str, at: float, facts: dict) -> None:
        def op(conn: Any, cleanup: list) -> None:
            conn.execute("INSERT INTO last_good (connector, at, data) VALUES (?, ?, ?) ON CONFLICT (connector) "
                         "DO UPDATE SET at = excluded.at, data = excluded.data",
                         (connector, at, json.dumps(facts)))
        await self._write(op)

    async def last_good(self) -> dict[str, dict]:
        return await self._read(lambda conn: {c: dict(json.loads(d), at=at) for c, at, d in conn.execute(
            "SELECT connector, at, data FROM last_good")})

    async def overrides(self) -> dict[str, dict]:
        return await self._read(lambda conn: {k: {"value": json.loads(v), "set_at": at, "incident_id": i}
                                              for k, v, at, i in conn.execute(
                                                  "SELECT key, value, set_at, incident_id FROM overrides")})

    async def overrides_version(self) -> tuple:
        return await self._read(lambda conn: conn.execute(
            "SELECT count(*), max(set_at) FROM overrides").fetchone())

    async def apply_fix(self, who: str, action: str, incident_id: int | None, detail: dict,
                        set_overrides: dict[str, Any], clear_overrides: Sequence[str], now: float) -> int:
        """Change overrides and write the audit record in one transaction."""
        def op(conn: Any, cleanup: list) -> int:
            for key, value in set_overrides.items():
                conn.execute("INSERT INTO overrides (key, value, set_at, incident_id) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT (key) DO UPDATE SET value = excluded.value, set_at = excluded.set_at, "
                             "incident_id = excluded.incident_id", (key, json.dumps(value), now, incident_id))
            for key in clear_overrides:
                conn.execute("DELETE FROM overrides WHERE key = ?", (key,))
            return conn.execute("INSERT INTO audit (at, who, action, incident_id, detail) VALUES (?, ?, ?, ?, ?) "
                                "RETURNING id", (now, who, action, incident_id, json.dumps(detail))).fetchone()[0]
        return await self._write(op)

    async def last_undoable(self, incident_id: int) -> dict | None:
        def q(conn: Any) -> dict | None:
            row = conn.execute("SELECT id, action, detail FROM audit WHERE incident_id = ? AND undone_at IS NULL "
                               "AND action NOT LIKE 'undo %' ORDER BY id DESC LIMIT 1", (incident_id,)).fetchone()
            return {"id": row[0], "action": row[1], "detail": json.loads(row[2])} if row else None
        return await self._read(q)

    async def mark_undone(self, audit_id: int, now: float) -> None:
        await self._write(lambda conn, cleanup: conn.execute(
            "UPDATE audit SET undone_at = ? WHERE id = ?", (now, audit_id)))

    async def add_invalid_recipients(self, rows: Sequence[tuple[float, str, str, str]]) -> None:
        if rows:
            await self._write(lambda conn, cleanup: conn.executemany(
                "INSERT INTO invalid_recipients (at, domain, connector, source) VALUES (?, ?, ?, ?)", rows))

    async def invalid_recipients_since(self, since: float) -> list[tuple[str, str, str, int]]:
        def q(conn: Any):
            return conn.execute("SELECT domain, connector, source, count(*) FROM invalid_recipients WHERE at >= ? "
                                "GROUP BY domain, connector, source ORDER BY count(*) DESC", (since,)).fetchall()
        return await self._read(q)


_INCIDENT_COLUMNS = "id, connector, code, state, opened_at, resolved_at, data"

# SQLite's "database or disk is full" and PostgreSQL's disk_full: the receiver says 452 4.3.1.
_FULL_CODES = {"SQLITE_FULL", "53100"}


def _driver_error(what: str, exc: Exception) -> StoreError:
    """The StoreError for a driver's exception (StoreFull when the disk under it is full)."""
    code = getattr(exc, "sqlite_errorname", None) or getattr(exc, "sqlstate", None)
    err = (StoreFull if code in _FULL_CODES else StoreError)(f"{what}: {first_line(exc)}", code=code)
    err.__cause__ = exc
    return err


def _incident(row: tuple) -> dict:
    id_, connector, code, state, opened_at, resolved_at, data = row
    return {"id": id_, "connector": connector, "code": code, "state": state, "opened_at": opened_at,
            "resolved_at": resolved_at, **json.loads(data)}


def _bytes(data) -> bytes | None:
    """BLOB (sqlite3: bytes) or BYTEA (psycopg: memoryview) as bytes."""
    return None if data is None else bytes(data)


def first_line(exc: BaseException) -> str:
    """A driver error in one line (psycopg's run over several, with hints)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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


def _insert_message(conn: Any, msg: NewMessage) -> list[str]:
    groups: dict[str, tuple[Route, list[str]]] = {}
    for address, route in msg.recipients:
        groups.setdefault(route.key, (route, []))[1].append(address)
    body_id = _insert_with_new_id(
        conn, "INSERT INTO bodies (id, data, path, size, refs) VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
        (msg.body.data, msg.body.path, msg.body.size, len(groups)))
    ids = []
    for route, addresses in groups.values():
        entry_id = _insert_with_new_id(conn, _INSERT_ENTRY, (
            body_id, msg.sender, msg.received_at, msg.expires_at, msg.received_at, route.kind.value,
            route.name, route.domain, msg.body.size, msg.message_id, msg.client, int(msg.is_dsn),
            len(addresses)))
        conn.executemany("INSERT INTO recipients (entry_id, position, address, status) "
                         "VALUES (?, ?, ?, 'pending')",
                         [(entry_id, i, a) for i, a in enumerate(addresses)])
        ids.append(entry_id)
    return ids


def _remove(conn: Any, entry_id: str, body_id: str, cleanup: list, had_attempts: bool = True) -> None:
    conn.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
    conn.execute("DELETE FROM recipients WHERE entry_id = ?", (entry_id,))
    if had_attempts:
        conn.execute("DELETE FROM attempts WHERE entry_id = ?", (entry_id,))
    # The last entry using the body deletes it; others only drop their reference.
    row = conn.execute("DELETE FROM bodies WHERE id = ? AND refs <= 1 RETURNING path", (body_id,)).fetchone()
    if row is None:
        conn.execute("UPDATE bodies SET refs = refs - 1 WHERE id = ?", (body_id,))
    elif row[0]:
        cleanup.append(row[0])


def _select(selector: Selector) -> tuple[str, tuple]:
    if selector.all:
        return "1", ()
    if selector.connector:
        return "route_name = ?", (selector.connector,)
    marks = ",".join("?" * len(selector.ids))
    return f"id IN ({marks})", tuple(i.upper() for i in selector.ids)


def _entry(row: tuple) -> Entry:
    (id_, body_id, sender, received_at, expires_at, status, attempts, next_attempt_at, route_kind,
     route_name, route_domain, size, message_id, client, is_dsn, first_failure_at, lease_owner,
     lease_until, delay_notified, notice_pending) = row
    leased = lease_owner is not None and (lease_until or 0) > time.time()
    return Entry(
        id=id_, sender=sender, received_at=received_at, expires_at=expires_at,
        status=EntryStatus.ACTIVE if leased else EntryStatus(status),
        attempts=attempts, next_attempt_at=next_attempt_at,
        route=Route(RouteKind(route_kind), route_name, route_domain), size=size,
        message_id=message_id, body_id=body_id, client=client, is_dsn=bool(is_dsn),
        first_failure_at=first_failure_at, lease_owner=lease_owner if leased else None,
        delay_notified=bool(delay_notified),
        notice_pending=json.loads(notice_pending) if notice_pending else None)


def _attach_bodies(conn: Any, entries: list[Entry]) -> None:
    if not entries:
        return
    ids = list({e.body_id for e in entries})
    marks = ",".join("?" * len(ids))
    bodies = {id_: StoredBody(size=size, data=_bytes(data), path=path) for id_, data, path, size in conn.execute(
        f"SELECT id, data, path, size FROM bodies WHERE id IN ({marks})", ids)}
    for e in entries:
        e.body = bodies.get(e.body_id)


def _attach_recipients(conn: Any, entries: list[Entry], include_final: bool = False) -> None:
    if not entries:
        return
    by_id = {e.id: e for e in entries}
    marks = ",".join("?" * len(by_id))
    sql = (f"SELECT entry_id, position, address, status, last_error FROM recipients "
           f"WHERE entry_id IN ({marks})")
    if not include_final:
        sql += " AND status IN ('pending', 'deferred')"
    for entry_id, position, address, status, last_error in conn.execute(sql + " ORDER BY entry_id, position",
                                                                        tuple(by_id)):
        by_id[entry_id].recipients.append(Recipient(
            address=address, status=RecipientStatus(status), position=position,
            last_error=Failure.from_dict(json.loads(last_error)) if last_error else None))
