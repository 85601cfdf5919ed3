"""The fence's arithmetic (relaywatch/cluster/fence.py), with a fake clock: until when a node's
heartbeats vouch for its leases, and when a late one makes them suspect."""

import asyncio

import pytest

from helpers import FakeClock, eventually
from relaywatch.cluster.fence import LeaseFence

LAPSE, INTERVAL, LEASE = 30.0, 5.0, 600.0


def beaten(*beats):
    """A fence after heartbeats (built at, committed at)."""
    fence = LeaseFence()
    for sent, acked in beats:
        fence.beat(sent, acked, LAPSE, INTERVAL)
    return fence


def test_without_heartbeats_only_the_lease_time_bounds_a_lease():
    fence = LeaseFence()            # a scheduler without a cluster node: no margin either
    grant = fence.grant(0.0)
    assert fence.open(1e9)
    assert fence.holds(grant, LEASE - 0.1, LEASE)
    assert not fence.holds(grant, LEASE, LEASE)


@pytest.mark.parametrize("now,held", [
    (100.0, True),
    (124.9, True),          # the last heartbeat (built at 100) + lapse - one interval
    (125.0, False),
    (1000.0, False),
])
def test_a_committed_heartbeat_vouches_until_its_time_plus_the_lapse_less_a_margin(now, held):
    fence = beaten((100.0, 100.2))
    assert fence.holds(fence.grant(100.5), now, LEASE) is held
    assert fence.open(now) is held


def test_heartbeats_in_time_keep_the_leases_of_before():
    fence = beaten((100.0, 100.1))
    grant = fence.grant(100.2)
    fence.beat(105.0, 105.3, LAPSE, INTERVAL)
    fence.beat(110.0, 124.0, LAPSE, INTERVAL)       # slow to commit, but before 125
    assert fence.epoch == 0
    assert fence.holds(grant, 130.0, LEASE)


def test_a_heartbeat_committed_after_the_deadline_makes_every_earlier_lease_suspect():
    fence = beaten((100.0, 100.1))
    before = fence.grant(100.2)
    assert fence.beat(140.0, 140.1, LAPSE, INTERVAL) is True       # stood still from ~101 to 140
    assert fence.epoch == 1
    assert fence.open(141.0)
    assert not fence.holds(before, 141.0, LEASE)                   # ask the store first
    assert fence.holds(fence.grant(141.0), 150.0, LEASE)           # what it vouched for since


def test_a_short_lease_keeps_at_most_a_quarter_of_itself_as_margin():
    fence = beaten((100.0, 100.1))
    grant = fence.grant(100.0)
    assert fence.holds(grant, 101.4, 2.0)
    assert not fence.holds(grant, 101.5, 2.0)


async def test_reopened_waits_for_the_next_heartbeat_or_gives_up():
    clock = FakeClock(start=0.0)
    fence = beaten((clock.monotonic() - 30.0, clock.monotonic() - 29.9))   # overdue now
    assert not fence.open(clock.monotonic())
    waiting = asyncio.ensure_future(fence.reopened(clock, 10.0))
    await asyncio.sleep(0)
    assert not waiting.done()
    fence.beat(clock.monotonic(), clock.monotonic(), LAPSE, INTERVAL)
    assert await waiting is True
    # The first wait's timer is cancelled a loop turn later: counted as waiting until then, it would
    # let the advance below run before the second wait has parked (which would then never end).
    await eventually(lambda: clock.waiting == 0, what="the first wait's timer to go")
    fence2 = beaten((clock.monotonic() - 30.0, clock.monotonic() - 29.9))
    giving_up = asyncio.ensure_future(fence2.reopened(clock, 10.0))
    await eventually(lambda: clock.waiting, what="the wait to park on the clock")
    clock.advance(10.0)
    assert await giving_up is False
