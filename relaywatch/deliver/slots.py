"""Connection slots whose number can change while they are held.

``asyncio.Semaphore`` is sized once; ``delivery.concurrency`` changes with a
reload.  Growing the limit lets waiters in at once; shrinking it takes no
slot away from a delivery in progress, it only admits nobody new until fewer
than the new limit are held.  Waiters are admitted in the order they came.
"""

from __future__ import annotations

import asyncio
import collections


class Slots:
    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def resize(self, limit: int) -> None:
        self.limit = limit
        self._admit()

    async def acquire(self) -> None:
        if self.held < self.limit and not self._waiters:
            self.held += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter            # _admit counted the slot as held before waking us
        except asyncio.CancelledError:
            if waiter.cancelled():
                if waiter in self._waiters:   # else _admit dropped it already
                    self._waiters.remove(waiter)
            else:                   # admitted, then cancelled before it ran: give it back
                self.release()
            raise

    def release(self) -> None:
        self.held -= 1
        self._admit()

    def _admit(self) -> None:
        while self._waiters and self.held < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.held += 1
                waiter.set_result(None)

    async def __aenter__(self) -> "Slots":
        await self.acquire()
        return self

    async def __aexit__(self, *exc) -> None:
        self.release()
