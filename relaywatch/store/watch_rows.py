"""The watch's rows read into the kernel's records and made from them: the one place an
``incidents``, ``notifications``, ``overrides``, ``audit`` or ``last_good`` row (in the
column order of watch.sql's queries) becomes an ``Incident``, a ``Notification``, an
``Override``... and back.

The SQL stores (store/watch.py, store/console.py) read their cursors' rows through it;
the memory store (store/memory_watch.py) keeps the same tuples and JSON text and reads
them through it too, so all three return what the SQL stores return.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from relaywatch.incident import BacklogSummary, Incident
from relaywatch.model import dest_label
from relaywatch.watch_records import (AuditRecord, DueNotification, HeldNotice, LastGood, Notification,
                                      NotificationState, Override, OverrideKey)

# The incident columns of their own; the rest of Incident.to_dict() is the JSON in ``data``.
_INCIDENT_KEYS = ("id", "connector", "code", "state", "opened_at", "resolved_at")


def summary(connector: str, code: str, messages: int, recipients: int, oldest: float, first_expiry: float,
            first_failure: float | None, errors: list[dict]) -> BacklogSummary:
    """One (connector, code) group of deferred_summary(); ``errors``: its newest last_errors (stored JSON)."""
    errors = sorted(errors, key=lambda e: e.get("at") or 0)
    return BacklogSummary.from_dict({
        "connector": connector, "code": code, "messages": messages, "recipients": recipients,
        "oldest_received_at": oldest, "first_expires_at": first_expiry,
        "first_failure_at": first_failure, "latest_error": errors[-1] if errors else None,
        "destinations": sorted({dest_label(e.get("destination")) for e in errors if e.get("destination")})})


def incident_row(incident: Incident) -> tuple:
    """An incident as its row: (id, connector, code, state, opened_at, resolved_at, the JSON ``data``:
    the rest of its documented shape, Incident.to_dict)."""
    shown = incident.to_dict()
    data = json.dumps({k: v for k, v in shown.items() if k not in (*_INCIDENT_KEYS, "notifications", "audit")},
                      separators=(",", ":"))
    return (*(shown[k] for k in _INCIDENT_KEYS), data)


def incident_of(row: tuple) -> Incident:
    """An incidents row as an Incident, whichever version wrote it (Incident.from_dict reads them all)."""
    id_, connector, code, state, opened_at, resolved_at, data = row
    return Incident.from_dict({**json.loads(data), "id": id_, "connector": connector, "code": code, "state": state,
                               "opened_at": opened_at, "resolved_at": resolved_at})


def notification_state(ok: bool, retry_at: float | None) -> NotificationState:
    if ok:
        return NotificationState.SENT
    return NotificationState.PENDING if retry_at is not None else NotificationState.FAILED


def notification_of(row: tuple) -> Notification:
    """(transition, channel, state, attempts, last_error, sent_at): ``notifications_of``."""
    transition, channel, state, attempts, last_error, sent_at = row
    return Notification(transition, channel, NotificationState(state), attempts, last_error, sent_at)


def due_notification_of(row: tuple) -> DueNotification:
    """(id, incident_id, transition, channel, attempts, payload JSON): ``due_notifications``."""
    id_, incident_id, transition, channel, attempts, payload = row
    return DueNotification(id_, incident_id, transition, channel, attempts, json.loads(payload))


def held_notice_of(row: tuple) -> HeldNotice:
    """(id, sender, route_name, notice_pending JSON): ``held_notices``."""
    entry_id, sender, connector, pending = row
    return HeldNotice.of(entry_id, sender, connector, json.loads(pending) if isinstance(pending, str) else pending)


def overrides_of(rows: Any) -> dict[OverrideKey, Override]:
    """(key, value JSON, set_at, incident_id) rows: ``overrides``.  A key this version does not
    know (a newer one wrote it) is left out: nothing here could apply it."""
    out = {}
    for text, value, set_at, incident_id in rows:
        key = OverrideKey.parse(text)
        if key is not None:
            out[key] = Override(key, json.loads(value), set_at, incident_id)
    return out


def override_values(sets: Mapping[OverrideKey, Any]) -> list[tuple[str, str]]:
    """(key, value JSON) to store; made before any is written, so a value that is not JSON changes nothing."""
    return [(str(key), json.dumps(value)) for key, value in sets.items()]


def audit_of(row: tuple) -> AuditRecord:
    """(id, at, who, action, incident_id, detail JSON, undone_at): ``audit_columns``."""
    id_, at, who, action, incident_id, detail, undone_at = row
    return AuditRecord(id_, at, who, action, json.loads(detail), incident_id, undone_at)


def last_good_row(good: LastGood) -> tuple[str, float, str]:
    """(connector, at, data JSON); ``data`` holds ``at`` too, as older versions read it."""
    return good.connector, good.at, json.dumps(good.to_dict())


def last_good_of(row: tuple) -> LastGood:
    connector, at, data = row
    return LastGood.from_dict(connector, at, json.loads(data))
