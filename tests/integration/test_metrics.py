"""/metrics beyond the queue: attempt durations, SMTP sessions, replies refused by
code, store commit latency, notification failures, the node label (console/metrics.py,
relaywatch/meters.py).  Real relays, real sockets, parsed with prometheus_client."""

import json
import re
import socket
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import LOOPBACK, RawClient, Sink, eventually, free_port, message

from relaywatch import meters
from relaywatch.console import metrics

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fresh_meters():
    meters.reset()      # the meters are this process's: earlier tests' relays counted into them
    yield
    meters.reset()


def sink_connector(name: str, port: int, domains: list[str]) -> dict:
    return {"name": name, "type": "partner", "domains": domains, "smart_hosts": [f"{LOOPBACK}:{port}"], "tls": "none"}


async def scrape_text(relay) -> str:
    host, port = relay.app.console.address
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10) as http:
        return (await http.get("/metrics")).text


async def scrape(relay) -> dict:
    """{sample name: {frozenset(labels without node): value}}; every series has the node label."""
    text = await scrape_text(relay)
    out: dict = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = dict(s.labels)
            assert labels.pop("node") == socket.gethostname(), s
            out.setdefault(s.name, {})[frozenset(labels.items())] = s.value
    return out


def histogram(m: dict, name: str, **labels) -> tuple[dict[str, float], float, float]:
    """(cumulative buckets by le, sum, count) of one histogram series."""
    key = frozenset(labels.items())
    buckets = {dict(k)["le"]: v for k, v in m[f"{name}_bucket"].items() if frozenset(
        (a, b) for a, b in k if a != "le") == key}
    return buckets, m[f"{name}_sum"][key], m[f"{name}_count"][key]


async def test_attempt_durations_sessions_and_commits_of_a_real_relay(relay_factory):
    sink = await Sink().start()
    refused_port = free_port()
    try:
        relay = await relay_factory(connectors=[sink_connector("fast", sink.port, ["fast.test"]),
                                                sink_connector("gone", refused_port, ["gone.test"])],
                                    queue={"retry_intervals": ["1h"]})
        n = 4
        for i in range(n):
            await relay.send("alice@contoso.test", [f"u{i}@fast.test"], message(f"m{i}"))
        await relay.send("alice@contoso.test", ["x@gone.test"], message("to a refused port"))
        await eventually(lambda: len(sink.messages) == n, what=f"{n} deliveries")

        async def tried():
            q = await relay.queue()
            return len(q) == 1 and q[0]["attempts"] >= 1 and q[0]["status"] == "deferred"
        await eventually(tried, what="the refused connector's attempt recorded")
        m = await eventually(lambda: _when_open_sessions_closed(relay), what="the sessions to close")
    finally:
        await sink.stop()

    buckets, total, count = histogram(m, "relaywatch_delivery_attempt_duration_seconds", connector="fast")
    assert count == n and buckets["+Inf"] == n and total > 0
    assert list(buckets) == [repr(b) for b in meters.ATTEMPT_BUCKETS] + ["+Inf"]
    assert list(buckets.values()) == sorted(buckets.values())      # cumulative
    buckets, _, count = histogram(m, "relaywatch_delivery_attempt_duration_seconds", connector="gone")
    assert count == 1 and buckets["+Inf"] == 1
    assert {dict(k)["connector"] for k in m["relaywatch_delivery_attempt_duration_seconds_count"]} == {"fast", "gone"}
    # One commit per batch, at least one batch for what was received and what was recorded.
    _, commit_sum, commits = histogram(m, "relaywatch_store_commit_duration_seconds")
    assert commits >= 2 and commit_sum > 0
    assert m["relaywatch_smtp_sessions_opened_total"][frozenset({("listener", "smtp")})] == n + 1
    assert m["relaywatch_smtp_sessions_open"][frozenset({("listener", "smtp")})] == 0


async def _when_open_sessions_closed(relay):
    m = await scrape(relay)
    return m if m["relaywatch_smtp_sessions_open"].get(frozenset({("listener", "smtp")})) == 0 else None


