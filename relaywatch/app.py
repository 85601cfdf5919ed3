"""Relaywatch: wires the store, the receiver and the scheduler together.

Two roles share one queue: *receive* (the SMTP server, committing to the
store) and *deliver* (the scheduler).  With ``server.delivery_process``
(default: when the machine has more than one core) ``serve`` runs the
receiver and supervises a child process for delivery, so each role gets a
core, as Postfix's smtpd and qmgr/smtp are separate processes.  The parent
wakes the child through a pipe after each commit, so a new message waits for
no poll.  Otherwise both roles run in one process.

Lifecycle: SIGTERM/SIGINT stop accepting, let deliveries in flight finish
within ``server.shutdown_grace`` and return the rest of the leases; SIGHUP
re-reads the config (routing, limits, timeouts) without dropping
connections; SIGUSR1 (sent by ``relaywatch queue retry``) wakes the
scheduler at once.

A delivery process that dies is restarted after a back-off that doubles
with each crash in a row (1 s to 60 s) and starts over once a process has
run for ``server.delivery_restart_reset``: a crash after healthy hours costs
a second, not a minute without delivery.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from enum import Enum

from relaywatch.config import Config
from relaywatch.deliver.callout import SmtpCallout
from relaywatch.deliver.resolver import Resolver
from relaywatch.deliver.scheduler import Scheduler
from relaywatch.deliver.smtp import SmtpRoutes
from relaywatch.errors import ConfigError
from relaywatch.receive.server import Receiver
from relaywatch.receive.spool import sweep_orphans
from relaywatch.runtime import control
from relaywatch.runtime.config import RunningConfig, release_unpaused_connectors, watch_overrides
from relaywatch.store import open_store
from relaywatch.watch.monitor import Monitor

log = logging.getLogger("relaywatch.app")


class RestartBackoff:
    """How long to wait before restarting a process that exited (pure).

    Doubles from ``first`` to ``limit`` while crashes come in a row; a process
    that ran for ``healthy_after`` or longer was healthy, and the next restart
    waits ``first`` again."""

    def __init__(self, healthy_after: float, first: float = 1.0, limit: float = 60.0):
        self.healthy_after = healthy_after
        self.first = first
        self.limit = limit
        self._next = first

    def after_exit(self, ran_for: float) -> float:
        """The wait before the next start, given how long the process that exited ran."""
        if ran_for >= self.healthy_after:
            self._next = self.first
        delay = self._next
        self._next = min(self._next * 2, self.limit)
        return delay


class Role(str, Enum):
    """What one process of the relay does (``serve --role``, hidden: serve picks it)."""
    ALL = "all"            # receive and deliver in this process
    RECEIVE = "receive"    # receive, and supervise a delivery process (runtime/child.py)
    DELIVER = "deliver"    # deliver only: the child of a RECEIVE process

    @property
    def receives(self) -> bool:
        return self is not Role.DELIVER

    @property
    def delivers(self) -> bool:
        return self is not Role.RECEIVE


class Relaywatch:
    def __init__(self, config: Config, clock=time.time, role: Role = Role.ALL, wake_fd: int | None = None):
        self.running = RunningConfig(config)   # file + Fix-now overrides; one snapshot per operation
        self.clock = clock
        self.role = role = Role(role)
        # Only a delivering process that receives nothing may skip fsync (see SqliteStore).
        self.store = open_store(config, sync_commits=role.receives, checkpoints=role.delivers)
        self.receiver: Receiver | None = None
        self.scheduler: Scheduler | None = None
        # Both roles may talk SMTP to destinations: deliveries, and recipient
        # verification at RCPT (receive/verify.py).
        self.resolver = Resolver(config.dns)
        self.routes = SmtpRoutes(self.running.snapshot, self.resolver)
        self.callout: SmtpCallout | None = None
        if role.delivers:
            self.scheduler = Scheduler(self.running.snapshot, self.store, self.routes, clock)
            self.running.subscribe(self.scheduler.reconfigure)
            self.store.on_work = self.scheduler.notify
            self.monitor = Monitor(self.running.snapshot, self.store, self.routes, self.scheduler.retry_now, clock)
            self.scheduler.observer = self.monitor.on_attempt
        if role.receives:
            self.callout = SmtpCallout(self.routes)
            # Alerts that the relay cannot queue go out from here too (watch/store_incident.py).
            self.receiver = Receiver(self.running.snapshot, self.store, clock, self.callout, alert_routes=self.routes)
        self._wake_fd = wake_fd        # a socketpair end: DELIVER's and RECEIVE's
        self._wake_pending = False
        self._scheduler_task: asyncio.Task | None = None
        self._tasks: list[asyncio.Task] = []
        self._child: subprocess.Popen | None = None
        self._child_started = 0.0
        self._supervisor: asyncio.Task | None = None
        self._stopping = False
        self._stop_event = asyncio.Event()
        self.console = None            # the HTTP console (relaywatch/console/), in the receiving process

    @property
    def config(self) -> Config:
        """The running config now (file + overrides)."""
        return self.running.snapshot()

    @property
    def file_config(self) -> Config:
        """The config as read from the file, without overrides."""
        return self.running.file

    def _make_data_dir(self) -> None:
        data_dir = self.config.server.data_dir
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:   # serve checked first (preflight.py); this is the race
            raise ConfigError(f"server.data_dir: cannot create {data_dir}: {exc.strerror}") from exc

    async def start(self) -> None:
        data_dir = self.config.server.data_dir
        self._make_data_dir()
        await self.store.open()
        await self.refresh_overrides()
        self._tasks.append(asyncio.create_task(watch_overrides(self.refresh_overrides), name="overrides"))
        if self.receiver is not None:
            # Only the receiving side may sweep: the spool is where it writes.
            spool = data_dir / "spool"
            spool.mkdir(parents=True, exist_ok=True)
            swept = sweep_orphans(spool, await self.store.spool_paths())
            if swept:
                log.info("removed %d incomplete spool file(s) left by a crash", swept)
        if self.scheduler is not None:
            if self.store.single_node:
                # One delivering process owns an SQLite queue: leases left by an
                # earlier run are stale, so their messages are due again right away.
                # (With PostgreSQL other nodes' leases are live; a dead node's lapse.)
                returned = await self.store.release_leases(None, self.clock())
                if returned:
                    log.info("returned %d message(s) leased by a previous run", returned)
            self._scheduler_task = asyncio.create_task(self.scheduler.run(), name="scheduler")
            self._tasks.append(asyncio.create_task(self.monitor.run(), name="monitor"))
            if self._wake_fd is not None:
                os.set_blocking(self._wake_fd, False)
                asyncio.get_running_loop().add_reader(self._wake_fd, self._woken)
                try:
                    os.write(self._wake_fd, b"R")   # ready: the receiver may open its port
                except OSError:
                    pass   # the receiver is gone; _woken sees the end of file
        if self.receiver is not None:
            if self._wake_fd is not None:
                self.store.on_work = self._wake_child
                await self._wait_for_child()
            try:
                await self.receiver.start()
            except OSError as exc:
                # serve bound every address before it began (preflight.py); this is
                # an address taken since.  Nothing may stay listening.
                await self.receiver.stop()
                raise ConfigError(f"server.listen: cannot listen: {exc}") from exc
            log.info("relaywatch listening on %s; queue %s",
                     ", ".join(f"{h}:{p}" for h, p in self.receiver.addresses), self.store.where)
            if self.config.http.listen is not None:
                from relaywatch.console.server import Console   # imported only where it serves
                self.console = Console(self)
                try:
                    await self.console.start()
                except OSError as exc:   # taken since serve checked it (preflight.py)
                    raise ConfigError(f"http.listen: cannot listen: {exc}") from exc
        elif self.role is Role.DELIVER:
            from relaywatch.console.metrics import export_counters   # the console adds them to its own
            self._tasks.append(asyncio.create_task(export_counters(data_dir), name="counters"))

    def _woken(self) -> None:
        try:
            while True:
                data = os.read(self._wake_fd, 4096)
                if not data:
                    # End of file: the receiving process is gone (even killed with
                    # SIGKILL).  A delivering child must not outlive it: the next
                    # run starts its own and takes over the queue.
                    asyncio.get_running_loop().remove_reader(self._wake_fd)
                    log.error("the receiving process is gone; the delivery process stops")
                    self._stop_event.set()
                    return
        except BlockingIOError:
            pass
        self.scheduler.notify()

    async def _wait_for_child(self, timeout: float = 30.0) -> None:
        """Open the SMTP port only once the delivery process runs.

        Its start (Python, imports, the store) takes about half a second on the
        bench machine; mail accepted before it would wait that long.  Receiving
        never depends on delivery, though: past ``timeout``, or if the child
        died, the port opens anyway (the supervisor restarts the child)."""
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def readable() -> None:
            try:
                os.read(self._wake_fd, 64)
            except BlockingIOError:
                return
            except OSError:
                pass
            if not ready.done():
                ready.set_result(None)
        loop.add_reader(self._wake_fd, readable)
        try:
            deadline = loop.time() + timeout
            while not ready.done() and self._child.poll() is None and loop.time() < deadline:
                await asyncio.wait({ready}, timeout=0.05)
        finally:
            loop.remove_reader(self._wake_fd)
        if not ready.done():
            log.warning("the delivery process is not ready; accepting mail anyway (it is delivered once it is)")
        # A restarted child says "ready" again; nobody waits for it then.
        loop.add_reader(self._wake_fd, self._discard_child_messages)

    def _discard_child_messages(self) -> None:
        try:
            os.read(self._wake_fd, 64)
        except OSError:
            pass

    def _wake_child(self) -> None:
        # One byte per turn of the event loop, however many messages it queued.
        if not self._wake_pending:
            self._wake_pending = True
            asyncio.get_running_loop().call_soon(self._write_wake)

    def _write_wake(self) -> None:
        self._wake_pending = False
        try:
            os.write(self._wake_fd, b"!")
        except (BlockingIOError, BrokenPipeError):
            pass   # a full pipe already means "wake up"; a dead child is restarted

    def notify(self) -> None:
        """SIGUSR1: an operator changed the queue or the overrides; look now."""
        asyncio.get_running_loop().create_task(self.refresh_overrides())
        if self.scheduler is not None:
            self.scheduler.retry_now()
        # A child still starting up has no handler yet (SIGUSR1 would kill it);
        # it looks at the queue within a second of starting anyway.
        if self._child is not None and time.monotonic() - self._child_started > 3:
            self._child.send_signal(signal.SIGUSR1)

    async def refresh_overrides(self) -> bool:
        """Apply Fix-now overrides from the store if they changed; True if they did."""
        before = await self.running.refresh(self.store)
        if before is None:
            return False
        if self.scheduler is not None:
            await release_unpaused_connectors(self.scheduler.actions, before, self.config)
            self.scheduler.retry_now()
        return True

    async def stop(self) -> None:
        self._stopping = True
        if self.console is not None:
            await self.console.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.scheduler is not None:
            self.monitor.stop()
        if self.receiver is not None:
            await self.receiver.stop()
        if self.callout is not None:
            self.callout.close()
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        if self._child is not None:
            self._child.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self._child.wait, self.config.server.shutdown_grace + 10)
            except subprocess.TimeoutExpired:
                log.error("the delivery process did not stop in time; killing it (its leases lapse)")
                self._child.kill()
        if self.scheduler is not None:
            await self.scheduler.stop(self.config.server.shutdown_grace)
        if self._scheduler_task is not None:
            self._scheduler_task.cancel()
            await asyncio.gather(self._scheduler_task, return_exceptions=True)
        await self.store.close()

    def reload(self) -> bool:
        """SIGHUP: re-read the file; the delivery process re-reads it too."""
        if not self.running.reload():
            return False
        if self.scheduler is not None:
            self.scheduler.notify()
        if self._child is not None:
            self._child.send_signal(signal.SIGHUP)
        log.info("configuration reloaded from %s", self.config.source)
        return True

    # -- the delivery child ------------------------------------------------------------

    def _spawn_child(self, read_fd: int) -> subprocess.Popen:
        self._child_started = time.monotonic()
        return subprocess.Popen(
            [sys.executable, "-m", "relaywatch", "serve", "--role", Role.DELIVER.value, "--wake-fd", str(read_fd),
             "-c", str(self.config.source)],
            pass_fds=(read_fd,))

    async def _supervise(self, read_fd: int) -> None:
        """Restart the delivery process if it dies; its leases lapse or are returned."""
        backoff = RestartBackoff(self.config.server.delivery_restart_reset)
        while not self._stopping:
            code = await asyncio.to_thread(self._child.wait)
            if self._stopping:
                return
            ran_for = time.monotonic() - self._child_started
            backoff.healthy_after = self.config.server.delivery_restart_reset   # a reload may change it
            delay = backoff.after_exit(ran_for)
            log.error("the delivery process exited with %s after %.1fs; restarting it in %.0fs", code, ran_for, delay)
            await asyncio.sleep(delay)
            self._child = self._spawn_child(read_fd)

    async def serve_forever(self) -> None:
        stop = self._stop_event
        control.handle_signals(asyncio.get_running_loop(), stop=stop.set, reload=self.reload, wake=self.notify)
        if self.role is Role.RECEIVE:
            # Wake-ups go to the child, its "ready" comes back; EOF tells the child
            # the receiver is gone.
            parent_end, child_end = socket.socketpair()
            read_fd, self._wake_fd = child_end.detach(), parent_end.detach()
            os.set_blocking(self._wake_fd, False)
            self._make_data_dir()
            self._child = self._spawn_child(read_fd)
        try:
            await self.start()
        except BaseException:
            await self.stop()   # the delivery process, the queue: nothing outlives a failed start
            raise
        if self.role is Role.RECEIVE:
            self._supervisor = asyncio.create_task(self._supervise(read_fd))
        if self.role.receives:
            control.write_pid_file(self.config.server.data_dir)
        try:
            await stop.wait()
            if self.role.receives:
                log.info("stopping: no new connections; waiting up to %.0fs for deliveries in flight",
                         self.config.server.shutdown_grace)
        finally:
            await self.stop()
            if self.role.receives:
                control.remove_pid_file(self.config.server.data_dir)


def default_role(config: Config) -> Role:
    """Split receiving and delivering over two processes when there are two cores."""
    split = config.server.delivery_process
    if split == "auto":
        split = (os.cpu_count() or 1) > 1 and config.source is not None
    return Role.RECEIVE if split else Role.ALL
