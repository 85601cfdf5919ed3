"""The queue's operations on SQL: receive (enqueue), deliver (lease, record) and the operator's.

They run on a GroupCommitEngine (store/engine.py): each write is one function
of the connection, run in the writer's next batch (store/batch.py).

Leasing moves ``next_attempt_at`` to the lease's end, so an entry whose worker
died simply becomes due again: there is no separate reclaim pass.

The SQL is in queue.sql, written once with ``?`` placeholders in what both
databases share (``ON CONFLICT``, ``RETURNING``, ``CASE``); what differs is in
the Dialect (store/sqlite.py, store/postgres.py).  This module holds what the
SQL cannot say: the order of the statements and the status rules of record.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, Callable, Sequence

from relaywatch.dsn_params import NO_RECIPIENT_DSN
from relaywatch.errors import LeaseLost, StoreError, UnknownEntry
from relaywatch.model import Attempt, Entry, NewMessage, Recipient, RecipientOutcome, RecipientStatus, Route, StoredBody
from relaywatch.store import queries
from relaywatch.store import trace as traces
from relaywatch.store.base import QueueQuery, Selector
from relaywatch.store.engine import Dialect, GroupCommitEngine
from relaywatch.store.entry_rows import as_bytes, attach_bodies, attach_recipients, entry_from_row, read_entry

Q = queries.load("queue.sql")


def lease_sql(row_lock: str = "") -> str:
    """The lease statement with the dialect's ``row_lock`` (queue.sql ``lease``)."""
    return Q["lease"].replace("{row_lock}", row_lock)


def new_id() -> str:
    """A queue id: milliseconds since 1970, then 20 random bits (16 hex digits).

    Time first, so new rows go to the right edge of every index keyed by id:
    with random ids each message dirtied a random page of each of three
    indexes, and with a million messages queued those pages were no longer
    cached (the big_queue bench: enqueue rate 0.74 of an empty queue's).
    Two processes may draw the same id in the same millisecond: see
    _insert_with_new_id."""
    return f"{time.time_ns() // 1_000_000:011X}{secrets.randbits(20):05X}"


def domain_of(address: str) -> str:
    """What the console's domain filter finds ``address`` by (recipients.domain): what follows
    its last "@", lower-cased; addresses are kept with A-label domains already (idn.py)."""
    return address.rpartition("@")[2].lower()


def _insert_with_new_id(conn: Any, sql: str, params: tuple) -> str:
    """Run ``sql`` (an INSERT whose first parameter is the id, ending in ON CONFLICT
    (id) DO NOTHING) under a fresh id; draw again in the rare case it is taken."""
    for _ in range(16):
        id_ = new_id()
        if conn.execute(sql, (id_, *params)).rowcount == 1:
            return id_
    raise StoreError("could not draw an unused queue id")


