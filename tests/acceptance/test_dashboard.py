"""The console's web pages in a real browser: Debian's Chromium driven by Playwright.

One browser for the module (a new context, so new cookies, per test); the
relay runs in the module's event loop beside it.  Nothing downloads a
browser: /usr/bin/chromium is the one `apt-get install chromium` put there
(.ci/run installs it).  Without it the module is skipped, except under CI,
where that is a failure.  When a test fails, every page it visited is
screenshotted under its tmp_path and the paths printed.
"""

import asyncio
import os
import sys
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from helpers import (LOOPBACK, Relay, Scripted, Sink, base_config, clear_of_utc_midnight, eventually, free_port,
                     https_files, message)

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "ops-token-0123456789abcdef"
EVIL_SCRIPT = "<script>alert(1)</script>"
EVIL_IMG = '"><img src=x onerror=alert(1)>'

pytestmark = pytest.mark.asyncio(loop_scope="module")


def _require_chromium():
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: CI installs Debian's chromium (.ci/run) for the browser tests")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium): the browser tests need Debian's Chromium")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("playwright is not installed (requirements-dev.txt)")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser():
    _require_chromium()
    from playwright.async_api import async_playwright
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        await b.close()


@pytest_asyncio.fixture(loop_scope="module")
async def relay_factory(tmp_path):
    """As conftest's, in the module's loop (where the browser is)."""
    started = []

    async def make(**sections):
        relay = await Relay(tmp_path, base_config(tmp_path, **sections)).start()
        started.append(relay)
        return relay
    yield make
    for relay in started:
        await relay.stop()


class Tab:
    """A page of its own browser context; remembers what it visited and every dialog that opened."""

    def __init__(self, page, base: str):
        self.page, self.base = page, base
        self.visited: list[str] = []
        self.dialogs: list[str] = []

        async def on_dialog(dialog):
            self.dialogs.append(dialog.message)
            await dialog.dismiss()
        page.on("dialog", on_dialog)

    async def goto(self, path: str):
        response = await self.page.goto(self.base + path)
        self.visited.append(self.page.url)
        return response

    def text(self, selector: str = "main"):
        return self.page.inner_text(selector)


@pytest_asyncio.fixture(loop_scope="module")
async def tab_factory(browser, request, tmp_path):
    tabs: list[Tab] = []

    async def make(relay) -> Tab:
        host, port = relay.app.console.address
        context = await browser.new_context()
        tab = Tab(await context.new_page(), f"http://{host}:{port}")
        tabs.append(tab)
        return tab
    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for n, tab in enumerate(tabs):
        if failed:
            shots = tmp_path / "screenshots"
            shots.mkdir(exist_ok=True)
            for i, url in enumerate(dict.fromkeys(tab.visited + [tab.page.url])):
                path = shots / f"tab{n}-{i}.png"
                try:
                    await tab.page.goto(url)
                    await tab.page.screenshot(path=str(path), full_page=True)
                    print(f"screenshot of {url}: {path}", file=sys.stderr)
                except Exception as exc:   # the relay may be what failed
                    print(f"no screenshot of {url}: {exc}", file=sys.stderr)
        await tab.page.context.close()


def refused(name: str, port: int | None = None, domain: str | None = None) -> dict:
    return {"name": name, "type": "partner", "domains": [domain or f"{name}.test"],
            "smart_hosts": [f"{LOOPBACK}:{port or free_port()}"], "tls": "none"}


WATCH = {"open_after": "0s", "evaluate_interval": "0.2s", "probe_interval": "1h", "cert_probe_interval": "1h",
         "min_messages": 1}


async def deferred(relay, n: int) -> list[dict]:
    async def all_tried():
        q = await relay.queue()
        return q if len(q) == n and all(m["attempts"] >= 1 and m["status"] == "deferred" for m in q) else None
    return await eventually(all_tried, what=f"{n} message(s) deferred")


