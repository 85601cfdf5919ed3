"""The watch's state of the in-memory store (store/memory.py): incidents,
notifications, last good deliveries, Fix-now overrides and their audit, refused
recipients.  Values are kept as the SQL stores keep them (their rows' tuples, JSON
text), and read through the same mapping (store/watch_rows.py), so what comes back
is a copy, typed as theirs is.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Sequence

from relaywatch.incident import Incident, IncidentRecord, IncidentState
from relaywatch.store.watch_rows import (audit_of, due_notification_of, incident_of, incident_row, last_good_of,
                                         last_good_row, notification_of, notification_state, override_values,
                                         overrides_of)
from relaywatch.watch_records import (AuditRecord, DueNotification, LastGood, NotificationState, Override,
                                      OverrideKey)


# The columns of watch.sql's notifications_of and due_notifications, as the memory store's rows hold them.
_NOTIFICATION_COLUMNS = ("transition", "channel", "state", "attempts", "last_error", "sent_at")
_DUE_COLUMNS = ("id", "incident_id", "transition", "channel", "attempts", "payload")


class MemoryWatch:
    """The watch's half of MemoryStore, which supplies ``_check`` (StoreError when closed)."""
    _check: Callable[[], None]
    _check_term: Callable[[int | None], None]     # the leader's fence (store/memory_cluster.py)

    def __init__(self) -> None:
        self._incidents: dict[int, tuple] = {}      # id -> the incidents row
        self._notifications: list[dict] = []
        self._last_good: dict[str, tuple[str, float, str]] = {}   # connector -> its last_good row
        self._overrides: dict[str, tuple[str, float, int | None]] = {}
        self._audit: list[list] = []    # the audit rows (watch.sql audit_columns), undone_at last
        self._invalid: list[tuple[float, str, str, str]] = []

    async def open_incidents(self) -> list[Incident]:
        self._check()
        return [incident_of(row) for _, row in sorted(self._incidents.items()) if row[3] == IncidentState.OPEN]

    async def incidents(self, include_resolved: bool = False, limit: int = 200) -> list[Incident]:
        self._check()
        rows = [row for _, row in sorted(self._incidents.items(), reverse=True)
                if include_resolved or row[3] == IncidentState.OPEN]
        return [incident_of(row) for row in rows[:limit]]

    async def incident(self, incident_id: int) -> IncidentRecord | None:
        self._check()
        row = self._incidents.get(incident_id)
        if row is None:
            return None
        notifications = tuple(notification_of(tuple(n[k] for k in _NOTIFICATION_COLUMNS))
                              for n in self._notifications if n["incident_id"] == incident_id)
        audit = tuple(audit_of(tuple(a)) for a in self._audit if a[4] == incident_id)
        return IncidentRecord(incident_of(row), notifications, audit)

    async def save_incident(self, incident: Incident, term: int | None = None) -> int:
        self._check()
        self._check_term(term)
        id_, connector, code, state, opened_at, resolved_at, blob = incident_row(incident)
        if id_ is None:
            id_ = max(self._incidents, default=0) + 1
            self._incidents[id_] = (id_, connector, code, state, opened_at, resolved_at, blob)
        elif id_ in self._incidents:
            old = self._incidents[id_]
            self._incidents[id_] = (*old[:3], state, old[4], resolved_at, blob)
        return id_

    def _add_notification(self, incident_id: int, transition: str, channel: str, **row: Any) -> bool:
        if any((n["incident_id"], n["transition"], n["channel"]) == (incident_id, transition, channel)
               for n in self._notifications):
            return False    # never twice per transition and channel
        self._notifications.append({"id": len(self._notifications) + 1, "incident_id": incident_id,
                                    "transition": transition, "channel": channel, **row})
        return True

    async def add_notification(self, incident_id: int, transition: str, channel: str, payload: dict,
                               now: float, term: int | None = None) -> bool:
        self._check()
        self._check_term(term)
        return self._add_notification(incident_id, transition, channel, state=NotificationState.PENDING.value,
                                      attempts=0, next_try=now, last_error=None, sent_at=None,
                                      payload=json.dumps(payload))

    async def add_notification_outcome(self, incident_id: int, transition: str, channel: str, payload: dict,
                                       attempts: int, sent_at: float | None, last_error: str | None) -> None:
        self._check()
        state = NotificationState.SENT if sent_at is not None else NotificationState.FAILED
        self._add_notification(incident_id, transition, channel, state=state.value, attempts=attempts,
                               next_try=sent_at or 0, last_error=last_error, sent_at=sent_at,
                               payload=json.dumps(payload))

    async def due_notifications(self, now: float) -> list[DueNotification]:
        self._check()
        return [due_notification_of(tuple(n[k] for k in _DUE_COLUMNS))
                for n in self._notifications if n["state"] == NotificationState.PENDING and n["next_try"] <= now]

    async def notification_result(self, notification_id: int, ok: bool, error: str | None, now: float,
                                  retry_at: float | None) -> None:
        self._check()
        for n in self._notifications:
            if n["id"] == notification_id:
                n.update(state=notification_state(ok, retry_at).value, attempts=n["attempts"] + 1,
                         last_error=error, sent_at=now if ok else None,
                         next_try=retry_at if retry_at is not None else n["next_try"])

    async def set_last_good(self, good: LastGood) -> None:
        self._check()
        self._last_good[good.connector] = last_good_row(good)

    async def last_good(self) -> dict[str, LastGood]:
        self._check()
        return {c: last_good_of(row) for c, row in self._last_good.items()}

    async def overrides(self) -> dict[OverrideKey, Override]:
        self._check()
        return overrides_of((k, v, at, i) for k, (v, at, i) in self._overrides.items())

    async def overrides_version(self) -> tuple:
        self._check()
        return len(self._overrides), max((at for _, at, _ in self._overrides.values()), default=None)

    async def apply_fix(self, who: str, action: str, incident_id: int | None, detail: dict,
                        set_overrides: Mapping[OverrideKey, Any], clear_overrides: Sequence[OverrideKey],
                        now: float) -> int:
        self._check()
        values, detail_json = override_values(set_overrides), json.dumps(detail)   # fails before any change
        for key, value in values:
            self._overrides[key] = (value, now, incident_id)
        for key in clear_overrides:
            self._overrides.pop(str(key), None)
        audit_id = len(self._audit) + 1
        self._audit.append([audit_id, now, who, action, incident_id, detail_json, None])
        return audit_id

    async def last_undoable(self, incident_id: int) -> AuditRecord | None:
        self._check()
        for row in reversed(self._audit):
            a = audit_of(tuple(row))
            if a.incident_id == incident_id and a.undone_at is None and not a.is_undo:
                return a
        return None

    async def mark_undone(self, audit_id: int, now: float) -> None:
        self._check()
        for row in self._audit:
            if row[0] == audit_id:
                row[6] = now

    async def add_invalid_recipients(self, rows: Sequence[tuple[float, str, str, str]]) -> None:
        self._check()
        self._invalid.extend(tuple(r) for r in rows)

    async def invalid_recipients_since(self, since: float) -> list[tuple[str, str, str, int]]:
        self._check()
        counts: dict[tuple[str, str, str], int] = {}
        for at, domain, connector, source in self._invalid:
            if at >= since:
                counts[(domain, connector, source)] = counts.get((domain, connector, source), 0) + 1
        return sorted(((*k, n) for k, n in counts.items()), key=lambda row: -row[3])
