"""The fence: until when this process may act on the leases it holds, by its own clock.

The leader returns a node's leases once that node's heartbeat is older than
``node_lapse`` (store/cluster.sql release_dead_leases); another node then
delivers them.  A node that stood still meanwhile (a stopped VM, SIGSTOP, an
overloaded host, a link to the database that hangs while destinations still
answer) would otherwise go on, when it runs again, to deliver what it had
leased: a second copy.  So a node acts on its leases only while it knows the
leader cannot have returned them yet:

- Each committed heartbeat, built at monotonic time ``sent``, keeps the
  leases until ``sent + lapse - margin``: the leader's clock must pass the
  heartbeat's own time plus the lapse before it returns them, and ``margin``
  (one heartbeat interval) covers the clocks' skew (run NTP).
- The chain must be unbroken: a heartbeat committed after ``until`` may come
  after the leader returned the leases (the return locks the dead node's row,
  so a heartbeat waits for it, store/cluster.sql); from then on every lease
  held from before (an older ``epoch``) is suspect, and is asked of the store
  again (``renew_leases``: still ours?) before anything more is sent.
- A lease is also bounded by its own ``lease_time``, less the margin (at most a
  quarter of it), from the moment it was asked for: another node may lease a
  lapsed entry.  Past that, the store is asked too; if it cannot be (it is
  away), the entry is not delivered now and its lease lapses.

The scheduler checks before a session starts on an entry and again right
before the final dot of DATA (deliver/transport.py): the point after which the
destination has the message.  A node whose heartbeat is overdue leases nothing.
What no fence covers is a node that stops *after* that check and before the
destination's answer: the one duplicate window left (docs/cluster.md).

Without a cluster node (a scheduler on its own, in tests) ``until`` is
infinite: only the leases' own time bounds them.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from relaywatch.clock import Clock


@dataclass(frozen=True)
class Grant:
    """A lease as this process holds it: the fence's epoch and when it was asked for (monotonic)."""
    epoch: int
    at: float


class LeaseFence:
    def __init__(self) -> None:
        self.epoch = 0
        self.until = math.inf      # monotonic; no heartbeat guards the leases yet
        self.margin = 0.0
        self._beat = asyncio.Event()

    def beat(self, sent: float, acked: float, lapse: float, margin: float) -> bool:
        """A heartbeat built at ``sent`` was committed by ``acked``; True if the chain had broken
        (the leases held from before are suspect: a new epoch)."""
        broke = acked > self.until
        if broke:
            self.epoch += 1
        self.until = sent + lapse - margin
        self.margin = margin
        self._beat.set()
        self._beat = asyncio.Event()
        return broke

    def open(self, now: float) -> bool:
        """May this process lease (or vouch for a lease) now?"""
        return now < self.until

    def grant(self, now: float) -> Grant:
        return Grant(self.epoch, now)

    def holds(self, grant: Grant, now: float, lease_time: float) -> bool:
        """Is the lease granted so still this process's at ``now``, without asking the store?"""
        return (grant.epoch == self.epoch and now < self.until
                and now < grant.at + lease_time - min(self.margin, lease_time / 4))

    async def reopened(self, clock: Clock, timeout: float) -> bool:
        """Wait (at most ``timeout`` seconds) until the fence is open: a heartbeat committed."""
        deadline = clock.monotonic() + timeout
        while not self.open(clock.monotonic()):
            remaining = deadline - clock.monotonic()
            if remaining <= 0:
                return False
            await clock.wait(self._beat, remaining)
        return True
