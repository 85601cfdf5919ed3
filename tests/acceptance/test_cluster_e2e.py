"""Several real ``relaywatch serve`` processes on one PostgreSQL queue (a per-test schema).

One leader runs the watch: a refused connector opens one incident and one
notification per transition across the nodes; killing the leader (kill -9) moves
the watch to another node within the lapse, the incident keeps its state, no
second "open" is sent, and the dead node is an incident of its own.
"""

import asyncio
import json
import os
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relaywatch.watch_records import NotificationState, Setting

from helpers import LOOPBACK, Server, Sink, WebhookReceiver, eventually, free_port, message

ROOT = Path(__file__).resolve().parents[2]
LAPSE = 2.0


def node_config(pg_dsn, name, hook, refused_port):
    return dict(
        server={"store": pg_dsn, "node_name": name, "heartbeat_interval": "0.25s", "node_lapse": f"{LAPSE}s",
                "delivery_process": False},
        queue={"retry_intervals": ["1s"]},
        alerts={"webhook_url": f"http://{LOOPBACK}:{hook.port}/hook", "open_after": "1s", "min_messages": 1,
                "evaluate_interval": "0.3s", "probe_interval": "0.5s"},
        connectors=[{"name": "onprem", "type": "on_premises", "domains": ["fabrikam.test"],
                     "smart_hosts": [f"{LOOPBACK}:{refused_port}"], "tls": "none"}])


def send(port, n):
    with smtplib.SMTP(LOOPBACK, port, timeout=10) as c:
        for i in range(n):
            c.sendmail("alice@contoso.test", ["bob@fabrikam.test"], message(f"m{i}"))


async def nodes_json(server):
    """`relaywatch nodes --json` in a thread: the test's loop (the webhook receiver) keeps
    answering meanwhile, so no node's POST times out and is sent again."""
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "relaywatch", "nodes", "--json", "-c", str(server.config_path)],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def posts(hook, kind):
    """(transition, incident id) of the webhook posts about incidents of ``kind``."""
    out = []
    for _, body in hook.posts:
        data = json.loads(body)
        if (data["incident"].get("kind") or "").endswith(kind):
            out.append((data["transition"], data["incident"]["id"]))
    return out


def node_dirs(tmp_path, n):
    """A directory per node: n1, n2, ..."""
    for i in range(n):
        (d := tmp_path / f"n{i + 1}").mkdir()
        yield d


async def start_nodes(tmp_path, pg_dsn, hook, n):
    """``n`` serve processes on one PostgreSQL queue, delivering to a port that refuses:
    (the servers, that store opened, the port)."""
    from relaywatch.store.postgres import PostgresStore
    refused = free_port()
    servers = [await Server(d, **node_config(pg_dsn, f"n{i + 1}", hook, refused)).start()
               for i, d in enumerate(node_dirs(tmp_path, n))]
    store = PostgresStore(pg_dsn)
    await store.open()
    return servers, store, refused


@pytest.fixture
async def hook():
    h = await WebhookReceiver().start()
    yield h
    await h.stop()


