"""The message trace, the nodes and the queue's text and route filters over real HTTP, against a
running relay; ``relaywatch queue trace --json`` and ``relaywatch nodes --json`` are the reference."""

import pytest

from helpers import LOOPBACK, Sink, SinkHandler, eventually, message
from tests.acceptance.test_console import OTHER, TOKEN, client, deferred, partner, stuck_relay

pytestmark = pytest.mark.both_loops

LIVE = ("heartbeat_at", "heartbeat_age", "leases", "received", "delivered")   # change between two reads


async def traced(http, message_id: str) -> list[dict]:
    async def found():
        r = await http.get("/api/v1/trace", params={"message_id": message_id})
        assert r.status_code == 200
        traces = r.json()["traces"]
        return traces if traces and not traces[0]["in_queue"] else None
    return await eventually(found, what=f"{message_id} to leave the queue")


async def test_a_delivered_message_is_traced_by_id_and_message_id(relay_factory, sink):
    relay = await relay_factory(connectors=partner(sink.port))
    await relay.send("alice@contoso.test", ["u1@partner.test", "u2@partner.test"],
                     message(message_id="<trace-1@client.test>"))
    async with client(relay) as http:
        [t] = await traced(http, "trace-1@client.test")      # without <>
        assert (await relay.cli_json("queue", "trace", "--message-id", "trace-1@client.test")) == \
            (await http.get("/api/v1/trace", params={"message_id": "trace-1@client.test"})).json()
        shown = await http.get(f"/api/v1/messages/{t['id'].lower()}/trace")
        assert shown.status_code == 200 and shown.json() == t == await relay.cli_json("queue", "trace", t["id"])
    assert await relay.cli("queue", "show", t["id"], expect=1)          # it left the queue ...
    assert (t["status"], t["in_queue"], t["message_id"], t["connector"]) == \
        ("delivered", False, "<trace-1@client.test>", "p")             # ... and is traced all the same
    assert [e["event"] for e in t["events"]] == ["received", "attempt", "delivered"]
    received, attempt, _ = t["events"]
    assert (received["client"], received["helo"], received["recipients"]) == \
        (LOOPBACK, received["helo"], ["u1@partner.test", "u2@partner.test"]) and received["helo"]
    assert (attempt["n"], attempt["connector"], attempt["host"], attempt["ip"], attempt["port"]) == \
        (1, "p", LOOPBACK, LOOPBACK, sink.port)
    assert [(r["status"], r["reply"].split()[0]) for r in attempt["recipients"]] == [("delivered", "250")] * 2
    assert all(e["at"].endswith("Z") for e in t["events"])


async def test_a_deferred_message_shows_who_held_and_released_it(relay_factory):
    relay, [m] = await stuck_relay(relay_factory, n=1)
    async with client(relay) as http:
        assert (await http.post(f"/api/v1/queue/{m['id']}/hold", json={"reason": "looking into it"})).status_code == 200
        t = (await http.get(f"/api/v1/messages/{m['id']}/trace")).json()
        assert t == await relay.cli_json("queue", "trace", m["id"])     # held: nothing changes between the two
        assert (await http.post(f"/api/v1/queue/{m['id']}/release", json={"reason": "partner fixed"})).status_code == 200
        after = (await http.get(f"/api/v1/messages/{m['id']}/trace")).json()
    assert t["in_queue"] and t["status"] == "held" and [e["event"] for e in t["events"]] == \
        ["received", "attempt", "action"]
    assert t["events"][1]["recipients"][0]["code"] == "4.4.316"
    assert [(e["action"], e["who"], e["reason"]) for e in after["events"] if e["event"] == "action"] == \
        [("hold", "loopback", "looking into it"), ("release", "loopback", "partner fixed")]


async def test_trace_errors(relay_factory):
    relay = await relay_factory()
    async with client(relay) as http:
        missing = await http.get("/api/v1/messages/0123456789ABCDEF/trace")
        assert missing.status_code == 404 and "trace_retention" in missing.json()["error"]
        assert (await http.get("/api/v1/messages/not-an-id/trace")).status_code == 404
        for params in ({}, {"message_id": "<>"}, {"message_id": "x", "other": "y"}):
            r = await http.get("/api/v1/trace", params=params)
            assert r.status_code == 400, params
        assert (await http.get("/api/v1/trace", params={"message_id": "<none@x>"})).json() == \
            {"message_id": "<none@x>", "traces": []}
    await relay.cli("queue", "trace", expect=1)
    await relay.cli("queue", "trace", "0123456789ABCDEF", expect=1)


async def test_the_nodes_api_is_relaywatch_nodes(relay_factory):
    relay = await relay_factory()
    async with client(relay) as http:
        async def leading():
            body = (await http.get("/api/v1/nodes")).json()
            return body if body["nodes"] and body["nodes"][0]["leader"] else None
        api = await eventually(leading, what="this node to lead")
    cli = await relay.cli_json("nodes")
    assert [{k: v for k, v in n.items() if k not in LIVE} for n in api["nodes"]] == \
        [{k: v for k, v in n.items() if k not in LIVE} for n in cli["nodes"]]
    assert (api["leader_term"], api["lapse"]) == (cli["leader_term"], cli["lapse"])
    [node] = api["nodes"]
    assert node["state"] == "alive" and node["instance"] == relay.app.scheduler.node


