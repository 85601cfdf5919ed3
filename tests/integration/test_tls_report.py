"""TLS reporting (RFC 8460): the TXT record and the report by table; then a real
relay delivering under an MTA-STS policy (HTTPS on loopback with a test CA,
DNS on loopback answering _mta-sts and _smtp._tls, aiosmtpd MX sinks), the
results counted and stored, and on the day after (a clock of the test's) the
report mailed through the queue to an aiosmtpd sink and POSTed to an HTTPS
receiver on loopback, both parsed and checked.  Both loops, both stores."""

import asyncio
import email
import email.policy
import gzip
import json
import ssl
import time

import httpx
import pytest
import trustme

from helpers import LOOPBACK, DnsServer, FakeClock, Sink, clear_of_utc_midnight, eventually, free_port, message
from tests.integration.test_mta_sts import DOMAIN, MX, World, policy_text, server_context
from relaywatch.classify.observation import Observation, Outcome, Phase
from relaywatch.deliver.tls_report import TlsTally, opportunistic_result, utc_day
from relaywatch.model import Destination
from relaywatch.tls_results import TlsCount, TlsResult
from relaywatch.notify.tls_report import parse_tlsrpt, policies, report
from relaywatch.watch.tls_report import TlsReporter

MX2 = "mx2.partner.test"
REPORTING = {"enabled": True, "organization_name": "Contoso Ltd", "contact_info": "tls@contoso.test",
             "submitter": "relay.contoso.test"}


async def start_reporting_relay(world, reports: Sink | None = None):
    """The world's relay with TLS reporting on; report mail to reports.test goes to ``reports``."""
    sections = {"connectors": [{"name": "reports", "type": "partner", "domains": ["reports.test"],
                                "smart_hosts": [f"{LOOPBACK}:{reports.port}"], "tls": "none"}]} if reports else {}
    return await world.start_relay(alerts={"evaluate_interval": "0.1s"}, tls_reporting=REPORTING, **sections)


_LINES = ("version: STSv1", "mode: enforce", f"mx: {MX}", "max_age: 86400")


# -- pure -------------------------------------------------------------------------------------

@pytest.mark.parametrize("texts, expected", [
    (["v=TLSRPTv1; rua=mailto:tls@p.test"], ("mailto:tls@p.test",)),
    (["v=TLSRPTv1;rua=mailto:a@p.test,https://r.p.test/v1"], ("mailto:a@p.test", "https://r.p.test/v1")),
    (["v=TLSRPTv1; rua=mailto:a%40b@p.test"], ("mailto:a%40b@p.test",)),
    (["other", "v=TLSRPTv1; rua=https://r.p.test/"], ("https://r.p.test/",)),
    (["v=TLSRPTv1; rua=ftp://r.p.test/, mailto:nobody"], ()),         # unknown scheme, no address
    (["v=TLSRPTv1"], ()),
    (["v=TLSRPTv1; rua=mailto:a@p.test\x1b[31m,https://r.p.test/"], ("https://r.p.test/",)),   # no escapes
    (["v=TLSRPTv1; rua=mailto:a@p.test", "v=TLSRPTv1; rua=mailto:b@p.test"], ()),   # two: none (RFC 8460 3)
    (["v=TLSRPTv10; rua=mailto:a@p.test"], ()),
    ([], ()),
])
def test_the_tlsrpt_record(texts, expected):
    assert parse_tlsrpt(texts) == expected


def _result(kind=None, mx=MX, ip=LOOPBACK, policy_type="sts", lines=_LINES, at=86400.0 * 20000 + 5):
    return TlsResult(at=at, policy_domain=DOMAIN, policy_type=policy_type, policy_id="1", mode="enforce",
                     result_type=kind, mx_host=mx, receiving_ip=ip, policy_strings=lines, sending_ip="127.0.0.9")


