"""Mail flow intelligence end to end: incidents, alerts, probes, Fix now."""

import asyncio
import datetime
import email
import hashlib
import hmac
import json
import smtplib
import ssl

import httpx
import pytest
import trustme

from helpers import LOOPBACK, FakeClock, Scripted, Sink, WebhookReceiver, advance, eventually, free_port, message, settle

pytestmark = [pytest.mark.both_loops, pytest.mark.both_stores]   # delivery end to end: asyncio and uvloop (serve runs uvloop); SQLite and PostgreSQL


SECRET = "s3cret"


def alerts_config(alert_sink, webhook, **kw):
    return {"notify": ["admin@ops.test"], "smtp": f"{LOOPBACK}:{alert_sink.port}",
            "webhook_url": f"http://{LOOPBACK}:{webhook.port}/hook", "webhook_secret": SECRET,
            "open_after": "0s", "evaluate_interval": "0.2s", "probe_interval": "0.3s",
            "cert_probe_interval": "1h", "escalate_before_expiry": "1s", **kw}


def onprem(port, **kw):
    return [{"name": "onprem", "type": "on_premises", "domains": ["hybrid.test"],
             "smart_hosts": [f"{LOOPBACK}:{port}"], "tls": "none", **kw}]


HYBRID = [{"name": "contoso.test", "type": "authoritative", "mailboxes": ["alice"]},
          {"name": "hybrid.test", "type": "internal_relay", "mailboxes": ["kept"]}]


async def _attempts(relay, n):
    return await relay.attempts() == n


async def incidents(relay, all_=False):
    args = ["incidents", "list"] + (["--all"] if all_ else [])
    return (await relay.cli_json(*args))["incidents"]


async def test_outage_opens_once_notifies_once_recovers_by_probe_and_sends_all_clear(relay_factory, watchers):
    alert_sink, webhook = watchers
    port = free_port()
    relay = await relay_factory(domains=HYBRID, queue={"retry_intervals": ["1h"]}, connectors=onprem(port),
                                alerts=alerts_config(alert_sink, webhook))
    for i in range(5):
        await relay.send("alice@contoso.test", [f"user{i}@hybrid.test"], message(f"m{i}"))
    [inc] = await eventually(lambda: _open_with(relay, 5), what="one incident for five messages")
    assert (inc["connector"], inc["code"], inc["connector_type"]) == ("onprem", "4.4.316", "on_premises")
    assert inc["recipients"] == 5 and inc["first_expires_at"] and inc["destinations"] == [f"{LOOPBACK}:{port}"]
    assert inc["diagnosis"]["cause"] == "nothing_listening"
    assert "decommission" in inc["actions"] and inc["fixes"]
    await eventually(lambda: webhook.events() == ["open"] and len(alert_sink.messages) == 1, what="the alerts")
    headers, body = webhook.posts[0]
    assert headers["x-relaywatch-signature"] == "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert json.loads(body)["incident"]["code"] == "4.4.316"
    alert = email.message_from_bytes(alert_sink.messages[0].content)
    assert alert["To"] == "admin@ops.test" and "4.4.316 Connection refused" in alert["Subject"]
    assert "Fix now" in alert.get_payload()

    # The server comes back: a probe passes and the backlog goes at once, not in an hour.
    sink = await Sink(port=port).start()
    try:
        await eventually(lambda: len(sink.messages) == 5, what="the backlog released by the probe")
        resolved = await eventually(lambda: _resolved(relay), what="the all-clear")
        assert resolved["delivered_late"] == 5 and resolved["peak_messages"] == 5
        await eventually(lambda: webhook.events() == ["open", "resolve"] and len(alert_sink.messages) == 2,
                         what=lambda: f"one all-clear per channel: {webhook.events()}, {len(alert_sink.messages)} emails")
        assert "RESOLVED" in email.message_from_bytes(alert_sink.messages[1].content)["Subject"]
        await asyncio.sleep(1)   # not a wait for the system: proves no duplicate notifications follow
        assert webhook.events() == ["open", "resolve"] and len(alert_sink.messages) == 2
        shown = (await relay.cli("incidents", "show", str(resolved["id"]))).output
        assert "Notified open by email: sent" in shown and "Notified resolve by webhook: sent" in shown
    finally:
        await sink.stop()


async def _open_with(relay, n):
    found = await incidents(relay)
    return found if len(found) == 1 and found[0]["messages"] == n else None


async def _resolved(relay):
    found = [i for i in await incidents(relay, all_=True) if i["state"] == "resolved"]
    return found[0] if found else None