async def test_a_refused_rcpt_counts_its_reply_code(relay_factory):
    relay = await relay_factory()
    client = await RawClient.connect(relay.port)
    try:
        await client.cmd(b"HELO client.test\r\n")
        assert (await client.cmd(b"MAIL FROM:<alice@contoso.test>\r\n")).startswith(b"250")
        reply = (await client.cmd(b"RCPT TO:<user%elsewhere.test@contoso.test>\r\n")).decode()
        bad = (await client.cmd(b"RCPT TO:<not an address\r\n")).decode()
        await client.cmd(b"QUIT\r\n")
    finally:
        client.close()
    assert reply.startswith("5") and bad[:1] in "45", (reply, bad)
    m = await scrape(relay)
    counted = m["relaywatch_smtp_rejection_replies_total"]
    code, enhanced = re.match(r"(\d{3}) (\d\.\d+\.\d+)", reply).groups()
    assert counted[frozenset({("reply", code), ("enhanced", enhanced)})] == 1
    assert sum(counted.values()) == 2
    assert all("@" not in v and "elsewhere" not in v for k in counted for _, v in k)


async def test_a_failing_webhook_counts_a_notification_failure(relay_factory):
    relay = await relay_factory(connectors=[sink_connector("p", free_port(), ["partner.test"])],
                                queue={"retry_intervals": ["1h"]},
                                alerts={"open_after": "0s", "evaluate_interval": "0.2s", "probe_interval": "1h",
                                        "webhook_url": f"http://{LOOPBACK}:{free_port()}/hook"})
    await relay.send("alice@contoso.test", ["u@partner.test"], message("stuck"))

    async def failed():
        m = await scrape(relay)
        return m.get("relaywatch_notification_failures_total", {}).get(frozenset({("channel", "webhook")}))
    assert await eventually(failed, what="the webhook's failure counted") >= 1