class SqlQueue:
    """The queue operations; SqlStore (store/sql.py) supplies ``engine``, ``clock`` and ``_notify``."""
    engine: GroupCommitEngine
    dialect: Dialect
    lease_sql: str
    clock: Callable[[], float]       # the time of what an operation has no ``now`` for
    trace_retention: float = 7 * 86400.0    # queue.trace_retention (store/trace.py); set by open_store
    trace_prune_every: float = traces.PRUNE_EVERY
    _traces_pruned_at: float = 0.0

    def _keep_trace(self, conn: Any, entry_id: str, end: dict, outcomes: Sequence[RecipientOutcome] = (),
                    attempt: dict | None = None, entry: Entry | None = None, first_try: bool = False,
                    statuses: list | None = None) -> None:
        """What is kept of an entry that leaves the queue now (store/trace.py), in the
        transaction that removes it; pruned at most every trace_prune_every seconds by each writer.
        ``attempt``: the attempt not stored yet, as Attempt.to_dict().  ``entry``: its row as
        the caller read it (else read here).  ``first_try``: no attempt stored yet and the
        recipients attached (the delivery path's common case), so nothing more is read.
        Otherwise the recipients' statuses and the stored attempts' JSON text are read (not
        the recipients' failures: the trace does not keep them); ``statuses``: those
        (position, address, status) rows, sorted, if the caller has read them.  None kept: the entry's
        message_ids row goes (SQLite; PostgreSQL's trigger does it)."""
        if self.trace_retention <= 0:
            if self.dialect.forget_message_id is not None:
                conn.execute(self.dialect.forget_message_id, (entry_id, entry_id))
            return
        if entry is None:
            entry = entry_from_row(conn.execute(Q["entry"], (entry_id,)).fetchone(), end["at"])
        stored: list[str] = []
        if not first_try:
            if statuses is None:
                statuses = sorted(conn.execute(Q["recipient_statuses"], (entry.id,)))
            entry.recipients = [Recipient(address, RecipientStatus(status), position=position)
                                for position, address, status in statuses]
            stored = [data for (data,) in conn.execute(Q["attempts_of"], (entry.id,))]
        self._insert_trace(conn, entry.id, entry.message_id, end["at"],
                           traces.trace_json(entry, stored, attempt, end, outcomes))

    def _insert_trace(self, conn: Any, entry_id: str, message_id: str, ended_at: float, data: str) -> None:
        conn.execute(traces.Q["insert_trace"], (entry_id, message_id, ended_at, data))
        if ended_at - self._traces_pruned_at >= self.trace_prune_every:
            self._traces_pruned_at = ended_at
            conn.execute(traces.Q["prune_traces"], (ended_at - self.trace_retention,))

    async def enqueue(self, msg: NewMessage) -> list[str]:
        def op(conn: Any, cleanup: list) -> list[str]:
            return _insert_message(conn, msg)
        ids = await self.engine.write(op, announce=True)
        self._notify()
        return ids

    async def lease(self, owner: str, limit: int, ttl: float, now: float) -> list[Entry]:
        def op(conn: Any, cleanup: list) -> list[Entry]:
            rows = conn.execute(self.lease_sql, (owner, now + ttl, now + ttl, now, limit)).fetchall()
            # Oldest first within the batch: RETURNING has no order of its own, and
            # PostgreSQL returns the rows as its join found them (SQLite happened to
            # keep the subquery's), so mail released at one moment went out shuffled.
            entries = sorted((entry_from_row(row, now) for row in rows), key=lambda e: (e.received_at, e.id))
            attach_recipients(conn, entries)
            attach_bodies(conn, entries)
            return entries
        return await self.engine.write(op)

    async def read_body(self, body_id: str) -> StoredBody:
        def q(conn: Any) -> StoredBody:
            row = conn.execute(Q["body"], (body_id,)).fetchone()
            if row is None:
                raise StoreError(f"message body {body_id} is missing from the store")
            return StoredBody(size=row[2], data=as_bytes(row[0]), path=row[1])
        return await self.engine.read(q)

    async def record(self, entry_id: str, owner: str | None, attempt: Attempt | None,
                     outcomes: Sequence[RecipientOutcome], next_attempt_at: float | None,
                     notices: Sequence[NewMessage] = (), delay_notified: bool = False,
                     notice_pending: dict | None = None, attempts_before: int | None = None,
                     leased: Entry | None = None) -> bool:
        held_notice = json.dumps(notice_pending, separators=(",", ":")) if notice_pending else None
        # Before the op, not in it: the op runs on the writer thread holding the write lock,
        # which the receiving process waits for.
        attempt_data = attempt.to_dict() if attempt is not None else None
        delivered_all = bool(outcomes) and all(o.status is RecipientStatus.DELIVERED for o in outcomes)
        first_trace = None
        if (leased is not None and leased.attempts == 0 and not notices and held_notice is None and delivered_all
                and self.trace_retention > 0):
            # The common case, a first try delivered to all: its trace is the leased entry's, built here;
            # the op takes it if the rows still say first try, these recipients (else it builds its own).
            at = self.clock()
            first_trace = ([r.address for r in leased.recipients], at, traces.to_json(traces.trace_record(
                leased, [attempt_data] if attempt_data is not None else [], traces.end_of((), at), outcomes)))

        def op(conn: Any, cleanup: list) -> bool:
            now = self.clock()
            row = conn.execute(Q["entry_to_record"].replace("{row_lock}", self.dialect.row_lock),
                               (entry_id,)).fetchone()
            if row is None:
                if attempts_before is not None:
                    return False   # recorded (delivered to all) before, or deleted
                raise UnknownEntry(entry_id)
            lease_owner, lease_until = row[:2]
            entry = entry_from_row(row[2:], now)
            body_id, attempts, first_failure_at = entry.body_id, entry.attempts, entry.first_failure_at
            leased = lease_owner is not None and (lease_until or 0) > now
            if attempts_before is not None:
                # A record tried again (store/pending.py): still ours, lapsed or
                # not, or returned unrecorded (start-up returns an SQLite run's
                # leases); not if an attempt was recorded since, since then
                # this one already was (its commit went through after all) or
                # another worker has had the entry.
                if lease_owner is None and attempts != attempts_before:
                    return False
                if lease_owner is not None and lease_owner != owner:
                    raise LeaseLost(f"entry {entry_id} is now leased by {lease_owner}")
            elif owner is not None and lease_owner != owner:
                raise LeaseLost(f"entry {entry_id} is now leased by {lease_owner}")
            if owner is None and leased:
                raise StoreError(f"message {entry_id} is being delivered right now; try again in a moment")
            by_address = {o.address: o for o in outcomes}
            if not notices and held_notice is None and delivered_all:
                # The common case, delivered to everyone still waiting: the entry goes
                # at once, without first recording statuses and an attempt it drops.
                if attempts == 0:
                    statuses = None
                    waiting = [a for (a,) in conn.execute(Q["waiting_addresses"], (entry_id,)).fetchall()]
                else:
                    # Tried before: every recipient's status, read once for this test and the trace.
                    statuses = sorted(conn.execute(Q["recipient_statuses"], (entry_id,)).fetchall())
                    waiting = [a for _p, a, status in statuses if not RecipientStatus(status).is_final]
                if all(address in by_address for address in waiting):
                    with queries.together(conn):   # 2 round-trips, not 4 or 5
                        if first_trace is not None and attempts == 0 and first_trace[0] == waiting:
                            self._insert_trace(conn, entry.id, entry.message_id, first_trace[1], first_trace[2])
                        elif statuses is None:
                            entry.recipients = [Recipient(a, position=i) for i, a in enumerate(waiting)]
                            self._keep_trace(conn, entry_id, traces.end_of((), now), outcomes, attempt_data,
                                             entry=entry, first_try=True)
                        else:
                            self._keep_trace(conn, entry_id, traces.end_of((), now), outcomes, attempt_data,
                                             entry=entry, statuses=statuses)
                        _remove(conn, entry_id, body_id, cleanup, had_attempts=attempts > 0)
                    return True
            failed_now = False
            for position, address, status in conn.execute(Q["recipient_statuses"], (entry_id,)).fetchall():
                o = by_address.get(address)
                if o is None or RecipientStatus(status).is_final:
                    continue
                if o.status is not RecipientStatus.DELIVERED:
                    failed_now = True
                conn.execute(Q["set_recipient_status"],
                             (o.status.value, o.failure.to_json() if o.failure else None, entry_id, position))
            notice_ids = [i for notice in notices for i in _insert_message(conn, notice)]
            if attempt_data is not None:
                attempts += 1
                # The notices it queued go with the attempt, so the trace can say an NDR was sent.
                data = dict(attempt_data, **({"notices": notice_ids} if notice_ids else {}))
                conn.execute(Q["insert_attempt"], (entry_id, attempts, json.dumps(data, separators=(",", ":"))))
            pending = conn.execute(Q["count_waiting"], (entry_id,)).fetchone()[0]
            if pending == 0 and held_notice is None:
                self._keep_trace(conn, entry_id, traces.end_of(notice_ids, now), entry=entry)
                _remove(conn, entry_id, body_id, cleanup)
                return True
            # Still here: recipients wait, or only a notice that could not be built
            # yet (notice_pending; retried on its own, never by delivering again).
            if failed_now and first_failure_at is None:
                first_failure_at = now
            last_code = next((o.failure.code for o in outcomes
                              if o.status is RecipientStatus.DEFERRED and o.failure), None)
            conn.execute(Q["after_attempt"], (
                attempts, next_attempt_at if next_attempt_at is not None else now,
                first_failure_at, pending, last_code, pending, held_notice,
                int(delay_notified), int(delay_notified), entry_id))
            return True
        applied = await self.engine.write(op, announce=bool(notices))
        if notices and applied:
            self._notify()
        return applied

    async def release_leases(self, owner: str | None, now: float, keep: Sequence[str] = ()) -> int:
        def op(conn: Any, cleanup: list) -> int:
            where, args = (Q["leased_by"], (owner,)) if owner else (Q["leased"], ())
            if keep:
                where += " AND " + queries.in_list(Q["id_not_in"], len(keep))
                args = (*args, *keep)
            return conn.execute(Q["release_leases"].replace("{where}", where), (now, now, *args)).rowcount
        n = await self.engine.write(op, announce=True)
        if n:
            self._notify()
        return n

    async def renew_leases(self, owner: str, ids: Sequence[str], until: float) -> set[str]:
        """Extend ``owner``'s leases on ``ids`` (lapsed or not) to ``until``; the
        ids renewed (an entry another worker leased meanwhile is not)."""
        def op(conn: Any, cleanup: list) -> set[str]:
            return {i for (i,) in conn.execute(queries.in_list(Q["renew_leases"], len(ids)),
                                               (until, until, owner, *ids)).fetchall()}
        return await self.engine.write(op) if ids else set()

    async def get(self, entry_id: str) -> Entry | None:
        return await self.engine.read(lambda conn: read_entry(conn, entry_id.upper(), self.clock()))

    async def list(self, query: QueueQuery) -> list[Entry]:
        def q(conn: Any) -> list[Entry]:
            where, args, now = [], [], self.clock()
            if query.connector:
                where.append(Q["on_connector"])
                args.append(query.connector)
            if query.status == "active":
                where.append(Q["is_active"])
                args.append(now)
            elif query.status:
                where.append(Q["in_status_unleased"])
                args += [query.status, now]
            sql = Q["list_entries"].replace("{where}", " WHERE " + " AND ".join(where) if where else "")
            entries = [entry_from_row(r, now) for r in conn.execute(sql, (*args, query.limit))]
            attach_recipients(conn, entries, include_final=True)
            return entries
        return await self.engine.read(q)

    async def retry(self, selector: Selector, now: float) -> int:
        def op(conn: Any, cleanup: list) -> int:
            where, args = _select(selector)
            return conn.execute(Q["retry"].replace("{where}", where), (now, now, now, *args)).rowcount
        n = await self.engine.write(op, announce=True)
        if n:
            self._notify()
        return n

    async def hold(self, entry_id: str) -> bool:
        def op(conn: Any, cleanup: list) -> bool:
            return conn.execute(Q["hold"], (entry_id.upper(),)).rowcount == 1
        return await self.engine.write(op)

    async def release(self, entry_id: str, now: float) -> bool:
        def op(conn: Any, cleanup: list) -> bool:
            return conn.execute(Q["release"], (now, entry_id.upper())).rowcount == 1
        ok = await self.engine.write(op, announce=True)
        if ok:
            self._notify()
        return ok

    async def delete(self, entry_id: str) -> bool:
        def op(conn: Any, cleanup: list) -> bool:
            row = conn.execute(Q["entry_to_delete"], (entry_id.upper(),)).fetchone()
            if row is None:
                return False
            if row[1] and row[1] > self.clock():
                raise StoreError(f"message {entry_id} is being delivered right now; try again in a moment")
            self._keep_trace(conn, entry_id.upper(), {"at": self.clock(), "event": "deleted", "notices": []})
            _remove(conn, entry_id.upper(), row[0], cleanup)
            return True
        return await self.engine.write(op)

    async def spool_paths(self) -> set[str]:
        """Every body file a queue row points at (the rest are crash leftovers)."""
        def q(conn: Any) -> set[str]:
            return {p for (p,) in conn.execute(Q["spool_paths"])}
        return await self.engine.read(q)

    async def counts(self) -> dict[str, int]:
        def q(conn: Any) -> dict[str, int]:
            return dict(conn.execute(Q["counts"]).fetchall())
        return await self.engine.read(q)

    async def move_recipients(self, entry_id: str, addresses: Sequence[str], route: Route, now: float) -> str | None:
        """Give some recipients of an (unleased) entry a new route, as a new entry
        sharing the body.  Returns the new entry id (None if nothing moved)."""
        def op(conn: Any, cleanup: list) -> str | None:
            row = conn.execute(Q["entry"], (entry_id,)).fetchone()
            if row is None or not addresses:
                return None
            entry = entry_from_row(row, now)
            if entry.lease_owner is not None:
                raise StoreError(f"message {entry_id} is being delivered right now; try again in a moment")
            moved = conn.execute(queries.in_list(Q["take_recipients"], len(addresses)),
                                 (entry_id, *addresses)).fetchall()
            if not moved:
                return None
            new = _insert_with_new_id(conn, Q["insert_entry"], (
                entry.body_id, entry.sender, entry.received_at, entry.expires_at, now, route.kind.value,
                route.name, route.domain, entry.size, entry.message_id, entry.client, int(entry.is_dsn),
                len(moved), entry.helo, entry.auth_user, entry.dsn.ret, entry.dsn.envid,
                int(entry.is_tls_report), int(entry.utf8_headers)))
            conn.execute(Q["fewer_waiting"], (len(moved), entry_id))
            conn.executemany(Q["insert_recipient"], [(new, i, *row, domain_of(row[0]))
                                                     for i, row in enumerate(moved)])
            conn.execute(Q["ref_body"], (entry.body_id,))
            if not conn.execute(Q["has_recipients"], (entry_id,)).fetchone():
                self._keep_trace(conn, entry_id, {"at": now, "event": "moved", "notices": [], "moved_to": new})
                _remove(conn, entry_id, entry.body_id, cleanup)
            return new
        new = await self.engine.write(op, announce=True)
        if new:
            self._notify()
        return new