async def test_escalates_before_messages_expire(relay_factory, watchers):
    alert_sink, webhook = watchers
    relay = await relay_factory(domains=HYBRID, queue={"retry_intervals": ["1h"], "message_expiration": "2h"},
                                connectors=onprem(free_port()),
                                alerts=alerts_config(alert_sink, webhook, escalate_before_expiry="3h"))
    await relay.send("alice@contoso.test", ["bob@hybrid.test"], message())
    await eventually(lambda: webhook.events() == ["open", "escalate:expiry"], what="open, then escalation")
    [inc] = await incidents(relay)
    assert inc["severity"] == "critical" and inc["escalations"] == ["expiry"]


async def test_a_cause_change_resolves_the_old_incident_and_opens_a_new_one(relay_factory, watchers):
    alert_sink, webhook = watchers
    port = free_port()
    relay = await relay_factory(domains=HYBRID, queue={"retry_intervals": ["0.5s"]}, connectors=onprem(port),
                                alerts=alerts_config(alert_sink, webhook, probe_interval="1h"))
    await relay.send("alice@contoso.test", ["bob@hybrid.test"], message())
    await eventually(lambda: _codes(relay, "4.4.316"), what="the refused incident")

    async def busy(c):
        await c.say("421 4.3.2 Service not available")
    server = await Scripted(busy).start()
    # the same port now answers, but turns us away
    server.server.close()
    server.server = await asyncio.start_server(lambda r, w: _run(server, r, w), LOOPBACK, port)
    try:
        found = await eventually(lambda: _codes(relay, "4.4.317"), what="the new cause's incident")
        states = {(i["code"], i["state"]) for i in found}
        assert ("4.4.316", "resolved") in states and ("4.4.317", "open") in states
    finally:
        server.server.close()


async def _run(server, reader, writer):
    from helpers import ScriptedConnection
    await server.script(ScriptedConnection(reader, writer))
    writer.close()


async def _codes(relay, code):
    found = await incidents(relay, all_=True)
    return found if any(i["code"] == code and i["state"] == "open" for i in found) else None


async def test_decommission_returns_unknown_recipients_delivers_listed_ones_and_undo_restores(relay_factory, watchers):
    alert_sink, webhook = watchers
    relay = await relay_factory(domains=HYBRID, queue={"retry_intervals": ["1h"]}, connectors=onprem(free_port()),
                                alerts=alerts_config(alert_sink, webhook, probe_interval="1h"))
    await relay.send("alice@contoso.test", ["kept@hybrid.test", "gone@hybrid.test"], message("to the old server"))
    # kept@ is a listed mailbox of an internal-relay domain: it is local already.
    # Mail to unlisted users goes to the (dead) on-premises server:
    await relay.send("alice@contoso.test", ["gone2@hybrid.test"], message("another"))
    [inc] = await eventually(lambda: _open_with(relay, 2), what="the 4.4.316 incident")
    dry = (await relay.cli("incidents", "fix", str(inc["id"]), "decommission", "--dry-run")).output
    assert "Disable connector onprem" in dry and "Make hybrid.test authoritative" in dry and "nothing changed" in dry
    assert (await relay.cli_json("config", "show"))["overrides"] == {}

    out = (await relay.cli("incidents", "fix", str(inc["id"]), "decommission", "--reason", "server retired")).output
    assert "2 message(s) returned (5.1.10)" in out
    ndrs = await eventually(lambda: len(relay.maildir("alice@contoso.test")) == 2 and relay.maildir("alice@contoso.test"),
                            what="two NDRs")
    for ndr in ndrs:
        per_rcpt = email.message_from_bytes(ndr).get_payload()[1].get_payload()[1]
        assert per_rcpt["Status"] == "5.1.10"
    shown = await relay.cli_json("config", "show")
    assert shown["overrides"]["connector:onprem:enabled"]["value"] is False
    assert shown["overrides"]["domain:hybrid.test:type"]["value"] == "authoritative"
    # The incident clears with its backlog gone.  Waited for before sending more: mail
    # sent before the server picks the override up goes to onprem and is a backlog
    # again (on PostgreSQL the NDRs leave at once, so the test got there first).
    resolved = await eventually(lambda: _resolved(relay), what="the incident to clear with its backlog gone")
    assert resolved["id"] == inc["id"]
    # New mail to unknown users is now rejected at RCPT (the server picks the override up within seconds).

    async def rejected():
        try:
            await relay.send("x@example.org", ["new@hybrid.test"], message())
        except smtplib.SMTPRecipientsRefused as exc:
            return exc.recipients["new@hybrid.test"][0] == 550
        return False
    await eventually(rejected, what="RCPT rejection after decommission")

    undone = (await relay.cli("incidents", "undo", str(inc["id"]))).output
    assert "undid decommission" in undone and "already delivered locally or returned stays so" in undone
    assert (await relay.cli_json("config", "show"))["overrides"] == {}

    async def accepted_again():
        try:
            await relay.send("x@example.org", ["new@hybrid.test"], message())
            return True
        except smtplib.SMTPRecipientsRefused:
            return False
    await eventually(accepted_again, what="internal relay restored by undo")


