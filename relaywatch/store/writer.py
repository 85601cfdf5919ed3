"""The engine's writer thread: the only write connection, the batches, reconnecting.

``Writer.run`` is the thread.  It takes every operation waiting on the engine's queue
(up to MAX_BATCH) as one batch, the leader row's first, and has store/batch.py's
``BatchRunner`` run and commit it.

When a batch fails as a whole (the database went away, a disk error, a lock held
too long) its callers get StoreError (StoreFull when the disk is full:
driver_error); the writer drops the connection and opens a new one with capped
exponential backoff (``Backoff``), failing what arrives meanwhile at once rather
than letting it wait.  A batch whose connection was found broken before anything
of it ran goes to a new connection at once.  The store logs one line when it goes
away and one when a commit works again.
"""

from __future__ import annotations

import logging
import queue
import time
from typing import TYPE_CHECKING, Any

from relaywatch.errors import StoreError, StoreFull
from relaywatch.store.backoff import Backoff
from relaywatch.store.batch import BatchRunner, Unstarted, settle_all
from relaywatch.store.driver_errors import FULL_CODES, close_quietly, error_code, first_line

if TYPE_CHECKING:
    from relaywatch.store.engine import Dialect

MAX_BATCH = 256

log = logging.getLogger("relaywatch.store")

_RECONNECT = object()   # the writer woke with nothing to do but reconnect


class Writer:
    def __init__(self, dialect: Dialect, ops: queue.SimpleQueue, batches: BatchRunner):
        self.dialect = dialect
        self._ops = ops                          # GroupCommitEngine.write's; None: stop
        self._batches = batches
        self._down_since: float | None = None    # the last batch failed as a whole (see run)
        self._down_code: str | None = None      # the driver error code of that failure (full disk?)

    def run(self, conn: Any) -> None:
        backoff = Backoff()
        while True:
            # Without a connection, wake for the next try even if nothing waits.
            timeout = None if conn is not None else max(0.0, backoff.next_try - time.monotonic())
            try:
                first = self._ops.get(timeout=timeout)
            except queue.Empty:
                first = _RECONNECT
            if first is None:
                close_quietly(conn)
                return
            batch = [] if first is _RECONNECT else [first]
            stop = False
            while batch and len(batch) < MAX_BATCH:
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
                close_quietly(conn)
                return

    def _commit(self, conn: Any, batch: list, backoff: Backoff) -> Any:
        """Run ``batch`` on ``conn`` (None: there is none now); the connection to go on with."""
        if conn is None:
            # Not a wait for the next try: the client is answered 451 now.
            settle_all(batch, self._unavailable(backoff))
            return None
        failure = self._batches.run(conn, batch, may_defer=True)
        if isinstance(failure, Unstarted):
            # The connection died while idle (a failover, a cut link, a DBA's
            # pg_terminate_backend): nothing of the batch ran, so it goes to a
            # new connection at once rather than failing.
            close_quietly(conn)
            conn = self._try_reconnect(backoff)
            if conn is None:
                self._store_failed(failure.cause)
                settle_all(batch, self._unavailable(backoff))
                return None
            failure = self._batches.run(conn, batch)
        if failure is None:
            self._store_works()
            return conn
        self._store_failed(failure)
        # Whatever broke it (a cut connection, a disk error, a lock that was
        # never released), a new connection starts clean.
        close_quietly(conn)
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