def test_results_are_counted_by_day_and_key_into_the_rfc_8460_policies():
    tally = TlsTally()
    for r in [_result(), _result(), _result("certificate-host-mismatch"), _result("certificate-host-mismatch"),
              _result("starttls-not-supported", mx=MX2, ip="127.0.0.3"),
              _result("sts-policy-fetch-error", mx=None, ip=None, policy_type="no-policy-found", lines=()),
              _result(at=86400.0 * 20001)]:   # the next day: a row of its own
        tally.add(r)
    rows = tally.take()
    assert tally.take() == []
    day = utc_day(86400.0 * 20000)
    assert sorted(r.day for r in rows) == [day] * 4 + [utc_day(86400.0 * 20001)]
    data = report(rows, day, DOMAIN, "Contoso", "mailto:tls@contoso.test", "relay.contoso.test")
    assert data["date-range"] == {"start-datetime": f"{day}T00:00:00Z", "end-datetime": f"{day}T23:59:59Z"}
    assert data["report-id"] == f"{day}T00:00:00Z_{DOMAIN}@relay.contoso.test"
    assert data["policies"] == [
        {"policy": {"policy-type": "no-policy-found", "policy-string": [], "policy-domain": DOMAIN},
         "summary": {"total-successful-session-count": 0, "total-failure-session-count": 1},
         "failure-details": [{"result-type": "sts-policy-fetch-error", "sending-mta-ip": "127.0.0.9",
                              "failed-session-count": 1}]},
        {"policy": {"policy-type": "sts", "policy-string": list(_LINES), "policy-domain": DOMAIN,
                    "mx-host": [MX]},
         "summary": {"total-successful-session-count": 2, "total-failure-session-count": 3},
         "failure-details": [
             {"result-type": "certificate-host-mismatch", "sending-mta-ip": "127.0.0.9",
              "receiving-mx-hostname": MX, "receiving-ip": LOOPBACK, "failed-session-count": 2},
             {"result-type": "starttls-not-supported", "sending-mta-ip": "127.0.0.9",
              "receiving-mx-hostname": MX2, "receiving-ip": "127.0.0.3", "failed-session-count": 1}]},
    ]


def test_counts_a_failed_store_write_gave_back_are_counted_again():
    tally = TlsTally()
    tally.add(_result())
    rows = tally.take()
    tally.add(_result())
    tally.put_back(rows)
    [row] = tally.take()
    assert row.count == 2


_DEST = Destination(MX, LOOPBACK, 25)


@pytest.mark.parametrize("encrypted, failure, expected", [
    (True, None, None),
    (False, None, "starttls-not-supported"),      # offered no STARTTLS: the mail went in clear
    (True, Observation(Phase.STARTTLS, Outcome.TLS_HANDSHAKE, _DEST), "validation-failure"),
    (False, Observation(Phase.CONNECT, Outcome.REFUSED, _DEST), "none"),   # no TLS session at all
])
def test_opportunistic_tls_by_mx_is_reported_as_no_policy_found(encrypted, failure, expected):
    result = opportunistic_result(DOMAIN, MX, LOOPBACK, "127.0.0.9", encrypted, failure, 0.0)
    if expected == "none":
        assert result is None
        return
    assert (result.policy_type, result.result_type, result.mx_host, result.sending_ip) == (
        "no-policy-found", expected, MX, "127.0.0.9")


# -- the loopback world: a relay under a policy, the report's two destinations ------------------

