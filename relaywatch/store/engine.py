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
others run again, each in a SAVEPOINT.  Reads run on other threads with their
own connections, so they never wait for the writer.

This module is the engine's face: the ``Dialect`` and ``GroupCommitEngine``, which
opens and closes the parts and hands them the writes and reads.  The parts, one
job each: store/writer.py's ``Writer`` is the writer thread (the batches, the
write connection, reconnecting with capped backoff while the store is down);
store/batch.py's ``BatchRunner`` runs one batch (savepoints once an op failed,
the batch again after a lost lock conflict, one commit, then the futures);
store/readers.py's ``ReaderPool`` keeps a read connection per thread.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, Callable, Protocol

from relaywatch.errors import StoreError
from relaywatch.store.batch import BatchRunner
from relaywatch.store.readers import ReaderPool
from relaywatch.store.writer import Writer


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
    forget_message_id: str | None   # drops an entry's message_ids row when no trace is kept (None: a trigger does)

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
        self._ops: queue.SimpleQueue = queue.SimpleQueue()   # (fn, announce, loop, future, first); None: stop
        self._batches = BatchRunner(dialect)
        self._writer = Writer(dialect, self._ops, self._batches)
        self._writer_thread: threading.Thread | None = None
        self._readers = ReaderPool(dialect)

    @property
    def where(self) -> str:
        return self.dialect.where

    @property
    def is_open(self) -> bool:
        return self._writer_thread is not None

    @property
    def conflicts_retried(self) -> int:
        """Batches run again after a lost lock conflict (store/batch.py _run_ops)."""
        return self._batches.conflicts_retried

    # -- lifecycle -----------------------------------------------------------

    async def open(self) -> None:
        self._readers.open()
        try:
            conn = await asyncio.to_thread(self.dialect.connect_writer)
        except self.dialect.errors as exc:
            raise StoreError(f"cannot open queue store {self.dialect.where}: {exc}") from exc
        self._writer_thread = threading.Thread(target=self._writer.run, args=(conn,),
                                               name="relaywatch-store-writer", daemon=True)
        self._writer_thread.start()

    async def close(self) -> None:
        if self._writer_thread is not None:
            self._ops.put(None)
            await asyncio.to_thread(self._writer_thread.join)
            self._writer_thread = None
        await asyncio.to_thread(self._readers.close)

    # -- writes and reads ------------------------------------------------------

    async def write(self, fn: Callable[[Any, list], Any], announce: bool = False, first: bool = False) -> Any:
        """``fn``'s result once committed.  ``announce``: if that result is true, it made
        work due, which the batch tells other nodes of (the dialect's ``announce``).
        ``first``: ``fn`` locks the leader row (store/cluster.py), which every transaction
        takes before any other row: it runs ahead of the rest of its batch."""
        if self._writer_thread is None:
            raise StoreError("queue store is not open")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._ops.put((fn, announce, loop, fut, first))
        return await fut

    async def read(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(conn)``'s result, on a reader thread's own connection (store/readers.py)."""
        return await asyncio.to_thread(self._readers.run, fn)
