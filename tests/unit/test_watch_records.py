"""The watch's records beside its incidents (watch_records.py), the overrides they apply
(config/overrides.py) and Fix now's undo of them (watch/fixes.py): as tables, no store."""

import json

import pytest

from relaywatch.config import apply_overrides, parse_config
from relaywatch.incident import IncidentRecord
from relaywatch.store.watch_rows import (audit_of, due_notification_of, held_notice_of, last_good_of, last_good_row,
                                         notification_of, overrides_of)
from relaywatch.watch.fixes import _undo_of
from relaywatch.watch_records import (AuditRecord, DueNotification, HeldNotice, LastGood, Notification,
                                      NotificationState, Override, OverrideKey, Setting)

from helpers import base_config

# -- override keys: the stored text and back --------------------------------------------

KEYS = [
    ("connector:onprem:paused",         OverrideKey(Setting.CONNECTOR_PAUSED, "onprem")),
    ("connector:onprem:enabled",        OverrideKey(Setting.CONNECTOR_ENABLED, "onprem")),
    ("domain:contoso.test:type",        OverrideKey(Setting.DOMAIN_TYPE, "contoso.test")),
    ("connector:a:b:paused",            OverrideKey(Setting.CONNECTOR_PAUSED, "a:b")),   # the name keeps its colons
]


@pytest.mark.parametrize("text, key", KEYS)
def test_an_override_key_reads_as_it_is_stored(text, key):
    assert OverrideKey.parse(text) == key and str(key) == text


@pytest.mark.parametrize("text", [
    "connector:onprem:weight",      # a setting this version does not know
    "node:n1:paused",               # nor a scope
    "connector::paused",            # no name
    "connector:paused",
    "paused",
    "",
])
def test_an_override_key_this_version_does_not_know_is_none(text):
    assert OverrideKey.parse(text) is None


def test_unknown_override_rows_are_left_out_and_values_come_back_as_json():
    rows = [("connector:a:paused", "true", 1.0, 7), ("domain:d.test:type", '"authoritative"', 2.0, None),
            ("connector:a:weight", "3", 3.0, None)]
    paused, typed = Setting.CONNECTOR_PAUSED.of("a"), Setting.DOMAIN_TYPE.of("d.test")
    assert overrides_of(rows) == {paused: Override(paused, True, 1.0, 7), typed: Override(typed, "authoritative", 2.0)}


# -- what the overrides change -------------------------------------------------------------

def _config(tmp_path):
    return parse_config(base_config(
        tmp_path, connectors=[{"name": "onprem", "type": "on_premises", "domains": ["contoso.test"],
                               "smart_hosts": ["127.0.0.1:25"], "tls": "none"}],
        domains=[{"name": "contoso.test", "type": "internal_relay", "mailboxes": ["anna"]}]))


def _set(setting, name, value):
    key = setting.of(name)
    return {key: Override(key, value, 1.0)}


@pytest.mark.parametrize("overrides, enabled, paused, domain_type", [
    ({},                                                                True,  False, "internal_relay"),
    (_set(Setting.CONNECTOR_PAUSED, "onprem", True),                    True,  True,  "internal_relay"),
    (_set(Setting.CONNECTOR_ENABLED, "onprem", False),                  False, False, "internal_relay"),
    (_set(Setting.DOMAIN_TYPE, "contoso.test", "authoritative"),        True,  False, "authoritative"),
    (_set(Setting.CONNECTOR_PAUSED, "gone", True),                      True,  False, "internal_relay"),  # not in the file
    (_set(Setting.DOMAIN_TYPE, "onprem", "authoritative"),              True,  False, "internal_relay"),  # not a domain
])
def test_apply_overrides(tmp_path, overrides, enabled, paused, domain_type):
    config = apply_overrides(_config(tmp_path), overrides)
    c, d = config.connector("onprem"), config.domain("contoso.test")
    assert (c.enabled, c.paused, d.type) == (enabled, paused, domain_type)


@pytest.mark.parametrize("detail, restore", [
    ({"undo": {"connector:a:paused": None}},                  {Setting.CONNECTOR_PAUSED.of("a"): None}),
    ({"undo": {"connector:a:enabled": True, "domain:d:type": "internal_relay"}},
     {Setting.CONNECTOR_ENABLED.of("a"): True, Setting.DOMAIN_TYPE.of("d"): "internal_relay"}),
    ({"undo": {"connector:a:weight": 3}},                     {}),       # a newer version's key: left alone
    ({"undo": None},                                          {}),
    ({"reason": "no undo recorded"},                          {}),
])
def test_an_undo_restores_what_the_audit_says(detail, restore):
    assert _undo_of(detail) == restore


