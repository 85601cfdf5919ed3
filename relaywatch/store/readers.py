"""The engine's readers: a connection per reader thread, so reads never wait for the writer.

``ReaderPool.run`` runs ``fn(conn)`` on the calling thread's own connection (the
engine calls it through ``asyncio.to_thread``), made on first use.  A connection
kept from earlier that broke is dropped and the read tried once more on a new one
(reads change nothing); while new ones cannot be made, reads fail at once until
the backoff's next try.  ``close`` waits out a read still running before it
closes the connections.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from relaywatch.errors import StoreError
from relaywatch.store.backoff import Backoff
from relaywatch.store.driver_errors import close_quietly, driver_error, first_line

if TYPE_CHECKING:
    from relaywatch.store.engine import Dialect


class ReaderPool:
    def __init__(self, dialect: Dialect):
        self.dialect = dialect
        self._local = threading.local()
        self._readers: list[Any] = []
        self._readers_lock = threading.Lock()
        self._readers_idle = threading.Condition()
        self._reads_in_flight = 0
        self._closed = False
        self._reader_backoff = Backoff()
        self._reader_backoff_lock = threading.Lock()

    def open(self) -> None:
        self._closed = False
        self._local = threading.local()    # no reader connection from an earlier open

    def close(self) -> None:
        """Close every reader connection (blocking: run it on a thread)."""
        # A read still running on an executor thread (its task was cancelled, the
        # thread was not) must finish before its connection is closed: closing a
        # connection another thread is using crashes the interpreter.
        with self._readers_idle:
            self._closed = True
            self._readers_idle.wait_for(lambda: self._reads_in_flight == 0, timeout=30)
            for conn in self._readers:
                conn.close()
            self._readers.clear()

    def run(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(conn)`` on this thread's read connection; driver errors as StoreError."""
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
        close_quietly(conn)

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
