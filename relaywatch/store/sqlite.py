"""SQLite queue store (the embedded default): WAL, synchronous=FULL, one file in data_dir.

The SQLite dialect of the group-commit engine (store/engine.py): connecting,
taking the write lock, keeping the WAL short.  Beside the queue file:
``queue.sqlite3-writelock``, the lock file the receiving and the delivering
process take turns on (see SqliteDialect.begin).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from typing import Callable
from pathlib import Path

from relaywatch.errors import StoreError
from relaywatch.store import message_ids, schema
from relaywatch.store.sql import SqlStore

_LOCK_WAIT_LIMIT = 30.0

SCHEMA = schema.render("sqlite")


_CHECKPOINT_INTERVAL = 0.1     # seconds between checkpoints by the delivering process
_WAL_SAFETY_PAGES = 16384      # 64 MB: a commit checkpoints only past this
_WAL_RESTART_PAGES = 1000      # the WAL is brought back to its start past this (SQLite's default)


class SqliteStore(SqlStore):
    """The queue in one SQLite file; see SqliteDialect for ``sync_commits`` and ``checkpoints``."""

    def __init__(self, path: str | os.PathLike, on_work=None, sync_commits: bool = True,
                 checkpoints: bool = False, clock: Callable[[], float] = time.time):
        super().__init__(SqliteDialect(path, sync_commits=sync_commits, checkpoints=checkpoints), on_work, clock)
        self.path = self.dialect.path


class SqliteDialect:
    name = "sqlite"
    errors = (sqlite3.Error,)
    lease_lock = ""
    last_reply = "(r.last_error ->> 'reply')"
    row_share = ""
    row_lock = ""
    single_node = True
    inline_bodies = False
    counts_by_delta = False
    announce = None
    forget_message_id = message_ids.SQLITE_FORGET

    def __init__(self, path: str | os.PathLike, sync_commits: bool = True, checkpoints: bool = False):
        self.path = Path(path)
        # Copying the WAL back into the database (a checkpoint) is left out of the
        # commits: SQLite would run it inside whichever COMMIT crossed the
        # threshold, holding the write lock and adding an fsync to a client's 250.
        # The store with ``checkpoints`` (the delivering process) runs them on a
        # thread of their own; the rest only checkpoint past _WAL_SAFETY_PAGES,
        # should nobody else be doing it.
        self.checkpoints = checkpoints
        self._checkpointer: threading.Thread | None = None
        self._stop_checkpoints = threading.Event()
        # False only for the delivering process: what it commits (leases,
        # outcomes) may be lost to a power cut, which means a redelivery, never a
        # lost message, and the receiver's FULL commits still sync the shared WAL.
        self.sync_commits = sync_commits
        self._lock_fd: int | None = None

    @property
    def where(self) -> str:
        return str(self.path)

    def connect_writer(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._lock_fd is None:
            self._lock_fd = self._open_lock()
        conn = _connect(self.path)
        _migrate(conn)
        # One transaction: queue_counts' triggers and the count they start from (schema.counting),
        # message_ids' and its fill (store/message_ids.py).  One node: the indexes message_ids replaced go.
        retired = "".join(f"DROP INDEX IF EXISTS {name};\n" for name in message_ids.RETIRED_INDEXES)
        conn.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}\n{schema.counting('sqlite')}\n{message_ids.triggers('sqlite')}\n"
                           f"{retired}COMMIT;")
        self._configure_writer(conn)
        return conn

    def reconnect_writer(self) -> sqlite3.Connection:
        # After a failed batch (a disk error, the lock held past _LOCK_WAIT_LIMIT):
        # a new connection, since SQLite may leave the old one mid-transaction.
        conn = _connect(self.path)
        self._configure_writer(conn)
        return conn

    def _configure_writer(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA busy_timeout=0")   # the writer waits for the lock itself (begin)
        conn.execute(f"PRAGMA wal_autocheckpoint={_WAL_SAFETY_PAGES}")
        if not self.sync_commits:
            conn.execute("PRAGMA synchronous=NORMAL")

    def start(self, loop, wake) -> None:
        if self.checkpoints:
            self._stop_checkpoints.clear()
            self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="relaywatch-checkpoint",
                                                  daemon=True)
            self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        conn = _connect(self.path)
        conn.execute("PRAGMA busy_timeout=0")
        lock_fd = self._open_lock()
        try:
            while not self._stop_checkpoints.wait(_CHECKPOINT_INTERVAL):
                try:
                    # PASSIVE: copies what no reader still needs, without waiting
                    # for or blocking the writers...
                    _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if frames >= _WAL_RESTART_PAGES:
                        # ...but the WAL only starts over from its beginning once a
                        # checkpoint caught up with the last commit, which never
                        # happens while two processes keep committing.  Holding the
                        # writers off for the few frames written meanwhile lets it.
                        fcntl.flock(lock_fd, fcntl.LOCK_EX)
                        try:
                            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                        finally:
                            fcntl.flock(lock_fd, fcntl.LOCK_UN)
                except sqlite3.Error:
                    pass   # busy now; the next round catches up
        finally:
            os.close(lock_fd)
            conn.close()

    def stop(self) -> None:
        if self._checkpointer is not None:
            self._stop_checkpoints.set()
            self._checkpointer.join()
            self._checkpointer = None

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def connect_reader(self) -> sqlite3.Connection:
        return _connect(self.path)

    def _open_lock(self) -> int:
        path = f"{self.path}-writelock"
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open the queue's lock file {path}: {exc.strerror}") from exc

    def begin(self, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE, after taking the writers' lock file.

        The receiving and the delivering process both write, hundreds of times
        a second.  SQLite only lets a waiting writer poll; a blocking flock()
        on a lock file beside the database hands the turn over the moment the
        other process commits (the kernel wakes the waiter), and neither
        process sleeps while the database is free.  Writers that do not take
        the lock (an admin's sqlite3 shell) are still waited for below.
        """
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._begin_immediate(conn)

    def end(self, conn: sqlite3.Connection) -> None:
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def broken(self, conn: sqlite3.Connection) -> bool:
        return False   # a file: a failed batch gets a new connection anyway (reconnect_writer)

    def _begin_immediate(self, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE, waiting for another writer ourselves.

        SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25... ms between
        tries; with a receiving and a delivering process committing hundreds of
        times a second that backoff, not the work, would set the pace.  Short
        sleeps hand the lock over within a fraction of a millisecond.
        """
        delay, waited = 0.0001, 0.0
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if waited > _LOCK_WAIT_LIMIT:
                    raise
                time.sleep(delay)
                waited += delay
                delay = min(delay * 2, 0.002)


def _migrate(conn: sqlite3.Connection) -> None:
    """Add the columns a queue made by an earlier version lacks."""
    columns = {table: {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
               for table in schema.MIGRATED_TABLES}
    for table, column, definition, fill in schema.missing_columns(columns):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        conn.execute(fill)
        conn.execute("COMMIT")


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    # Debian's SQLite zeroes every freed page (SQLITE_SECURE_DELETE), which writes each
    # delivered body a second time. A deleted queue file's blocks are not wiped either.
    conn.execute("PRAGMA secure_delete=OFF")
    return conn