async def open_incident(relay) -> dict:
    async def found():
        return (await relay.cli_json("incidents", "list"))["incidents"]
    [inc] = await eventually(found, what="an incident to open")
    return inc


async def stuck(relay_factory, n=2, **sections):
    sections.setdefault("connectors", [refused("p")])
    sections.setdefault("queue", {"retry_intervals": ["1h"], "message_expiration": "2h"})
    sections.setdefault("alerts", WATCH)
    relay = await relay_factory(**sections)
    for i in range(n):
        await relay.send("alice@contoso.test", [f"u{i}@{sections['connectors'][0]['domains'][0]}"], message(f"m{i}"))
    return relay, await deferred(relay, n)


# -- the pages --------------------------------------------------------------------------------------

async def test_the_overview_shows_the_incident_a_refused_connector_opened(relay_factory, tab_factory):
    relay, listed = await stuck(relay_factory, connectors=[refused("p"), refused("idle", domain="idle.test")])
    inc = await open_incident(relay)
    tab = await tab_factory(relay)
    response = await tab.goto("/")
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "unsafe-inline" not in csp
    text = await tab.text()
    assert f"#{inc['id']} 4.4.316" in text and "Open incidents" in text
    row = tab.page.locator("tr[data-connector=p]")
    assert "4.4.316: 2" in await row.inner_text()
    assert "2 message(s) will be returned to their senders in the next 2 hour(s) unless this is fixed" in \
        await row.inner_text()
    # The connector with the incident comes first.
    assert await tab.page.locator("table.connectors tbody tr").first.get_attribute("data-connector") == "p"
    assert await tab.page.locator("svg rect").count() == 24 * 3
    assert "the queue store keeps no delivered mail" in text
    await tab.page.click(f"a[href='/incidents/{inc['id']}']")
    await tab.page.wait_for_url(f"**/incidents/{inc['id']}")
    flyout = await tab.text("section.flyout")
    port = relay.raw["connectors"][0]["smart_hosts"][0].rsplit(":", 1)[1]
    for field in ("Message count", "Connector", "Queue start", "Oldest message", "Destination server",
                  "Last IP address", "Last error", "How to fix"):
        assert field in flyout
    assert "2 (2 recipient(s)" in flyout and "4.4.316" in flyout and LOOPBACK in flyout and port in flyout
    assert "Latest probe 20" in await tab.text()     # times as ISO 8601, not seconds since 1970
    if os.environ.get("RELAYWATCH_SCREENSHOT"):   # docs/console-overview.png
        await tab.goto("/")
        await tab.page.set_viewport_size({"width": 1100, "height": 560})
        await tab.page.screenshot(path=os.environ["RELAYWATCH_SCREENSHOT"])
    assert tab.dialogs == []