def _insert_message(conn: Any, msg: NewMessage) -> list[str]:
    groups = msg.by_route()
    body_id = _insert_with_new_id(
        conn, Q["insert_body"], (msg.body.data, msg.body.path, msg.body.size, len(groups)))
    ids = []
    for route, addresses in groups:
        entry_id = _insert_with_new_id(conn, Q["insert_entry"], (
            body_id, msg.sender, msg.received_at, msg.expires_at, msg.received_at, route.kind.value,
            route.name, route.domain, msg.body.size, msg.message_id, msg.client, int(msg.is_dsn),
            len(addresses), msg.helo, msg.auth_user, msg.dsn.ret, msg.dsn.envid, int(msg.is_tls_report),
            int(msg.utf8_headers)))
        dsn = [msg.recipient_dsn.get(a, NO_RECIPIENT_DSN) for a in addresses]
        conn.executemany(Q["insert_recipient"], [(entry_id, i, a, d.stored_notify, d.orcpt, domain_of(a))
                                                 for i, (a, d) in enumerate(zip(addresses, dsn))])
        ids.append(entry_id)
    return ids


def _remove(conn: Any, entry_id: str, body_id: str, cleanup: list, had_attempts: bool = True) -> None:
    conn.execute(Q["delete_entry"], (entry_id,))
    conn.execute(Q["delete_recipients"], (entry_id,))
    if had_attempts:
        conn.execute(Q["delete_attempts"], (entry_id,))
    # The last entry using the body deletes it; others only drop their reference.
    row = conn.execute(Q["delete_body"], (body_id,)).fetchone()
    if row is None:
        conn.execute(Q["unref_body"], (body_id,))
    elif row[0]:
        cleanup.append(row[0])


def _select(selector: Selector) -> tuple[str, tuple]:
    if selector.all:
        return Q["every_entry"], ()
    if selector.connector:
        return Q["on_connector"], (selector.connector,)
    return queries.in_list(Q["id_in"], len(selector.ids)), tuple(i.upper() for i in selector.ids)