async def test_pause_stops_attempts_and_undo_resumes(relay_factory, watchers):
    alert_sink, webhook = watchers
    port, clock = free_port(), FakeClock()
    relay = await relay_factory(clock=clock, domains=HYBRID, queue={"retry_intervals": ["1s"]},
                                connectors=onprem(port), alerts=alerts_config(alert_sink, webhook, probe_interval="1h"))
    await relay.send("alice@contoso.test", ["bob@hybrid.test"], message())
    await eventually(lambda: _attempts(relay, 1), what="the first attempt")
    await advance(clock, relay, 1)          # the watch's next tick sees it
    [inc] = await eventually(lambda: _open_with(relay, 1), what="the incident")
    await relay.cli("incidents", "fix", str(inc["id"]), "pause")
    await eventually(lambda: relay.app.config.connector("onprem").paused, what="the server to apply the pause")
    tried = await relay.attempts()
    sink = await Sink(port=port).start()
    try:
        for _ in range(3):                  # due again, and looked at again every 30 s: paused, no attempt
            await advance(clock, relay, 30)
        assert sink.messages == [] and await relay.attempts() == tried
        await relay.cli("incidents", "undo", str(inc["id"]))
        await eventually(lambda: sink.messages, what="delivery after the pause is undone")
    finally:
        await sink.stop()


async def test_certificate_expiring_soon_opens_a_warning(relay_factory, watchers, tmp_path):
    alert_sink, webhook = watchers
    ca = trustme.CA()
    now = datetime.datetime.now(datetime.timezone.utc)
    leaf = ca.issue_cert("mail.partner.test", not_before=now - datetime.timedelta(days=80),
                         not_after=now + datetime.timedelta(days=5))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    sink = await Sink(tls_context=ctx).start()
    try:
        relay = await relay_factory(
            connectors=[{"name": "partner", "type": "partner", "domains": ["partner.test"],
                         "smart_hosts": [f"{LOOPBACK}:{sink.port}"], "tls": "required", "tls_verify": "ca_and_name",
                         "tls_name": "mail.partner.test", "ca_file": str(ca_file)}],
            alerts=alerts_config(alert_sink, webhook, cert_probe_interval="0.5s"))
        [inc] = await eventually(lambda: incidents(relay), what="the certificate warning")
        assert inc["code"] == "watch:cert_expiring" and inc["connector"] == "partner"
        assert 4 <= inc["certificate"]["days_left"] <= 5
        assert "expires on" in inc["detail"]
        await eventually(lambda: webhook.events() == ["open"], what="the warning notification")
        # The console's connector list says so (mail flows: not "incident open").
        host, port = relay.app.console.address
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10) as http:
            [c] = (await http.get("/api/v1/connectors")).json()["connectors"]
        assert (c["state"], c["open_incidents"]) == ("certificate expiring", [inc["id"]])
        # Mail still flows meanwhile.
        await relay.send("alice@contoso.test", ["bob@partner.test"], message())
        await eventually(lambda: sink.messages, what="delivery with the still-valid certificate")
    finally:
        await sink.stop()


async def test_delay_notice_is_sent_once(relay_factory):
    # On the test's clock: an attempt a second, the notice due from the third on (2 s late).
    clock = FakeClock()
    relay = await relay_factory(clock=clock, queue={"retry_intervals": ["1s"]},
                                connectors=[{"name": "onprem", "type": "on_premises", "domains": ["hybrid.test"],
                                             "smart_hosts": [f"{LOOPBACK}:{free_port()}"], "tls": "none",
                                             "delay_notice_after": "2s"}])
    await relay.send("alice@contoso.test", ["bob@hybrid.test"], message("slow one"))
    await eventually(lambda: _attempts(relay, 1), what="the first attempt")
    await advance(clock, relay, 1)
    assert await relay.attempts() == 2 and relay.maildir("alice@contoso.test") == []   # not late enough yet
    for attempts in (3, 4, 5):        # more attempts, one notice
        await advance(clock, relay, 1)
        assert await relay.attempts() == attempts
    await settle(clock, relay)
    [notice] = relay.maildir("alice@contoso.test")
    report = email.message_from_bytes(notice)
    assert report["Subject"] == "Delayed: slow one"
    per_rcpt = report.get_payload()[1].get_payload()[1]
    assert per_rcpt["Action"] == "delayed" and per_rcpt["Will-Retry-Until"]
    assert "You do not need to send it again" in report.get_payload()[0].get_payload(decode=True).decode()