async def test_the_queue_filters(relay_factory, tab_factory):
    relay = await relay_factory(connectors=[refused("p"), refused("q")], queue={"retry_intervals": ["1h"]})
    for i in range(2):
        await relay.send("alice@contoso.test", [f"a{i}@p.test"], message(f"p{i}"))
    await relay.send("alice@contoso.test", ["b@q.test"], message("q"))
    listed = await deferred(relay, 3)
    tab = await tab_factory(relay)
    await tab.goto("/queue")
    rows = tab.page.locator("table.queue tbody tr[data-id]")
    assert await rows.count() == 3
    await tab.page.fill("input[name=connector]", "q")
    await tab.page.click("form.filters button[type=submit]")
    await tab.page.wait_for_url("**/queue?*connector=q*")
    assert await rows.count() == 1 and "b@q.test" in await rows.first.inner_text()
    assert "4.4.316" in await rows.first.inner_text()   # the last server response per recipient
    await tab.goto("/queue")
    await tab.page.fill("input[name=text]", "A1@P")
    await tab.page.select_option("select[name=route]", "connector")
    await tab.page.click("form.filters button[type=submit]")
    await tab.page.wait_for_url("**/queue?*text=A1%40P*")
    assert await rows.count() == 1 and "a1@p.test" in await rows.first.inner_text()
    assert await tab.page.input_value("input[name=text]") == "A1@P"
    # The code filter: a class or a catalog id, as well as an exact code (issue 11).
    code = tab.page.locator("input[name=code]")
    assert "4.4" in await code.get_attribute("placeholder") and "connect.refused" in await code.get_attribute("placeholder")
    for typed, n in (("4.4", 3), ("connect.refused", 3), ("5.7", 0)):
        await tab.goto("/queue")
        await tab.page.fill("input[name=code]", typed)
        await tab.page.click("form.filters button[type=submit]")
        await tab.page.wait_for_url(f"**/queue?*code={typed}&*")
        assert await rows.count() == n, typed
        assert await tab.page.input_value("input[name=code]") == typed
    await tab.goto("/queue?code=4.4.x")
    assert "code must be an enhanced code (4.4.316), a class or prefix" in await tab.text(".error")
    await tab.goto("/queue?route=local")
    assert await rows.count() == 0
    await tab.goto("/queue?status=held")
    assert await rows.count() == 0 and "No messages match" in await tab.text()
    await tab.goto("/queue?older_than=soon")
    assert "older_than" in await tab.text(".error")
    # A message's page: its attempt history and what to do.
    await tab.goto(f"/queue/{listed[0]['id']}")
    text = await tab.text()
    assert "Attempt history" in text and "What to do" in text and "4.4.316" in text


async def test_fix_now_shows_the_dry_run_then_applies_and_audits(relay_factory, tab_factory):
    relay, listed = await stuck(relay_factory)
    inc = await open_incident(relay)
    assert "pause" in inc["actions"]
    tab = await tab_factory(relay)
    await tab.goto(f"/incidents/{inc['id']}")
    fix = tab.page.locator(f"form[action='/incidents/{inc['id']}/fix/pause']")
    await fix.locator("input[name=reason]").fill("INC-7: partner down, stop hammering it")
    await fix.locator("button").click()
    await tab.page.wait_for_url(f"**/incidents/{inc['id']}/fix/pause")
    confirm = tab.page.locator("section.confirm")
    assert "Dry run" in await confirm.inner_text()
    assert (await tab.page.locator("ol.plan li").count()) >= 1
    assert (await relay.cli_json("config", "show"))["overrides"] == {}    # nothing done yet
    async with tab.page.expect_navigation(url=f"**/incidents/{inc['id']}/fix/pause"):   # the same URL again
        await confirm.locator("button.danger").click()
    await tab.page.wait_for_url(f"**/incidents/{inc['id']}/fix/pause")
    assert "Done: pause" in await tab.text("section.result")
    overrides = (await relay.cli_json("config", "show"))["overrides"]
    assert any("paused" in key for key in overrides), overrides
    await tab.goto("/audit")
    row = tab.page.locator("table.audit tbody tr").first
    text = await row.inner_text()
    assert "loopback" in text and "pause" in text and "INC-7: partner down" in text
    # And undo, with its own reason.
    await tab.goto(f"/incidents/{inc['id']}")
    await tab.page.fill("#undo input[name=reason]", "partner back")
    await tab.page.click("#undo button")
    await tab.page.wait_for_url(f"**/incidents/{inc['id']}/undo")
    assert "Done: undo" in await tab.text("section.result")
    assert (await relay.cli_json("config", "show"))["overrides"] == {}


