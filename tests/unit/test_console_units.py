"""The console's pure parts, table-tested: who gets in, route matching, metrics text, readiness, input."""

import hashlib

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relaywatch import events
from relaywatch.errors import ConfigError
from relaywatch.config import AdminToken, is_loopback, parse_config
from relaywatch.console import metrics
from relaywatch.console.api_input import BadInput, queue_page
from relaywatch.console.api_routes import ROUTES
from relaywatch.console.auth import LOOPBACK_USER, authenticate, bearer_token, cross_site
from relaywatch.console.health import readiness
from relaywatch.console.openapi import document
from relaywatch.console.router import Match, NoRoute, match

TOKENS = (AdminToken("ops", hashlib.sha256(b"ops-token-0123456789").digest()),
          AdminToken("dev", hashlib.sha256(b"dev-token-0123456789").digest()))


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("::ffff:127.0.0.1", True), ("localhost", True),
    ("10.0.0.1", False), ("0.0.0.0", False), ("::", False), ("192.168.1.10", False), ("::ffff:10.0.0.1", False),
    ("relay.example", False), ("", False),
])
def test_the_address_rule(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("authorization, peer, tokens, who", [
    (None, "127.0.0.1", (), LOOPBACK_USER),                     # loopback, no tokens: open
    (None, "::1", (), LOOPBACK_USER),
    (None, "10.1.2.3", (), None),                               # any other address: a token is required
    ("Bearer ops-token-0123456789", "10.1.2.3", (), None),      # ...and without tokens none is valid
    (None, "127.0.0.1", TOKENS, None),                          # tokens set: loopback needs one too
    ("Bearer ops-token-0123456789", "127.0.0.1", TOKENS, "ops"),
    ("bearer dev-token-0123456789", "10.1.2.3", TOKENS, "dev"),
    ("Bearer  dev-token-0123456789 ", "10.1.2.3", TOKENS, "dev"),
    ("Bearer ops-token-012345678", "10.1.2.3", TOKENS, None),   # one character short
    ("Bearer ops-token-0123456789x", "10.1.2.3", TOKENS, None),
    ("Basic b3BzOnRva2Vu", "10.1.2.3", TOKENS, None),
    ("Bearer", "10.1.2.3", TOKENS, None),
    ("Bearer a b", "10.1.2.3", TOKENS, None),
    ("Bearer sécret-ü-0123456789", "10.1.2.3", TOKENS, None),
])
def test_who_gets_in(authorization, peer, tokens, who):
    assert authenticate(authorization, peer, tokens, "127.0.0.1:8025") == who


@pytest.mark.parametrize("host, who", [
    ("127.0.0.1:8025", LOOPBACK_USER), ("127.0.0.1", LOOPBACK_USER), ("LOCALHOST:8025", LOOPBACK_USER),
    ("[::1]:8025", LOOPBACK_USER), ("127.1.2.3:9", LOOPBACK_USER),
    ("evil.example:8025", None), ("evil.example", None), ("127.0.0.1.evil.example:8025", None), ("", None), (None, None),
])
def test_without_tokens_only_a_loopback_host_name_gets_in(host, who):
    # DNS rebinding: a page at evil.example (resolving to 127.0.0.1) reaches the socket, not the console.
    assert authenticate(None, "127.0.0.1", (), host) == who
    assert authenticate("Bearer ops-token-0123456789", "127.0.0.1", TOKENS, host) == "ops"   # tokens: any Host


@pytest.mark.parametrize("headers, refused", [
    ({}, False),                                                          # curl, scripts
    ({"sec-fetch-site": "same-origin"}, False), ({"sec-fetch-site": "none"}, False),
    ({"sec-fetch-site": "cross-site"}, True), ({"sec-fetch-site": "same-site"}, True),
    ({"origin": "http://127.0.0.1:8025", "host": "127.0.0.1:8025"}, False),
    ({"origin": "https://evil.example", "host": "127.0.0.1:8025"}, True),
    ({"origin": "null", "host": "127.0.0.1:8025"}, True),
    ({"sec-fetch-site": "same-origin", "origin": "https://evil.example", "host": "x"}, False),   # the browser's word
])
def test_cross_site_requests(headers, refused):
    assert cross_site(headers) is refused


def test_tokens_are_kept_only_as_digests(tmp_path):
    (tmp_path / "tokens").write_text("# the admins\nops: ops-token-0123456789\n\ndev:dev-token-0123456789\n")
    config = parse_config({"http": {"tokens": str(tmp_path / "tokens")}}, base_dir=tmp_path)
    assert config.http.tokens == TOKENS
    assert "ops-token" not in repr(config)
    assert bearer_token("Bearer x") == "x" and bearer_token(None) is None


def test_a_token_may_be_given_as_its_sha256(tmp_path):
    """``name:sha256:<hex>`` is the token's digest (hashed at rest); a short or odd sha256: is a weak token."""
    import hashlib
    from relaywatch.config.http import hashed_line
    line = hashed_line("ops", "ops-token-0123456789")
    assert line == "ops:sha256:" + hashlib.sha256(b"ops-token-0123456789").hexdigest()
    config = parse_config({"http": {"tokens": [line, "dev:dev-token-0123456789"]}}, base_dir=tmp_path)
    assert config.http.tokens == TOKENS
    with pytest.raises(ConfigError, match="the token of ops is too weak"):
        parse_config({"http": {"tokens": ["ops:sha256:abc"]}}, base_dir=tmp_path)


@pytest.mark.parametrize("method, path, found", [
    ("GET", "/healthz", ("healthz", {})),
    ("GET", "/api/v1/queue", ("queue_list", {})),
    ("GET", "/api/v1/queue/", ("queue_list", {})),
    ("GET", "/api/v1/queue/ABC", ("queue_show", {"id": "ABC"})),
    ("POST", "/api/v1/queue/ABC/bounce", ("queue_action", {"id": "ABC"})),
    ("GET", "/api/v1/queue/ABC/bounce", ("GET not allowed", ("POST",))),
    ("DELETE", "/api/v1/queue", ("DELETE not allowed", ("GET",))),
    ("POST", "/api/v1/queue/ABC/explode", None),
    ("GET", "/api/v1/queue//hold", None),
    ("GET", "/", None),
    ("GET", "/api/v1/incidents/7", ("incident_show", {"id": "7"})),
    ("POST", "/api/v1/queue/actions", ("queue_bulk", {})),      # the concrete path, not {id}
    ("GET", "/api/v1/jobs/3", ("job_show", {"id": "3"})),
])
def test_route_matching(method, path, found):
    result = match(ROUTES, method, path)
    if found is None:
        assert result == NoRoute(())
    elif isinstance(found[1], tuple):
        assert result == NoRoute(found[1])
    else:
        assert isinstance(result, Match) and (result.route.handler, result.params) == found


def test_public_routes_are_exactly_metrics_and_health():
    assert {r.path for r in ROUTES if r.public} == {"/metrics", "/healthz", "/readyz"}
    changes = [r for r in ROUTES if r.method == "POST" and r.handler != "connector_test"]   # the test changes nothing
    assert changes and all("reason" in r.body["required"] for r in changes), "every action takes a reason"


def test_the_openapi_document_has_every_route_once():
    doc = document(ROUTES)
    ops = [(m.upper(), p) for p, methods in doc["paths"].items() for m in methods]
    assert sorted(ops) == sorted((r.method, r.path) for r in ROUTES)
    ids = [op["operationId"] for methods in doc["paths"].values() for op in methods.values()]
    assert len(ids) == len(set(ids))
    for methods in doc["paths"].values():
        for op in methods.values():
            for response in op["responses"].values():
                ref = response.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref")
                if ref:
                    assert ref.rsplit("/", 1)[1] in doc["components"]["schemas"]


@pytest.mark.parametrize("args, problem", [
    ({"status": "stuck"}, "status"), ({"limit": "1001"}, "limit"), ({"limit": "-1"}, "limit"),
    ({"after": "1A2B;drop"}, "after"), ({"older_than": "a while"}, "older_than"), ({"domain": " "}, "domain"),
])
def test_queue_filters_refuse_bad_values_naming_them(args, problem):
    with pytest.raises(BadInput) as exc:
        queue_page(args)
    assert exc.value.field == problem and exc.value.status == 400


def test_queue_filters_parse():
    page = queue_page({"status": "deferred", "older_than": "2h", "limit": "5", "after": "1a2b", "sender": ""})
    assert (page.status, page.older_than, page.limit, page.after, page.sender) == ("deferred", 7200, 5, "1a2b", "")


@pytest.mark.parametrize("given, code", [
    ("4.4.316", "4.4.316"), ("5.7.1", "5.7.1"), ("4.4", "4.4.*"), ("4.4.*", "4.4.*"), ("4", "4.*"), ("4.*", "4.*"),
    ("5.7", "5.7.*"), (" 4.4 ", "4.4.*"), ("connect.refused", "4.4.316"), ("tls.dane", "4.7.320"),
])
def test_the_code_filter_is_a_code_or_a_class(given, code):
    assert queue_page({"code": given}).code == code


@pytest.mark.parametrize("given", ["4.4.x", "4.", "4..4", "9", "3.1.1", "4.4.316.*", "4.4.3166", "watch.cert_expiring",
                                   "connect", "4.4%", "4_4", " "])
def test_a_code_filter_of_anything_else_says_what_it_takes(given):
    with pytest.raises(BadInput) as exc:
        queue_page({"code": given})
    assert exc.value.field == "code" and exc.value.status == 400
    assert given.strip() == "" or all(x in exc.value.message for x in ("4.4.316", "4.4.*", "connect.refused"))


@pytest.mark.parametrize("checks, status, reasons", [
    ({"store": None, "smtp": None}, 200, None),
    ({"store": "down", "smtp": None}, 503, ["store: down"]),
    ({"store": "down", "smtp": "closed"}, 503, ["store: down", "smtp: closed"]),
])
def test_readiness(checks, status, reasons):
    code, body = readiness(checks)
    assert code == status and body.get("reasons") == reasons
    assert body["status"] == ("ready" if status == 200 else "not ready")


def parse(text: str) -> dict:
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_queue_gauges_from_rows():
    now = 1000.0
    rows = [("p", "deferred", "4.4.316", 5, 1, 100.0), ("p", "deferred", "4.4.317", 2, 0, 400.0),
            ("p", "queued", None, 3, 2, 900.0), ("q", "held", None, 1, 0, 50.0)]
    m = parse(metrics.render(metrics.queue_families(rows, ["p", "q", "local"], now)))
    depth = {(dict(k[1])["connector"], dict(k[1])["status"]): v for k, v in m.items()
             if k[0] == "relaywatch_queue_messages"}
    assert depth == {("p", "deferred"): 6, ("p", "active"): 3, ("p", "queued"): 1, ("p", "held"): 0,
                     ("q", "held"): 1, ("q", "queued"): 0, ("q", "deferred"): 0, ("q", "active"): 0,
                     ("local", "queued"): 0, ("local", "deferred"): 0, ("local", "held"): 0, ("local", "active"): 0}
    assert m[("relaywatch_queue_deferred_messages", frozenset({("connector", "p"), ("code", "4.4.316")}))] == 5
    assert m[("relaywatch_queue_oldest_message_age_seconds", frozenset({("connector", "p")}))] == 900
    assert m[("relaywatch_queue_oldest_deferred_age_seconds", frozenset({("connector", "p")}))] == 900
    assert m[("relaywatch_queue_oldest_deferred_age_seconds", frozenset({("connector", "q")}))] == 0
    assert m[("relaywatch_queue_oldest_message_age_seconds", frozenset({("connector", "local")}))] == 0


def test_counters_merge_processes_and_keep_only_bounded_labels():
    here = {("received", "p", ""): 4, ("rejected", "", "5.7.1"): 2}
    child = {("delivered", "p", ""): 3, ("deferred", "p", "4.4.316"): 7, ("bounced", "p", ""): 1,
             ("expired", "local", ""): 1}
    m = parse(metrics.render(metrics.counter_families(here, child)))
    assert m[("relaywatch_messages_received_total", frozenset({("connector", "p")}))] == 4
    assert m[("relaywatch_recipients_delivered_total", frozenset({("connector", "p")}))] == 3
    assert m[("relaywatch_recipients_deferred_total", frozenset({("connector", "p"), ("code", "4.4.316")}))] == 7
    assert m[("relaywatch_smtp_rejections_total", frozenset({("code", "5.7.1")}))] == 2
    assert m[("relaywatch_recipients_expired_total", frozenset({("connector", "local")}))] == 1
    for family in text_string_to_metric_families(metrics.render(metrics.counter_families(here, child))):
        assert family.type == "counter" and f"{family.name}_total".startswith("relaywatch_")


def test_events_are_counted_where_they_are_logged(monkeypatch):
    monkeypatch.setattr(events, "counts", {})
    events.emit("delivered", id="X", to="a@b.test", connector="p", status="sent")
    events.emit("deferred", id="X", to="a@b.test", connector="p", code="4.4.316", status="deferred")
    events.emit("bounced", id="X", to="a@b.test", detail="no DSN")   # about the DSN: not a second bounce
    events.emit("rejected", to="a@b.test", code="5.1.10")
    events.emit("incident", id=1, connector="p")
    assert events.counts == {("delivered", "p", ""): 1, ("deferred", "p", "4.4.316"): 1, ("rejected", "", "5.1.10"): 1}


def test_label_values_are_escaped():
    text = metrics.render([metrics.Family("relaywatch_x", "gauge", "h", [({"connector": 'a"b\\c\nd'}, 1)])])
    [family] = list(text_string_to_metric_families(text))
    assert family.samples[0].labels == {"connector": 'a"b\\c\nd'}


def test_the_delivery_process_export_round_trips(tmp_path):
    metrics.write_export(tmp_path, {("delivered", "p", ""): 2})
    assert metrics.read_export(tmp_path) == {("delivered", "p", ""): 2}
    (tmp_path / metrics.EXPORT_NAME).write_text("{half")
    assert metrics.read_export(tmp_path) == {}
    assert metrics.read_export(tmp_path / "none") == {}


def test_the_example_alert_rules_use_only_metrics_the_console_has():
    import re
    from pathlib import Path
    rules = (Path(__file__).resolve().parents[2] / "examples" / "prometheus-alerts.yml").read_text()
    rows = [("p", "deferred", "4.4.316", 1, 0, 1.0)]
    families = metrics.queue_families(rows, ["p"], 2.0) + [metrics.incident_family([])]
    families += metrics.counter_families({})
    names = {f.name for f in families}
    used = set(re.findall(r"relaywatch_[a-z_]+", rules))
    assert used and used <= names, used - names