async def test_connector_test_walks_the_path(relay_factory, sink):
    relay = await relay_factory(connectors=onprem(sink.port))
    result = await relay.cli("connector", "test", "onprem", "--json")
    data = json.loads(result.output)
    assert data["ok"] and [s["step"] for s in data["steps"]] == ["dns", "tcp", "greeting", "ehlo", "mail", "rcpt", "rset"]
    assert sink.messages == []
    port = free_port()
    relay.raw["connectors"] = onprem(port)
    relay.write_config()
    failed = await relay.cli("connector", "test", "onprem", expect=1)
    assert "FAIL tcp" in failed.output and "4.4.316 Connection refused" in failed.output


async def test_a_short_outage_recovers_by_probe_without_an_incident(relay_factory, watchers):
    alert_sink, webhook = watchers
    port = free_port()
    relay = await relay_factory(domains=HYBRID, queue={"retry_intervals": ["1h"]}, connectors=onprem(port),
                                alerts=alerts_config(alert_sink, webhook, open_after="1h"))
    for i in range(3):
        await relay.send("alice@contoso.test", [f"u{i}@hybrid.test"], message(f"m{i}"))
    await eventually(lambda: _all_tried(relay, 3), what="three deferrals")
    sink = await Sink(port=port).start()
    try:
        await eventually(lambda: len(sink.messages) == 3, what="release by the probe, long before the 1h retry")
        subjects = [m.content.split(b"Subject: ")[1].split(b"\r\n")[0] for m in sink.messages]
        assert subjects == [b"m0", b"m1", b"m2"]     # oldest first
        assert await incidents(relay, all_=True) == [] and webhook.events() == []
    finally:
        await sink.stop()


async def _all_tried(relay, n):
    q = await relay.queue()
    return len(q) == n and all(m["attempts"] for m in q)


async def test_invalid_recipient_quota_warns_at_80_and_100_percent(relay_factory, watchers):
    alert_sink, webhook = watchers
    relay = await relay_factory(alerts=alerts_config(alert_sink, webhook, invalid_recipient_quota=5))

    async def reject(n):
        for i in range(n):
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                await relay.send("x@example.org", [f"nobody{i}-{n}@contoso.test"], message())
    await reject(4)
    [inc] = await eventually(lambda: incidents(relay), what="the 80% warning")
    assert inc["code"] == "watch:invalid_recipients" and inc["level"] == 80 and inc["count"] == 4
    assert inc["top"][0]["domain"] == "contoso.test" and "80% of the quota of 5" in inc["detail"]
    await reject(1)
    await eventually(lambda: "escalate:100%" in webhook.events(), what="the 100% escalation")
    [inc] = await incidents(relay)
    assert inc["level"] == 100 and inc["severity"] == "critical"


async def test_a_failing_webhook_is_retried_and_its_failure_recorded(relay_factory):
    webhook = await WebhookReceiver(status=500).start()
    try:
        relay = await relay_factory(domains=HYBRID, queue={"retry_intervals": ["1h"]}, connectors=onprem(free_port()),
                                    alerts={"webhook_url": f"http://{LOOPBACK}:{webhook.port}/hook",
                                            "open_after": "0s", "evaluate_interval": "0.2s", "probe_interval": "1h"})
        await relay.send("alice@contoso.test", ["bob@hybrid.test"], message())
        [inc] = await eventually(lambda: incidents(relay), what="the incident")
        await eventually(lambda: len(webhook.posts) >= 1, what="the first try")
        shown = await eventually(lambda: _shown_with(relay, inc["id"], "last error: webhook answered HTTP/1.1 500"),
                                 what="the recorded failure")
        assert "Notified open by webhook: pending" in shown
    finally:
        await webhook.stop()


async def _shown_with(relay, incident_id, text):
    out = (await relay.cli("incidents", "show", str(incident_id))).output
    return out if text in out else None


async def test_a_channel_that_refuses_an_alert_raises_a_relaywatch_error_saying_why():
    """One root (errors.py): a failed alert is an AlertNotSent, whose text is the last error shown."""
    from relaywatch.config import parse_config
    from relaywatch.errors import AlertNotSent, RelaywatchError
    from relaywatch.watch.alerts import send_webhook
    hook = await WebhookReceiver(status=503).start()
    try:
        config = parse_config({"alerts": {"webhook_url": f"http://{LOOPBACK}:{hook.port}/hook"}})
        with pytest.raises(AlertNotSent, match="webhook answered HTTP/1.1 503") as raised:
            await send_webhook(config, {"event": "incident.opened", "transition": "open", "incident": {"id": 1}})
        assert isinstance(raised.value, RelaywatchError) and len(hook.posts) == 1
    finally:
        await hook.stop()