async def test_a_bulk_action_shows_the_count_first(relay_factory, tab_factory):
    relay, listed = await stuck(relay_factory, n=3)
    tab = await tab_factory(relay)
    await tab.goto("/queue?connector=p")
    bulk = tab.page.locator("form.bulk")
    await bulk.locator("select[name=action]").select_option("hold")
    await bulk.locator("input[name=reason]").fill("maintenance window")
    await bulk.locator("button").click()
    await tab.page.wait_for_url("**/queue/actions")
    assert "3 message(s) match" in await tab.text("section.confirm")
    assert all(m["status"] == "deferred" for m in await relay.queue())
    async with tab.page.expect_navigation(url="**/queue/actions"):     # the same URL again
        await tab.page.locator("section.confirm button.danger").click()
    await tab.page.wait_for_url("**/queue/actions")
    assert "3 message(s) matched" in await tab.text(".result")
    await eventually(lambda: _all_held(relay), what="the job to hold all three")
    # Each message's page says the job held it, and why.
    async with httpx.AsyncClient(base_url=tab.base) as http:
        [job] = (await http.get("/api/v1/jobs")).json()["jobs"]
    await tab.goto(f"/queue/{listed[0]['id']}")
    timeline = await tab.text("ol.timeline")
    assert f"hold by loopback (bulk job {job['id']}): maintenance window" in timeline, timeline


async def _all_held(relay):
    return all(m["status"] == "held" for m in await relay.queue())


async def test_the_overview_updates_live_when_a_message_is_delivered(relay_factory, tab_factory):
    port = free_port()
    relay, [entry] = await stuck(relay_factory, n=1, connectors=[refused("p", port)], alerts={})
    tab = await tab_factory(relay)
    asked: list[str] = []
    tab.page.on("request", lambda request: asked.append(request.url))
    await tab.goto("/")
    delivered = tab.page.locator("tr[data-connector=p] td.delivered")
    assert await delivered.inner_text() == "0"
    await eventually(lambda: any(u.endswith("/events/overview") for u in asked), what="the event stream opened")
    await tab.page.evaluate("window.stillTheSamePage = true")
    sink = await Sink(port=port).start()
    try:
        host, cport = relay.app.console.address
        async with httpx.AsyncClient(base_url=f"http://{host}:{cport}") as http:
            r = await http.post(f"/api/v1/queue/{entry['id']}/retry", json={"reason": "partner back"})
            assert r.status_code == 200
        await eventually(lambda: len(sink.messages) == 1, what="the delivery")
        from playwright.async_api import expect
        await expect(delivered).to_have_text("1", timeout=15_000)
        await expect(tab.page.locator("tr[data-connector=p] td").nth(3)).to_have_text("0", timeout=15_000)
        assert await tab.page.evaluate("window.stillTheSamePage") is True    # updated in place, not reloaded
        assert not any("/fragments/overview" in u for u in asked), asked        # by the server's event, not a poll
    finally:
        await sink.stop()


# -- attacker-controlled text ---------------------------------------------------------------------------

async def evil_destination(conv):
    await conv.say(f"220 {EVIL_SCRIPT} {EVIL_IMG} ESMTP")
    while True:
        cmd = (await conv.hear()).upper()
        if cmd.startswith(("EHLO", "HELO")):
            await conv.say(f"250-evil.test {EVIL_SCRIPT}", "250 8BITMIME")
        elif cmd.startswith("RCPT"):
            await conv.say(f"451 4.3.0 {EVIL_SCRIPT}{EVIL_IMG}")
        elif cmd.startswith("QUIT"):
            await conv.say("221 bye")
            return
        elif cmd.startswith("DATA"):
            await conv.say("554 no")
        else:
            await conv.say("250 OK")


