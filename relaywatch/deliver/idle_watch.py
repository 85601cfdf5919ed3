"""When a destination's worker has waited ``delivery.connection_idle`` for more mail: it stops.

A worker (deliver/scheduler.py) keeps its connection between entries and waits for the
next one on a future of its own (``DestinationQueue.wake_one`` resolves it).  With one
message in flight it waits once per message; a clock wait with a deadline per wait cost a
task and a timer each (``asyncio.wait_for``).  Instead the worker waits on its future
alone, and this watch, one per worker, sleeps on the clock
until the deadline of the worker's latest wait: it wakes once per idle period, not once
per message, and when the worker has been waiting past its deadline it wakes the worker
to stop.  The deadline is the one the wait began with (``connection_idle`` then), as it
was when each wait had its own timer.
"""

from __future__ import annotations

import asyncio

from relaywatch.clock import Clock

FOREVER = float("inf")


class IdleWatch:
    def __init__(self, clock: Clock):
        self.clock = clock
        self.waiter: asyncio.Future | None = None   # what the worker awaits now: resolved to wake it
        self.expired = False               # the worker's current wait ran past its deadline
        self._deadline: float | None = None   # clock.monotonic() the current wait ends at; None: busy
        self._armed = FOREVER              # the deadline the watch sleeps toward
        self._rearm = asyncio.Event()
        self._task: asyncio.Task | None = None

    def begin(self, idle: float) -> None:
        """The worker starts waiting for its next entry, for at most ``idle`` seconds."""
        self._deadline = deadline = self.clock.monotonic() + idle
        self.expired = idle <= 0
        if self._task is None or self._task.done():     # done: it expired a wait an entry then ended
            self._task = asyncio.create_task(self._watch(), name="deliver:idle-watch")
        elif deadline < self._armed:
            self._rearm.set()              # sleeping toward a later deadline (or none): look again

    def end(self) -> None:
        """The worker has its entry (or stops)."""
        self._deadline = None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _watch(self) -> None:
        while True:
            self._rearm.clear()
            deadline = self._deadline
            if deadline is None:
                # Busy: the next wait's deadline is not known until it begins (begin rearms).
                self._armed = FOREVER
                await self._rearm.wait()
                continue
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                self.expired = True
                if self.waiter is not None and not self.waiter.done():
                    self.waiter.set_result(None)   # the worker looks, sees expired, and stops
                return
            self._armed = deadline
            await self.clock.wait(self._rearm, remaining)
