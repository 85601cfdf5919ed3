"""The queue store seam: queue operations, not SQL.

Everything above this interface (receiver, scheduler, CLI) is the same for
every backend.  SQLite is the embedded default (store/sqlite.py); a
PostgreSQL backend implements the same protocol.

Durability contract: when ``enqueue`` returns, the message is on disk and
survives a crash; when ``record`` returns, the outcome (and any NDR it queued)
is on disk.  A message is removed only inside the same transaction that records
its last recipient as delivered, or queues the NDR that tells the sender.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from relaywatch.model import Attempt, Entry, NewMessage, RecipientOutcome, StoredBody


@dataclass(frozen=True)
class QueueQuery:
    connector: str | None = None
    status: str | None = None
    limit: int = 1000


@dataclass(frozen=True)
class Selector:
    """Which entries an operator command applies to."""
    ids: tuple[str, ...] = ()
    connector: str | None = None
    all: bool = False


class QueueStore(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...

    async def enqueue(self, msg: NewMessage) -> list[str]:
        """Commit a received message (one entry per route); return entry ids."""

    async def lease(self, owner: str, limit: int, ttl: float, now: float) -> list[Entry]:
        """Take up to ``limit`` due entries, oldest due first.  A lease that is
        not recorded within ``ttl`` seconds lapses and the entry is due again."""

    async def read_body(self, body_id: str) -> StoredBody: ...

    async def record(self, entry_id: str, owner: str | None, attempt: Attempt | None,
                     outcomes: Sequence[RecipientOutcome], next_attempt_at: float | None,
                     notices: Sequence[NewMessage] = (), delay_notified: bool = False,
                     notice_pending: dict | None = None, attempts_before: int | None = None) -> bool:
        """Apply one attempt's outcomes; queue ``notices`` (NDRs) in the same
        transaction; remove the entry once no recipient is pending and no
        ``notice_pending`` (an NDR that could not be built) is left; such an
        entry stays, due again at ``next_attempt_at``, for that NDR alone.
        ``notice_pending`` is the entry's state after this record: pass the
        entry's own to keep it.
        ``owner=None`` is an operator action and requires the entry unleased.

        ``attempts_before`` (the entry's attempts when it was leased) marks a
        record tried again after it failed: it is applied while ``owner``
        still holds the lease, lapsed or not, or nobody does and no attempt
        was recorded since; it returns False when that shows it was applied
        already, and raises LeaseLost if another worker holds the entry."""

    async def release_leases(self, owner: str | None, now: float, keep: Sequence[str] = ()) -> int:
        """Make leased entries due again (all of them when owner is None), but
        those in ``keep`` (their outcome is still to be recorded)."""

    async def renew_leases(self, owner: str, ids: Sequence[str], until: float) -> set[str]:
        """Extend ``owner``'s leases on ``ids`` to ``until``; the ids it still held."""

    async def get(self, entry_id: str) -> Entry | None: ...
    async def list(self, query: QueueQuery) -> list[Entry]: ...
    async def retry(self, selector: Selector, now: float) -> int: ...
    async def hold(self, entry_id: str) -> bool: ...
    async def release(self, entry_id: str, now: float) -> bool: ...
    async def delete(self, entry_id: str) -> bool: ...
    async def next_due(self) -> float | None: ...
    async def counts(self) -> dict[str, int]: ...
    async def spool_paths(self) -> set[str]: ...
