"""The console pages' pure parts (console/web_session.py, overview.py, web.py): sessions, CSRF, the overview."""

import pytest

from relaywatch.console.overview import FlowHistory, chart_svg_data, connector_rows, flow_counts
from relaywatch.console.web import is_page
from relaywatch.console.web_session import COOKIE, SESSION_SECONDS, Sessions, cookie_header, cookies, safe_next


def test_a_session_cookie_reads_back_and_a_changed_one_does_not():
    sessions = Sessions()
    session, value = sessions.new("ops", 1000.0)
    read = sessions.read(f"other=1; {COOKIE}={value}", 1000.0 + 60)
    assert read == session
    sid, who, issued, mac = value.split(".")
    forged_who = "YWRtaW4="   # base64 "admin"
    for bad in (f"{sid}.{forged_who}.{issued}.{mac}", f"{sid}.{who}.{int(issued) + 1}.{mac}", value[:-1] + ("1" if value[-1] == "0" else "0"),
                "a.b.c.d", "", "nodots"):
        assert sessions.read(f"{COOKIE}={bad}", 1000.0) is None, bad
    assert sessions.read(f"{COOKIE}={value}", 1000.0 + SESSION_SECONDS + 1) is None     # expired
    assert Sessions().read(f"{COOKIE}={value}", 1000.0) is None                         # another process's key
    sessions.ended.add(session.id)                                                        # logged out
    assert sessions.read(f"{COOKIE}={value}", 1000.0) is None


def test_the_csrf_token_is_the_sessions_own():
    sessions = Sessions()
    a, _ = sessions.new("ops", 0.0)
    b, _ = sessions.new("ops", 0.0)
    assert sessions.csrf_ok(a, sessions.csrf(a))
    assert not sessions.csrf_ok(a, sessions.csrf(b))
    assert not sessions.csrf_ok(a, None) and not sessions.csrf_ok(a, "")


def test_the_cookie_is_httponly_strict_and_secure_over_https():
    assert cookie_header("v", secure=False) == f"{COOKIE}=v; Path=/; HttpOnly; SameSite=Strict; Max-Age={SESSION_SECONDS}"
    assert cookie_header("v", secure=True).endswith("; Secure")
    assert cookies("a=1; b=2=3; c") == {"a": "1", "b": "2=3"}


@pytest.mark.parametrize("target, to", [
    ("/queue?status=held", "/queue?status=held"), (None, "/"), ("", "/"), ("//evil.example/", "/"),
    ("https://evil.example/", "/"), ("/\\evil.example", "/"), ("queue", "/"),
    ("/x\r\nSet-Cookie: a=b", "/"),
])
def test_after_login_only_a_path_of_this_console(target, to):
    assert safe_next(target) == to


@pytest.mark.parametrize("path, page", [("/", True), ("/queue/ABC", True), ("/api/v1/queue", False),
                                        ("/metrics", False), ("/healthz", False), ("/readyz", False)])
def test_which_paths_are_pages(path, page):
    assert is_page(path) is page


def test_connector_rows_from_the_queue_gauges():
    gauges = [("p", "deferred", "4.4.316", 3, 0, 100.0), ("p", "deferred", "4.4.315", 1, 0, 50.0),
              ("p", "queued", None, 2, 1, 400.0), ("internet", "held", None, 1, 0, 10.0)]
    rows = connector_rows(["p", "idle"], gauges, now=1000.0, expiration=3600.0)
    assert rows["p"]["deferred"] == 4 and rows["p"]["deferred_by_code"] == {"4.4.316": 3, "4.4.315": 1}
    assert rows["p"]["oldest_deferred"] == 50.0 and rows["p"]["oldest_expires"] == 3650.0
    assert rows["p"]["queued"] == 2 and rows["p"]["active"] == 1
    assert rows["idle"]["deferred"] == 0 and rows["idle"]["oldest_deferred"] is None
    assert rows["internet"]["held"] == 1


def test_flow_counts_fold_expired_into_bounced_and_drop_the_rest():
    counts = {("delivered", "p", ""): 5, ("expired", "p", ""): 1, ("bounced", "p", ""): 2,
              ("deferred", "p", "4.4.316"): 3, ("deferred", "p", "4.4.315"): 1, ("received", "p", ""): 9}
    assert flow_counts(counts) == {("delivered", "p"): 5, ("bounced", "p"): 3, ("deferred", "p"): 4}


def test_flow_history_last_hour_and_per_hour():
    h = FlowHistory(started=0.0)
    h.add(1800.0, {("delivered", "p"): 2})
    h.add(3600.0, {("delivered", "p"): 5})
    h.add(5400.0, {("delivered", "p"): 6, ("bounced", "p"): 1})
    now, counts = 7200.0, {("delivered", "p"): 10, ("bounced", "p"): 1}
    assert h.since(now, 3600, counts) == {("delivered", "p"): 5, ("bounced", "p"): 1}   # since the 3600 sample
    hourly = h.hourly(now, counts)
    assert len(hourly) == 24 and hourly[-1]["delivered"] == 5 and hourly[-2]["delivered"] == 5
    assert sum(x["delivered"] for x in hourly) == 10     # every delivery since start, in one hour or another
    assert h.at(-1.0) == {} and h.at(1799.0) == {}


def test_flow_history_counts_from_what_the_counters_said_at_start():
    # The process's counters need not be zero when the console starts.
    h = FlowHistory(started=1000.0, baseline={("delivered", "p"): 7})
    counts = {("delivered", "p"): 9}
    assert h.since(1500.0, 3600, counts) == {("delivered", "p"): 2}
    assert sum(x["delivered"] for x in h.hourly(1500.0, counts)) == 2


def test_the_chart_has_one_bar_per_hour_and_event_scaled_to_the_highest():
    hourly = [{"delivered": 0, "deferred": 0, "bounced": 0}] * 23 + [{"delivered": 10, "deferred": 5, "bounced": 0}]
    chart = chart_svg_data(hourly, width=480, height=80)
    assert len(chart["bars"]) == 72 and chart["top"] == 10
    last = {b["event"]: b for b in chart["bars"][-3:]}
    assert last["delivered"]["h"] == 76 and last["deferred"]["h"] == 38 and last["bounced"]["h"] == 0
    assert all(b["y"] + b["h"] == 80 for b in chart["bars"])
