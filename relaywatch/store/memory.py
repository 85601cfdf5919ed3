"""A store in dicts: the queue and the watch's state of one process, gone when it ends.

It implements QueueStore and WatchStore for real (the contract suite,
tests/contract/test_store_contract.py, runs it beside SQLite and PostgreSQL): leases
lapse, statuses move as in queue.sql, NDRs are queued with the outcome,
bodies are reference-counted and a spool file goes with its last entry.

Each operation runs to its end without awaiting, so it is atomic to every
other coroutine; it checks everything that can fail before it changes
anything, which is what the SQL stores' per-operation savepoint gives them.
Nothing is durable, so it is for tests and tools, never for ``serve``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from relaywatch.dsn_params import NO_MESSAGE_DSN, NO_RECIPIENT_DSN, MessageDsn
from relaywatch.errors import LeaseLost, StoreError, UnknownEntry
from relaywatch.incident import BacklogSummary
from relaywatch.model import (
    Attempt, Entry, EntryStatus, NewMessage, Recipient, RecipientOutcome, RecipientStatus, Route, StoredBody,
)
from relaywatch.store import queue as sql_queue
from relaywatch.store import trace as traces
from relaywatch.store.base import QueueQuery, Selector
from relaywatch.store.memory_cluster import MemoryCluster
from relaywatch.store.memory_console import MemoryConsole
from relaywatch.store.memory_tls_reports import MemoryTlsReports
from relaywatch.store.memory_watch import MemoryWatch
from relaywatch.store.watch_rows import held_notice_of, summary
from relaywatch.watch_records import HeldNotice

WAITING = (RecipientStatus.PENDING, RecipientStatus.DEFERRED)
DUE = (EntryStatus.QUEUED, EntryStatus.DEFERRED)


@dataclass
class _Row:
    """One entry as stored (the columns of the entries table)."""
    id: str
    body_id: str
    sender: str
    received_at: float
    expires_at: float
    route: Route
    size: int
    message_id: str
    client: str
    is_dsn: bool
    next_attempt_at: float | None
    status: EntryStatus = EntryStatus.QUEUED
    attempts: int = 0
    first_failure_at: float | None = None
    lease_owner: str | None = None
    lease_until: float | None = None
    last_code: str | None = None
    delay_notified: bool = False
    waiting: int = 0
    notice_pending: dict | None = None
    helo: str = ""
    auth_user: str = ""
    dsn: MessageDsn = NO_MESSAGE_DSN
    is_tls_report: bool = False
    utf8_headers: bool = False
    recipients: list[Recipient] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


class MemoryStore(MemoryWatch, MemoryConsole, MemoryCluster, MemoryTlsReports):
    where = "memory"
    single_node = True
    inline_bodies = False
    trace_retention = 7 * 86400.0

    def __init__(self, on_work: Callable[[], None] | None = None, clock: Callable[[], float] = time.time):
        self.on_work = on_work
        self.clock = clock
        self._open = False
        self._entries: dict[str, _Row] = {}
        self._bodies: dict[str, list] = {}          # id -> [StoredBody, refs]
        self._traces: dict[str, dict] = {}          # entry id -> trace_record of an entry that left
        MemoryWatch.__init__(self)
        MemoryCluster.__init__(self)
        MemoryTlsReports.__init__(self)

    async def open(self) -> None:
        self._open = True

    async def close(self) -> None:
        self._open = False

    def _check(self) -> None:
        if not self._open:
            raise StoreError("queue store is not open")

    def _notify(self) -> None:
        if self.on_work is not None:
            self.on_work()

    # -- the queue -------------------------------------------------------------------

    async def enqueue(self, msg: NewMessage) -> list[str]:
        self._check()
        ids = self._insert_message(msg)
        self._notify()
        return ids

    async def lease(self, owner: str, limit: int, ttl: float, now: float) -> list[Entry]:
        self._check()
        due = sorted((r for r in self._entries.values()
                      if r.status in DUE and r.next_attempt_at is not None and r.next_attempt_at <= now),
                     key=lambda r: (r.next_attempt_at, r.id))[:limit]
        due.sort(key=lambda r: (r.received_at, r.id))   # the batch oldest first, as the SQL stores return it
        for r in due:
            r.lease_owner, r.lease_until, r.next_attempt_at = owner, now + ttl, now + ttl
        entries = [self._entry(r, [x for x in r.recipients if x.status in WAITING]) for r in due]
        for e in entries:
            e.body = self._bodies[e.body_id][0]
        return entries

    async def read_body(self, body_id: str) -> StoredBody:
        self._check()
        if body_id not in self._bodies:
            raise StoreError(f"message body {body_id} is missing from the store")
        return self._bodies[body_id][0]

    async def record(self, entry_id: str, owner: str | None, attempt: Attempt | None,
                     outcomes: Sequence[RecipientOutcome], next_attempt_at: float | None,
                     notices: Sequence[NewMessage] = (), delay_notified: bool = False,
                     notice_pending: dict | None = None, attempts_before: int | None = None,
                     leased: Entry | None = None) -> bool:
        self._check()
        now = self.clock()
        r = self._entries.get(entry_id)
        if r is None:
            if attempts_before is not None:
                return False   # recorded (delivered to all) before, or deleted
            raise UnknownEntry(entry_id)
        if attempts_before is not None:   # a record tried again: see QueueStore.record
            if r.lease_owner is None and r.attempts != attempts_before:
                return False
            if r.lease_owner is not None and r.lease_owner != owner:
                raise LeaseLost(f"entry {entry_id} is now leased by {r.lease_owner}")
        elif owner is not None and r.lease_owner != owner:
            raise LeaseLost(f"entry {entry_id} is now leased by {r.lease_owner}")
        if owner is None and r.lease_owner is not None and (r.lease_until or 0) > now:
            raise StoreError(f"message {entry_id} is being delivered right now; try again in a moment")
        held = json.loads(json.dumps(notice_pending)) if notice_pending else None
        history = json.loads(json.dumps(attempt.to_dict())) if attempt is not None else None
        # Checked: from here on nothing fails.
        by_address = {o.address: o for o in outcomes}
        failed_now = False
        for i, rcpt in enumerate(r.recipients):
            o = by_address.get(rcpt.address)
            if o is None or rcpt.status.is_final:
                continue
            failed_now = failed_now or o.status is not RecipientStatus.DELIVERED
            r.recipients[i] = replace(rcpt, status=o.status, last_error=o.failure or rcpt.last_error)
        notice_ids = [i for notice in notices for i in self._insert_message(notice)]
        if history is not None:
            r.attempts += 1
            r.history.append(dict(history, **({"notices": notice_ids} if notice_ids else {})))
        pending = sum(1 for x in r.recipients if x.status in WAITING)
        if pending == 0 and held is None:
            self._remove(r, traces.end_of(notice_ids, now))
        else:
            # Still here: recipients wait, or only a notice that could not be built yet.
            if failed_now and r.first_failure_at is None:
                r.first_failure_at = now
            code = next((o.failure.code for o in outcomes
                         if o.status is RecipientStatus.DEFERRED and o.failure), None)
            if r.status is not EntryStatus.HELD:
                r.status = EntryStatus.DEFERRED
            r.next_attempt_at = next_attempt_at if next_attempt_at is not None else now
            r.lease_owner = r.lease_until = None
            r.last_code = None if pending == 0 else (code or r.last_code)
            r.waiting, r.notice_pending = pending, held
            r.delay_notified = r.delay_notified or delay_notified
        if notices:
            self._notify()
        return True

    async def release_leases(self, owner: str | None, now: float, keep: Sequence[str] = ()) -> int:
        self._check()
        n = 0
        for r in self._entries.values():
            if (r.lease_owner == owner if owner else r.lease_owner is not None) and r.id not in keep:
                r.lease_owner = r.lease_until = None
                if r.next_attempt_at is None or r.next_attempt_at >= now:
                    r.next_attempt_at = now
                n += 1
        if n:
            self._notify()
        return n

    async def renew_leases(self, owner: str, ids: Sequence[str], until: float) -> set[str]:
        self._check()
        renewed = set()
        for i in ids:
            r = self._entries.get(i)
            if r is not None and r.lease_owner == owner:
                r.lease_until = r.next_attempt_at = until
                renewed.add(i)
        return renewed

    async def get(self, entry_id: str) -> Entry | None:
        self._check()
        r = self._entries.get(entry_id.upper())
        if r is None:
            return None
        entry = self._entry(r, r.recipients)
        entry.history = json.loads(json.dumps(r.history))
        return entry

    async def list(self, query: QueueQuery) -> list[Entry]:
        self._check()
        now = self.clock()
        rows = sorted(self._entries.values(), key=lambda r: (r.received_at, r.id))
        if query.connector:
            rows = [r for r in rows if r.route.name == query.connector]
        if query.status == EntryStatus.ACTIVE.value:
            rows = [r for r in rows if r.lease_until is not None and r.lease_until > now]
        elif query.status:
            rows = [r for r in rows if r.status.value == query.status
                    and (r.lease_until is None or r.lease_until <= now)]
        return [self._entry(r, r.recipients) for r in rows[:query.limit]]

    async def retry(self, selector: Selector, now: float) -> int:
        self._check()
        ids = {i.upper() for i in selector.ids}
        n = 0
        for r in self._entries.values():
            chosen = selector.all or (r.route.name == selector.connector if selector.connector else r.id in ids)
            if chosen and r.status is not EntryStatus.HELD and (r.lease_until is None or r.lease_until <= now):
                r.next_attempt_at = min(r.received_at, now)
                n += 1
        if n:
            self._notify()
        return n

    async def hold(self, entry_id: str) -> bool:
        self._check()
        r = self._entries.get(entry_id.upper())
        if r is None:
            return False
        r.status = EntryStatus.HELD
        return True

    async def release(self, entry_id: str, now: float) -> bool:
        self._check()
        r = self._entries.get(entry_id.upper())
        if r is None or r.status is not EntryStatus.HELD:
            return False
        r.status = EntryStatus.QUEUED if r.attempts == 0 else EntryStatus.DEFERRED
        r.next_attempt_at = now
        self._notify()
        return True

    async def delete(self, entry_id: str) -> bool:
        self._check()
        r = self._entries.get(entry_id.upper())
        if r is None:
            return False
        if r.lease_until and r.lease_until > self.clock():
            raise StoreError(f"message {entry_id} is being delivered right now; try again in a moment")
        self._remove(r, {"at": self.clock(), "event": "deleted", "notices": []})
        return True

    async def move_recipients(self, entry_id: str, addresses: Sequence[str], route: Route, now: float) -> str | None:
        self._check()
        r = self._entries.get(entry_id)
        if r is None or not addresses:
            return None
        if r.lease_owner is not None and (r.lease_until or 0) > self.clock():
            raise StoreError(f"message {entry_id} is being delivered right now; try again in a moment")
        moved = [x for x in r.recipients if x.address in addresses and x.status in WAITING]
        if not moved:
            return None
        r.recipients = [x for x in r.recipients if not any(x is m for m in moved)]
        r.waiting -= len(moved)
        new = self._new_id(self._entries)
        self._entries[new] = _Row(
            id=new, body_id=r.body_id, sender=r.sender, received_at=r.received_at, expires_at=r.expires_at,
            route=route, size=r.size, message_id=r.message_id, client=r.client, is_dsn=r.is_dsn,
            helo=r.helo, auth_user=r.auth_user, next_attempt_at=now, waiting=len(moved), dsn=r.dsn,
            is_tls_report=r.is_tls_report, utf8_headers=r.utf8_headers,
            recipients=[Recipient(x.address, position=i, dsn=x.dsn) for i, x in enumerate(moved)])
        self._bodies[r.body_id][1] += 1
        if not r.recipients:
            self._remove(r, {"at": now, "event": "moved", "notices": [], "moved_to": new})
        self._notify()
        return new

    async def counts(self) -> dict[str, int]:
        self._check()
        counts: dict[str, int] = {}
        for r in self._entries.values():
            counts[r.status.value] = counts.get(r.status.value, 0) + 1
        return counts

    async def spool_paths(self) -> set[str]:
        self._check()
        return {body.path for body, _ in self._bodies.values() if body.path}

    def _insert_message(self, msg: NewMessage) -> list[str]:
        groups = msg.by_route()
        body_id = self._new_id(self._bodies)
        self._bodies[body_id] = [msg.body, len(groups)]
        ids = []
        for route, addresses in groups:
            entry_id = self._new_id(self._entries)
            self._entries[entry_id] = _Row(
                id=entry_id, body_id=body_id, sender=msg.sender, received_at=msg.received_at,
                expires_at=msg.expires_at, route=route, size=msg.body.size, message_id=msg.message_id,
                client=msg.client, is_dsn=msg.is_dsn, helo=msg.helo, auth_user=msg.auth_user,
                next_attempt_at=msg.received_at, waiting=len(addresses), dsn=msg.dsn,
                is_tls_report=msg.is_tls_report, utf8_headers=msg.utf8_headers,
                recipients=[Recipient(a, position=i, dsn=msg.recipient_dsn.get(a, NO_RECIPIENT_DSN))
                            for i, a in enumerate(addresses)])
            ids.append(entry_id)
        return ids

    @staticmethod
    def _new_id(taken: dict) -> str:
        while True:
            id_ = sql_queue.new_id()
            if id_ not in taken:
                return id_

    def _remove(self, r: _Row, end: dict) -> None:
        if self.trace_retention > 0:    # what is kept of it for the message trace (store/trace.py)
            entry = self._entry(r, r.recipients)
            self._traces[r.id] = traces.trace_record(entry, r.history, end)
            while self._traces:   # in the order they ended: the oldest first
                oldest = next(iter(self._traces))
                if self._traces[oldest]["end"]["at"] >= end["at"] - self.trace_retention:
                    break
                del self._traces[oldest]
        del self._entries[r.id]
        body = self._bodies[r.body_id]
        body[1] -= 1
        if body[1] <= 0:
            del self._bodies[r.body_id]
            if body[0].path:
                try:
                    os.unlink(body[0].path)
                except OSError:
                    pass

    def _entry(self, r: _Row, recipients: list[Recipient]) -> Entry:
        leased = r.lease_owner is not None and (r.lease_until or 0) > self.clock()
        return Entry(
            id=r.id, sender=r.sender, received_at=r.received_at, expires_at=r.expires_at,
            status=EntryStatus.ACTIVE if leased else r.status, attempts=r.attempts,
            next_attempt_at=r.next_attempt_at, route=r.route, size=r.size, message_id=r.message_id,
            body_id=r.body_id, client=r.client, is_dsn=r.is_dsn, dsn=r.dsn, first_failure_at=r.first_failure_at,
            lease_owner=r.lease_owner if leased else None, delay_notified=r.delay_notified,
            helo=r.helo, auth_user=r.auth_user, is_tls_report=r.is_tls_report, utf8_headers=r.utf8_headers,
            notice_pending=json.loads(json.dumps(r.notice_pending)) if r.notice_pending else None,
            recipients=sorted(recipients, key=lambda x: x.position))

    # -- the watch's reads of the queue (the rest: store/memory_watch.py) ---------------

    async def deferred_summary(self) -> list[BacklogSummary]:
        self._check()
        groups: dict[tuple[str, str], list[_Row]] = {}
        for r in self._entries.values():
            if r.status is EntryStatus.DEFERRED and r.last_code is not None:
                groups.setdefault((r.route.name, r.last_code), []).append(r)
        out = []
        for (connector, code), rows in groups.items():
            failures = [x.last_error for r in sorted(rows, key=lambda r: -r.received_at)
                        for x in r.recipients if x.last_error is not None][:20]
            first_failures = [r.first_failure_at for r in rows if r.first_failure_at is not None]
            out.append(summary(connector, code, len(rows), sum(r.waiting for r in rows),
                               min(r.received_at for r in rows), min(r.expires_at for r in rows),
                               min(first_failures) if first_failures else None,
                               [json.loads(f.to_json()) for f in failures]))
        return out

    async def held_notices(self, limit: int = 20) -> list[HeldNotice]:
        self._check()
        held = [held_notice_of((r.id, r.sender, r.route.name, json.dumps(r.notice_pending)))
                for r in self._entries.values() if r.notice_pending is not None]
        return sorted(held, key=lambda h: -(h.retry_at or 0))[:limit]

    async def entry_ids(self, connector: str, code: str | None = None,
                        status: str = EntryStatus.DEFERRED.value) -> list[str]:
        self._check()
        return [r.id for r in sorted(self._entries.values(), key=lambda r: r.received_at)
                if r.route.name == connector and r.status.value == status and (code is None or r.last_code == code)]
