"""Relaywatch: wires the store, the receiver and the scheduler together.

Lifecycle: SIGTERM/SIGINT stop accepting, let deliveries in flight finish
within ``server.shutdown_grace`` and return the rest of the leases; SIGHUP
re-reads the config (routing, limits, timeouts) without dropping connections.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

from relaywatch.config import Config, load_config
from relaywatch.deliver.resolver import Resolver
from relaywatch.deliver.scheduler import Scheduler
from relaywatch.deliver.smtp import SmtpRoutes
from relaywatch.errors import ConfigError
from relaywatch.receive.server import Receiver
from relaywatch.receive.spool import sweep_orphans
from relaywatch.store.sqlite import SqliteStore

log = logging.getLogger("relaywatch.app")


class Relaywatch:
    def __init__(self, config: Config, clock=time.time):
        self.config = config
        self.clock = clock
        self.store = SqliteStore(config.store_path)
        self.resolver = Resolver(config.dns)
        self.routes = SmtpRoutes(self.get_config, self.resolver)
        self.scheduler = Scheduler(self.get_config, self.store, self.routes, clock)
        self.store.on_work = self.scheduler.notify
        self.receiver = Receiver(self.get_config, self.store, clock)
        self._scheduler_task: asyncio.Task | None = None
        self._stopped = asyncio.Event()

    def get_config(self) -> Config:
        return self.config

    @property
    def pid_file(self) -> Path:
        return self.config.server.data_dir / "relaywatch.pid"

    async def start(self) -> None:
        data_dir = self.config.server.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        await self.store.open()
        # One node owns an SQLite queue: leases left by an earlier run of it are
        # stale, so its messages are due again right away, not after lease_time.
        returned = await self.store.release_leases(None, self.clock())
        if returned:
            log.info("returned %d message(s) leased by a previous run", returned)
        spool = data_dir / "spool"
        spool.mkdir(parents=True, exist_ok=True)
        swept = sweep_orphans(spool, await self.store.spool_paths())
        if swept:
            log.info("removed %d incomplete spool file(s) left by a crash", swept)
        await self.receiver.start()
        self._scheduler_task = asyncio.create_task(self.scheduler.run(), name="scheduler")
        self.pid_file.write_text(str(os.getpid()))
        log.info("relaywatch listening on %s; queue %s",
                 ", ".join(f"{h}:{p}" for h, p in self.receiver.addresses), self.config.store_path)

    async def stop(self) -> None:
        await self.receiver.stop()
        await self.scheduler.stop(self.config.server.shutdown_grace)
        if self._scheduler_task is not None:
            self._scheduler_task.cancel()
            await asyncio.gather(self._scheduler_task, return_exceptions=True)
        await self.store.close()
        try:
            self.pid_file.unlink()
        except OSError:
            pass
        self._stopped.set()

    def reload(self) -> bool:
        if self.config.source is None:
            return False
        try:
            new = load_config(self.config.source)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config:\n%s", exc)
            return False
        if new.server.listen != self.config.server.listen or new.server.data_dir != self.config.server.data_dir:
            log.warning("server.listen and server.data_dir changes take effect at the next restart")
        self.config = new
        self.scheduler.notify()
        log.info("configuration reloaded from %s", new.source)
        return True

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.start()
        try:
            await stop.wait()
            log.info("stopping: no new connections; waiting up to %.0fs for deliveries in flight",
                     self.config.server.shutdown_grace)
        finally:
            await self.stop()