async def test_remote_text_is_shown_escaped_and_never_runs(relay_factory, tab_factory):
    evil = await Scripted(evil_destination).start()
    try:
        relay, [entry] = await stuck(relay_factory, n=1, connectors=[refused("p", evil.port)])
        inc = await open_incident(relay)
        tab = await tab_factory(relay)
        for path in ("/", "/queue", f"/queue/{entry['id']}", f"/incidents/{inc['id']}", f"/trace?q={entry['id']}",
                     "/nodes", "/connectors/p"):   # the connector page last: its test button is clicked next
            await tab.goto(path)
            text = await tab.text()
            if path not in ("/", "/connectors/p", "/nodes"):   # codes and counts; the connector page until its test
                assert EVIL_SCRIPT in text and EVIL_IMG in text, path
            assert await tab.page.locator("img").count() == 0, path
            assert await tab.page.locator("main script").count() == 0, path
        await tab.page.click("text=Test this connector")
        await tab.page.wait_for_url("**/connectors/p/test")
        test = await tab.text("section.test")
        assert EVIL_SCRIPT in test and EVIL_IMG in test        # the banner and the reply, as text
        assert await tab.page.locator("img").count() == 0
        assert tab.dialogs == []
    finally:
        await evil.stop()


async def test_the_trace_page_follows_a_delivered_message_and_escapes_its_helo(relay_factory, tab_factory, tmp_path):
    """The client's HELO name is remote text too; the message has left the queue and is traced from what was kept."""
    import smtplib
    sink = await Sink().start()
    try:
        relay = await relay_factory(connectors=[refused("p", sink.port)])
        evil_helo = '"><img/src=x/onerror=alert(1)>'

        def submit():
            with smtplib.SMTP(LOOPBACK, relay.port, local_hostname=evil_helo, timeout=30) as smtp:
                smtp.sendmail("alice@contoso.test", ["u@p.test"], message("t", message_id="<trace-page@client.test>"))
        await asyncio.to_thread(submit)
        await eventually(lambda: sink.messages, what="the delivery")
        tab = await tab_factory(relay)
        await tab.goto("/")
        await tab.page.click("header nav >> text=Trace")
        await tab.page.wait_for_url("**/trace")
        await tab.page.fill("input[name=q]", "<trace-page@client.test>")
        await tab.page.click("form.filters button[type=submit]")
        # Reloading while the form's navigation is still in flight detaches the page (CI saw it once).
        await tab.page.wait_for_url("**/trace?q=*")

        async def delivered():
            await tab.page.reload()
            return "delivered" in await tab.text("section.trace") if await tab.page.locator("section.trace").count() \
                else None
        await eventually(delivered, what="the trace to say delivered")
        events = await tab.page.locator("ol.timeline li.ev b").all_inner_texts()
        assert events == ["received", "attempt", "delivered"]
        text = await tab.text("section.trace")
        assert evil_helo in text and "250" in text and "Ok: queued as SINK1" in text
        assert await tab.page.locator("img").count() == 0 and tab.dialogs == []
        await tab.page.click("section.trace h2 a")       # the message page: it left the queue, so its trace
        await tab.page.wait_for_url("**/queue/*")
        assert await tab.page.locator("ol.timeline li.ev").count() == 3
        assert await tab.page.locator("img").count() == 0 and tab.dialogs == []
        await tab.goto("/trace?q=<nothing@here>")
        assert "No queued or kept message" in await tab.text(".error")
    finally:
        await sink.stop()


async def test_the_incident_page_shows_the_probe_history_and_whom_it_notified(relay_factory, tab_factory):
    alert_sink = await Sink().start()
    try:
        relay, _ = await stuck(relay_factory, n=1, alerts={
            **WATCH, "probe_interval": "0.2s", "notify": ["admin@ops.test"], "smtp": f"{LOOPBACK}:{alert_sink.port}",
            "webhook_url": f"http://{LOOPBACK}:{free_port()}/hooks/t0ken-in-the-path?key=k3y"})
        inc = await open_incident(relay)

        async def told_and_probed():
            shown = await relay.cli_json("incidents", "show", str(inc["id"]))
            sent = any(n["channel"] == "email" and n["state"] == "sent" for n in shown["notifications"])
            return shown if sent and len(shown.get("probe_history", [])) >= 2 else None
        shown = await eventually(told_and_probed, what="the alert mail sent and two probes run")
        tab = await tab_factory(relay)
        await tab.goto(f"/incidents/{inc['id']}")
        probes = tab.page.locator("table.probes tbody tr")
        assert await probes.count() >= 2
        first = await probes.last.inner_text()       # newest first: the last row is the probe at open
        assert "failed" in first and "4.4.316" in first and "tcp" in first
        rows = {r.split("\t")[1]: r for r in await tab.page.locator("table.notifications tbody tr").all_inner_texts()}
        assert "admin@ops.test" in rows["email"] and "sent" in rows["email"]
        assert f"http://{LOOPBACK}:" in rows["webhook"]
        text = await tab.text()
        assert "t0ken" not in text and "k3y" not in text       # a webhook's path and query may hold its secret
        assert len(shown["probe_history"]) <= 20
    finally:
        await alert_sink.stop()


