"""The incident rules (watch/rules.py), by table: every kind opens past its threshold,
escalates, resolves, and does not open twice; a change of cause resolves one and opens another."""

from dataclasses import replace

import pytest

from relaywatch.config import parse_config
from relaywatch.model import Failure
from relaywatch.watch.model import (BacklogSummary, Incident, IncidentKind, IncidentState, Severity,
                                    TransitionKind as T)
from relaywatch.watch.rules import WatchFacts, evaluate

NOW = 1_800_000_000.0
CONFIG = parse_config({
    "alerts": {"open_after": "5m", "min_messages": 2, "escalate_before_expiry": "4h", "escalate_steps": [100, 1000]},
    "connectors": [{"name": "onprem", "type": "on_premises", "domains": ["c.test"]},
                   {"name": "partner", "type": "partner", "domains": ["p.test"]}]})


def refused(at=NOW):
    return Failure(code="4.4.316", smtp_code=450, title="Connection refused", subtype="refused",
                   detail="h refused the connection.", phase="connect", permanent=False, at=at, kind="connect.refused")


def backlog(messages=5, age=600, expires_in=86_000, code="4.4.316", connector="onprem"):
    return BacklogSummary(connector=connector, code=code, messages=messages, recipients=messages,
                          oldest_received_at=NOW - age, first_expires_at=NOW + expires_in, first_failure_at=NOW - 60,
                          latest_error=refused() if code == "4.4.316" else None, destinations=("h:25",))


def open_backlog(code="4.4.316", escalations=(), **kw):
    return Incident(kind=IncidentKind.BACKLOG, connector="onprem", code=code, title="Connection refused",
                    opened_at=NOW - 900, id=1, connector_type="on_premises", messages=5, escalations=escalations,
                    last_seen=NOW - 900, **kw)


def run(facts, open_=()):
    return evaluate(facts, list(open_), CONFIG, NOW)


def brief(transitions):
    return [(t.kind, t.notify, t.incident.code) for t in transitions]


BACKLOG = [
    # name                 facts                                                  open                expected
    ("too young",          WatchFacts((backlog(age=60),)),                        [],                 []),
    ("too few",            WatchFacts((backlog(messages=1),)),                    [],                 []),
    ("opens",              WatchFacts((backlog(),)),                              [],                 [(T.OPEN, "open", "4.4.316")]),
    ("stays open: no second open", WatchFacts((backlog(),)),                      [open_backlog()],   [(T.UPDATE, None, "4.4.316")]),
    ("escalates by count", WatchFacts((backlog(messages=150),)),                  [open_backlog()],   [(T.ESCALATE, "escalate:count-100", "4.4.316")]),
    ("escalates before expiry", WatchFacts((backlog(expires_in=3600),)),          [open_backlog()],   [(T.ESCALATE, "escalate:expiry", "4.4.316")]),
    ("two escalations at once", WatchFacts((backlog(messages=1500, expires_in=60),)), [open_backlog()],
     [(T.ESCALATE, "escalate:expiry", "4.4.316"), (T.ESCALATE, "escalate:count-100", "4.4.316"),
      (T.ESCALATE, "escalate:count-1000", "4.4.316")]),
    ("escalates once",     WatchFacts((backlog(expires_in=3600),)),               [open_backlog(escalations=("expiry",))],
     [(T.UPDATE, None, "4.4.316")]),
    ("resolves",           WatchFacts(()),                                        [open_backlog()],   [(T.RESOLVE, "resolve", "4.4.316")]),
    ("a change of cause",  WatchFacts((backlog(code="4.7.320"),)),                [open_backlog()],
     [(T.RESOLVE, "resolve", "4.4.316"), (T.OPEN, "open", "4.7.320")]),
    ("another connector is its own incident", WatchFacts((backlog(), backlog(connector="partner"))), [open_backlog()],
     [(T.UPDATE, None, "4.4.316"), (T.OPEN, "open", "4.4.316")]),
]


@pytest.mark.parametrize("facts, open_, expected", [row[1:] for row in BACKLOG], ids=[row[0] for row in BACKLOG])
def test_backlog(facts, open_, expected):
    assert brief(run(facts, open_)) == expected


def test_a_backlog_incident_opens_with_the_catalog_and_the_evidence():
    [t] = run(WatchFacts((backlog(),)))
    inc = t.incident
    assert (inc.kind, inc.state, inc.severity, inc.id) == (IncidentKind.BACKLOG, IncidentState.OPEN, Severity.WARNING, None)
    assert (inc.connector_type, inc.catalog_id, inc.subtype, inc.title) == (
        "on_premises", "connect.refused", "refused", "Connection refused")
    assert inc.actions == ("decommission", "retry-now", "pause", "expire")
    assert inc.fixes and inc.causes and inc.latest_error == refused() and inc.destinations == ("h:25",)
    assert (inc.messages, inc.peak_messages, inc.first_seen, inc.opened_at) == (5, 5, NOW - 60, NOW)


def test_escalation_makes_it_critical_and_resolve_counts_what_happened():
    facts = WatchFacts((backlog(messages=150),), delivered_late={"onprem": 3}, expired={("onprem", "4.4.316"): 2})
    escalated = run(facts, [open_backlog()])[0].incident
    assert escalated.severity is Severity.CRITICAL and escalated.escalations == ("count-100",)
    assert (escalated.messages, escalated.peak_messages, escalated.delivered_late, escalated.expired) == (150, 150, 3, 2)
    # counted once, also with several escalations in one evaluation
    many = run(replace(facts, backlog=(backlog(messages=1500, expires_in=60),)), [open_backlog()])
    assert {t.incident.delivered_late for t in many} == {3}
    [done] = run(WatchFacts((), delivered_late={"onprem": 1}), [escalated])
    assert done.incident.state is IncidentState.RESOLVED and done.incident.resolved_at == NOW
    assert (done.incident.messages, done.incident.peak_messages, done.incident.delivered_late) == (0, 150, 4)


def test_a_resolved_incident_is_not_reopened_by_a_backlog_under_the_threshold():
    assert run(WatchFacts((backlog(messages=1),)), [replace(open_backlog(), state=IncidentState.RESOLVED)]) == []


def test_the_backlog_rule_leaves_the_store_incident_alone():
    store = Incident(kind=IncidentKind.STORE, connector="-", code="4.3.1", title="Disk full", opened_at=NOW, id=9)
    assert run(WatchFacts(()), [store]) == []
