"""This node in the cluster: the loop around cluster/decisions.py.

Every ``server.heartbeat_interval`` it writes the node's heartbeat, takes or
renews the leader lease, and, while it leads, returns what dead nodes had
leased (at once, not when each lease's own timer runs out).  The watch asks
``term()`` before each evaluation and fences its writes with it.  It runs in
the delivering process: the one whose scheduler owns the leases.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from relaywatch import __version__
from relaywatch.cluster.decisions import Leadership, Timing
from relaywatch.cluster.fence import LeaseFence
from relaywatch.cluster.model import NodeBeat, NodeState
from relaywatch.clock import SYSTEM_CLOCK, Clock
from relaywatch.config import Config
from relaywatch.errors import StoreError
from relaywatch.model import Destination, Entry, RecipientOutcome, RecipientStatus
from relaywatch.store.base import ClusterStore

log = logging.getLogger("relaywatch.cluster")


class ClusterNode:
    def __init__(self, config_ref: Callable[[], Config], store: ClusterStore, instance: str, role: str,
                 leases_held: Callable[[], int] = lambda: 0, received: Callable[[], int] = lambda: 0,
                 clock: Clock = SYSTEM_CLOCK, fence: LeaseFence | None = None):
        self.config_ref = config_ref
        self.store = store
        self.instance = instance          # the scheduler's lease owner
        self.role = role
        self.leases_held = leases_held
        self.received = received          # counted by the receiving process (app.py)
        self.clock = clock
        self.started_at = clock.now()
        self.delivered = 0
        self.leadership = Leadership(self._timing())
        self.fence = fence if fence is not None else LeaseFence()   # the scheduler's: its leases' fence
        self._state = NodeState.RUNNING
        self._started = False

    def _timing(self) -> Timing:
        s = self.config_ref().server
        return Timing(s.heartbeat_interval, s.node_lapse)

    def term(self) -> int | None:
        """The leader term to fence with; None while another node leads."""
        return self.leadership.term(self.clock.now())

    def on_attempt(self, entry: Entry, outcomes: list[RecipientOutcome], dest: Destination | None,
                   tls: dict | None) -> None:
        self.delivered += sum(1 for o in outcomes if o.status is RecipientStatus.DELIVERED)

    def _beat(self, state: NodeState = NodeState.RUNNING) -> NodeBeat:
        config = self.config_ref()
        address = ", ".join(f"{h}:{p}" for h, p in config.server.listen)
        return NodeBeat(name=config.server.node_name, instance=self.instance, address=address, role=self.role,
                        version=__version__, started_at=self.started_at, at=self.clock.now(),
                        leases=self.leases_held(), received=self.received(), delivered=self.delivered,
                        state=state)

    async def start(self) -> None:
        """Register before the scheduler leases anything (its leases name this instance)."""
        sent = self.clock.monotonic()
        returned = await self.store.heartbeat(self._beat(), first=True)
        self._beaten(sent)
        self._started = True
        if returned:
            log.info("returned %d message(s) leased by an earlier start of this node", returned)
        await self._lead()

    async def run(self) -> None:
        # Beats on while the node drains (the others must not take it for dead while it
        # finishes its deliveries), but leads no more; stop() ends it.
        while self._started:
            await self.clock.sleep(self._timing().interval)
            if not self._started:
                return
            try:
                sent = self.clock.monotonic()
                await self.store.heartbeat(self._beat(self._state))
                self._beaten(sent)
                if self._state is NodeState.RUNNING:
                    await self._lead()
            except StoreError as exc:
                log.error("cluster: heartbeat failed: %s", exc)
            except Exception:
                log.exception("cluster: heartbeat failed; trying again at the next interval")

    def _beaten(self, sent: float) -> None:
        """A heartbeat built at ``sent`` (monotonic) is committed: the fence moves on."""
        timing = self._timing()
        until = self.fence.until
        if self.fence.beat(sent, self.clock.monotonic(), timing.lapse, timing.interval):
            log.warning("cluster: this node's heartbeat was late (its leases were vouched for until %.1f s before "
                        "this one was written): the other nodes may have taken it for dead and its leases, so each "
                        "is asked of the queue again before anything more is sent", self.clock.monotonic() - until)

    async def _lead(self) -> None:
        self.leadership.timing = timing = self._timing()
        asked_at = self.clock.now()
        change = self.leadership.answered(asked_at, await self.store.acquire_leader(
            self.instance, asked_at, asked_at + timing.lease_length))
        if change:
            log.info("cluster: node %s %s (term %s)", self.config_ref().server.node_name, change,
                     self.leadership.term(self.clock.now()) or "-")
        if self.term() is not None:
            now = self.clock.now()
            released = await self.store.release_dead_leases(timing.dead_before(now), now)
            if released:
                log.warning("cluster: returned %d message(s) leased by dead nodes to the queue", released)

    async def drain(self) -> None:
        """A clean stop begins: shown draining, and the leader lease let go at once so
        another node takes the watch while this one finishes its deliveries."""
        self._state = NodeState.DRAINING
        if not self._started:
            return
        self.leadership.resigned()
        try:
            await self.store.heartbeat(self._beat(NodeState.DRAINING))
            await self.store.resign_leader(self.instance)
        except StoreError as exc:
            log.warning("cluster: could not announce the drain (%s)", exc)

    async def stop(self) -> None:
        """A clean stop: marked stopped (no incident), the leader lease let go at once."""
        self._state = NodeState.STOPPED
        self.leadership.resigned()
        if not self._started:
            return
        self._started = False
        try:
            await self.store.heartbeat(self._beat(NodeState.STOPPED))
            await self.store.resign_leader(self.instance)
        except StoreError as exc:
            log.warning("cluster: could not say goodbye (%s); the other nodes see this one dead after the lapse", exc)
