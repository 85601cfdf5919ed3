"""The queue manager: lease due entries, deliver them, record what happened.

One loop leases due entries in batches and hands each to its destination's
queue.  Per destination, up to ``per_destination`` workers each hold one
session of the destination's connector (deliver/connector.py: SMTP or local)
and deliver entry after entry through it (bounded overall by
``concurrency``).  How a connector reaches the destination, reuses its
connection or marks it down is the connector's business; the scheduler only
leases, dispatches and records.

Only this module changes an entry's status by delivering; every other change
(the CLI, Fix now, the watch, the override watcher, the console) goes through
deliver/queue_actions.py, which ``self.actions`` offers in this process.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import secrets
from dataclasses import dataclass, field
from typing import Callable

from relaywatch.cluster.fence import Grant, LeaseFence
from relaywatch.clock import SYSTEM_CLOCK, Clock
from relaywatch.config import Config
from relaywatch.deliver.connector import Connector, DeliveryResult, Session, connector_for_route
from relaywatch.deliver.idle_watch import IdleWatch
from relaywatch.deliver.handover import JOURNAL_NAME as HANDOVER_NAME, HandoverJournal
from relaywatch.deliver.queue_actions import QueueActions
from relaywatch.deliver.record import classify_result, record_attempt
from relaywatch.deliver.slots import Slots
from relaywatch.deliver.smtp import SmtpRoutes
from relaywatch.errors import LeaseFenced, StoreError
from relaywatch.model import Destination, Entry, RecipientOutcome, StoredBody
from relaywatch.store.base import QueueStore
from relaywatch.store.pending import JOURNAL_NAME, PendingOutcomes

log = logging.getLogger("relaywatch.scheduler")

LEASE_BATCH = 256
PAUSED_RECHECK = 30.0


@dataclass
class DestinationQueue:
    key: str
    connector: Connector                  # its dead-destination mark lives and goes with this queue
    entries: collections.deque = field(default_factory=collections.deque)
    workers: int = 0
    idle: list[asyncio.Future] = field(default_factory=list)   # its workers waiting for an entry, latest last

    def wake_one(self) -> None:
        """An entry was added: the worker that went idle last takes it (its connection is the
        warmest).  One, not all: with every worker woken per entry, a burst's workers took
        turns with mail that came one at a time, none ever idle long enough to close, and
        each entry woke them all (~13 wake-ups per message at one in flight)."""
        while self.idle:
            waiter = self.idle.pop()
            if not waiter.done():
                waiter.set_result(None)
                return

    def wake_all(self) -> None:
        for waiter in self.idle:
            if not waiter.done():
                waiter.set_result(None)
        self.idle.clear()


class Scheduler:
    def __init__(self, config_ref: Callable[[], Config], store: QueueStore, routes: SmtpRoutes,
                 clock: Clock = SYSTEM_CLOCK):
        self.config_ref = config_ref
        self.store = store
        self.routes = routes
        self.clock = clock
        now = clock.now
        # The lease owner: the node's name and this start (relaywatch/cluster/): a restarted
        # node returns what its earlier start had leased instead of taking it for its own.
        self.node = f"{config_ref().server.node_name}:{os.getpid()}:{secrets.token_hex(3)}"
        self.wake = asyncio.Event()
        self.destinations: dict[str, DestinationQueue] = {}
        self.inflight = 0
        self._stopping = False
        self._workers: set[asyncio.Task] = set()
        self._recording: set[str] = set()          # entry ids whose outcome is being committed
        # Told of every recorded attempt (the watch monitor): (entry, outcomes, destination, tls facts).
        self.observer: Callable[[Entry, list[RecipientOutcome], Destination | None, dict | None], None] | None = None
        self._record_tasks: set[asyncio.Task] = set()
        self._connections = Slots(self.config_ref().delivery.concurrency)   # follows reloads: reconfigure
        # Outcomes the store could not take: recorded later, never delivered again.
        self.pending = PendingOutcomes(store, self.config_ref().server.data_dir / JOURNAL_NAME,
                                       lambda: self.config_ref().queue.lease_time, now)
        # What sessions are handing over and is not recorded yet: the next start's possible duplicates.
        self.handover = HandoverJournal(self.config_ref().server.data_dir / HANDOVER_NAME)
        self._lease_failing = False
        # Until when this process may act on its leases (cluster/fence.py): the cluster node moves
        # it with each heartbeat.  What it holds, by entry id: the grant each is delivered under.
        self.fence = LeaseFence()
        self._held: dict[str, Grant] = {}
        self._fenced = False
        # The one way the rest of this process changes the queue (the watch, the override watcher).
        self.actions = QueueActions(store, config_ref, wake=self.retry_now, clock=now)

    def notify(self) -> None:
        """Called when new work may be due (enqueue, retry, release)."""
        self.wake.set()

    def reconfigure(self, before: Config, after: Config) -> None:
        """The running config changed (runtime/config.py subscribe).  Every other
        limit is read per operation; the connection slots are sized here."""
        self._connections.resize(after.delivery.concurrency)
        self.wake.set()

    def retry_now(self) -> None:
        """An operator (or a passing probe) asked for delivery now: forget that
        destinations were down a moment ago, so the next message really tries."""
        for dq in self.destinations.values():
            dq.connector.forget_down()
        self.wake.set()

    # -- the loop ------------------------------------------------------------

    async def run(self) -> None:
        # What a previous run delivered but could not record goes in before
        # anything is leased (store/pending.py).
        await self.pending.replay()
        self.handover.report_previous(self.config_ref().server.node_name)
        while not self._stopping:
            config = self.config_ref()
            pass_started = self.clock.monotonic()
            room = self._max_inflight() - self.inflight
            leased = []
            if room > 0 and not self.fence.open(self.clock.monotonic()):
                # The heartbeat is overdue: the leader may be returning what this node holds.
                # Nothing new is leased until a heartbeat is written again.
                if not self._fenced:
                    self._fenced = True
                    log.warning("this node's heartbeat is overdue: leasing nothing until it is written again")
                await self.fence.reopened(self.clock, 1.0)
                continue
            if self._fenced:
                self._fenced = False
                log.warning("this node's heartbeat is written again: leasing again")
            if room > 0:
                self.wake.clear()
                grant = self.fence.grant(self.clock.monotonic())   # before asking: the lease is no older
                try:
                    leased = await self.store.lease(self.node, min(room, LEASE_BATCH),
                                                    config.queue.lease_time, self.clock.now())
                    if self._lease_failing:
                        self._lease_failing = False
                        log.warning("leasing from the queue works again")
                        self.pending.nudge()
                except StoreError as exc:
                    if not self._lease_failing:   # one line per outage, not one a second
                        self._lease_failing = True
                        log.error("cannot lease from the queue: %s (trying every second)", exc)
                except Exception:
                    # The loop must outlive any one failure: mail waits, it is not lost.
                    log.exception("leasing failed unexpectedly; trying again in a second")
                for entry in leased:
                    self._dispatch(entry, grant)
            if len(leased) == LEASE_BATCH:
                await asyncio.sleep(0)
                continue
            # Poll at least every second: operator commands from another process
            # (queue retry, release) are seen within a second. The second counts from
            # when this pass leased: time that passed during the pass (a slow store, a
            # clock that moved on) is not waited for again before mail due by then is leased.
            await self.clock.wait(self.wake, max(1.0 - (self.clock.monotonic() - pass_started), 0.0))

    async def stop(self, grace: float) -> None:
        """Stop leasing; let deliveries finish within ``grace``; return the rest."""
        self._stopping = True
        self.wake.set()
        for dq in self.destinations.values():
            dq.wake_all()
        if self._workers:
            done, pending = await asyncio.wait(self._workers, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._record_tasks:
            await asyncio.wait(self._record_tasks, timeout=grace)
        if len(self.pending):
            await self.pending.flush()
        await self.pending.close()
        self.handover.close()
        try:
            # Not the leases of outcomes still kept: the next run records them.
            await self.store.release_leases(self.node, self.clock.now(), keep=self.pending.ids())
        except StoreError as exc:
            log.error("could not return leases at shutdown (they lapse by themselves): %s", exc)

    def _finished_one(self, entry_id: str) -> None:
        self._held.pop(entry_id, None)
        self.inflight -= 1
        # Room for more: lease the next batch now.  Without this a backlog
        # drained at one batch per poll interval (400 messages a second).
        if self.inflight == self._max_inflight() // 2:
            self.wake.set()

    def _max_inflight(self) -> int:
        return self.config_ref().delivery.concurrency * 4

    def _dispatch(self, entry: Entry, grant: Grant) -> None:
        if entry.id in self.pending:
            # Delivered already; only its record is missing (its lease lapsed
            # while the store was away): record it under this lease, never deliver.
            self.pending.adopt(entry.id, self.node)
            return
        if entry.id in self._held:
            # Leased again while this process still has it (returned while this node stood
            # still, then leased by it once more): the one it has goes on, under the new lease.
            self._held[entry.id] = grant
            return
        self._held[entry.id] = grant
        key = entry.route.key
        dq = self.destinations.get(key)
        if dq is None:
            dq = self.destinations[key] = DestinationQueue(
                key, connector_for_route(entry.route, self.config_ref, self.routes, self.clock))
        dq.entries.append(entry)
        self.inflight += 1
        dq.wake_one()
        if dq.workers < self.config_ref().delivery.per_destination and (dq.workers == 0 or len(dq.entries) > 1):
            dq.workers += 1
            task = asyncio.create_task(self._worker(dq), name=f"deliver:{key}")
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)

    async def _next_entry(self, dq: DestinationQueue, idle: IdleWatch) -> Entry | None:
        if not dq.entries:
            idle.begin(self.config_ref().delivery.connection_idle)
            loop = asyncio.get_running_loop()
            try:
                while not dq.entries:
                    if self._stopping or idle.expired:
                        return None
                    # No timer per wait: the watch wakes this waiter when the wait is too long.
                    idle.waiter = waiter = loop.create_future()
                    dq.idle.append(waiter)
                    try:
                        await waiter
                    finally:
                        if waiter in dq.idle:      # woken by the watch, or cancelled (stop)
                            dq.idle.remove(waiter)
            finally:
                idle.end()
        return dq.entries.popleft()

    async def _worker(self, dq: DestinationQueue) -> None:
        session = dq.connector.session()
        idle = IdleWatch(self.clock)
        try:
            async with self._connections:
                while True:
                    entry = await self._next_entry(dq, idle)
                    if entry is None:
                        return
                    try:
                        await self._deliver(dq, entry, session)
                    except LeaseFenced:
                        # Stopped before the final dot: the destination drops the transaction.
                        session.abandon()
                    except StoreError as exc:
                        # Nothing was sent (the body or a bookkeeping write failed):
                        # the lease lapses and the entry is due again.  The store
                        # logs the outage itself, once; no traceback per entry.
                        log.warning("delivery of %s waits for the queue store: %s", entry.id, exc)
                    except Exception:
                        log.exception("delivery of %s failed unexpectedly; it stays queued", entry.id)
                        session.abandon()
                    finally:
                        if entry.id not in self._recording:
                            self._finished_one(entry.id)
                    if entry.id not in self._recording:   # not when cancelled mid-session (stop)
                        self.handover.ended(entry.id)
        finally:
            dq.workers -= 1
            await idle.close()
            await session.close()
            if not dq.entries and dq.workers == 0 and self.destinations.get(dq.key) is dq:
                del self.destinations[dq.key]

    # -- one entry ------------------------------------------------------------------

    async def _deliver(self, dq: DestinationQueue, entry: Entry, session: Session) -> None:
        started = self.clock.now()
        recipients = [r.address for r in entry.pending]
        if not recipients:
            if entry.notice_pending:
                # Delivered and bounced already; only the sender's notice is owed.
                self._finish(entry, DeliveryResult([], None), started, entry.body, count_attempt=False)
            else:
                await self.store.record(entry.id, self.node, None, [], None)
            return
        body = entry.body or await self.store.read_body(entry.body_id)
        if dq.connector.paused():
            # Paused by an operator: keep the message, make no attempt.
            await self.store.record(entry.id, self.node, None, [], self.clock.now() + PAUSED_RECHECK,
                                    notice_pending=entry.notice_pending)
            return
        if not await self.still_held(entry.id):
            return
        self.handover.started(entry.id)
        self._finish(entry, await session.deliver(entry, body, recipients, lambda: self.still_held(entry.id)),
                     started, body)

    async def still_held(self, entry_id: str) -> bool:
        """May this process still deliver the entry?  Asked before a session starts on it and
        before the final dot (cluster/fence.py).  Without asking the store while the fence
        vouches for the lease; else, once a heartbeat is written again, the store says whether
        the lease is still ours (and renews it), or another node's now: then False, logged."""
        grant = self._held.get(entry_id)
        if grant is None:
            return False
        config = self.config_ref()
        lease_time = config.queue.lease_time
        if self.fence.holds(grant, self.clock.monotonic(), lease_time):
            return True
        renewed: set[str] = set()
        if await self.fence.reopened(self.clock, config.server.node_lapse):
            grant = self.fence.grant(self.clock.monotonic())
            try:
                renewed = await self.store.renew_leases(self.node, [entry_id], self.clock.now() + lease_time)
            except StoreError as exc:
                log.warning("cannot check the lease of %s with the queue (%s): not delivering it now", entry_id, exc)
                return False
        if entry_id in renewed:
            if self._held.get(entry_id) is not None:
                self._held[entry_id] = grant
            return True
        log.warning("not delivering %s: this node's heartbeat was late and its lease on it lapsed or went to "
                    "another node, which delivers it", entry_id)
        return False

    def _finish(self, entry: Entry, result: DeliveryResult, started: float, body: StoredBody | None,
                count_attempt: bool = True) -> None:
        """Record the attempt in the background: the connection moves on to the
        next message while the store commits.  The lease is held until the
        record is durable; if we crash before that, the message is tried again
        (at-least-once, as in every MTA)."""
        classify_result(result)            # the one classification of the attempt, before its record
        self._recording.add(entry.id)
        task = asyncio.create_task(record_attempt(
            self.store, self.config_ref(), entry, result.outcomes, result.destination, started, body,
            owner=self.node, tried=result.tried, now=self.clock.now(), count_attempt=count_attempt,
            keep=self.pending), name=f"record:{entry.id}")

        def done(t: asyncio.Task) -> None:
            self._recording.discard(entry.id)
            self._record_tasks.discard(t)
            self._finished_one(entry.id)
            if not t.cancelled():
                self.handover.ended(entry.id)
            if not t.cancelled() and t.exception() is not None:
                log.error("could not record the attempt for %s (it will be retried): %s", entry.id, t.exception())
            elif not t.cancelled() and self.observer is not None:
                self.observer(entry, t.result(), result.destination, result.tls)
        self._record_tasks.add(task)
        task.add_done_callback(done)