async def test_the_nodes_page_lists_this_node_leading(relay_factory, tab_factory):
    relay = await relay_factory()
    tab = await tab_factory(relay)
    await tab.goto("/")
    await tab.page.click("header nav >> text=Nodes")
    await tab.page.wait_for_url("**/nodes")

    async def leading():
        await tab.page.reload()
        row = tab.page.locator("table.nodes tbody tr[data-name]")
        return await row.count() == 1 and "leader" in await row.inner_text()
    await eventually(leading, what="this node listed as the leader")
    row = await tab.page.locator("table.nodes tbody tr[data-name]").inner_text()
    assert "alive" in row and relay.app.config.server.node_name in row


async def test_the_tls_reports_page_shows_a_day_of_policy_sessions_and_the_report_sent(relay_factory, tab_factory,
                                                                                     tmp_path):
    """A real MTA-STS world on loopback (DNS, the policy over HTTPS with a test CA, the MX):
    one session under the policy, then a policy whose mx line is hostile markup (its
    rejection's reason quotes it: remote text), the report mailed the day after; the page
    shows what the API says, the hostile line as text."""
    import time
    import trustme
    from tests.integration.test_mta_sts import DOMAIN, MX, World, policy_text
    from tests.integration.test_tls_report import start_reporting_relay
    from relaywatch.deliver.tls_report import utc_day
    await clear_of_utc_midnight()    # "yesterday" and "today" below must stay the days they were
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    world = await World(tmp_path, ca, relay_factory).start(policy=policy_text())
    world.dns.zone[(f"_smtp._tls.{DOMAIN}", "TXT")] = ['"v=TLSRPTv1; rua=mailto:tlsrpt@reports.test"']
    reports = await Sink().start()
    try:
        relay = await start_reporting_relay(world, reports)
        monitor = relay.app.monitor     # the sessions happen yesterday (UTC), so that its report goes out now
        relay.app.routes.mta_sts.clock = monitor.tls_reports.clock = lambda: time.time() - 86400
        day = utc_day(time.time() - 86400)
        await relay.send("alice@contoso.test", [f"bob@{DOMAIN}"], message("one"))
        await eventually(lambda: len(world.mx.messages) == 1, what="the first delivery, under the policy")
        world.policy.body = policy_text(mx=(EVIL_SCRIPT + EVIL_IMG,)).encode()
        world.set_txt("2")      # a new policy id: fetched again, refused; the cached policy stays in force
        await relay.send("alice@contoso.test", [f"bob@{DOMAIN}"], message("two"))
        await eventually(lambda: len(world.mx.messages) == 2, what="the second delivery, under the cached policy")

        async def counted():
            counts = await relay.store.tls_counts(day)
            return counts if sum(c.count for c in counts) == 3 else None
        await eventually(counted, what="the sessions and the refused fetch in the store")
        monitor.tls_reports.clock = time.time
        await eventually(lambda: reports.messages, what="the day's report mailed")

        async def sent():
            [report] = await relay.store.tls_reports(day)
            return report if report["outcome"] else None
        await eventually(sent, what="the report's outcome recorded")
        api = await relay.cli_json("tls-report", "show", "--date", day)

        tab = await tab_factory(relay)
        await tab.goto("/")
        await tab.page.click("header nav >> text=TLS reports")
        await tab.page.wait_for_url("**/tls-reports")
        assert "No TLS sessions" in await tab.text()            # today: nothing yet
        await tab.page.click(f"form.filters a[href='/tls-reports?date={day}']")    # the day selector
        await tab.page.wait_for_url(f"**/tls-reports?date={day}")
        section = tab.page.locator(f"section.tls-domain[data-domain='{DOMAIN}']")
        [policy] = api["domains"][0]["policies"]
        row = await section.locator("table.tls-policies tr[data-policy-type=sts]").inner_text()
        assert row.split("\t")[:3] == ["sts", "2", "1"]        # two sessions met the policy, one fetch failed
        assert [policy["summary"]["total-successful-session-count"],
                policy["summary"]["total-failure-session-count"]] == [2, 1]
        assert f"mx: {MX}" in row and "mode: enforce" in row
        failure = await section.locator("table.tls-failures tr[data-result-type=sts-policy-invalid]").inner_text()
        [detail] = policy["failure-details"]
        assert detail["result-type"] == "sts-policy-invalid" and EVIL_SCRIPT in detail["failure-reason-code"]
        assert EVIL_SCRIPT in failure and EVIL_IMG in failure and "could not be fetched" in failure
        report = await section.locator("table.tls-report-sent").inner_text()
        assert "mailto:tlsrpt@reports.test" in report and "queued " in report
        assert api["domains"][0]["report"]["report_id"] in report
        assert await tab.page.locator("img").count() == 0 and await tab.page.locator("main script").count() == 0
        assert tab.dialogs == []
        await tab.goto("/tls-reports?date=yesterday")
        assert "not a day such as" in await tab.text(".error")
    finally:
        await reports.stop()
        await world.stop()


