"""Incidents: one per (connector, code), opened, escalated and resolved by rule.

Pure: ``evaluate()`` takes what the queue looks like now and the open
incidents, and returns what changed.  The monitor (watch/monitor.py) does the
I/O: probing, saving, notifying.

Lifecycle of an incident:
    (deferred mail with code C on connector X past the thresholds)
        -> OPEN (severity warning)   notify "open"
        -> escalations                notify "escalate:expiry", "escalate:count-<n>" (severity critical)
        -> RESOLVED when no mail for X is deferred with C any more
                                      notify "resolve" with what happened (the all-clear)
A change of cause on the same connector is a resolve of the old code and an
open of the new one.

Incidents with a ``kind`` from ``IncidentKind`` are not about a connector's
backlog: their own code opens and resolves them, and ``evaluate`` leaves them
alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from relaywatch.classify.catalog import CATALOG, lookup
from relaywatch.config import Config


class IncidentKind(enum.StrEnum):
    STORE = "store"   # the relay itself cannot queue mail (watch/store_incident.py)


_OWN_KINDS = frozenset(IncidentKind)


@dataclass(frozen=True)
class Transition:
    kind: str            # open | update | escalate | resolve
    incident: dict
    notify: str | None   # the notification transition name, if admins are told


def _key(item: dict) -> tuple[str, str]:
    return item["connector"], item["code"]


def _actions(connector_type: str | None, code: str, has_connector: bool) -> list[str]:
    actions = ["retry-now", "pause", "expire"] if has_connector else ["retry-now", "expire"]
    if code == "4.4.316" and connector_type == "on_premises":
        actions.insert(0, "decommission")
    return actions


def new_incident(summary: dict, config: Config, now: float) -> dict:
    connector = config.connector(summary["connector"])
    error = summary.get("latest_error") or {}
    entry = CATALOG.get(error.get("kind")) or lookup(summary["code"])
    ctype = connector.type if connector else None
    return {
        "id": None, "connector": summary["connector"], "connector_type": ctype or "internet",
        "code": summary["code"], "title": entry.title if entry else error.get("title", summary["code"]),
        "kind": entry.id if entry else None, "subtype": error.get("subtype"),
        "state": "open", "severity": "warning", "opened_at": now, "updated_at": now, "resolved_at": None,
        "first_seen": summary.get("first_failure_at") or now, "last_seen": error.get("at") or now,
        "messages": summary["messages"], "recipients": summary["recipients"],
        "peak_messages": summary["messages"], "oldest_received_at": summary["oldest_received_at"],
        "first_expires_at": summary["first_expires_at"], "destinations": summary["destinations"],
        "latest_error": error, "diagnosis": None,
        "causes": list(entry.causes_for(ctype)) if entry else [],
        "fixes": list(entry.fixes_for(ctype)) if entry else [],
        "actions": _actions(ctype, summary["code"], connector is not None),
        "escalations": [], "delivered_late": 0, "expired": 0, "probe": None,
    }


def evaluate(summaries: list[dict], open_incidents: list[dict], config: Config, now: float) -> list[Transition]:
    alerts = config.alerts
    by_key = {_key(s): s for s in summaries}
    out: list[Transition] = []
    open_keys = set()
    for inc in open_incidents:
        if inc["code"].startswith("watch:") or inc.get("kind") in _OWN_KINDS:
            continue    # certificate and quota warnings, and the store's, are kept by their own checks
        key = _key(inc)
        open_keys.add(key)
        summary = by_key.get(key)
        if summary is None:
            done = dict(inc, state="resolved", resolved_at=now, updated_at=now, messages=0, recipients=0)
            out.append(Transition("resolve", done, "resolve"))
            continue
        updated = dict(inc, messages=summary["messages"], recipients=summary["recipients"],
                       peak_messages=max(inc.get("peak_messages", 0), summary["messages"]),
                       oldest_received_at=summary["oldest_received_at"],
                       first_expires_at=summary["first_expires_at"], destinations=summary["destinations"],
                       latest_error=summary.get("latest_error") or inc.get("latest_error"),
                       last_seen=(summary.get("latest_error") or {}).get("at") or inc["last_seen"], updated_at=now)
        escalations = list(inc.get("escalations", []))
        reasons = []
        if summary["first_expires_at"] - now <= alerts.escalate_before_expiry and "expiry" not in escalations:
            reasons.append("expiry")
        for step in alerts.escalate_steps:
            name = f"count-{step}"
            if summary["messages"] >= step and name not in escalations:
                reasons.append(name)
        if reasons:
            updated["escalations"] = escalations + reasons
            updated["severity"] = "critical"
            for reason in reasons:
                out.append(Transition("escalate", updated, f"escalate:{reason}"))
        else:
            out.append(Transition("update", updated, None))
    for key, summary in by_key.items():
        if key in open_keys:
            continue
        old_enough = now - summary["oldest_received_at"] >= alerts.open_after
        if old_enough and summary["messages"] >= alerts.min_messages:
            out.append(Transition("open", new_incident(summary, config, now), "open"))
    return out


def headline(inc: dict) -> str:
    verb = {"open": "OPEN", "resolved": "RESOLVED"}.get(inc["state"], inc["state"].upper())
    if inc["state"] == "open" and inc.get("severity") == "critical":
        verb = "CRITICAL"
    if inc.get("kind") == IncidentKind.STORE:
        if inc["state"] == "resolved":
            return f"{verb} {inc['code']} relaywatch queues mail again ({inc.get('refused', 0)} message(s) refused)"
        return f"{verb} {inc['code']} {inc['title']}: mail is refused with {inc['reply']}"
    if inc["code"].startswith("watch:"):
        return f"{verb} {inc['title']} on connector {inc['connector']}"
    what = f"{inc['code']} {inc['title']}"
    if inc["state"] == "resolved":
        return f"{verb} {what} on connector {inc['connector']}: mail flows again"
    return f"{verb} {what} on connector {inc['connector']} ({inc['messages']} message(s) waiting)"
