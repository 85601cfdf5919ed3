"""The watch's typed incidents read and write exactly the stored / documented JSON shape."""

import json
from dataclasses import replace

import pytest

from relaywatch.incident import (PROBE_HISTORY, Alert, BacklogSummary, Incident, IncidentKind, IncidentState, ProbeResult,
                                    QuotaFacts, Severity, with_probe)

NOW = 1_800_000_000.0
ERROR = {"v": 1, "code": "4.4.316", "smtp_code": 450, "title": "Connection refused", "subtype": "refused",
         "detail": "h[192.0.2.5]:25 refused the connection (ECONNREFUSED).", "phase": "connect", "permanent": False,
         "at": NOW - 5, "kind": "connect.refused", "destination": {"host": "h", "ip": "192.0.2.5", "port": 25,
                                                                  "index": 1, "count": 1},
         "reply": None, "errno": "ECONNREFUSED", "dns": None, "tls": None}
PROBE = {"connector": "onprem", "type": "on_premises", "test_address": "postmaster@c.test", "at": NOW,
         "steps": [{"step": "dns", "ok": True, "ms": 0.1, "detail": "h -> 192.0.2.5"},
                   {"step": "tcp", "ok": False, "ms": 1.0, "detail": "refused"}],
         "ok": False, "error": {k: v for k, v in ERROR.items() if k != "v"}, "greeting": None, "certificate": None}


def _common(**kw):
    base = {"id": 7, "connector": "onprem", "connector_type": "on_premises", "code": "4.4.316",
            "title": "Connection refused", "kind": "connect.refused", "subtype": "refused", "state": "open",
            "severity": "warning", "opened_at": NOW, "updated_at": NOW, "resolved_at": None, "first_seen": NOW - 60,
            "last_seen": NOW - 5, "messages": 5, "recipients": 6, "peak_messages": 5,
            "oldest_received_at": NOW - 600, "first_expires_at": NOW + 86000, "destinations": ["h[192.0.2.5]:25"],
            "latest_error": ERROR, "diagnosis": {"cause": "nothing_listening", "text": "Nothing accepts",
                                                 "facts": {"last_good": None}},
            "causes": ["a"], "fixes": ["b"], "actions": ["decommission", "retry-now", "pause", "expire"],
            "escalations": ["expiry"], "delivered_late": 0, "expired": 1, "probe": PROBE}
    base.update(kw)
    return base


WATCH = dict(connector="*", connector_type="-", subtype=None, messages=0, recipients=0, peak_messages=0,
             destinations=[], latest_error=None, causes=[], actions=[], escalations=[], probe=None, diagnosis=None)

STORED = [
    (IncidentKind.BACKLOG, _common()),
    (IncidentKind.CERT_EXPIRING, _common(**{**WATCH, "connector": "partner", "connector_type": "partner"},
                                         code="watch:cert_expiring", kind="watch:cert_expiring",
                                         title="Destination certificate expires soon", detail="expires on 2027-01-01",
                                         certificate={"subject": "x", "days_left": 4.5}, fixes=["renew"])),
    (IncidentKind.INVALID_QUOTA, _common(**WATCH, code="watch:invalid_recipients", kind="watch:invalid_recipients",
                                         title="Invalid recipients near the quota", level=80, count=4, quota=5,
                                         top=[{"domain": "c.test", "connector": "local", "source": "destination",
                                               "count": 4}], detail="4 invalid", fixes=["check"])),
    (IncidentKind.NOTICE_FAILED, _common(**WATCH, code="watch:notice_failed", kind="watch:notice_failed",
                                         title="Non-delivery reports cannot be built", severity="critical", count=2,
                                         detail="2 NDR(s)", fixes=["report"])),
    (IncidentKind.STORE, _common(**{**WATCH, "connector": "-"}, code="4.3.1", kind="store", reply="452 4.3.1",
                                 title="Disk full: relaywatch cannot queue mail", severity="critical", refused=3,
                                 problems=[{"place": "queue", "path": "/q", "code": "ENOSPC", "detail": "full",
                                            "full": True, "refusing": "all mail"}],
                                 seen=[{"place": "queue", "path": "/q", "code": "ENOSPC", "detail": "full",
                                        "full": True, "refusing": "all mail"}], fixes=["free space"])),
    # an incident that was probed: the history in short beside the latest probe whole
    (IncidentKind.BACKLOG, _common(probe_history=[{"at": NOW - 60, "ok": False, "code": "4.4.316", "step": "tcp"},
                                                  {"at": NOW, "ok": True, "code": None, "step": None}])),
]


@pytest.mark.parametrize("kind, stored", STORED, ids=[k.value for k, _ in STORED])
def test_an_incident_reads_and_writes_its_stored_form_unchanged(kind, stored):
    inc = Incident.from_dict(json.loads(json.dumps(stored)))
    assert inc.kind is kind and inc.other == {}
    assert inc.to_dict() == stored
    assert json.dumps(inc.to_dict(), sort_keys=True) == json.dumps(stored, sort_keys=True)


