"""The incident rules (watch/rules.py), by table: every kind opens past its threshold,
escalates, resolves, and does not open twice; a change of cause resolves one and opens another."""

from dataclasses import replace

import pytest

from relaywatch.config import parse_config
from relaywatch.model import Failure
from relaywatch.incident import (BacklogSummary, Incident, IncidentKind, IncidentState, Severity,
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


def told(t):
    """The alert's name: the text stored and sent (the notification's ``transition``), or None."""
    return t.alert.name if t.alert is not None else None


def brief(transitions):
    return [(t.kind, told(t), t.incident.code) for t in transitions]


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


# -- the watch's own warnings -------------------------------------------------------------------

from relaywatch.classify.catalog import CATALOG  # noqa: E402
from relaywatch.incident_facts import CertificateFacts, InvalidSource, NoticeFacts, QuotaFacts  # noqa: E402
from relaywatch.watch.rules import CertificateSeen  # noqa: E402
from relaywatch.watch_records import HeldNotice  # noqa: E402

QUOTA = replace(CONFIG, alerts=replace(CONFIG.alerts, invalid_recipient_quota=10, cert_warning_days=14))


def cert(days, connector="partner"):
    return CertificateSeen(connector, "partner", "mail.partner.test",
                           {"subject": "mail.partner.test", "issuer": "Corp CA", "not_after": "2027-01-05T00:00:00+00:00",
                            "days_left": days})


def invalid(*counts):
    return tuple(InvalidSource(f"d{i}.test", "local", "destination", n) for i, n in enumerate(counts))


def warning(kind, connector="*", **kw):
    return Incident(kind=kind, connector=connector, code=kind.code, title="w", opened_at=NOW - 900, id=2, **kw)


OPEN_CERT = warning(IncidentKind.CERT_EXPIRING, "partner", facts=CertificateFacts({"days_left": 5}))
OPEN_QUOTA = warning(IncidentKind.INVALID_QUOTA, facts=QuotaFacts(80, 8, 10))
OPEN_QUOTA_100 = warning(IncidentKind.INVALID_QUOTA, facts=QuotaFacts(100, 12, 10), severity=Severity.CRITICAL)
OPEN_NOTICE = warning(IncidentKind.NOTICE_FAILED, facts=NoticeFacts(1), severity=Severity.CRITICAL)
HELD = (HeldNotice("e1", "alice@c.test", "a", "FileNotFoundError: body"), HeldNotice("e0", "bob@c.test", "a", "x"))

WARNINGS = [
    # certificate
    ("cert: not probed this time",    WatchFacts(), [OPEN_CERT],                                 []),
    ("cert: valid for long enough",   WatchFacts(certificates=(cert(30),)), [],                  []),
    ("cert: no certificate facts",    WatchFacts(certificates=(cert(None),)), [OPEN_CERT],       []),
    ("cert: opens under the warning", WatchFacts(certificates=(cert(5),)), [],
     [(T.OPEN, "open", "watch:cert_expiring")]),
    ("cert: does not open twice",     WatchFacts(certificates=(cert(4),)), [OPEN_CERT],          []),
    ("cert: renewed, resolves",       WatchFacts(certificates=(cert(300),)), [OPEN_CERT],
     [(T.RESOLVE, "resolve", "watch:cert_expiring")]),
    ("cert: per connector",           WatchFacts(certificates=(cert(5, "other"),)), [OPEN_CERT],
     [(T.OPEN, "open", "watch:cert_expiring")]),
    # quota (10 a day)
    ("quota: under 80%",              WatchFacts(invalid_recipients=invalid(5, 2)), [],          []),
    ("quota: opens at 80%",           WatchFacts(invalid_recipients=invalid(5, 3)), [],
     [(T.OPEN, "open", "watch:invalid_recipients")]),
    ("quota: does not open twice",    WatchFacts(invalid_recipients=invalid(9)), [OPEN_QUOTA],   []),
    ("quota: escalates at 100%",      WatchFacts(invalid_recipients=invalid(6, 4)), [OPEN_QUOTA],
     [(T.ESCALATE, "escalate:100%", "watch:invalid_recipients")]),
    ("quota: escalates once",         WatchFacts(invalid_recipients=invalid(20)), [OPEN_QUOTA_100], []),
    ("quota: resolves under 80%",     WatchFacts(invalid_recipients=invalid(7)), [OPEN_QUOTA],
     [(T.RESOLVE, "resolve", "watch:invalid_recipients")]),
    ("quota: not read",               WatchFacts(), [OPEN_QUOTA],                                []),
    ("quota: opens at 100% at once",  WatchFacts(invalid_recipients=invalid(30)), [],
     [(T.OPEN, "open", "watch:invalid_recipients")]),
    # notices
    ("notice: none held",             WatchFacts(held_notices=()), [],                           []),
    ("notice: opens",                 WatchFacts(held_notices=HELD), [],
     [(T.OPEN, "open", "watch:notice_failed")]),
    ("notice: does not open twice",   WatchFacts(held_notices=HELD), [OPEN_NOTICE],              []),
    ("notice: resolves",              WatchFacts(held_notices=()), [OPEN_NOTICE],
     [(T.RESOLVE, "resolve", "watch:notice_failed")]),
    ("notice: not read",              WatchFacts(), [OPEN_NOTICE],                               []),
    # kinds do not touch each other
    ("a backlog on the same connector", WatchFacts((backlog(connector="partner"),), certificates=(cert(5),)),
     [replace(OPEN_CERT, connector="partner")], [(T.OPEN, "open", "4.4.316")]),
]


@pytest.mark.parametrize("facts, open_, expected", [row[1:] for row in WARNINGS], ids=[row[0] for row in WARNINGS])
def test_warnings(facts, open_, expected):
    assert brief(evaluate(facts, open_, QUOTA, NOW)) == expected


def test_the_certificate_warning_says_which_and_when_with_the_catalog_texts():
    [t] = evaluate(WatchFacts(certificates=(cert(5.2),)), [], QUOTA, NOW)
    inc, entry = t.incident, CATALOG["watch.cert_expiring"]
    assert (inc.kind, inc.connector, inc.connector_type, inc.severity) == (
        IncidentKind.CERT_EXPIRING, "partner", "partner", Severity.WARNING)
    assert inc.title == entry.title and inc.fixes == entry.fixes["partner"] and inc.causes == entry.causes["partner"]
    assert inc.detail == ("The certificate of mail.partner.test (mail.partner.test, issued by Corp CA) expires on "
                          "2027-01-05, in 5.2 days. Mail will stop with 4.7.320 then unless it is renewed.")
    assert inc.facts.certificate["days_left"] == 5.2
    assert (inc.diagnosis.cause, inc.diagnosis.text) == ("cert_expiring", inc.detail)
    assert inc.to_dict()["code"] == inc.to_dict()["kind"] == "watch:cert_expiring"
    [done] = evaluate(WatchFacts(certificates=(cert(300),)), [inc], QUOTA, NOW + 60)
    assert done.incident.state is IncidentState.RESOLVED and done.incident.facts.certificate["days_left"] == 300


def test_the_quota_warning_counts_and_names_the_worst_sources():
    [t] = evaluate(WatchFacts(invalid_recipients=invalid(5, 3)), [], QUOTA, NOW)
    inc = t.incident
    assert inc.facts == QuotaFacts(80, 8, 10, invalid(5, 3)) and inc.severity is Severity.WARNING
    assert inc.detail == ("8 invalid recipients in the last 24 hours, 80% of the quota of 10. "
                          "Most from: d0.test via local (5, destination), d1.test via local (3, destination).")
    assert inc.fixes == CATALOG["watch.invalid_recipients"].fixes["partner"]
    assert inc.fixes[0].startswith("If an on-premises server was retired, use the decommission action")
    [up] = evaluate(WatchFacts(invalid_recipients=invalid(5, 5)), [inc], QUOTA, NOW)
    assert up.incident.severity is Severity.CRITICAL and up.incident.facts.level == 100
    assert up.incident.facts.count == 10 and "100% of the quota" in up.incident.detail
    [done] = evaluate(WatchFacts(invalid_recipients=invalid(1)), [up.incident], QUOTA, NOW)
    assert done.incident.state is IncidentState.RESOLVED and done.incident.facts.count == 1


def test_the_notice_warning_is_critical_and_names_the_latest():
    [t] = evaluate(WatchFacts(held_notices=HELD), [], QUOTA, NOW)
    inc = t.incident
    assert inc.severity is Severity.CRITICAL and inc.facts == NoticeFacts(2)
    assert inc.detail.startswith("2 NDR(s) could not be built, latest for e1 to alice@c.test: FileNotFoundError")
    assert inc.fixes == CATALOG["watch.notice_failed"].fixes["partner"]


def test_a_quota_of_zero_watches_nothing():
    assert evaluate(WatchFacts(invalid_recipients=invalid(100)), [], CONFIG, NOW) == []


def test_decommission_is_offered_for_a_refused_connection_not_for_a_reply_with_its_code():
    """An on-premises server that answers "450 4.4.316" itself is up: retiring it is no fix."""
    reply = replace(refused(), kind="smtp.transient_reply", reply="450 4.4.316 busy")
    [t] = run(WatchFacts((replace(backlog(), latest_error=reply),)))
    assert t.incident.catalog_id == "smtp.transient_reply" and "decommission" not in t.incident.actions
    [t] = run(WatchFacts((backlog(),)))
    assert t.incident.actions[0] == "decommission"


# -- nodes of the cluster ------------------------------------------------------------------

from relaywatch.incident_facts import NodeFacts  # noqa: E402
from relaywatch.watch.rules import NodeSeen  # noqa: E402


def node(name="relay-2", down=True):
    return NodeSeen(name, "10.0.0.2:25", NOW - 45, down)


def open_node_down(name="relay-2"):
    return Incident(kind=IncidentKind.NODE_DOWN, connector="*", code="watch:node_down", title="A relaywatch node is down",
                    opened_at=NOW - 60, id=7, facts=NodeFacts(name, "10.0.0.2:25", NOW - 90))


NODES = [
    # name                         nodes                                   open                   expected (kind, alert, node)
    ("all alive",                  (node("relay-1", False), node(down=False)), [],               []),
    ("opens when one dies",        (node("relay-1", False), node()),       [],                    [(T.OPEN, "open", "relay-2")]),
    ("one per node",               (node("relay-1"), node()),              [],                    [(T.OPEN, "open", "relay-1"), (T.OPEN, "open", "relay-2")]),
    ("never opens twice",          (node(),),                              [open_node_down()],    []),
    ("resolves when it returns",   (node(down=False),),                    [open_node_down()],    [(T.RESOLVE, "resolve", "relay-2")]),
    ("resolves when it is gone",   (),                                     [open_node_down()],    [(T.RESOLVE, "resolve", "relay-2")]),
    ("another's death is its own", (node("relay-1"), node()),              [open_node_down()],    [(T.OPEN, "open", "relay-1")]),
    ("nodes not read: no change",  None,                                   [open_node_down()],    []),
]


@pytest.mark.parametrize("name,nodes,open_,expected", NODES, ids=[n[0] for n in NODES])
def test_node_down_rule(name, nodes, open_, expected):
    out = run(WatchFacts(nodes=nodes), open_)
    assert [(t.kind, told(t), t.incident.facts.node) for t in out] == expected
    for t in out:
        assert t.incident.kind is IncidentKind.NODE_DOWN and t.incident.code == "watch:node_down"
        if t.kind is T.OPEN:
            assert t.incident.severity is Severity.CRITICAL and "relaywatch nodes" in " ".join(t.incident.fixes)
            assert t.incident.facts.last_heartbeat_at == NOW - 45


def test_a_node_down_incident_is_read_back_as_stored():
    inc = replace(open_node_down(), id=3)
    again = Incident.from_dict(inc.to_dict())
    assert again.kind is IncidentKind.NODE_DOWN and again.facts == inc.facts and again.to_dict() == inc.to_dict()
