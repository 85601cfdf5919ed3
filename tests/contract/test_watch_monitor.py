"""The monitor over a real store: incidents stored by an older relaywatch (a "watch:" code
as their only type tag, fewer fields) are read as their kinds and kept by the rules."""

from helpers import LOOPBACK, FakeClock, free_port, insert_stored_incident

from relaywatch.config import parse_config
from relaywatch.store.sqlite import SqliteStore
from relaywatch.watch.monitor import Monitor

NOW = 1_800_000_000.0


def _old_watch_incident(code, title, **extra):
    """As monitor._watch_incident wrote them before the incidents were typed."""
    return {"id": None, "connector": "*", "connector_type": "-", "code": code, "title": title, "kind": code,
            "subtype": None, "state": "open", "severity": "warning", "opened_at": NOW - 600,
            "updated_at": NOW - 600, "resolved_at": None, "first_seen": NOW - 600, "last_seen": NOW - 600,
            "messages": 0, "recipients": 0, "peak_messages": 0, "oldest_received_at": NOW - 600,
            "first_expires_at": NOW - 600, "destinations": [], "latest_error": None, "causes": [], "fixes": ["x"],
            "actions": [], "escalations": [], "delivered_late": 0, "expired": 0, "probe": None, **extra}


async def test_incidents_stored_by_an_older_version_are_resolved_by_their_rules(tmp_path):
    store = SqliteStore(tmp_path / "q.sqlite3")
    await store.open()
    try:
        config = parse_config({"alerts": {"invalid_recipient_quota": 5, "cert_probe_interval": "1h",
                                          "webhook_url": f"http://{LOOPBACK}:{free_port()}/hook"}})
        notice = await insert_stored_incident(store, _old_watch_incident(
            "watch:notice_failed", "Non-delivery reports cannot be built", severity="critical", count=1,
            detail="1 NDR(s) could not be built"))
        quota = await insert_stored_incident(store, _old_watch_incident(
            "watch:invalid_recipients", "Invalid recipients near the quota", level=80, count=4, quota=5, top=[],
            detail="4 invalid recipients"))
        cert = await insert_stored_incident(store, _old_watch_incident(
            "watch:cert_expiring", "Destination certificate expires soon", connector="partner",
            certificate={"days_left": 3}, detail="expires on 2027-01-01"))
        monitor = Monitor(lambda: config, store, routes=None, wake_scheduler=lambda: None, clock=FakeClock(NOW))
        await monitor.tick()
        # Nothing held back, no invalid recipients: both resolve; the certificate of a
        # connector no longer configured is nobody's to judge, so it stays as it was.
        for incident_id, code in ((notice, "watch:notice_failed"), (quota, "watch:invalid_recipients")):
            shown = (await store.incident(incident_id)).to_dict()
            assert (shown["code"], shown["kind"], shown["state"], shown["resolved_at"]) == (
                code, code, "resolved", NOW)
            assert [n["transition"] for n in shown["notifications"]] == ["resolve"]
        assert (await store.incident(quota)).to_dict()["level"] == 80 and (await store.incident(quota)).to_dict()["count"] == 0
        kept = (await store.incident(cert)).to_dict()
        assert kept["state"] == "open" and kept["certificate"] == {"days_left": 3} and kept["notifications"] == []
        assert [i.id for i in await store.open_incidents()] == [cert]
        await monitor.tick()        # and they do not come back
        assert [i.id for i in await store.open_incidents()] == [cert]
    finally:
        await store.close()


async def test_only_the_leader_evaluates_and_a_stale_leaders_writes_are_refused(tmp_path):
    """Two monitors on one queue (two nodes): the one without the lease evaluates nothing;
    the one whose term is over has its incident refused by the store, and nothing is written."""
    import pytest
    from relaywatch.cluster.model import NodeBeat
    from relaywatch.errors import StaleTerm
    from relaywatch.store.memory import MemoryStore
    store = MemoryStore(clock=FakeClock(NOW))
    await store.open()
    config = parse_config({"server": {"node_lapse": "30s"},
                           "alerts": {"webhook_url": f"http://{LOOPBACK}:{free_port()}/hook"}})
    await store.heartbeat(NodeBeat("gone", "gone:1:a", "10.0.0.9:25", "all", "1", NOW - 900, NOW - 60))
    terms = {"a": None, "b": None}

    def monitor(name):
        return Monitor(lambda: config, store, routes=None, wake_scheduler=lambda: None, clock=FakeClock(NOW),
                       leader_term=lambda: terms[name])
    a, b = monitor("a"), monitor("b")
    await a.tick()
    await b.tick()
    assert await store.open_incidents() == []           # nobody leads: nobody evaluates
    terms["a"] = await store.acquire_leader("a", NOW, NOW + 25)
    terms["b"] = terms["a"]                              # b still believes in a term that is over...
    await store.resign_leader("a")
    terms["a"] = await store.acquire_leader("a2", NOW, NOW + 25)   # ...since another start took it
    with pytest.raises(StaleTerm):                       # run() logs it; nothing is written
        await b.tick()
    assert await store.open_incidents() == []
    await a.tick()
    [down] = [i.to_dict() for i in await store.open_incidents()]
    assert (down["code"], down["node"]) == ("watch:node_down", "gone")
    assert [n.transition for n in (await store.incident(down["id"])).notifications] == ["open"]
