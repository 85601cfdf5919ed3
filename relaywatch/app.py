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

This module builds the parts of a ``Role`` and runs their loops under one
``asyncio.TaskGroup`` (a loop that dies stops the process); ``stop`` stops
them in the order ``_make_parts`` lists.  The delivery process, its restarts
and the bytes the two exchange are runtime/child.py's; the running config and
its reloads runtime/config.py's; the pid file and the signal table
runtime/control.py's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from enum import Enum
from typing import Awaitable, Callable

from relaywatch import events
from relaywatch.cluster.node import ClusterNode
from relaywatch.clock import SYSTEM_CLOCK, Clock
from relaywatch.config import Config
from relaywatch.console.metrics import EXPORT_NAME, RECEIVE_EXPORT_NAME, export_counters, read_export
from relaywatch.deliver.callout import SmtpCallout
from relaywatch.deliver.resolver import Resolver
from relaywatch.deliver.scheduler import Scheduler
from relaywatch.deliver.smtp import SmtpRoutes
from relaywatch.errors import ConfigError, RelaywatchError
from relaywatch.receive.server import Receiver
from relaywatch.receive.spool import sweep_orphans
from relaywatch.runtime import control
from relaywatch.runtime.child import ChildLink, DeliveryChild, ParentLink, SchedulerWaker
from relaywatch.runtime.config import RunningConfig, release_unpaused_connectors, watch_overrides
from relaywatch.store import open_store
from relaywatch.watch.monitor import Monitor
from relaywatch.watch.store_incident import StoreIncidentReporter

log = logging.getLogger("relaywatch.app")


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


@dataclass
class Part:
    """One part of the running relay.  ``run``, a loop, runs under the app's one
    TaskGroup from ``start`` on; at ``stop`` the parts stop in list order: ``stop``
    first (graceful), then the loop is cancelled if it has not returned."""
    name: str
    run: Callable[[], Awaitable[None]] | None = None
    stop: Callable[[], Awaitable[None]] | None = None