def test_the_delivery_process_exports_its_meters_compatibly(tmp_path):
    meters.observe_attempt("p", 0.2)
    meters.commit_seconds.observe(0.003)
    meters.notification_failed("email")
    metrics.write_export(tmp_path, {("delivered", "p", ""): 2}, meters.snapshot())
    counts, exported = metrics.read_export_all(tmp_path)
    assert counts == {("delivered", "p", ""): 2}
    assert metrics.read_export(tmp_path) == counts     # the old reader's view is unchanged
    meters.reset()
    meters.observe_attempt("p", 0.007)
    text = metrics.render(metrics.meter_families(metrics.local_meters(), exported), "n1")
    m = {(s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    p = frozenset({("connector", "p"), ("node", "n1")})
    assert m[("relaywatch_delivery_attempt_duration_seconds_count", p)] == 2     # this process's and the child's
    assert m[("relaywatch_delivery_attempt_duration_seconds_bucket", p | {("le", "0.01")})] == 1
    assert m[("relaywatch_delivery_attempt_duration_seconds_bucket", p | {("le", "0.25")})] == 2
    assert m[("relaywatch_store_commit_duration_seconds_count", frozenset({("node", "n1")}))] == 1
    assert m[("relaywatch_notification_failures_total", frozenset({("channel", "email"), ("node", "n1")}))] == 1
    # A file written before the meters existed (no "meters" key) still reads.
    (tmp_path / metrics.EXPORT_NAME).write_text(json.dumps({"pid": 1, "at": 0, "counts": [["delivered", "p", "", 3]]}))
    assert metrics.read_export_all(tmp_path) == ({("delivered", "p", ""): 3}, {})


def test_histogram_buckets_are_upper_bounds():
    h = meters.Histogram((0.005, 0.01))
    for v in (0.005, 0.0051, 0.01, 99.0):
        h.observe(v)
    assert h.counts == [1, 2, 1]      # le is inclusive: 0.005 falls in le="0.005"


def test_refused_replies_keep_only_codes():
    meters.refused("550 5.7.1 Relaying denied for someone@example.test")
    meters.refused("421-4.7.0 too many\r\n421 4.7.0 too many")
    meters.refused("500 Syntax error")
    meters.refused("250 OK")
    meters.refused("5xx junk@example.test")
    assert meters.replies_refused == {("550", "5.7.1"): 1, ("421", "4.7.0"): 1, ("500", ""): 1, ("", ""): 1}


async def test_the_grafana_dashboard_queries_only_metrics_a_relay_serves(relay_factory):
    dashboard = json.loads((ROOT / "examples" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    titles = " | ".join(p["title"] for p in dashboard["panels"]).lower()
    for wanted in ("queue depth", "oldest deferred", "delivery rate", "deferrals by code", "attempt duration p50 / p99",
                   "open incidents", "store commit latency p99"):
        assert wanted in titles, wanted
    served = await served_names(relay_factory)
    used = {name for e in exprs for name in re.findall(r"relaywatch_[a-z_]+", e)}
    assert used and used <= served, used - served
    assert any("histogram_quantile(0.99" in e and "attempt_duration_seconds_bucket" in e for e in exprs)
    assert any("histogram_quantile(0.99" in e and "store_commit_duration_seconds_bucket" in e for e in exprs)


async def served_names(relay_factory) -> set[str]:
    """Every metric name /metrics of a relay that has delivered one message and deferred one
    serves: declared families (with or without series yet) and the series themselves (_bucket ...)."""
    sink = await Sink().start()
    try:
        relay = await relay_factory(connectors=[sink_connector("fast", sink.port, ["fast.test"]),
                                                sink_connector("gone", free_port(), ["gone.test"])],
                                    queue={"retry_intervals": ["1h"]})
        await relay.send("alice@contoso.test", ["u@fast.test"], message("one"))
        await relay.send("alice@contoso.test", ["u@gone.test"], message("two"))
        await eventually(lambda: len(sink.messages) == 1, what="the delivery")

        async def deferred():
            return [m for m in await relay.queue() if m["attempts"] >= 1]
        await eventually(deferred, what="the deferral")
        text = await scrape_text(relay)
    finally:
        await sink.stop()
    return set(re.findall(r"^# TYPE (\S+) ", text, re.M)) | {
        s.name for f in text_string_to_metric_families(text) for s in f.samples}


async def test_the_example_alert_rules_parse_and_use_only_metrics_a_relay_serves(relay_factory):
    """examples/prometheus-alerts.yml as Prometheus loads it: groups of rules, each an alert with
    an expression, a severity and a summary; every relaywatch_ name in it is one /metrics serves."""
    import yaml
    doc = yaml.safe_load((ROOT / "examples" / "prometheus-alerts.yml").read_text())
    assert set(doc) == {"groups"} and doc["groups"]
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert all(set(g) <= {"name", "interval", "rules"} and g["name"] for g in doc["groups"])
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, r
        assert r["alert"] and isinstance(r["expr"], str) and r["annotations"]["summary"], r
        assert r["labels"]["severity"] in ("info", "warning", "critical"), r
        assert re.fullmatch(r"\d+[smhd]", r.get("for", "0s")), r
    assert len({r["alert"] for r in rules}) == len(rules)
    names = {r["alert"] for r in rules}
    assert {"RelaywatchMailStuck", "RelaywatchIncidentOpen", "RelaywatchDown"} <= names
    served = await served_names(relay_factory)
    used = {name for r in rules for name in re.findall(r"relaywatch_[a-z_]+", r["expr"])}
    assert used and used <= served, used - served


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_each_committed_batch_is_timed_once(backend, tmp_path, request):
    import time

    from helpers import make_store
    from relaywatch.model import NewMessage, Route, RouteKind, StoredBody

    store = make_store(backend, tmp_path, request)
    await store.open()
    try:
        meters.reset()
        data = b"Subject: x\r\n\r\nbody\r\n"
        now = time.time()
        for i in range(5):      # one at a time: each is a batch of its own
            await store.enqueue(NewMessage(sender="s@x.test", recipients=((f"u{i}@a.test", Route(RouteKind.CONNECTOR, "a")),),
                                           body=StoredBody(size=len(data), data=data), received_at=now,
                                           expires_at=now + 3600))
        # (PostgreSQL's store may commit a write of its own meanwhile.)
        assert sum(meters.commit_seconds.counts) >= 5 and meters.commit_seconds.sum > 0
    finally:
        await store.close()