class HttpsReceiver:
    """HTTPS on loopback that keeps every POST (headers, body) and answers 200, or
    first each status of ``failing`` in turn."""

    def __init__(self, context: ssl.SSLContext, failing: tuple[int, ...] = ()):
        self.context = context
        self.failing = list(failing)
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        self.server = None

    async def start(self) -> "HttpsReceiver":
        self.server = await asyncio.start_server(self._handle, LOOPBACK, 0, ssl=self.context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader, writer):
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.posts.append((head[0], headers, body))
            status = self.failing.pop(0) if self.failing else 200
            writer.write(b"HTTP/1.1 %d Whatever\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % status)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()


@pytest.fixture
def ca(tmp_path):
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return ca


@pytest.fixture
async def world(tmp_path, ca, relay_factory):
    # Each test here counts (or reports) the sessions of one UTC day on the real clock.
    await clear_of_utc_midnight()
    w = World(tmp_path, ca, relay_factory)
    yield w
    await w.stop()


@pytest.mark.both_loops
@pytest.mark.both_stores
async def test_a_day_of_sessions_under_a_policy_is_reported_by_mail_and_https(world, tmp_path):
    # mx2 comes first but its certificate names mx: a certificate-host-mismatch, then mx takes the mail.
    await world.start(policy=policy_text(mx=(MX2, MX)), mx_hosts=(MX2, MX))
    receiver = await HttpsReceiver(server_context(world.ca, "tlsrpt.partner.test")).start()
    reports = await Sink().start()
    world.dns.zone[(f"_smtp._tls.{DOMAIN}", "TXT")] = [
        f'"v=TLSRPTv1; rua=mailto:tlsrpt@reports.test,https://tlsrpt.partner.test:{receiver.port}/v1/"']
    world.dns.zone[("tlsrpt.partner.test", "A")] = [LOOPBACK]
    try:
        relay = await start_reporting_relay(world, reports)
        # The clock of the test: the sessions happen yesterday, and the reporter lives
        # yesterday too until the test moves it past midnight.
        monitor = relay.app.monitor
        relay.app.routes.mta_sts.clock = monitor.tls_reports.clock = lambda: time.time() - 86400
        await relay.send("alice@contoso.test", [f"bob@{DOMAIN}"], message("one"))
        await eventually(lambda: world.mx.messages, what="delivery")
        day = utc_day(time.time() - 86400)

        async def counted():
            counts = await relay.store.tls_counts(day)
            return counts if sum(c.count for c in counts if c.policy_type == "sts") == 2 else None
        counts = await eventually(counted, what="the session counts in the store")
        assert {(c.result_type, c.mx_host, c.count) for c in counts} == {
            ("", "", 1), ("certificate-host-mismatch", MX2, 1)}
        assert not reports.messages and not receiver.posts      # not before the day is over

        monitor.tls_reports.clock = time.time
        await eventually(lambda: reports.messages and receiver.posts, what="the report by mail and by HTTPS")

        [mail] = reports.messages
        # The report went by the smart host of a connector: no MX of reports.test, nothing to report to it.
        assert {r.policy_domain for r in relay.app.routes.tls_results.recent} == {DOMAIN}
        assert mail.sender == "noreply-smtp-tls-reporting@relay.contoso.test"
        assert mail.recipients == ["tlsrpt@reports.test"]
        msg = email.message_from_bytes(mail.content, policy=email.policy.default)
        report_id = f"{day}T00:00:00Z_{DOMAIN}@relay.contoso.test"
        assert msg["TLS-Report-Domain"] == DOMAIN
        assert msg["TLS-Report-Submitter"] == "relay.contoso.test"
        assert msg["Subject"] == f"Report Domain: {DOMAIN} Submitter: relay.contoso.test Report-ID: <{report_id}>"
        assert msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == "tlsrpt"
        text, attachment = msg.get_payload()
        assert text.get_content_type() == "text/plain"
        assert attachment.get_content_type() == "application/tlsrpt+gzip"
        assert attachment.get_filename().startswith(f"relay.contoso.test!{DOMAIN}!")
        assert attachment.get_filename().endswith(".json.gz")
        data = json.loads(gzip.decompress(attachment.get_content()))

        line, headers, body = receiver.posts[0]
        assert line == "POST /v1/ HTTP/1.1"
        assert headers["content-type"] == "application/tlsrpt+gzip"
        assert json.loads(gzip.decompress(body)) == data

        assert data["organization-name"] == "Contoso Ltd"
        assert data["contact-info"] == "tls@contoso.test"
        assert data["report-id"] == report_id
        assert data["date-range"]["start-datetime"] == f"{day}T00:00:00Z"
        [policy] = data["policies"]
        assert policy["policy"] == {"policy-type": "sts", "policy-string": policy_text(mx=(MX2, MX)).split("\r\n")[:-1],
                                    "policy-domain": DOMAIN, "mx-host": [MX2, MX]}
        assert policy["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 1}
        assert policy["failure-details"] == [{
            "result-type": "certificate-host-mismatch", "sending-mta-ip": LOOPBACK,
            "receiving-mx-hostname": MX2, "receiving-ip": LOOPBACK, "failed-session-count": 1,
            "failure-reason-code": f"the session with {MX2} does not meet the policy (certificate-host-mismatch); "
                                   "the message was not sent there"}]

        # Sent once: another node (a reporter of its own on the same store) finds it claimed.
        other = TlsReporter(monitor.config_ref, relay.store, relay.app.resolver, time.time)
        await other.send_due()
        [sent] = await relay.store.tls_reports(day)
        assert sent["outcome"][f"https://tlsrpt.partner.test:{receiver.port}/v1/"] == "sent (HTTP 200)"
        assert sent["outcome"]["mailto:tlsrpt@reports.test"].startswith("queued ")
        assert len(receiver.posts) == 1 and len(reports.messages) == 1

        # The same facts in the CLI and the console's API, field for field, and in the table.
        shown = await relay.cli_json("tls-report", "show", "--date", day)
        host, port = relay.app.console.address
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10) as http:
            api = (await http.get("/api/v1/tls-reports", params={"date": day})).json()
            bad = await http.get("/api/v1/tls-reports", params={"date": "yesterday"})
        assert api == shown
        assert bad.status_code == 400 and "date" in bad.text
        [domain] = shown["domains"]
        assert domain["policies"] == data["policies"]
        assert domain["report"]["report_id"] == report_id
        table = (await relay.cli("tls-report", "show", "--date", day)).output
        assert "certificate-host-mismatch" in table and MX2 in table and "sent (HTTP 200)" in table
        assert f"'the session with {MX2} does not meet the policy (certificate-host-mismatch)" in table
    finally:
        await receiver.stop()
        await reports.stop()


@pytest.mark.both_loops
@pytest.mark.both_stores
async def test_the_report_reaches_a_domain_whose_policy_fails_and_is_not_counted(world):
    # RFC 8460 5.3: the report about partner.test's broken TLS goes to partner.test itself,
    # whose only MX shows a certificate for another name under an enforced policy.
    await world.start(policy=policy_text(), mx_cert="other.partner.test")
    world.dns.zone[(f"_smtp._tls.{DOMAIN}", "TXT")] = [f'"v=TLSRPTv1; rua=mailto:tlsrpt@{DOMAIN}"']
    relay = await start_reporting_relay(world)
    monitor = relay.app.monitor
    relay.app.routes.mta_sts.clock = monitor.tls_reports.clock = lambda: time.time() - 86400
    await relay.send("alice@contoso.test", [f"bob@{DOMAIN}"], message("one"))
    day = utc_day(time.time() - 86400)

    async def counted():
        return [c for c in await relay.store.tls_counts(day) if c.result_type == "certificate-host-mismatch"]
    await eventually(counted, what="the failed session counted")
    assert not world.mx.messages                          # the policy holds bob's mail back

    monitor.tls_reports.clock = time.time
    await eventually(lambda: world.mx.messages, what="the report delivered to the domain's own MX")
    [mail] = world.mx.messages
    assert mail.recipients == [f"tlsrpt@{DOMAIN}"]
    assert ("noreply-smtp-tls-reporting@relay.contoso.test", True) in world.handler.mail_from   # TLS as offered
    # Its session is in no count: every result recorded is one of bob's failures under the policy.
    assert {(r.policy_type, r.result_type) for r in relay.app.routes.tls_results.recent} == {
        ("sts", "certificate-host-mismatch")}


# -- the incident of a policy failure says what the day's report will say ----------------------------

@pytest.mark.parametrize("facts, expected", [
    ({"policy_domain": DOMAIN, "failures": [["certificate-host-mismatch", 3]], "enabled": True,
      "rua": ["mailto:tlsrpt@partner.test"]},
     "3 session(s) to partner.test failed today (UTC): 3 with certificate-host-mismatch; the daily TLS report "
     "goes to rua=mailto:tlsrpt@partner.test."),
    ({"policy_domain": DOMAIN, "failures": [["starttls-not-supported", 2], ["validation-failure", 1]],
      "enabled": True, "rua": []},
     "3 session(s) to partner.test failed today (UTC): 2 with starttls-not-supported, 1 with validation-failure; "
     "partner.test publishes no _smtp._tls record, so no TLS report is sent."),
    ({"policy_domain": DOMAIN, "failures": [["validation-failure", 1]], "enabled": False, "rua": ["mailto:a@b.test"]},
     "1 session(s) to partner.test failed today (UTC): 1 with validation-failure; TLS reporting is off here "
     "([tls_reporting] enabled), so the domain is not told."),
    ({"policy_domain": DOMAIN, "failures": [["certificate-host-mismatch", 2]], "enabled": True, "rua": [],
      "failure_details": [{"result-type": "certificate-host-mismatch", "receiving-mx-hostname": "mx.partner.test",
                           "receiving-ip": "192.0.2.1", "failed-session-count": 2,
                           "failure-reason-code": 'no "match"\nhere'}]},
     "2 session(s) to partner.test failed today (UTC): 2 with certificate-host-mismatch; partner.test publishes no "
     "_smtp._tls record, so no TLS report is sent.\n"
     '  2 certificate-host-mismatch at mx.partner.test [192.0.2.1]: "no \\"match\\"\\nhere"'),
    ({"policy_domain": DOMAIN, "failures": [], "enabled": True, "rua": []}, None),
    ({}, None),
])
def test_the_incident_line(facts, expected):
    from relaywatch.notify.tls_report import incident_line
    assert incident_line(facts) == expected


@pytest.mark.both_loops
async def test_an_mta_sts_incident_says_how_many_sessions_failed_and_where_the_report_goes(world):
    await world.start(policy=policy_text(), mx_cert="other.example.test")   # the MX's certificate names another host
    world.dns.zone[(f"_smtp._tls.{DOMAIN}", "TXT")] = ['"v=TLSRPTv1; rua=mailto:tlsrpt@partner.test"']
    relay = await world.start_relay(
        alerts={"evaluate_interval": "0.1s", "open_after": "1s", "min_messages": 1},
        tls_reporting={"enabled": True, "organization_name": "Contoso Ltd", "contact_info": "tls@contoso.test"})
    await relay.send("alice@contoso.test", [f"bob@{DOMAIN}"], message("one"))

    async def opened():
        found = (await relay.cli_json("incidents", "list"))["incidents"]
        return found[0] if found else None
    incident = await eventually(opened, what="the incident")
    text = (await relay.cli("incidents", "show", str(incident["id"]))).output
    assert "session(s) to partner.test failed today (UTC): " in text
    assert "with certificate-host-mismatch; the daily TLS report goes to rua=mailto:tlsrpt@partner.test." in text
    # The same facts as the day's report (tls-report show, the console's page, what the partner gets):
    # each failure-details row, its MX, address and failure-reason-code, as the incident was opened.
    reported = (await relay.cli_json("tls-report", "show"))["domains"]
    [details] = [[d for p in r["policies"] for d in p.get("failure-details", [])] for r in reported
                 if r["policy_domain"] == DOMAIN]
    kept = incident["diagnosis"]["facts"]["tls_report"]["failure_details"]
    assert kept and {(d["result-type"], d["receiving-mx-hostname"], d["failure-reason-code"]) for d in kept} <= {
        (d["result-type"], d["receiving-mx-hostname"], d["failure-reason-code"]) for d in details}
    for d in kept:
        assert (f"  {d['failed-session-count']} {d['result-type']} at {d['receiving-mx-hostname']} "
                f"[{d['receiving-ip']}]: \"{d['failure-reason-code']}\"") in text


# -- the daily trigger on a clock of the test's, over each store ------------------------------------

from helpers import STORE_BACKENDS, make_store  # noqa: E402
from relaywatch.config import parse_config  # noqa: E402
from relaywatch.deliver.resolver import Resolver  # noqa: E402
from relaywatch.errors import StoreError  # noqa: E402
from relaywatch.store.base import QueueQuery  # noqa: E402

MIDNIGHT = 86400.0 * 20422     # 2025-11-30 00:00 UTC


@pytest.mark.parametrize("backend", STORE_BACKENDS)
async def test_the_report_goes_after_midnight_once_and_a_dns_failure_is_asked_again(backend, tmp_path, request):
    dns_server = await DnsServer({(f"_smtp._tls.{DOMAIN}", "TXT"): "SERVFAIL"}).start()
    store = make_store(backend, tmp_path, request)
    await store.open()
    config = parse_config({
        "server": {"hostname": "relay.contoso.test", "data_dir": str(tmp_path / "data")},
        "dns": {"nameservers": [f"{LOOPBACK}:{dns_server.port}"], "timeout": "1s"},
        "tls_reporting": {"enabled": True, "organization_name": "Contoso", "contact_info": "tls@contoso.test"}})
    now = [MIDNIGHT - 3600]                 # 23:00 the day before
    reporter = TlsReporter(lambda: config, store, Resolver(config.dns), lambda: now[0])
    try:
        day = utc_day(MIDNIGHT - 1)
        await store.add_tls_counts([TlsCount(day, DOMAIN, "no-policy-found", (), count=4)])
        await reporter.send_due()
        assert await store.tls_reports(day) == []          # the day is not over

        now[0] = MIDNIGHT + 60
        await reporter.send_due()
        assert await store.tls_reports(day) == []          # SERVFAIL: nothing claimed, asked again later

        dns_server.zone[(f"_smtp._tls.{DOMAIN}", "TXT")] = ['"v=TLSRPTv1; rua=mailto:tlsrpt@partner.test"']
        now[0] = MIDNIGHT + 120
        await reporter.send_due()
        assert await store.tls_reports(day) == []          # not yet: within the DNS retry hold

        now[0] = MIDNIGHT + 60 + 601
        await reporter.send_due()
        [sent] = await store.tls_reports(day)
        [entry] = await store.list(QueueQuery())
        assert sent["outcome"] == {"mailto:tlsrpt@partner.test": f"queued {entry.id}"}
        assert entry.sender == "noreply-smtp-tls-reporting@relay.contoso.test"
        assert [r.address for r in entry.recipients] == ["tlsrpt@partner.test"]

        now[0] += 3600
        await TlsReporter(lambda: config, store, Resolver(config.dns), lambda: now[0]).send_due()   # a restart
        assert len(await store.list(QueueQuery())) == 1
    finally:
        await store.close()
        dns_server.stop()


async def test_counts_the_store_refused_are_kept_for_the_next_tick(tmp_path):
    from relaywatch.store.memory import MemoryStore
    from relaywatch.watch.monitor import Monitor
    store = MemoryStore()
    await store.open()
    config = parse_config({"server": {"data_dir": str(tmp_path / "data")}})
    monitor = Monitor(lambda: config, store, routes=None, wake_scheduler=lambda: None)
    monitor.tls_tally.add(_result())
    await store.close()
    with pytest.raises(StoreError):
        await monitor.tick()
    [row] = monitor.tls_tally.take()
    assert row.count == 1


@pytest.mark.both_loops
@pytest.mark.parametrize("starttls, expected", [(True, ""), (False, "starttls-not-supported")])
async def test_mail_by_mx_under_no_policy_counts_as_no_policy_found(world, starttls, expected):
    await world.start(txt_id=None, starttls=starttls)   # no _mta-sts record: opportunistic TLS
    relay = await world.start_relay(alerts={"evaluate_interval": "0.1s"})
    await relay.send("alice@contoso.test", [f"bob@{DOMAIN}"], message("one"))
    await eventually(lambda: world.mx.messages, what="delivery")

    async def counted():
        return [c for c in await relay.store.tls_counts(utc_day(time.time())) if c.policy_domain == DOMAIN]
    [row] = await eventually(counted, what="the session counted")
    assert (row.policy_type, row.result_type, row.count) == ("no-policy-found", expected, 1)
    if expected:
        assert (row.mx_host, row.receiving_ip, row.sending_ip) == (MX, LOOPBACK, LOOPBACK)


async def test_a_clean_stop_stores_the_counts_of_the_last_deliveries(world):
    await world.start(txt_id=None)
    relay = await world.start_relay(alerts={"evaluate_interval": "1h"})   # no tick after the start's
    await relay.send("alice@contoso.test", [f"bob@{DOMAIN}"], message("one"))
    await eventually(lambda: world.mx.messages, what="delivery")
    await eventually(lambda: relay.app.monitor.tls_tally.pending, what="the session counted in memory")
    await relay.restart()
    [row] = await relay.store.tls_counts(utc_day(time.time()))
    assert (row.policy_domain, row.policy_type, row.count) == (DOMAIN, "no-policy-found", 1)


async def test_only_the_leader_sends_the_reports(tmp_path):
    from relaywatch.store.memory import MemoryStore
    from relaywatch.watch.monitor import Monitor
    dns_server = await DnsServer({(f"_smtp._tls.{DOMAIN}", "TXT"): ['"v=TLSRPTv1; rua=mailto:t@partner.test"']}).start()
    store = MemoryStore()
    await store.open()
    config = parse_config({
        "server": {"data_dir": str(tmp_path / "data")},
        "dns": {"nameservers": [f"{LOOPBACK}:{dns_server.port}"], "timeout": "1s"},
        "tls_reporting": {"enabled": True, "organization_name": "Contoso", "contact_info": "tls@contoso.test"}})
    day = utc_day(MIDNIGHT - 1)
    await store.add_tls_counts([TlsCount(day, DOMAIN, "no-policy-found", (), count=1)])
    terms = {"a": None, "b": None}

    def monitor(name):
        m = Monitor(lambda: config, store, routes=None, wake_scheduler=lambda: None, clock=FakeClock(MIDNIGHT + 60),
                    leader_term=lambda: terms[name])
        m.tls_reports = TlsReporter(lambda: config, store, Resolver(config.dns), lambda: MIDNIGHT + 60)
        return m
    a, b = monitor("a"), monitor("b")
    try:
        await a.tick()
        await b.tick()
        assert await store.tls_reports(day) == []       # nobody leads: nobody reports
        terms["b"] = await store.acquire_leader("b", MIDNIGHT, MIDNIGHT + 25)
        await a.tick()
        assert await store.tls_reports(day) == []
        await b.tick()
        [sent] = await store.tls_reports(day)
        assert list(sent["outcome"]) == ["mailto:t@partner.test"]
    finally:
        await store.close()
        dns_server.stop()


async def test_the_mailed_report_is_dkim_signed_by_the_submitters_key_and_verifies(tmp_path):
    from relaywatch.store.memory import MemoryStore
    from test_dkim import keygen, verify_all
    name, rdata, key_file = keygen(tmp_path, "relay.contoso.test", "ed25519", "tls-1")
    dns_server = await DnsServer({(name, "TXT"): [rdata],
                                  (f"_smtp._tls.{DOMAIN}", "TXT"): ['"v=TLSRPTv1; rua=mailto:t@partner.test"']}).start()
    store = MemoryStore()
    await store.open()
    config = parse_config({
        "server": {"hostname": "relay.contoso.test", "data_dir": str(tmp_path / "data")},
        "dns": {"nameservers": [f"{LOOPBACK}:{dns_server.port}"], "timeout": "1s"},
        "dkim": [{"domain": "relay.contoso.test", "selector": "tls-1", "key_file": key_file}],
        "tls_reporting": {"enabled": True, "organization_name": "Contoso", "contact_info": "tls@contoso.test"}})
    try:
        await store.add_tls_counts([TlsCount(utc_day(MIDNIGHT - 1), DOMAIN, "no-policy-found", (), count=1)])
        await TlsReporter(lambda: config, store, Resolver(config.dns), lambda: MIDNIGHT + 60).send_due()
        [entry] = await store.list(QueueQuery())
        body = (await store.read_body(entry.body_id)).data
        assert body.startswith(b"DKIM-Signature:") and b"d=relay.contoso.test;" in body
        assert await asyncio.to_thread(verify_all, body, dns_server.port) == [(b"ed25519-sha256", True)]
    finally:
        await store.close()
        dns_server.stop()


def test_a_bad_date_is_named():
    from click.testing import CliRunner
    from relaywatch.cli import main
    result = CliRunner().invoke(main, ["tls-report", "show", "--date", "30.11.2026", "-c", "/nonexistent.toml"])
    assert result.exit_code == 2 and "'30.11.2026' is not a date such as 2026-11-30" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("backend", STORE_BACKENDS)
async def test_a_failed_post_is_tried_again_and_missed_days_go_late(backend, tmp_path, request):
    """The cluster was down over two midnights: both missed days' reports go when it is back
    (not the one before: too old); the POST that fails is tried again after 10 minutes and
    an hour, once each, by whichever reporter looks first."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    receiver = await HttpsReceiver(server_context(ca, "tlsrpt.partner.test"), failing=(503, 503, 503)).start()
    uri = f"https://tlsrpt.partner.test:{receiver.port}/v1/"
    dns_server = await DnsServer({(f"_smtp._tls.{DOMAIN}", "TXT"): [f'"v=TLSRPTv1; rua={uri}"'],
                                  ("tlsrpt.partner.test", "A"): [LOOPBACK]}).start()
    store = make_store(backend, tmp_path, request)
    await store.open()
    config = parse_config({
        "server": {"hostname": "relay.contoso.test", "data_dir": str(tmp_path / "data")},
        "dns": {"nameservers": [f"{LOOPBACK}:{dns_server.port}"], "timeout": "1s"},
        "mta_sts": {"ca_file": str(tmp_path / "ca.pem")},
        "tls_reporting": {"enabled": True, "organization_name": "Contoso", "contact_info": "tls@contoso.test"}})
    now = [MIDNIGHT + 86400 + 60]          # two midnights after the first day counted
    reporters = [TlsReporter(lambda: config, store, Resolver(config.dns), lambda: now[0]) for _ in range(2)]
    days = [utc_day(MIDNIGHT - 1 - back * 86400) for back in (1, 0)] + [utc_day(MIDNIGHT + 1)]
    try:
        await store.add_tls_counts([TlsCount(day, DOMAIN, "no-policy-found", (), count=n)
                                    for n, day in enumerate(days, 1)])
        await reporters[0].send_due()
        assert await store.tls_reports(days[0]) == []        # three days old: not sent
        assert len(receiver.posts) == 2                       # the two missed days, one POST each
        sent = [json.loads(gzip.decompress(body))["date-range"]["start-datetime"][:10] for *_, body in receiver.posts]
        assert sorted(sent) == days[1:]
        [first] = await store.tls_reports(days[1])
        assert first["outcome"][uri].startswith("failed: HTTP 503; trying again after ")
        assert first["outcome"][uri].endswith("(try 1 of 4)")

        now[0] += 601
        for reporter in reporters:                            # the next try is made once
            await reporter.send_due()
        assert len(receiver.posts) == 4                       # one more each; the second day's is taken
        outcome = {d: (await store.tls_reports(d))[0]["outcome"][uri] for d in days[1:]}
        # The due tries go by day: the older day's gets the third 503, the other's goes.
        assert outcome[days[2]] == "sent (HTTP 200) (try 2 of 4)"
        assert outcome[days[1]].startswith("failed: HTTP 503; trying again after ")
        assert outcome[days[1]].endswith("(try 2 of 4)")

        now[0] += 600                                         # not yet: the third try waits an hour
        await reporters[1].send_due()
        assert len(receiver.posts) == 4
        now[0] += 3600
        await reporters[1].send_due()
        assert len(receiver.posts) == 5
        assert (await store.tls_reports(days[1]))[0]["outcome"][uri] == "sent (HTTP 200) (try 3 of 4)"
        now[0] += 86400
        await reporters[0].send_due()
        assert len(receiver.posts) == 5                       # nothing left to try
    finally:
        await store.close()
        dns_server.stop()
        await receiver.stop()
