"""The one-line headline of an incident (alert subjects, the CLI, events).

The rules that open, escalate and resolve incidents are in watch/rules.py,
the incident itself in watch/model.py.
"""

from __future__ import annotations

from relaywatch.watch.model import IncidentKind


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