def test_with_probe_keeps_the_latest_whole_and_a_bounded_history_in_short():
    inc = Incident.from_dict(_common(probe=None))
    failed = ProbeResult.from_dict(PROBE)
    for i in range(PROBE_HISTORY + 3):
        inc = with_probe(inc, replace(failed, at=NOW + i))
    assert inc.probe.at == NOW + PROBE_HISTORY + 2 and len(inc.probe_history) == PROBE_HISTORY
    assert inc.probe_history[0]["at"] == NOW + 3
    step = next(s.step for s in failed.steps if not s.ok)
    assert inc.probe_history[-1] == {"at": NOW + PROBE_HISTORY + 2, "ok": failed.ok,
                                     "code": failed.error.code if failed.error else None, "step": step}
    assert Incident.from_dict(json.loads(json.dumps(inc.to_dict()))).probe_history == inc.probe_history


def test_typed_fields():
    inc = Incident.from_dict(_common())
    assert inc.state is IncidentState.OPEN and inc.severity is Severity.WARNING and inc.is_open
    assert inc.latest_error.kind == "connect.refused" and inc.latest_error.destination.ip == "192.0.2.5"
    assert inc.probe.steps[1].step == "tcp" and inc.probe.host == "h" and inc.catalog_id == "connect.refused"
    quota = Incident.from_dict(STORED[2][1])
    assert quota.facts == QuotaFacts(80, 4, 5, quota.facts.top) and quota.facts.top[0].domain == "c.test"


def test_the_watch_code_is_the_kind_not_a_type_tag():
    assert IncidentKind.CERT_EXPIRING.code == "watch:cert_expiring"
    assert IncidentKind.BACKLOG.code is None and IncidentKind.STORE.code is None


def test_unknown_fields_are_kept_and_missing_ones_read_neutral():
    newer = _common(node="relay-2", shiny={"x": 1})
    inc = Incident.from_dict(newer)
    assert inc.other == {"node": "relay-2", "shiny": {"x": 1}}
    assert inc.to_dict() == newer
    old = Incident.from_dict({"id": 1, "connector": "a", "code": "4.4.316", "state": "open", "opened_at": 1.0,
                              "messages": 2})
    assert (old.kind, old.messages, old.escalations, old.latest_error, old.probe) == (
        IncidentKind.BACKLOG, 2, (), None, None)
    assert old.last_seen == 1.0 and old.severity is Severity.WARNING


def test_a_kind_of_a_newer_version_is_kept_as_it_was():
    # (node_down was the example here until this version learned it; disk_full is still unknown.)
    stored = _common(**WATCH, code="watch:disk_full", kind="watch:disk_full", title="Disk full")
    inc = Incident.from_dict(stored)
    assert inc.kind is IncidentKind.OTHER and inc.to_dict() == stored


def test_the_shown_incident_keeps_its_notifications_and_audit():
    shown = _common(notifications=[{"transition": "open"}], audit=[])
    assert Incident.from_dict(shown).to_dict() == shown


def test_probe_result_round_trips():
    assert ProbeResult.from_dict(PROBE).to_dict() == PROBE


def test_backlog_summary_from_the_store():
    s = BacklogSummary.from_dict({"connector": "onprem", "code": "4.4.316", "messages": 3, "recipients": 4,
                                  "oldest_received_at": 1.0, "first_expires_at": 2.0, "first_failure_at": None,
                                  "latest_error": ERROR, "destinations": ["h:25"]})
    assert s.key == ("onprem", "4.4.316") and s.latest_error.kind == "connect.refused" and s.destinations == ("h:25",)


# -- the texts and the webhook body built from typed incidents -----------------------------------

from relaywatch.receive.store_condition import ConditionEnded, Place, StoreProblem  # noqa: E402
from relaywatch.watch import alerts  # noqa: E402
from relaywatch.watch.store_incident import (open_store_incident, resolve_store_incident,  # noqa: E402
                                             update_store_incident)

# The keys the store's incident had as a dict, before it was typed (and what the webhook carried).
STORE_KEYS = {"id", "kind", "connector", "connector_type", "subtype", "state", "severity", "opened_at", "updated_at",
              "resolved_at", "first_seen", "last_seen", "messages", "recipients", "peak_messages",
              "oldest_received_at", "first_expires_at", "destinations", "latest_error", "diagnosis", "causes",
              "actions", "escalations", "delivered_late", "expired", "probe", "refused", "seen", "code", "reply",
              "title", "problems", "fixes"}


