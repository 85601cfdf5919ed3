"""CPU per entry of a destination queue's workers waiting for entries that come one at a time.

    .venv/bin/python bench/worker_wakeups.py

With K workers idle on one queue (a burst leaves up to delivery.per_destination): "before",
the wait as it was until 2026-12-01 (every worker woken per entry through the queue's event,
each wait an asyncio.wait_for through SystemClock.wait), written out here; "now",
Scheduler._next_entry itself (DestinationQueue.wake_one: the worker idle last; no timer per
wait, deliver/idle_watch.py).  In-process, on uvloop: CPU time (time.process_time) per entry
of the producer and the workers together, the least of three runs of 20,000 entries.
"""

from __future__ import annotations

import asyncio
import collections
import time
import types

import uvloop

from relaywatch.clock import SYSTEM_CLOCK
from relaywatch.deliver.idle_watch import IdleWatch
from relaywatch.deliver.scheduler import DestinationQueue, Scheduler

ENTRIES = 20000
IDLE = 60.0       # connection_idle: longer than a run, so no worker stops


def before() -> tuple:
    """The queue's event woke every worker; each wait had its own deadline (wait_for)."""
    more, entries = asyncio.Event(), collections.deque()

    async def next_entry(_idle: IdleWatch):
        deadline = time.monotonic() + IDLE
        while not entries:
            more.clear()
            if not await SYSTEM_CLOCK.wait(more, deadline - time.monotonic()):
                return None
        return entries.popleft()

    def add() -> None:
        entries.append(1)
        more.set()
    return next_entry, add


def now() -> tuple:
    dq = DestinationQueue("bench", None)
    scheduler = types.SimpleNamespace(_stopping=False, clock=SYSTEM_CLOCK, config_ref=lambda: types.SimpleNamespace(
        delivery=types.SimpleNamespace(connection_idle=IDLE)))

    def add() -> None:
        dq.entries.append(1)
        dq.wake_one()
    return (lambda idle: Scheduler._next_entry(scheduler, dq, idle)), add


async def per_entry(queue, workers: int) -> float:
    next_entry, add = queue()
    took = asyncio.Event()
    taken = 0

    async def worker() -> None:
        nonlocal taken
        idle = IdleWatch(SYSTEM_CLOCK)
        try:
            while taken < ENTRIES and await next_entry(idle) is not None:
                taken += 1
                took.set()
        finally:
            await idle.close()
    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    await asyncio.sleep(0.05)      # every worker waiting
    started = time.process_time()
    for _ in range(ENTRIES):
        took.clear()
        add()
        await took.wait()
    cpu = time.process_time() - started
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return cpu / ENTRIES * 1e6


def main() -> None:
    for workers in (1, 13):
        for queue in (before, now, before, now):
            us = min(uvloop.run(per_entry(queue, workers)) for _ in range(3))
            print(f"{workers:2d} worker(s), {queue.__name__:6s}: {us:5.1f} us per entry")


if __name__ == "__main__":
    main()
