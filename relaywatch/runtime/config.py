"""The running config: the file's, with the store's Fix-now overrides on top.

One ``RunningConfig`` per process.  It changes in two ways only: SIGHUP
re-reads the file (``reload``), and a Fix now (or its undo) writes an
override into the store, which every process picks up within two seconds
(``refresh``, polled by ``watch_overrides``; SIGUSR1 makes it look at once).
Each change replaces the whole ``Config`` (it is frozen), so whoever takes
one ``snapshot()`` for an operation sees every value of one version.

Values a component sizes once (the scheduler's connection slots) follow a
change through ``subscribe``: the callback gets the config before and after,
on every change, in the order subscribed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from relaywatch.config import Config, apply_overrides, load_config
from relaywatch.watch_records import Override, OverrideKey
from relaywatch.errors import ConfigError
from relaywatch.store.base import Selector

log = logging.getLogger("relaywatch.app")

Subscriber = Callable[[Config, Config], None]
OVERRIDES_POLL = 2.0


class RunningConfig:
    def __init__(self, file_config: Config):
        self.file = file_config                   # as read from the file
        self.overrides: dict[OverrideKey, Override] = {}   # as read from the store
        self._current = file_config
        self._overrides_seen: object = None       # the store's overrides version applied
        self._subscribers: list[Subscriber] = []

    def snapshot(self) -> Config:
        """The config in force now; take one per operation."""
        return self._current

    def subscribe(self, callback: Subscriber) -> None:
        self._subscribers.append(callback)

    def _replace(self, new: Config) -> Config:
        before, self._current = self._current, new
        for callback in self._subscribers:
            callback(before, new)
        return before

    def reload(self) -> bool:
        """Re-read the file (SIGHUP).  A file with errors changes nothing: it is
        logged with every problem, and the running config stays."""
        current = self._current
        if current.source is None:
            return False
        try:
            new = load_config(current.source)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config:\n%s", exc)
            return False
        if new.server.listen != current.server.listen or new.server.data_dir != current.server.data_dir:
            log.warning("server.listen and server.data_dir changes take effect at the next restart")
        if new.http.listen != current.http.listen or (new.http.tls_cert, new.http.tls_key) != (
                current.http.tls_cert, current.http.tls_key):
            log.warning("http.listen and the console's certificate take effect at the next restart "
                        "(http.tokens changed now)")
        self.file = new
        # The new file with the overrides already in force: no moment without them.
        self._replace(apply_overrides(new, self.overrides))
        return True

    async def refresh(self, store) -> Config | None:
        """Apply the store's overrides if they changed; the config before, or None."""
        version = await store.overrides_version()
        if version == self._overrides_seen:
            return None
        self._overrides_seen = version
        self.overrides = await store.overrides()
        return self._replace(apply_overrides(self.file, self.overrides))


async def release_unpaused_connectors(actions, before: Config, after: Config) -> None:
    """A connector un-paused: its held-back mail is due now, not at the next recheck
    (through the queue's one release entry point, deliver/queue_actions.py)."""
    for c in after.connectors:
        old = before.connector(c.name)
        if old is not None and old.paused and not c.paused:
            await actions.retry_now(Selector(connector=c.name))


async def watch_overrides(refresh: Callable[[], Awaitable[bool]], interval: float = OVERRIDES_POLL) -> None:
    """Poll for changed overrides.  Fixes are written by the CLI into the store;
    every process picks them up within ``interval`` (no signal needed, none can be lost)."""
    while True:
        await asyncio.sleep(interval)
        try:
            if await refresh():
                log.info("applied changed overrides (relaywatch config show lists them)")
        except Exception as exc:
            log.error("could not read overrides: %s", exc)
