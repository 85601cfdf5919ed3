"""The watch's state on SQL: deferred mail by cause, incidents, notifications, overrides, audit.

Kept beside the queue so one database holds all state and the CLI can read it
while the server runs; none of it is on the message path.  The SQL is in
watch.sql, the rows become the kernel's records in store/watch_rows.py.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from relaywatch.incident import BacklogSummary, Incident, IncidentRecord
from relaywatch.model import EntryStatus
from relaywatch.store import queries
from relaywatch.store.cluster import check_term
from relaywatch.store.engine import Dialect, GroupCommitEngine
from relaywatch.store.watch_rows import (audit_of, due_notification_of, held_notice_of, incident_of, incident_row,
                                         last_good_of, last_good_row, notification_of, notification_state,
                                         override_values, overrides_of, summary)
from relaywatch.watch_records import (AuditRecord, DueNotification, HeldNotice, LastGood, NotificationState,
                                      Override, OverrideKey)

Q = queries.load("watch.sql")


class SqlWatch:
    """The watch's operations; SqlStore (store/sql.py) supplies ``engine``."""
    engine: GroupCommitEngine
    dialect: Dialect

    async def deferred_summary(self) -> list[BacklogSummary]:
        """Deferred mail grouped by (connector, code), with the newest evidence."""
        def q(conn: Any) -> list[BacklogSummary]:
            out = []
            for connector, code, messages, recipients, oldest, first_expiry, first_failure in conn.execute(
                    Q["deferred_by_cause"]).fetchall():
                if oldest is None:   # counted, but gone from the snapshot the seeks read (PostgreSQL)
                    continue
                errors = [json.loads(x) for (x,) in conn.execute(Q["latest_errors"], (connector, code))]
                out.append(summary(connector, code, messages, recipients, oldest, first_expiry, first_failure,
                                   errors))
            return out
        return await self.engine.read(q)

    async def held_notices(self, limit: int = 20) -> list[HeldNotice]:
        """Entries whose NDR could not be built yet, latest failure first
        (through the entries_notice index: the watch asks every few seconds)."""
        def q(conn: Any) -> list[HeldNotice]:
            held = [held_notice_of(row) for row in conn.execute(Q["held_notices"]).fetchall()]
            return sorted(held, key=lambda h: -(h.retry_at or 0))[:limit]
        return await self.engine.read(q)

    async def entry_ids(self, connector: str, code: str | None = None,
                        status: str = EntryStatus.DEFERRED.value) -> list[str]:
        def q(conn: Any) -> list[str]:
            if code is None:
                return [i for (i,) in conn.execute(Q["entry_ids"], (connector, status))]
            return [i for (i,) in conn.execute(Q["entry_ids_with_code"], (connector, status, code))]
        return await self.engine.read(q)

    async def open_incidents(self) -> list[Incident]:
        return await self.engine.read(lambda conn: [incident_of(r) for r in conn.execute(Q["open_incidents"])])

    async def incidents(self, include_resolved: bool = False, limit: int = 200) -> list[Incident]:
        sql = Q["recent_incidents" if include_resolved else "recent_open_incidents"]
        return await self.engine.read(lambda conn: [incident_of(r) for r in conn.execute(sql, (limit,))])

    async def incident(self, incident_id: int) -> IncidentRecord | None:
        def q(conn: Any) -> IncidentRecord | None:
            row = conn.execute(Q["incident"], (incident_id,)).fetchone()
            if row is None:
                return None
            notifications = tuple(notification_of(r) for r in conn.execute(Q["notifications_of"], (incident_id,)))
            audit = tuple(audit_of(r) for r in conn.execute(Q["audit_of"], (incident_id,)))
            return IncidentRecord(incident_of(row), notifications, audit)
        return await self.engine.read(q)

    async def save_incident(self, incident: Incident, term: int | None = None) -> int:
        """Insert (no id) or update an incident; returns its id.  ``term``: the
        leader's, refused (StaleTerm) once another node leads."""
        def op(conn: Any, cleanup: list) -> int:
            check_term(conn, self.dialect.row_share, term)
            id_, connector, code, state, opened_at, resolved_at, blob = incident_row(incident)
            if id_ is None:
                return conn.execute(Q["insert_incident"], (
                    connector, code, state, opened_at, resolved_at, blob)).fetchone()[0]
            conn.execute(Q["update_incident"], (state, resolved_at, blob, id_))
            return id_
        return await self.engine.write(op, first=term is not None)   # the leader row: engine.write

    async def add_notification(self, incident_id: int, transition: str, channel: str, payload: dict,
                               now: float, term: int | None = None) -> bool:
        """Queue one notification; False if this transition was already notified."""
        def op(conn: Any, cleanup: list) -> bool:
            check_term(conn, self.dialect.row_share, term)
            return conn.execute(Q["add_notification"],
                                (incident_id, transition, channel, now, json.dumps(payload))).rowcount == 1
        return await self.engine.write(op, first=term is not None)

    async def add_notification_outcome(self, incident_id: int, transition: str, channel: str, payload: dict,
                                       attempts: int, sent_at: float | None, last_error: str | None) -> None:
        """Record a notification that was sent (or tried) before this store could be
        written: the relay's own "cannot queue" incident (watch/store_incident.py)."""
        state = NotificationState.SENT if sent_at is not None else NotificationState.FAILED
        await self.engine.write(lambda conn, cleanup: conn.execute(Q["add_notification_outcome"], (
            incident_id, transition, channel, state.value, attempts, sent_at or 0, last_error, sent_at,
            json.dumps(payload))))

    async def due_notifications(self, now: float) -> list[DueNotification]:
        return await self.engine.read(lambda conn: [
            due_notification_of(r) for r in conn.execute(Q["due_notifications"], (now,))])

    async def notification_result(self, notification_id: int, ok: bool, error: str | None, now: float,
                                  retry_at: float | None) -> None:
        state = notification_state(ok, retry_at)
        await self.engine.write(lambda conn, cleanup: conn.execute(Q["notification_result"], (
            state.value, error, now if ok else None, retry_at, notification_id)))

    async def set_last_good(self, good: LastGood) -> None:
        await self.engine.write(lambda conn, cleanup: conn.execute(Q["set_last_good"], last_good_row(good)))

    async def last_good(self) -> dict[str, LastGood]:
        return await self.engine.read(lambda conn: {
            good.connector: good for good in map(last_good_of, conn.execute(Q["last_good"]))})

    async def overrides(self) -> dict[OverrideKey, Override]:
        return await self.engine.read(lambda conn: overrides_of(conn.execute(Q["overrides"])))

    async def overrides_version(self) -> tuple:
        return await self.engine.read(lambda conn: tuple(conn.execute(Q["overrides_version"]).fetchone()))

    async def apply_fix(self, who: str, action: str, incident_id: int | None, detail: dict,
                        set_overrides: Mapping[OverrideKey, Any], clear_overrides: Sequence[OverrideKey],
                        now: float) -> int:
        """Change overrides and write the audit record in one transaction."""
        values, detail_json = override_values(set_overrides), json.dumps(detail)

        def op(conn: Any, cleanup: list) -> int:
            for key, value in values:
                conn.execute(Q["set_override"], (key, value, now, incident_id))
            for key in clear_overrides:
                conn.execute(Q["clear_override"], (str(key),))
            return conn.execute(Q["insert_audit"], (now, who, action, incident_id, detail_json)).fetchone()[0]
        return await self.engine.write(op)

    async def last_undoable(self, incident_id: int) -> AuditRecord | None:
        def q(conn: Any) -> AuditRecord | None:
            row = conn.execute(Q["last_undoable"], (incident_id,)).fetchone()
            return audit_of(row) if row else None
        return await self.engine.read(q)

    async def mark_undone(self, audit_id: int, now: float) -> None:
        await self.engine.write(lambda conn, cleanup: conn.execute(Q["mark_undone"], (now, audit_id)))

    async def add_invalid_recipients(self, rows: Sequence[tuple[float, str, str, str]]) -> None:
        if rows:
            await self.engine.write(lambda conn, cleanup: conn.executemany(Q["add_invalid_recipient"], rows))

    async def invalid_recipients_since(self, since: float) -> list[tuple[str, str, str, int]]:
        return await self.engine.read(lambda conn: [tuple(r) for r in conn.execute(
            Q["invalid_recipients_since"], (since,)).fetchall()])