class Relaywatch:
    def __init__(self, config: Config, clock: Clock = SYSTEM_CLOCK, role: Role = Role.ALL,
                 wake_fd: int | None = None):
        """``wake_fd``: this role's end of the socketpair to the other role (runtime/child.py).
        A DELIVER process is given it by its parent; a RECEIVE process given one
        talks to a delivery process that someone else runs, and starts none."""
        self.running = RunningConfig(config)   # file + Fix-now overrides; one snapshot per operation
        self.clock = clock                     # every part's time (relaywatch/clock.py; tests give a fake one)
        self.role = role = Role(role)
        # Only a delivering process that receives nothing may skip fsync (see SqliteStore).
        self.store = open_store(config, sync_commits=role.receives, checkpoints=role.delivers, clock=clock.now)
        self.receiver: Receiver | None = None
        self.scheduler: Scheduler | None = None
        # Both roles may talk SMTP to destinations: deliveries, and recipient
        # verification at RCPT (receive/verify.py).
        self.resolver = Resolver(config.dns)
        self.routes = SmtpRoutes(self.running.snapshot, self.resolver)
        self.callout: SmtpCallout | None = None
        self.monitor: Monitor | None = None
        self.node: ClusterNode | None = None           # this node of the cluster (relaywatch/cluster/)
        self.draining = False                          # stopping cleanly: /readyz answers 503 (console/health.py)
        self.child: DeliveryChild | None = None       # serve_forever starts it (role RECEIVE)
        self._child_link = ChildLink(wake_fd) if role is Role.RECEIVE and wake_fd is not None else None
        self._parent_link = ParentLink(wake_fd) if role is Role.DELIVER and wake_fd is not None else None
        if role.delivers:
            self.scheduler = Scheduler(self.running.snapshot, self.store, self.routes, clock)
            self.running.subscribe(self.scheduler.reconfigure)
            # Before the store opens: a PostgreSQL store then also listens for other nodes' work.
            self.store.on_work = SchedulerWaker(self.scheduler.notify).wake
            # This node in the cluster (heartbeat, leader lease): in the process whose scheduler leases.
            self.node = ClusterNode(self.running.snapshot, self.store, self.scheduler.node, role.value,
                                    lambda: self.scheduler.inflight, self._received, clock,
                                    # Several nodes may take this one's leases: its heartbeats fence
                                    # them (cluster/fence.py).  One delivering process on SQLite has
                                    # nobody to take them, and delivers through a store outage.
                                    fence=None if self.store.single_node else self.scheduler.fence)
            self.monitor = Monitor(self.running.snapshot, self.store, self.routes, self.scheduler.retry_now, clock,
                                   leader_term=self.node.term)
            self.scheduler.observer = self._observe
        if role.receives:
            self.callout = SmtpCallout(self.routes)
            # The relay's own incident when it cannot queue mail: opened and alerted from here, since the
            # store may be what fails (watch/store_incident.py).
            store_incident = StoreIncidentReporter(self.running.snapshot, self.store, self.routes, clock)
            self.receiver = Receiver(self.running.snapshot, self.store, store_incident, clock, self.callout)
        self.parts: list[Part] = []                  # made by start(), in stop order
        self._running: dict[str, asyncio.Task] = {}  # the parts' loops, by name
        self._group: asyncio.Task | None = None      # runs the TaskGroup they run in
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
                returned = await self.store.release_leases(None, self.clock.now())
                if returned:
                    log.info("returned %d message(s) leased by a previous run", returned)
            await self.node.start()   # registered before the scheduler leases in its name
        self.parts = self._make_parts()
        self._group = asyncio.create_task(self._run_parts(), name="parts")
        if self.scheduler is not None:
            if self._parent_link is not None:
                self._parent_link.listen(self.scheduler.notify, self._receiver_gone)
                self._parent_link.say_ready()   # the receiver may open its port
        if self._child_link is not None:
            self.store.on_work = self._child_link.waker.wake   # after open: a receiver listens to no node
            # Open the SMTP port only once the delivery process runs.
            await self._child_link.wait_ready(self.child.alive if self.child is not None else lambda: True)
        if self.receiver is not None:
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
            # Other listeners of the receiving process start here, and stop in a Part of theirs.

    def _make_parts(self) -> list[Part]:
        """The parts of this role, in the order they stop: the drain (the node says so,
        /readyz answers 503), the overrides watcher and the watch, then no new mail
        (the receiver), then the delivery process, then deliveries in flight (the
        scheduler, within shutdown_grace), then the cluster node (stopped: its leases
        are back), then the console."""
        parts = [Part("drain", stop=self._drain)]
        if self.role is Role.DELIVER:
            parts.append(Part("counters", run=self._export_counters))
        elif self.role is Role.RECEIVE:   # what it received, for the heartbeat its delivery process writes
            parts.append(Part("counters", run=lambda: self._export_counters(RECEIVE_EXPORT_NAME)))
        parts.append(Part("overrides", run=lambda: watch_overrides(self.refresh_overrides)))
        if self.monitor is not None:
            parts.append(Part("monitor", run=self.monitor.run, stop=self._stop_monitor))
        if self.receiver is not None:
            parts.append(Part("receiver", stop=self._stop_receiver))
        if self.child is not None:
            parts.append(Part("delivery process", run=self.child.supervise, stop=self._stop_child))
        elif self._child_link is not None:
            parts.append(Part("delivery link", stop=self._stop_child))
        if self.scheduler is not None:
            parts.append(Part("scheduler", run=self.scheduler.run, stop=self._stop_scheduler))
        if self.node is not None:   # beats (draining) until the scheduler has returned its leases
            parts.append(Part("cluster", run=self.node.run, stop=self.node.stop))
        if self.role.receives:      # last: /readyz answers 503 while the node drains
            parts.append(Part("console", stop=self._stop_console))
        return parts

    async def _run_parts(self) -> None:
        async with asyncio.TaskGroup() as group:
            for part in self.parts:
                if part.run is not None:
                    self._running[part.name] = group.create_task(part.run(), name=part.name)

    def part_task(self, name: str) -> asyncio.Task | None:
        """The running loop of a part (the console's readiness check reads it)."""
        return self._running.get(name)

    def _observe(self, *attempt) -> None:
        self.node.on_attempt(*attempt)
        self.monitor.on_attempt(*attempt)

    async def _drain(self) -> None:
        # SIGTERM, relaywatch node drain: the load balancer sees 503 from now on, and
        # another node takes the watch while this one finishes its deliveries.
        self.draining = True
        if self.node is not None:
            await self.node.drain()

    async def _stop_console(self) -> None:
        if self.console is not None:
            await self.console.stop()

    async def _export_counters(self, name: str = EXPORT_NAME) -> None:
        await export_counters(self.config.server.data_dir, name=name)

    def _received(self) -> int:
        """Queue entries this node committed since its receiving process started (the heartbeat's
        count): counted here, or by the receiving process when this is its delivery process."""
        counts = (read_export(self.config.server.data_dir, RECEIVE_EXPORT_NAME) if self.role is Role.DELIVER
                  else events.counts)
        return sum(n for (event, _, _), n in counts.items() if event == "received")

    async def _stop_monitor(self) -> None:
        self.monitor.stop()

    async def _stop_receiver(self) -> None:
        await self.receiver.stop()
        if self.callout is not None:
            self.callout.close()

    async def _stop_child(self) -> None:
        if self.child is not None:
            await self.child.stop()
        self._child_link.close()

    async def _stop_scheduler(self) -> None:
        await self.scheduler.stop(self.config.server.shutdown_grace)

    def _receiver_gone(self) -> None:
        # End of file: the receiving process is gone (even killed with SIGKILL).
        # A delivering child must not outlive it: the next run starts its own and
        # takes over the queue.
        log.error("the receiving process is gone; the delivery process stops")
        self._stop_event.set()

    def notify(self) -> None:
        """SIGUSR1: an operator changed the queue or the overrides; look now."""
        asyncio.get_running_loop().create_task(self.refresh_overrides())
        if self.scheduler is not None:
            self.scheduler.retry_now()
        if self.child is not None:
            self.child.forward(signal.SIGUSR1)

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
        """Stop every part in order (``_make_parts``), then close the queue.  Also
        after a failed or partial start: nothing outlives it."""
        parts = self.parts or self._make_parts()   # start failed before making them: the child, the link
        for part in parts:
            if part.stop is not None:
                await part.stop()
            task = self._running.get(part.name)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._group is not None:
            try:
                await self._group
            except Exception:
                log.exception("a part of relaywatch had failed")
        self.parts, self._running, self._group = [], {}, None
        if self.monitor is not None:
            try:   # the TLS results of the last deliveries, counted since the watch's last tick
                await self.monitor.flush_tls_counts()
            except RelaywatchError as exc:
                log.warning("the last TLS report counts could not be stored: %s", exc)
        await self.store.close()

    def reload(self) -> bool:
        """SIGHUP: re-read the file; the delivery process re-reads it too."""
        if not self.running.reload():
            return False
        if self.scheduler is not None:
            self.scheduler.notify()
        if self.child is not None:
            self.child.forward(signal.SIGHUP)
        log.info("configuration reloaded from %s", self.config.source)
        return True

    async def serve_forever(self) -> None:
        stop = self._stop_event
        control.handle_signals(asyncio.get_running_loop(), stop=stop.set, reload=self.reload, wake=self.notify)
        if self.role is Role.RECEIVE and self._child_link is None:
            self._make_data_dir()   # the child opens the store there
            self.child = DeliveryChild(self.running.snapshot)
            self._child_link = self.child.link
            self.child.spawn()
        try:
            await self.start()
        except BaseException:
            await self.stop()   # the delivery process, the queue: nothing outlives a failed start
            raise
        failed: str | None = None
        try:
            if self.role.receives:
                try:
                    control.write_pid_file(self.config.server.data_dir)
                except OSError as exc:
                    # The port is open and mail flows: a disk that filled up just now must not
                    # end that (it gets 452s); only the commands that signal us cannot find us.
                    log.error("cannot write the pid file %s: %s; relaywatch reload and node drain will not "
                              "find this server (signal pid %d instead)",
                              control.pid_file(self.config.server.data_dir), exc.strerror or exc, os.getpid())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({stopping, self._group}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if self._group.done():
                # A part ended by itself, which only a bug does: stop all of it, with
                # an error exit (a delivery process is then restarted by its parent).
                failed = self._failed_part()
                log.error("%s; stopping", failed, exc_info=self._group.exception())
                self._group = None
            elif self.role.receives:
                log.info("stopping: no new connections; waiting up to %.0fs for deliveries in flight",
                         self.config.server.shutdown_grace)
        finally:
            await self.stop()
            if self.role.receives:
                control.remove_pid_file(self.config.server.data_dir)
        if failed is not None:
            raise RelaywatchError(f"stopped: {failed}")

    def _failed_part(self) -> str:
        for name, task in self._running.items():
            if task.done() and not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                return f"the {name} part failed ({type(exc).__name__}: {exc})"
        return "a part of relaywatch returned"


def default_role(config: Config) -> Role:
    """Split receiving and delivering over two processes when there are two cores."""
    split = config.server.delivery_process
    if split == "auto":
        split = (os.cpu_count() or 1) > 1 and config.source is not None
    return Role.RECEIVE if split else Role.ALL