def test_the_store_incident_opens_changes_and_resolves_in_its_old_shape():
    queue = StoreProblem(Place.QUEUE, "/q.sqlite3", "SQLITE_FULL", "database or disk is full", True)
    spool = StoreProblem(Place.SPOOL, "/spool", "ENOSPC", "No space left on device", True)
    inc = open_store_incident(StoreProblem(Place.QUEUE, "/q.sqlite3", "?", "not open", False), NOW)
    opened = inc.to_dict()
    assert set(opened) == STORE_KEYS
    assert (opened["kind"], opened["code"], opened["reply"], opened["severity"], opened["refused"]) == (
        "store", "4.3.0", "451 4.3.0", "critical", 1)
    assert alerts.headline(inc) == "CRITICAL 4.3.0 relaywatch cannot queue mail: mail is refused with 451 4.3.0"
    inc = update_store_incident(inc, [queue, spool], 4, NOW + 5)
    d = inc.to_dict()
    assert (d["code"], d["reply"], d["refused"], d["title"]) == ("4.3.1", "452 4.3.1", 4,
                                                                 "Disk full: relaywatch cannot queue mail")
    assert [p["code"] for p in d["problems"]] == ["SQLITE_FULL", "ENOSPC"]
    assert [p["code"] for p in d["seen"]] == ["?", "SQLITE_FULL", "ENOSPC"]
    assert "/spool: ENOSPC (No space left on device)" in alerts.incident_text(inc, NOW + 6)
    done = resolve_store_incident(inc, ConditionEnded(NOW, NOW + 60, 7, (queue, spool)))
    assert Incident.from_dict(done.to_dict()) == done
    assert alerts.headline(done) == "RESOLVED 4.3.1 relaywatch queues mail again (7 message(s) refused)"
    assert "7 message(s) were refused" in alerts.incident_text(done, NOW + 60)


@pytest.mark.parametrize("kind, stored", STORED, ids=[k.value for k, _ in STORED])
def test_the_webhook_body_carries_the_stored_shape(kind, stored):
    inc = Incident.from_dict(stored)
    body = alerts.payload(inc, Alert.opened(), NOW)
    assert body["incident"] == stored and (body["event"], body["transition"]) == ("incident.opened", "open")
    assert body["summary"] == alerts.headline(inc) and body["text"].startswith(body["summary"])


def test_headlines():
    backlog, cert = Incident.from_dict(STORED[0][1]), Incident.from_dict(STORED[1][1])
    assert alerts.headline(backlog) == "OPEN 4.4.316 Connection refused on connector onprem (5 message(s) waiting)"
    assert alerts.headline(cert) == "OPEN Destination certificate expires soon on connector partner"
    text = alerts.incident_text(backlog, NOW, Alert.escalated("count-100"))
    for line in ("Escalated: backlog passed 100.", "Destination: h[192.0.2.5]:25", "Likely cause: Nothing accepts",
                 "Last error: h[192.0.2.5]:25 refused the connection (ECONNREFUSED).",
                 "Fix now (relaywatch incidents fix 7 ACTION [--dry-run]): decommission, retry-now, pause, expire"):
        assert line in text
    assert alerts.incident_text(cert, NOW).splitlines()[2] == "expires on 2027-01-01"


# -- the alerts' names: typed inside, the same text stored and sent ------------------------------

ALERTS = [
    # alert                              stored/sent name        webhook event
    (Alert.opened(),                     "open",                 "incident.opened"),
    (Alert.escalated("expiry"),          "escalate:expiry",      "incident.escalated"),
    (Alert.escalated("count-1000"),      "escalate:count-1000",  "incident.escalated"),
    (Alert.escalated("100%"),            "escalate:100%",        "incident.escalated"),
    (Alert.resolved(),                   "resolve",              "incident.resolved"),
]


@pytest.mark.parametrize("alert, name, event", ALERTS, ids=[row[1] for row in ALERTS])
def test_an_alert_is_named_as_stored_and_sent(alert, name, event):
    assert (alert.name, alert.event, Alert.from_name(name)) == (name, event, alert)
    body = alerts.payload(Incident.from_dict(STORED[0][1]), alert, NOW)
    assert (body["transition"], body["event"]) == (name, event)
    assert json.loads(json.dumps(body))["transition"] == name


def test_only_an_escalation_has_a_reason_and_an_update_tells_nobody():
    from relaywatch.incident import Transition, TransitionKind
    for kind, reason in ((TransitionKind.UPDATE, None), (TransitionKind.ESCALATE, None),
                         (TransitionKind.OPEN, "expiry"), (TransitionKind.RESOLVE, "x")):
        with pytest.raises(ValueError):
            Alert(kind, reason)
    with pytest.raises(ValueError):      # the transition and what it tells agree
        Transition(TransitionKind.RESOLVE, Incident.from_dict(STORED[0][1]), Alert.opened())
    assert "Escalated" not in alerts.incident_text(Incident.from_dict(STORED[0][1]), NOW, Alert.opened())