async def test_one_incident_per_cluster_and_the_watch_survives_its_leader(tmp_path, pg_dsn, hook):
    servers, store, refused = await start_nodes(tmp_path, pg_dsn, hook, 3)
    try:
        for s in servers:
            await asyncio.to_thread(send, s.port, 2)
        # One backlog incident, opened once, though every node sees the same backlog.
        # (The escalation follows in the next evaluation: a slow poll may see it too.)
        opened = await eventually(lambda: [p for p in posts(hook, "connect.refused") if p[0] == "open"],
                                  what="the incident's open notification")
        [(_, incident_id)] = opened
        listed = await nodes_json(servers[0])
        assert sorted(n["name"] for n in listed["nodes"]) == ["n1", "n2", "n3"]
        assert [n["state"] for n in listed["nodes"]] == ["alive"] * 3
        [leader] = [n for n in listed["nodes"] if n["leader"]]
        term = listed["leader_term"]

        # What the leader has queued is sent and recorded first: a notification it POSTed but
        # did not record when killed would be sent again by the next leader (at least once).
        await eventually(lambda: _all_sent(store, incident_id, 2), what="open and escalate:expiry recorded as sent")
        # kill -9 the leader: another takes the lease within the lapse (and a beat).
        victim = next(s for s in servers if s.raw["server"]["node_name"] == leader["name"])
        victim.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(victim.proc.wait)
        victim.log.close()
        killed_at = time.time()
        new = await eventually(lambda: _new_leader(store, leader["instance"]), timeout=LAPSE * 4,
                               what="another node to take the leader lease")
        assert new.term == term + 1
        # The new leader evaluates the incident it did not open: updated, not opened again.
        await eventually(lambda: _updated_since(store, incident_id, killed_at), what="the new leader's evaluation")
        # The dead node is an incident of its own, opened once.
        await eventually(lambda: posts(hook, "node_down"), what="the node_down notification")
        listed = await nodes_json(next(s for s in servers if s is not victim))
        states = {n["name"]: n["state"] for n in listed["nodes"]}
        assert states[leader["name"]] == "dead" and list(states.values()).count("alive") == 2
        assert [n["name"] for n in listed["nodes"] if n["leader"]] != [leader["name"]]

        # The destination comes back: the backlog (the dead node's share too) is delivered and
        # the incident resolves, with one resolve notification.
        sink = await Sink(port=refused).start()
        try:
            await eventually(lambda: len(sink.messages) >= 6, timeout=15, what="every message delivered")
            await eventually(lambda: ("resolve", incident_id) in posts(hook, "connect.refused"),
                             what="the resolve notification")
            # Each transition once across the nodes and the takeover (mail expires within
            # escalate_before_expiry, so it escalates too).
            assert posts(hook, "connect.refused") == [("open", incident_id), ("escalate:expiry", incident_id),
                                                      ("resolve", incident_id)]
            assert [t for t, _ in posts(hook, "node_down")] == ["open"]
            assert len(sink.messages) == 6
        finally:
            await sink.stop()
    finally:
        await store.close()
        for s in servers:
            if s.proc.poll() is None:
                assert await s.stop() == 0


async def _new_leader(store, old_instance):
    lease = await store.leader()
    return lease if lease.holder not in (None, old_instance) and lease.until > time.time() else None


async def _updated_since(store, incident_id, at):
    inc = (await store.incident(incident_id)).incident
    return inc.is_open and inc.updated_at > at


async def _all_sent(store, incident_id, n):
    notes = (await store.incident(incident_id)).notifications
    return len(notes) == n and all(x.state is NotificationState.SENT for x in notes)


async def test_a_fix_made_through_any_node_applies_on_all_and_a_clean_stop_is_not_down(tmp_path, pg_dsn, hook):
    """Fix-now overrides live in the shared store; each node re-reads them within 2 s.
    A node stopped with SIGTERM is shown stopped (not dead) and opens no incident."""
    servers, store, _ = await start_nodes(tmp_path, pg_dsn, hook, 2)
    try:
        # What `incidents fix ... pause` run against either node's config writes.
        await store.apply_fix("admin", "pause", None, {"undo": {}}, {Setting.CONNECTOR_PAUSED.of("onprem"): True}, [],
                              time.time())
        for s in servers:
            await eventually(lambda: "applied changed overrides" in s.log_path.read_text(),
                             what=f"{s.raw['server']['node_name']} to apply the fix")
        assert await servers[1].stop() == 0
        listed = await nodes_json(servers[0])
        assert {n["name"]: n["state"] for n in listed["nodes"]} == {"n1": "alive", "n2": "stopped"}
        # Past the lapse, with n1 leading (n2 resigned if it led): no node_down for n2.
        await eventually(lambda: time.time() > listed["nodes"][1]["heartbeat_at"] + LAPSE * 2, what="the lapse")
        await eventually(lambda: _n1_leads(store), what="n1 to lead")
        assert posts(hook, "node_down") == [] and await store.open_incidents() == []
    finally:
        await store.close()
        for s in servers:
            if s.proc.poll() is None:
                assert await s.stop() == 0


async def _n1_leads(store):
    lease = await store.leader()
    return lease.holder is not None and lease.holder.startswith("n1:") and lease.until > time.time()