async def test_queue_by_text_and_route_in_the_api_the_cli_and_bulk_actions(relay_factory):
    greylisting = await Sink(SinkHandler(rcpt_reply=lambda a: "451 4.7.1 Greylisted_100%, try later"
                                         if a.startswith("u1@") else "450 4.2.1 Mailbox busy")).start()
    try:
        relay = await relay_factory(connectors=partner(greylisting.port), queue={"retry_intervals": ["1h"]})
        for i in range(3):
            await relay.send("alice@contoso.test", [f"u{i}@partner.test"], message(f"m{i}"))
        listed = await deferred(relay, 3)
        await check_text_and_route(relay, listed)
    finally:
        await greylisting.stop()


async def check_text_and_route(relay, listed):
    u1 = next(m["id"] for m in listed if m["recipients"][0]["address"] == "u1@partner.test")
    async with client(relay) as http:
        async def ids(**params):
            r = await http.get("/api/v1/queue", params=params)
            assert r.status_code == 200, r.text
            return [m["id"] for m in r.json()["messages"]]
        assert await ids(text="U1@PARTNER") == [u1]
        assert await ids(text="greylisted_100%") == [u1]                      # the last reply
        assert await ids(text="BUSY") == sorted(m["id"] for m in listed if m["id"] != u1)
        assert await ids(route="connector", text="alice@") == sorted(m["id"] for m in listed)
        assert await ids(route="internet") == [] and await ids(route="local") == []
        assert await ids(text="%") == [u1] and await ids(text="u_@partner") == []    # wildcards are letters
        for params, field in (({"route": "mx"}, "route"), ({"text": " "}, "text"), ({"text": "x" * 201}, "text")):
            r = await http.get("/api/v1/queue", params=params)
            assert r.status_code == 400 and r.json()["field"] == field, params
        dry = await http.post("/api/v1/queue/actions", json={"action": "hold", "filter": {"text": "u1@", "route": "connector"},
                                                             "reason": "r", "dry_run": True})
        assert dry.status_code == 200 and (dry.json()["matched"], dry.json()["sample"]) == (1, [u1])
        api = (await http.get("/api/v1/queue", params={"text": "u1@", "route": "connector"})).json()["messages"]
    cli = await relay.cli_json("queue", "list", "--text", "u1@", "--route", "connector")
    assert cli["messages"] == api
    await relay.cli("queue", "list", "--route", "mx", expect=2)


async def test_the_new_endpoints_need_a_token_off_loopback(relay_factory):
    relay, [m] = await stuck_relay(relay_factory, n=1, http={"listen": f"{LOOPBACK}:0", "tokens": [f"ops:{TOKEN}"]})
    async with client(relay) as anonymous, client(relay, OTHER) as wrong, client(relay, TOKEN) as ops:
        for path, params in ((f"/api/v1/messages/{m['id']}/trace", {}), ("/api/v1/trace", {"message_id": "x"}),
                             ("/api/v1/nodes", {}), ("/api/v1/queue", {"text": "u0"})):
            for http in (anonymous, wrong):
                r = await http.get(path, params=params)
                assert r.status_code == 401 and r.content == b"", path
            assert (await ops.get(path, params=params)).status_code == 200, path


async def test_a_bulk_action_leaves_its_job_in_each_messages_trace(relay_factory):
    """Held, then deleted, by filter: each message's trace (API and CLI, queued or kept after it
    left) says what was done to it, by which token, in which job and why."""
    relay, listed = await stuck_relay(relay_factory, n=3, http={"listen": f"{LOOPBACK}:0", "tokens": [f"ops:{TOKEN}"]})
    ids = sorted(m["id"] for m in listed)
    async with client(relay, TOKEN) as http:
        async def bulk(action: str, filter_: dict, reason: str) -> int:
            started = await http.post("/api/v1/queue/actions", json={"action": action, "filter": filter_,
                                                                     "reason": reason})
            assert started.status_code == 202, started.text

            async def finished():
                job = (await http.get(started.headers["location"])).json()
                return job if job["state"] != "running" else None
            job = await eventually(finished, what=f"the bulk {action}")
            assert (job["state"], job["done"]) == ("done", 3)
            return job["id"]
        held_by = await bulk("hold", {"connector": "p"}, "partner down")
        for entry_id in ids:
            t = (await http.get(f"/api/v1/messages/{entry_id}/trace")).json()
            assert [(e["action"], e["who"], e["job"], e["reason"]) for e in t["events"] if e["event"] == "action"] \
                == [("hold", "ops", held_by, "partner down")], entry_id
        deleted_by = await bulk("delete", {"status": "held"}, "spam run")
        assert deleted_by != held_by
        traces = {i: (await http.get(f"/api/v1/messages/{i}/trace")).json() for i in ids}
        audit = (await http.get("/api/v1/audit")).json()["audit"]
    for entry_id, t in traces.items():
        assert not t["in_queue"] and t["status"] == "deleted", t
        assert [(e["action"], e["who"], e["job"], e["reason"]) for e in t["events"] if e["event"] == "action"] == \
            [("hold", "ops", held_by, "partner down"), ("delete", "ops", deleted_by, "spam run")]
        assert t == await relay.cli_json("queue", "trace", entry_id)
    text = (await relay.cli("queue", "trace", ids[0])).output
    assert f"hold by ops (job {held_by}): partner down" in text and f"delete by ops (job {deleted_by}): spam run" in text
    # The job's id is its audit record's; each batch's record names the ids it changed.
    by_id = {a["id"]: a for a in audit}
    assert (by_id[held_by]["action"], by_id[held_by]["detail"]["matched"]) == ("queue bulk hold", 3)
    [batch] = [a for a in audit if a["action"] == "queue hold"]
    assert (sorted(batch["detail"]["ids"]), batch["detail"]["job"], batch["who"]) == (ids, held_by, "ops")
