"""The SQL store: the queue's and the watch's operations on one group-commit engine.

    SqlStore = SqlQueue (store/queue.py) + SqlWatch (store/watch.py) + SqlConsole (store/console.py)
               + SqlCluster (store/cluster.py) + SqlTlsReports (store/tls_reports.py)
               on a GroupCommitEngine (store/engine.py) with a Dialect (store/sqlite.py, store/postgres.py)

Other processes (the CLI, a second node) open their own store on the same database.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from relaywatch.store.cluster import SqlCluster
from relaywatch.store.console import SqlConsole
from relaywatch.store.engine import Dialect, GroupCommitEngine
from relaywatch.store.queue import SqlQueue, lease_sql
from relaywatch.store.tls_reports import SqlTlsReports
from relaywatch.store.watch import SqlWatch


class SqlStore(SqlQueue, SqlWatch, SqlConsole, SqlCluster, SqlTlsReports):
    def __init__(self, dialect: Dialect, on_work: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.time):
        self.dialect = dialect
        self.clock = clock
        self.engine = GroupCommitEngine(dialect)
        self.lease_sql = lease_sql(dialect.lease_lock)
        # Called (on the event loop) after a commit that made work due, so the
        # scheduler wakes at once instead of at its next poll.
        self.on_work = on_work

    @property
    def where(self) -> str:
        return self.dialect.where

    @property
    def single_node(self) -> bool:
        return self.dialect.single_node

    @property
    def inline_bodies(self) -> bool:
        return self.dialect.inline_bodies

    async def open(self) -> None:
        await self.engine.open()
        # A scheduler (on_work) wants to hear of work other nodes made due.
        self.dialect.start(asyncio.get_running_loop(), self._wake if self.on_work is not None else None)

    async def close(self) -> None:
        await asyncio.to_thread(self.dialect.stop)
        await self.engine.close()
        self.dialect.release()

    def _wake(self) -> None:
        if self.on_work is not None:
            self.on_work()

    def _notify(self) -> None:
        """After a commit that made work due: wake our scheduler.  Other nodes hear
        of it from the commit itself (``engine.write(..., announce=True)``)."""
        self._wake()

    async def _read(self, fn: Callable[[Any], Any]) -> Any:
        """A read of the caller's own (tests and tools look at the tables)."""
        return await self.engine.read(fn)