# -- access ---------------------------------------------------------------------------------------------

async def test_a_post_without_the_csrf_token_is_refused(relay_factory, tab_factory):
    relay, [entry] = await stuck(relay_factory, n=1, alerts={})
    tab = await tab_factory(relay)
    await tab.goto(f"/queue/{entry['id']}")
    action = f"{tab.base}/queue/{entry['id']}/hold"
    # The browser's own cookies (page.request shares them), no or a wrong token in the form.
    for fields in ({"reason": "no token"}, {"reason": "wrong token", "csrf": "0" * 64}):
        r = await tab.page.request.post(action, form=fields)
        assert r.status == 403 and "CSRF" in await r.text(), fields
    assert (await relay.show(entry["id"]))["status"] == "deferred"
    # Another site's page posting here is refused by the same-origin check before that.
    r = await tab.page.request.post(action, form={"reason": "x"}, headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status == 403
    # The form itself carries the token: that works.
    await tab.page.fill("#act input[name=reason]", "looking into it")
    await tab.page.click("#act button[formaction$='/hold']")
    await tab.page.wait_for_url(f"**/queue/{entry['id']}/hold")
    assert "is held" in await tab.text(".result")
    assert (await relay.show(entry["id"]))["status"] == "held"
    cookie, = await tab.page.context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and not cookie["secure"]   # plain HTTP here


async def test_with_tokens_the_console_logs_in_once_and_audits_the_token_name(relay_factory, tab_factory):
    relay, [entry] = await stuck(relay_factory, n=1, alerts={},
                                 http={"listen": f"{LOOPBACK}:0", "tokens": [f"ops:{TOKEN}"]})
    tab = await tab_factory(relay)
    await tab.goto(f"/queue/{entry['id']}")
    assert "/login?next=" in tab.page.url
    await tab.page.fill("input[name=token]", "not-the-token-0123456789")
    await tab.page.click("form.stack button")
    await tab.page.wait_for_url("**/login")
    assert "not one of the console's" in await tab.text(".error")
    await tab.page.fill("input[name=token]", TOKEN)
    await tab.page.click("form.stack button")
    await tab.page.wait_for_url(f"**/queue/{entry['id']}")
    assert "ops" in await tab.text("header")
    await tab.page.fill("#act input[name=reason]", "INC-9")
    await tab.page.click("#act button[formaction$='/hold']")
    await tab.page.wait_for_url(f"**/queue/{entry['id']}/hold")
    assert "by ops" in await tab.text(".result")
    [record] = [a for a in await relay.store.audit_log(10) if a.action == "queue hold"]
    assert record.who == "ops" and record.detail["reason"] == "INC-9"
    # Without the session: the login page for a browser, 401 for the API, as before.
    host, port = relay.app.console.address
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as http:
        r = await http.get("/")
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
        assert (await http.get("/api/v1/queue")).status_code == 401
        forged = await http.post(f"/queue/{entry['id']}/release", data={"reason": "x"},
                                 cookies={"relaywatch_session": "a.b.c.d"})
        assert forged.status_code == 303 and (await relay.show(entry["id"]))["status"] == "held"
        # Logging out ends the session: a copy of its cookie no longer works either.
        [cookie] = await tab.page.context.cookies()
        copied = {"relaywatch_session": cookie["value"]}
        assert (await http.get("/", cookies=copied)).status_code == 200
        await tab.page.click("header form.who button")
        await tab.page.wait_for_url("**/login*")
        assert (await http.get("/", cookies=copied)).status_code == 303


# -- bad input (no browser needed) ------------------------------------------------------------------------

async def test_bad_input_on_a_page_is_a_page_saying_so(relay_factory):
    relay, [entry] = await stuck(relay_factory, n=1, alerts={})
    host, port = relay.app.console.address
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as http:
        home = await http.get("/")
        csrf = home.text.split('name="csrf" value="', 1)[1].split('"', 1)[0] if 'name="csrf"' in home.text else None
        session = home.cookies.get("relaywatch_session")
        assert home.status_code == 200 and session and home.headers["content-type"].startswith("text/html")
        for path, status, says in (("/incidents/abc", 400, "whole number"), ("/incidents/99", 404, "no incident 99"),
                                   ("/queue/ZZZ", 404, "no queued message"), ("/connectors/nope", 404, "nope"),
                                   ("/nothing-here", 404, "No such page"), ("/static/web.py", 404, "not found"),
                                   ("/queue?older_than=soon", 400, "older_than")):
            r = await http.get(path)
            assert r.status_code == status and says in r.text and "Traceback" not in r.text, (path, r.status_code)
        r = await http.post(f"/queue/{entry['id']}/explode", data={"reason": "x", "csrf": csrf})
        assert r.status_code == 400 and "unknown action" in r.text
        r = await http.post(f"/queue/{entry['id']}/hold", data={"reason": " ", "csrf": csrf})
        assert r.status_code == 400 and "A reason is required" in r.text
        assert (await relay.show(entry["id"]))["status"] == "deferred"
        r = await http.get("/login?next=//evil.example/")
        assert r.status_code == 303 and r.headers["location"] == "/"     # logged in (loopback): no open redirect


async def test_over_https_the_session_cookie_is_secure(relay_factory, tmp_path):
    cert, key, ca = https_files(tmp_path)
    relay = await relay_factory(http={"listen": f"{LOOPBACK}:0", "tls_cert": cert, "tls_key": key,
                                      "tokens": [f"ops:{TOKEN}"]})
    host, port = relay.app.console.address
    async with httpx.AsyncClient(base_url=f"https://{host}:{port}", verify=ca) as https:
        r = await https.post("/login", data={"token": TOKEN, "next": "/queue"})
        assert r.status_code == 303 and r.headers["location"] == "/queue"
        flags = [f.strip() for f in r.headers["set-cookie"].split(";")]
        assert {"HttpOnly", "SameSite=Strict", "Secure", "Path=/"} <= set(flags), flags
        assert (await https.get("/queue")).status_code == 200