# -- rows read into records ----------------------------------------------------------------

@pytest.mark.parametrize("pending, held", [
    ({"error": "OSError: disk", "since": 1.0, "tries": 2, "retry_at": 5.0, "recipients": []},
     HeldNotice("E1", "s@x.test", "a", "OSError: disk", 1.0, 2, 5.0)),
    ({},                                   HeldNotice("E1", "s@x.test", "a")),                # an older version's
    ({"error": None, "tries": "x", "retry_at": "soon"}, HeldNotice("E1", "s@x.test", "a")),   # odd values: neutral
])
def test_a_held_notice_reads_its_notice_pending(pending, held):
    assert held_notice_of(("E1", "s@x.test", "a", json.dumps(pending))) == held


@pytest.mark.parametrize("data, good", [
    ({"host": "mx", "ip": "192.0.2.1", "port": 25, "at": 9.0, "tls": {"version": "TLSv1.3"}},
     LastGood("a", 2.0, "mx", "192.0.2.1", 25, {"version": "TLSv1.3"})),      # the column's ``at`` wins
    ({"tls": "1.3"},                       LastGood("a", 2.0)),                   # odd: neutral
    ({},                                   LastGood("a", 2.0)),
])
def test_last_good_reads_what_any_version_stored(data, good):
    assert last_good_of(("a", 2.0, json.dumps(data))) == good


def test_last_good_is_stored_as_the_diagnosis_shows_it():
    good = LastGood("a", 2.0, "mx", "192.0.2.1", 25, {"version": "TLSv1.3"})
    connector, at, data = last_good_row(good)
    assert (connector, at) == ("a", 2.0)
    assert json.loads(data) == good.to_dict() == {"host": "mx", "ip": "192.0.2.1", "port": 25, "at": 2.0,
                                                  "tls": {"version": "TLSv1.3"}}
    assert last_good_of((connector, at, data)) == good


def test_notifications_and_audit_records_have_the_documented_shapes():
    """docs/json.md INCIDENT ``notifications`` and ``audit``; GET /api/v1/audit's records."""
    note = notification_of(("open", "webhook", "failed", 2, "refused", None))
    assert note == Notification("open", "webhook", NotificationState.FAILED, 2, "refused")
    assert note.to_dict() == {"transition": "open", "channel": "webhook", "state": "failed", "attempts": 2,
                              "last_error": "refused", "sent_at": None}
    audit = audit_of((3, 10.0, "ops", "pause", 7, '{"reason": "r"}', 11.0))
    assert audit == AuditRecord(3, 10.0, "ops", "pause", {"reason": "r"}, 7, 11.0) and not audit.is_undo
    assert list(audit.to_dict()) == ["id", "at", "who", "action", "detail", "undone_at"]
    assert audit.to_dict(with_incident=True) == {"id": 3, "at": 10.0, "who": "ops", "action": "pause",
                                                 "incident_id": 7, "detail": {"reason": "r"}, "undone_at": 11.0}
    assert list(audit.to_dict(with_incident=True)) == ["id", "at", "who", "action", "incident_id", "detail",
                                                        "undone_at"]
    assert due_notification_of((4, 7, "open", "email", 0, '{"x": 1}')) == DueNotification(4, 7, "open", "email", 0,
                                                                                           {"x": 1})


def test_an_incident_record_shows_its_notifications_and_audit_as_documented():
    from relaywatch.incident import Incident
    inc = Incident.from_dict({"id": 7, "connector": "a", "code": "4.4.316", "opened_at": 1.0})
    shown = IncidentRecord(inc, (Notification("open", "email", NotificationState.SENT, 1, None, 2.0),),
                           (AuditRecord(3, 10.0, "ops", "pause", {}, 7),)).to_dict()
    assert shown["notifications"] == [{"transition": "open", "channel": "email", "state": "sent", "attempts": 1,
                                       "last_error": None, "sent_at": 2.0}]
    assert shown["audit"] == [{"id": 3, "at": 10.0, "who": "ops", "action": "pause", "detail": {}, "undone_at": None}]
