"""Queue stores: SQLite (embedded default) or PostgreSQL (several nodes), one interface."""

from __future__ import annotations

import time
from typing import Callable

from relaywatch.config import Config
from relaywatch.store.base import Store


def open_store(config: Config, on_work=None, sync_commits: bool = True, checkpoints: bool = False,
               clock: Callable[[], float] = time.time) -> Store:
    """The store ``server.store`` names: "sqlite" (a file in data_dir) or a postgresql:// URL.

    ``sync_commits=False``: the caller only leases and records outcomes (the
    delivering process); ``checkpoints``: the caller keeps SQLite's WAL short
    (one process of a running relay); see SqliteStore.  ``clock``: the time of
    operations called without a ``now`` (relaywatch/clock.py's ``now``); ``server.delivery_sync_commits``
    makes the delivering process's commits wait for the disk as well."""
    sync_commits = sync_commits or config.server.delivery_sync_commits
    if config.server.store.startswith(("postgresql://", "postgres://")):
        from relaywatch.store.postgres import PostgresStore
        store = PostgresStore(config.server.store, on_work, statement_timeout=config.server.store_statement_timeout,
                              sync_commits=sync_commits, prepare=config.server.store_prepared_statements,
                              clock=clock)
    else:
        from relaywatch.store.sqlite import SqliteStore
        store = SqliteStore(config.store_path, on_work, sync_commits=sync_commits, checkpoints=checkpoints,
                            clock=clock)
    store.trace_retention = config.queue.trace_retention
    return store
