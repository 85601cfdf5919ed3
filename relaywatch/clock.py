"""Where the parts that wait get the time: one ``Clock``, passed in by the runtime.

Two readings, because they answer different questions: ``now()`` is wall time
(seconds since the epoch: what is stored, due times, what the console shows)
and ``monotonic()`` measures intervals that must not jump with the wall clock
(a login block, an idle connection).  The loops that wait for time to pass
(the scheduler's poll, the watch's tick, the heartbeat, the store-outage alert
retries) wait through ``sleep`` and ``wait`` so that a test's clock
(tests/helpers.py ``FakeClock``) can wake them by advancing, instead of the
test waiting real seconds.  Parts that only read the time take ``clock.now``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...

    async def wait(self, event: asyncio.Event, timeout: float) -> bool:
        """Wait until ``event`` is set (True) or ``timeout`` seconds pass (False)."""
        ...


class SystemClock:
    """The real one."""

    now = staticmethod(time.time)
    monotonic = staticmethod(time.monotonic)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def wait(self, event: asyncio.Event, timeout: float) -> bool:
        if event.is_set():
            # wait_for with no time left says False even for an event already set.  Still one turn
            # of the loop, as a wait always was: callers wait in loops (scheduler.py's wait for more
            # of a destination's mail), and one that never yields starves every other task.
            await asyncio.sleep(0)
            return True
        try:
            await asyncio.wait_for(event.wait(), timeout)
            return True
        except TimeoutError:
            return False


SYSTEM_CLOCK = SystemClock()