async def test_a_drained_node_answers_503_returns_its_leases_and_the_others_deliver_them(tmp_path, pg_dsn, hook):
    """relaywatch node drain (SIGTERM): /readyz 503 while it finishes, its leases back in
    the queue when it stops (not after their 10 minutes), delivered by the other node."""
    import urllib.error
    import urllib.request
    from helpers import Scripted
    from relaywatch.store.postgres import PostgresStore
    from relaywatch.store.base import QueueQuery

    async def stall(conv):          # connects, then never greets: the delivery hangs
        await asyncio.sleep(60)
    stuck = await Scripted(stall).start()
    port = stuck.port
    configs = []
    for i, d in enumerate(node_dirs(tmp_path, 2)):
        cfg = node_config(pg_dsn, f"n{i + 1}", hook, port)
        # The drain lasts the whole grace (the destination never greets): long enough that a
        # loaded machine still sees the 503 inside it.
        cfg["server"]["shutdown_grace"] = "10s"
        cfg["delivery"] = {"connect_timeout": "30s", "command_timeout": "30s"}
        configs.append((d, cfg))
    n1 = await Server(configs[0][0], **configs[0][1]).start()
    servers = [n1]
    store = PostgresStore(pg_dsn)
    await store.open()
    try:
        await asyncio.to_thread(send, n1.port, 4)

        async def n1_leases():
            return [e for e in await store.list(QueueQuery(limit=100)) if (e.lease_owner or "").startswith("n1:")]
        held = await eventually(n1_leases, what="n1 to lease some of the mail")
        # n2 starts once n1 holds the mail: the commit's NOTIFY wakes every node at once, so a
        # node already running could lease all of it first (as it did once in CI).
        n2 = await Server(configs[1][0], **configs[1][1]).start()
        servers.append(n2)
        console = await eventually(lambda: _console_url(n1), what="n1's console address")
        assert _get(console + "/readyz")[0] == 200
        drain = asyncio.create_task(n1.cli("node", "drain"))
        # Within the 10 s drain; the deadline also covers the drain command's own start (seconds
        # on a loaded machine).
        status, body = await eventually(lambda: _not_ready(console), timeout=30, what="/readyz to answer 503")
        assert "draining" in body["checks"]["drain"]
        await drain
        assert n1.proc.wait(5) == 0
        # Back in the queue at once: n2 leases them (to the same stuck destination) now.
        still = {e.id: e.lease_owner for e in await store.list(QueueQuery(limit=100))}
        assert all(not (still.get(e.id) or "").startswith("n1:") for e in held), still
        await eventually(lambda: _leased_by(store, [e.id for e in held], "n2:"), what="n2 to take n1's mail")
        assert {n["name"]: n["state"] for n in (await nodes_json(n2))["nodes"]} == {"n1": "stopped", "n2": "alive"}
    finally:
        await store.close()
        for s in servers:
            if s.proc.poll() is None:
                await s.stop()
            s.log.close()
        await stuck.stop()


def _console_url(server):
    import re
    m = re.search(r"console on (http://[\d.:]+)", server.log_path.read_text())
    return m.group(1) if m else None


def _get(url):
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def _not_ready(url):
    status, body = await asyncio.to_thread(_get, url + "/readyz")
    return (status, body) if status == 503 else None


async def _leased_by(store, ids, prefix):
    from relaywatch.store.base import QueueQuery
    owners = {e.id: e.lease_owner or "" for e in await store.list(QueueQuery(limit=100))}
    return all(owners.get(i, "").startswith(prefix) for i in ids)


@pytest.mark.parametrize("delivery_process", [True, False], ids=["two-processes", "one-process"])
async def test_the_heartbeat_counts_what_the_node_received_and_delivered(tmp_path, pg_dsn, delivery_process):
    """received is counted where the SMTP server runs, delivered where the scheduler runs:
    with a delivery process those are two processes, and the heartbeat carries both."""
    sink = await Sink().start()
    server = await Server(tmp_path, server={"store": pg_dsn, "node_name": "n1", "heartbeat_interval": "0.25s",
                                            "node_lapse": "2s", "delivery_process": delivery_process},
                          connectors=[{"name": "onprem", "type": "on_premises", "domains": ["fabrikam.test"],
                                       "smart_hosts": [f"{LOOPBACK}:{sink.port}"], "tls": "none"}]).start()
    try:
        await asyncio.to_thread(send, server.port, 3)
        await eventually(lambda: len(sink.messages) == 3, what="the three messages delivered")

        from relaywatch.store.postgres import PostgresStore
        store = PostgresStore(pg_dsn)
        await store.open()
        try:
            async def counted():
                [beat] = await store.nodes()
                return (beat.received, beat.delivered) == (3, 3)
            await eventually(counted, what=lambda: f"the heartbeat to count 3 received, 3 delivered")
        finally:
            await store.close()
        [node] = (await nodes_json(server))["nodes"]
        assert (node["received"], node["delivered"]) == (3, 3)
    finally:
        assert await server.stop() == 0
        await sink.stop()
