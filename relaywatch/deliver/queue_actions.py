"""Changes to the queue that are not deliveries: one entry point for all of them.

Postfix's rule is that only qmgr moves mail.  Here the scheduler moves it by
delivering and recording; everything else that changes a message's status or
due time goes through ``QueueActions``, beside the scheduler:

- the CLI's ``queue retry|hold|release|delete|bounce``;
- Fix now (watch/fixes.py): retry-now, expire, decommission;
- the watch (watch/monitor.py): release a connector's backlog when a probe passes;
- the override watcher (app.py): a connector un-paused is due now;
- the HTTP console's actions, which import this module and not the CLI.

A message being delivered right now is never changed under the worker that
holds it: the store refuses an operator's record on a leased entry, and a
bounce or expire first waits for the lease to end (``unleased``).  A bounce
is recorded as the scheduler records an attempt (deliver/record.py): the NDR
is queued in the same transaction that gives the recipients up.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Iterable, Sequence

from relaywatch.config import Config
from relaywatch.deliver.record import record_attempt
from relaywatch.errors import StoreError
from relaywatch.model import Entry, Failure, RecipientOutcome, RecipientStatus, Route
from relaywatch.store.base import QueueStore, Selector

UNLEASED_TRIES = 50
UNLEASED_POLL = 0.2


class QueueActions:
    """``wake``: told when mail became due (in the delivering process, the
    scheduler's retry_now; the CLI signals a running server itself)."""

    def __init__(self, store: QueueStore, config_ref: Callable[[], Config], *,
                 wake: Callable[[], None] | None = None, clock: Callable[[], float] = time.time):
        self.store = store
        self.config_ref = config_ref
        self.wake = wake
        self.clock = clock
        self.unleased_tries = UNLEASED_TRIES

    async def retry_now(self, selector: Selector, now: float | None = None) -> int:
        """Make the selected messages due now (not held ones, nor any being
        delivered); the oldest goes first.  Returns how many.  (``now``: the
        clock's unless a caller acting on many at once gives one.)"""
        n = await self.store.retry(selector, self.clock() if now is None else now)
        if n and self.wake is not None:
            self.wake()
        return n

    async def hold(self, entry_id: str) -> bool:
        """Stop delivery attempts until released."""
        return await self.store.hold(entry_id)

    async def release_held(self, entry_id: str, now: float | None = None) -> bool:
        """A held message is due at once."""
        released = await self.store.release(entry_id, self.clock() if now is None else now)
        if released and self.wake is not None:
            self.wake()
        return released

    async def delete(self, entry_id: str) -> bool:
        """Remove a message without telling its sender."""
        return await self.store.delete(entry_id)

    async def expire(self, entry_ids: Iterable[str]) -> int:
        """Give these messages up now, as if they had expired: an NDR with the
        last error each recipient saw, then removal.  Returns how many."""
        n = 0
        for entry_id in entry_ids:
            n += await self.bounce(entry_id, None)
        return n

    async def bounce(self, entry_id: str, failure: Failure | None) -> int:
        """Return a message to its sender now, its waiting recipients failed
        with ``failure`` (None: expired, with their last error); 1 if it was
        still queued with recipients waiting, else 0."""
        entry = await self.unleased(entry_id)
        if entry is None or not entry.pending:
            return 0
        now = self.clock()
        if failure is None:   # expire: give up now, with the last error seen
            outcomes = [RecipientOutcome(r.address, RecipientStatus.EXPIRED, r.last_error) for r in entry.pending]
        else:
            outcomes = [RecipientOutcome(r.address, RecipientStatus.FAILED, failure) for r in entry.pending]
        await record_attempt(self.store, self.config_ref(), entry, outcomes, None, now, None, owner=None, now=now,
                             count_attempt=False, expire=failure is None)
        return 1

    async def reroute(self, entry_id: str, addresses: Sequence[str], route: Route) -> str | None:
        """Move recipients of a queued message to another route (a new entry, due now)."""
        return await self.store.move_recipients(entry_id, addresses, route, self.clock())

    async def unleased(self, entry_id: str) -> Entry | None:
        """The entry, once no delivery holds it (a server stops using a
        disabled connector within seconds)."""
        for _ in range(self.unleased_tries):
            entry = await self.store.get(entry_id)
            if entry is None or entry.lease_owner is None:
                return entry
            await asyncio.sleep(UNLEASED_POLL)
        raise StoreError(f"message {entry_id} stayed in delivery; run the action again")
