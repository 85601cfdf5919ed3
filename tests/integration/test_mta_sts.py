"""MTA-STS (RFC 8461): the policy parser and mx matching by table; then a real
relay delivering by MX with a policy served over HTTPS on loopback (a test CA
from trustme), DNS on loopback (TXT, MX, A) and aiosmtpd MX sinks with and
without STARTTLS, with good and bad certificates.  Both event loops."""

import asyncio
import logging
import ssl

import pytest
import trustme

from helpers import (LOOPBACK, DnsServer, LoopbackServer, RecordingHandler, Sink, eventually, first_error, free_port,
                     message)
from relaywatch.classify.observation import Observation, Outcome, Phase
from relaywatch.deliver.sts_policy import MAX_AGE_LIMIT, PolicyInvalid, mx_matches, parse_policy, parse_txt, result_type

pytestmark = pytest.mark.both_loops

DOMAIN = "partner.test"
MX = "mx.partner.test"
POLICY_HOST = f"mta-sts.{DOMAIN}"


# -- pure: the TXT record, the policy, mx patterns ----------------------------------------------

@pytest.mark.parametrize("texts, expected", [
    (["v=STSv1; id=20261201T1"], "20261201T1"),
    (["v=STSv1;id=abc123;"], "abc123"),
    (["v=STSv1; id=abc; extra=1"], "abc"),
    (["some other record", "v=STSv1; id=x1"], "x1"),
    ([], None),
    (["v=STSv1"], None),                                # no id
    (["v=STSv1; id="], None),
    (["v=STSv1; id=has-dash"], None),                   # id is 1*32 alphanumerics
    (["v=STSv1; id=" + "a" * 33], None),
    (["v=STSv1; id=a", "v=STSv1; id=b"], None),         # two records: no policy (RFC 8461 3.1)
    (["v=STSv10; id=a"], None),
    (["V=STSv1; id=a"], None),
])
def test_txt_record(texts, expected):
    assert parse_txt(texts) == expected


GOOD = "version: STSv1\r\nmode: enforce\r\nmx: mx1.partner.test\r\nmx: *.backup.partner.test\r\nmax_age: 86400\r\n"


@pytest.mark.parametrize("text, mode, mx, max_age", [
    (GOOD, "enforce", ("mx1.partner.test", "*.backup.partner.test"), 86400),
    (GOOD.replace("\r\n", "\n"), "enforce", ("mx1.partner.test", "*.backup.partner.test"), 86400),
    ("version: STSv1\nmode: testing\nmx: MX.Partner.Test.\nmax_age: 60\nfuture_key: whatever\n",
     "testing", ("mx.partner.test",), 60),
    ("version: STSv1\nmode: none\nmax_age: 0\n", "none", (), 0),
    ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 99999999\n", "enforce", ("a.test",), MAX_AGE_LIMIT),
])
def test_policy_parses(text, mode, mx, max_age):
    policy = parse_policy(text, DOMAIN, "id1", 1000.0)
    assert (policy.mode, policy.mx, policy.max_age, policy.id) == (mode, mx, max_age, "id1")
    assert not policy.expired(1000.0 + max_age - 1) or max_age == 0
    assert policy.expired(1000.0 + max_age)


@pytest.mark.parametrize("text, fault", [
    ("version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 60\n", "version"),
    ("mode: enforce\nmx: a.test\nmax_age: 60\n", "version"),
    ("version: STSv1\nmode: strict\nmx: a.test\nmax_age: 60\n", "mode"),
    ("version: STSv1\nmx: a.test\nmax_age: 60\n", "mode"),
    ("version: STSv1\nmode: enforce\nmx: a.test\n", "max_age"),
    ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -5\n", "max_age"),
    ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1h\n", "max_age"),
    ("version: STSv1\nmode: enforce\nmax_age: 60\n", "mx"),
    ("version: STSv1\nmode: enforce\nmx: *.*.a.test\nmax_age: 60\n", "mx"),
    ("version: STSv1\nmode: enforce\nmx: bad_name.test\nmax_age: 60\n", "mx"),
    ("version: STSv1\nthis line has no colon\n", "line 2"),
    ("<html>not a policy</html>", "line 1"),
])
def test_invalid_policies_say_why(text, fault):
    with pytest.raises(PolicyInvalid, match=fault):
        parse_policy(text, DOMAIN, "id1", 0.0)


@pytest.mark.parametrize("pattern, host, matches", [
    ("mx.partner.test", "mx.partner.test", True),
    ("mx.partner.test", "MX.partner.test.", True),
    ("mx.partner.test", "mx2.partner.test", False),
    ("*.partner.test", "mx.partner.test", True),
    ("*.partner.test", "partner.test", False),          # the wildcard needs one label
    ("*.partner.test", "a.mx.partner.test", False),     # and only one
    ("*.partner.test", "mx.partner.test.evil.test", False),
    ("*.partner.test", "mxpartner.test", False),
    ("*.partner.test", ".partner.test", False),
])
def test_mx_patterns(pattern, host, matches):
    assert mx_matches(pattern, host) is matches


def _obs(outcome, phase="starttls", **kw):
    return Observation(Phase(phase), Outcome(outcome), **kw)


@pytest.mark.parametrize("observation, expected", [
    (_obs("tls_not_offered"), "starttls-not-supported"),
    (_obs("reply", reply_code=454), "starttls-not-supported"),
    (_obs("certificate", tls={"verify_code": 62}), "certificate-host-mismatch"),
    (_obs("certificate", tls={"verify_code": 10}), "certificate-expired"),
    (_obs("certificate", tls={"verify_code": 18}), "certificate-not-trusted"),
    (_obs("certificate", tls={"verify_code": 20}), "certificate-not-trusted"),
    (_obs("certificate", tls={"verify_code": 999}), "validation-failure"),
    (_obs("tls_handshake"), "validation-failure"),
    (_obs("sts_mx_mismatch", phase="dns"), "validation-failure"),
])
def test_rfc_8460_result_types(observation, expected):
    assert result_type(observation) == expected


# -- the loopback world: DNS, the policy server, the MX ---------------------------------------------

class PolicyServer(LoopbackServer):
    """HTTPS on loopback serving /.well-known/mta-sts.txt as told; counts the requests."""

    def __init__(self, context: ssl.SSLContext, body: str | bytes, status: int = 200,
                 content_type: str = "text/plain"):
        self.context = context
        self.body = body.encode() if isinstance(body, str) else body
        self.status = status
        self.content_type = content_type
        self.requests: list[tuple[str, str]] = []   # (path, Host header)

    async def start(self, port: int = 0) -> "PolicyServer":
        self.server = await asyncio.start_server(self._handle, LOOPBACK, port, ssl=self.context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            host = next((line.split(":", 1)[1].strip() for line in lines[1:] if line.lower().startswith("host:")), "")
            self.requests.append((path, host))
            extra = f"Location: https://elsewhere.test/\r\n" if 300 <= self.status < 400 else ""
            writer.write(f"HTTP/1.1 {self.status} X\r\nContent-Type: {self.content_type}\r\n{extra}"
                         f"Content-Length: {len(self.body)}\r\nConnection: close\r\n\r\n".encode() + self.body)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()


def policy_text(mode="enforce", mx=(MX,), max_age=86400):
    return "version: STSv1\r\nmode: %s\r\n%smax_age: %d\r\n" % (mode, "".join(f"mx: {m}\r\n" for m in mx), max_age)


def server_context(ca: trustme.CA, name: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(ctx)
    return ctx


@pytest.fixture
def ca(tmp_path):
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return ca


class World:
    def __init__(self, tmp_path, ca, relay_factory):
        self.tmp_path, self.ca, self.relay_factory = tmp_path, ca, relay_factory
        self.dns = self.policy = self.mx = None
        self.relay = None

    async def start(self, *, policy: str | bytes | None = None, txt_id="1", mx_hosts=(MX,),
                    mx_cert: str | None = MX, starttls=True, policy_cert=POLICY_HOST, **policy_kw):
        zone = {(DOMAIN, "MX"): [f"{10 * (i + 1)} {h}." for i, h in enumerate(mx_hosts)],
                (POLICY_HOST, "A"): [LOOPBACK]}
        for h in mx_hosts:
            zone[(h, "A")] = [LOOPBACK]
        if txt_id is not None:
            zone[(f"_mta-sts.{DOMAIN}", "TXT")] = [f'"v=STSv1; id={txt_id}"']
        self.dns = await DnsServer(zone).start()
        self.https_port = free_port()
        if policy is not None:
            self.policy = await PolicyServer(server_context(self.ca, policy_cert), policy, **policy_kw).start(
                self.https_port)
        self.handler = RecordingHandler()
        tls = server_context(self.ca, mx_cert) if starttls else None
        self.mx = await Sink(self.handler, tls_context=tls).start()
        return self

    async def start_relay(self, mode_enabled=True, **sections):
        self.relay = await self.relay_factory(
            dns={"nameservers": [f"{LOOPBACK}:{self.dns.port}"], "timeout": "1s"},
            # One message per connection: each message asks for targets (and the policy) again.
            delivery={"smtp_port": self.mx.port, "messages_per_connection": 1},
            mta_sts={"enabled": mode_enabled, "ca_file": str(self.tmp_path / "ca.pem"),
                     "https_port": self.https_port, "fetch_timeout": "3s"},
            **sections)
        return self.relay

    def set_txt(self, txt_id: str) -> None:
        self.dns.zone[(f"_mta-sts.{DOMAIN}", "TXT")] = [f'"v=STSv1; id={txt_id}"']

    @property
    def results(self):
        return list(self.relay.app.routes.mta_sts.results)

    async def stop(self):
        if self.dns:
            self.dns.stop()
        for server in (self.policy, self.mx):
            if server is not None:
                await server.stop()


@pytest.fixture
async def world(tmp_path, ca, relay_factory):
    w = World(tmp_path, ca, relay_factory)
    yield w
    await w.stop()


async def send(relay, subject="sts"):
    await relay.send("alice@contoso.test", [f"bob@{DOMAIN}"], message(subject))


# -- enforce ---------------------------------------------------------------------------------

async def test_enforce_good_mx_good_certificate_delivers_over_tls(world):
    await world.start(policy=policy_text())
    relay = await world.start_relay()
    await send(relay)
    await eventually(lambda: world.mx.messages, what="delivery to the MX")
    assert world.handler.mail_from == [("alice@contoso.test", True)]     # under TLS
    assert world.policy.requests == [("/.well-known/mta-sts.txt", f"{POLICY_HOST}:{world.https_port}")]
    ok = [r for r in world.results if r.mx_host == MX]
    assert ok and ok[-1].result_type is None and ok[-1].policy_id == "1" and ok[-1].mode == "enforce"
    # The policy is cached on disk under data_dir.
    assert '"mx.partner.test"' in (relay.data_dir / "mta-sts.json").read_text()


async def test_enforce_mx_not_in_policy_defers_and_never_connects(world):
    await world.start(policy=policy_text(mx=("mx.partner.test",)), mx_hosts=("rogue.partner.test",))
    relay = await world.start_relay()
    await send(relay)
    error = await first_error(relay)
    assert (error["code"], error["subtype"], error["kind"]) == ("4.7.320", "sts_mx_mismatch", "tls.sts_policy")
    assert error["sts"]["policy_id"] == "1" and error["sts"]["mode"] == "enforce"
    assert error["sts"]["mx"] == ["mx.partner.test"] and error["sts"]["mx_host"] == "rogue.partner.test"
    assert "rogue.partner.test" in error["detail"] and "did not connect" in error["detail"]
    assert ("rogue.partner.test", "A") not in world.dns.queries     # never even resolved
    assert world.handler.mail_from == [] and world.mx.messages == []
    assert any(r.result_type == "validation-failure" and r.enforced for r in world.results)


async def test_enforce_only_the_listed_mx_is_used(world):
    # The preferred MX is not in the policy: it is passed over, the listed backup takes the mail.
    await world.start(policy=policy_text(mx=("*.partner.test",)), mx_hosts=("mx.other.test", MX))
    relay = await world.start_relay()
    await send(relay)
    await eventually(lambda: world.mx.messages, what="delivery to the listed MX")
    assert ("mx.other.test", "A") not in world.dns.queries


async def test_enforce_without_starttls_defers_and_sends_nothing_in_clear(world):
    await world.start(policy=policy_text(), starttls=False)
    relay = await world.start_relay()
    await send(relay)
    error = await first_error(relay)
    assert (error["code"], error["subtype"], error["phase"]) == ("4.7.320", "sts_starttls_not_offered", "starttls")
    assert error["sts"]["result_type"] == "starttls-not-supported"
    assert "nothing was sent in clear" in error["detail"]
    assert world.handler.mail_from == []                            # no MAIL FROM, no body in clear
    assert world.mx.messages == []


async def test_enforce_wrong_certificate_name_defers_with_certificate_evidence(world):
    await world.start(policy=policy_text(), mx_cert="other.example.test")
    relay = await world.start_relay()
    await send(relay)
    error = await first_error(relay)
    assert (error["code"], error["subtype"], error["phase"]) == ("4.7.320", "sts_certificate", "starttls")
    assert error["tls"]["expected_name"] == MX
    assert error["tls"]["sans"] == ["other.example.test"]
    assert error["tls"]["issuer"]
    assert error["sts"]["result_type"] == "certificate-host-mismatch"
    assert error["sts"]["policy_domain"] == DOMAIN
    assert world.handler.mail_from == []


async def test_a_connector_opts_in_per_connector(world):
    # A connector by MX (no smart_hosts) applies the policy only with mta_sts = true.
    await world.start(policy=policy_text(), starttls=False)
    relay = await world.start_relay(
        mode_enabled=False,
        connectors=[{"name": "partner", "type": "partner", "domains": [DOMAIN], "mta_sts": True}])
    await send(relay)
    error = await first_error(relay)
    assert error["subtype"] == "sts_starttls_not_offered"


async def test_without_mta_sts_the_policy_is_not_looked_up(world):
    await world.start(policy=policy_text(), starttls=False)
    relay = await world.start_relay(mode_enabled=False)
    await send(relay)
    await eventually(lambda: world.mx.messages, what="delivery as before (no policy)")
    assert (f"_mta-sts.{DOMAIN}", "TXT") not in world.dns.queries
    assert world.policy.requests == []


# -- testing mode ------------------------------------------------------------------------------

async def test_testing_mode_delivers_and_records_the_would_be_failure(world, caplog):
    await world.start(policy=policy_text(mode="testing"), mx_cert="other.example.test")
    relay = await world.start_relay()
    with caplog.at_level(logging.WARNING, logger="relaywatch.mta_sts"):
        await send(relay)
        await eventually(lambda: world.mx.messages, what="delivery in testing mode")
    failed = [r for r in world.results if r.result_type is not None]
    assert [(r.result_type, r.mode, r.enforced, r.mx_host) for r in failed] == [
        ("certificate-host-mismatch", "testing", False, MX)]
    assert failed[0].policy_strings[:2] == ("version: STSv1", "mode: testing")
    assert "mta-sts certificate-host-mismatch for partner.test at mx.partner.test" in caplog.text
    assert "delivered anyway" in caplog.text


# -- the cache ---------------------------------------------------------------------------------

async def test_cached_policy_holds_when_the_policy_server_is_gone(world):
    await world.start(policy=policy_text())
    relay = await world.start_relay()
    await send(relay, "first")
    await eventually(lambda: world.mx.messages, what="the first delivery")
    await world.policy.stop()
    world.policy = None
    # An attacker now points the MX elsewhere and the policy host is unreachable; across a restart
    # the cached policy (same TXT id) still says only mx.partner.test may have the mail.
    world.dns.zone[(DOMAIN, "MX")] = ["10 evil.partner.test."]
    world.dns.zone[("evil.partner.test", "A")] = [LOOPBACK]
    await relay.restart()
    await send(relay, "second")
    error = await first_error(relay)
    assert (error["subtype"], error["sts"]["mx_host"]) == ("sts_mx_mismatch", "evil.partner.test")
    assert len(world.mx.messages) == 1


async def test_cached_policy_holds_when_the_txt_record_is_stripped(world):
    await world.start(policy=policy_text(), starttls=True)
    relay = await world.start_relay()
    await send(relay, "first")
    await eventually(lambda: world.mx.messages, what="the first delivery")
    del world.dns.zone[(f"_mta-sts.{DOMAIN}", "TXT")]
    world.dns.zone[(DOMAIN, "MX")] = ["10 evil.partner.test."]
    world.dns.zone[("evil.partner.test", "A")] = [LOOPBACK]
    await send(relay, "second")
    error = await first_error(relay)
    assert error["subtype"] == "sts_mx_mismatch"


async def test_a_new_txt_id_fetches_the_policy_again(world):
    await world.start(policy=policy_text())
    relay = await world.start_relay()
    await send(relay, "first")
    await eventually(lambda: world.mx.messages, what="the first delivery")
    await send(relay, "second, same id")
    await eventually(lambda: len(world.mx.messages) == 2, what="the second delivery")
    assert len(world.policy.requests) == 1                          # the cached policy served it
    world.policy.body = policy_text(mx=("only-this.partner.test",)).encode()
    world.set_txt("2")
    await send(relay, "third, new id")
    error = await first_error(relay)
    assert (error["subtype"], error["sts"]["policy_id"], error["sts"]["mx"]) == (
        "sts_mx_mismatch", "2", ["only-this.partner.test"])
    assert len(world.policy.requests) == 2


# -- fetch failures: deliver as without a policy, and record it ------------------------------------

def _big_policy():
    return policy_text(mx=("nowhere.partner.test",)) + "# padding: " + "x" * (64 * 1024) + "\r\n"


@pytest.mark.parametrize("case, result", [
    ("no server", "sts-policy-fetch-error"),
    ("http 404", "sts-policy-fetch-error"),
    ("redirect", "sts-policy-fetch-error"),
    ("wrong certificate", "sts-webpki-invalid"),
    ("over 64 KB", "sts-policy-invalid"),
    ("bad version", "sts-policy-invalid"),
    ("text/html", "sts-policy-invalid"),
])
async def test_a_failed_fetch_without_cache_delivers_as_without_policy(world, case, result):
    # Each "policy" would forbid this MX (or STARTTLS-less delivery); none of them may be applied.
    body = policy_text(mx=("nowhere.partner.test",))
    kw = {}
    if case == "no server":
        body = None
    elif case == "http 404":
        kw["status"] = 404
    elif case == "redirect":
        kw["status"] = 301
    elif case == "wrong certificate":
        kw["policy_cert"] = "someone-else.test"
    elif case == "over 64 KB":
        body = _big_policy()
    elif case == "bad version":
        body = body.replace("STSv1", "STSv2")
    elif case == "text/html":
        kw["content_type"] = "text/html"
    await world.start(policy=body, starttls=False, **kw)
    relay = await world.start_relay()
    await send(relay)
    await eventually(lambda: world.mx.messages, what="delivery without a policy")
    fetch = [r for r in world.results if r.mx_host is None]
    assert [(r.result_type, r.policy_type, r.policy_domain, r.policy_id) for r in fetch] == [
        (result, "no-policy-found", DOMAIN, "1")]
    assert not (relay.data_dir / "mta-sts.json").exists()


# -- config ----------------------------------------------------------------------------------

from click.testing import CliRunner  # noqa: E402

from relaywatch.cli import main as cli_main  # noqa: E402
from relaywatch.config import parse_config  # noqa: E402
from relaywatch.errors import ConfigError  # noqa: E402


def test_config_defaults_and_the_cache_under_data_dir(tmp_path):
    config = parse_config({"server": {"data_dir": str(tmp_path / "d")},
                           "connectors": [{"name": "p", "type": "partner", "domains": ["p.test"]}]})
    assert config.mta_sts.enabled is True
    assert config.mta_sts.cache == tmp_path / "d" / "mta-sts.json"
    assert config.mta_sts.https_port == 443 and config.mta_sts.ca_file is None
    assert config.connector("p").mta_sts is False
    absolute = parse_config({"mta_sts": {"cache": str(tmp_path / "elsewhere.json"), "fetch_timeout": "5s"}})
    assert (absolute.mta_sts.cache, absolute.mta_sts.fetch_timeout) == (tmp_path / "elsewhere.json", 5.0)


@pytest.mark.parametrize("raw, expected", [
    ({"mta_sts": {"enabled": "yes"}}, "mta_sts.enabled: must be true or false"),
    ({"mta_sts": {"fetch_timeout": "0s"}}, "mta_sts.fetch_timeout:"),
    ({"mta_sts": {"https_port": 70000}}, "mta_sts.https_port: must be a port number"),
    ({"mta_sts": {"ca_file": "/nonexistent/ca.pem"}}, "mta_sts.ca_file: file /nonexistent/ca.pem does not exist"),
    ({"mta_sts": {"enforce": True}}, "mta_sts.enforce: unknown key"),
    ({"mta_sts": {"cache": ""}}, "mta_sts.cache: must be a non-empty string"),
    ({"connectors": [{"name": "p", "type": "partner", "domains": ["p.test"], "mta_sts": 1}]},
     "connectors[0].mta_sts: must be true or false"),
    ({"connectors": [{"name": "p", "type": "partner", "domains": ["p.test"], "mta_sts": True,
                      "smart_hosts": ["mail.p.test"]}]},
     "connectors[0].mta_sts: has no effect with smart_hosts"),
])
def test_config_errors_name_the_key(raw, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


def test_config_check_reports_an_mta_sts_key(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[mta_sts]\nhttps_port = 0\n')
    result = CliRunner().invoke(cli_main, ["config", "check", "-c", str(path)])
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        f"relaywatch: {path}: mta_sts.https_port: must be a port number from 1 to 65535 (got 0)"]


def test_errors_explains_both_meanings_of_4_7_320():
    both = CliRunner().invoke(cli_main, ["errors", "4.7.320"])
    assert both.exit_code == 0
    assert "Certificate validation failed" in both.output and "MTA-STS policy not met" in both.output
    one = CliRunner().invoke(cli_main, ["errors", "tls.sts_policy"]).output
    assert "MTA-STS policy not met" in one and "Certificate validation failed" not in one


# -- the cache's lifetime, on a clock of our own ------------------------------------------------

from relaywatch.deliver.mta_sts import FETCH_FAILURE_HOLD, MtaSts  # noqa: E402
from relaywatch.deliver.resolver import Resolver  # noqa: E402


def _service(world, tmp_path, now):
    config = parse_config({
        "server": {"data_dir": str(tmp_path / "svc")},
        "dns": {"nameservers": [f"{LOOPBACK}:{world.dns.port}"], "timeout": "1s"},
        "mta_sts": {"ca_file": str(tmp_path / "ca.pem"), "https_port": world.https_port, "fetch_timeout": "3s"}})
    return MtaSts(lambda: config, Resolver(config.dns), clock=lambda: now[0])


async def test_a_cached_policy_lasts_until_max_age_and_no_longer(world, tmp_path):
    await world.start(policy=policy_text(max_age=600))
    now = [1_000_000.0]
    sts = _service(world, tmp_path, now)
    assert (await sts.policy(DOMAIN)).mode == "enforce"
    await world.policy.stop()
    world.policy = None
    world.set_txt("2")                                   # a refresh is due, and fails
    now[0] += 599
    assert (await sts.policy(DOMAIN)).id == "1"          # the cached policy still holds
    now[0] += FETCH_FAILURE_HOLD + 1                     # past max_age: the cache is gone
    assert await sts.policy(DOMAIN) is None
    assert DOMAIN not in (tmp_path / "svc" / "mta-sts.json").read_text()
    assert [r.result_type for r in sts.results] == ["sts-policy-fetch-error", "sts-policy-fetch-error"]


async def test_a_failed_fetch_is_not_repeated_at_once(world, tmp_path):
    await world.start(policy=policy_text(), status=503)
    now = [1_000_000.0]
    sts = _service(world, tmp_path, now)
    assert await sts.policy(DOMAIN) is None
    assert await sts.policy(DOMAIN) is None
    assert len(world.policy.requests) == 1               # held back after the failure
    now[0] += FETCH_FAILURE_HOLD
    world.policy.status = 200
    assert (await sts.policy(DOMAIN)).id == "1"
    assert len(world.policy.requests) == 2


async def test_many_messages_at_once_fetch_the_policy_once(world, tmp_path):
    await world.start(policy=policy_text())
    sts = _service(world, tmp_path, [1_000_000.0])
    policies = await asyncio.gather(*(sts.policy(DOMAIN) for _ in range(5)))
    assert {p.id for p in policies} == {"1"}
    assert len(world.policy.requests) == 1


# -- the incident's diagnosis reads the same facts ------------------------------------------------

from relaywatch.model import Failure  # noqa: E402
from relaywatch.watch.diagnosis import diagnose  # noqa: E402
from relaywatch.incident import Incident, IncidentKind  # noqa: E402

_STS = {"policy_domain": DOMAIN, "policy_type": "sts", "policy_id": "7", "mode": "enforce",
        "mx": ["mx.partner.test"], "mx_host": "rogue.partner.test", "result_type": "validation-failure"}


def _sts_incident(subtype, host="rogue.partner.test", **error):
    failure = Failure.from_dict({"code": "4.7.320", "kind": "tls.sts_policy", "subtype": subtype, "sts": _STS,
                                 "destination": {"host": host, "ip": None, "port": 25}, **error})
    return Incident(kind=IncidentKind.BACKLOG, connector="internet", code="4.7.320", title="", opened_at=0.0,
                    latest_error=failure)


@pytest.mark.parametrize("incident, cause, words", [
    (_sts_incident("sts_mx_mismatch"), "sts_mx_not_listed", "lists only mx.partner.test"),
    (_sts_incident("sts_starttls_not_offered", MX), "sts_starttls_missing", "does not offer STARTTLS"),
    (_sts_incident("sts_certificate", MX, tls={"sans": ["other.example.test"], "issuer": "Test CA",
                                                "expected_name": MX}),
     "sts_certificate", "is for other.example.test (issued by Test CA), not a valid one for mx.partner.test"),
    (_sts_incident("sts_tls_handshake", MX), "sts_tls_failed", "policy of partner.test (id 7)"),
])
def test_the_diagnosis_of_a_policy_failure(incident, cause, words):
    d = diagnose(incident, None)
    assert d.cause == cause and words in d.text, d.text
    assert d.facts["sts"]["policy_id"] == "7"


# -- DANE where it applies, MTA-STS elsewhere (RFC 8461 2) ------------------------------------------

import hashlib  # noqa: E402
import smtplib  # noqa: E402

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat  # noqa: E402


def _spki_sha256_of(port: int) -> str:
    """The SHA-256 of the MX's public key, as a 3 1 1 TLSA record carries it."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP(LOOPBACK, port, timeout=10) as client:
        client.starttls(context=context)
        cert = x509.load_der_x509_certificate(client.sock.getpeercert(binary_form=True))
    return hashlib.sha256(cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).hexdigest()


@pytest.mark.parametrize("tlsa_matches", [True, False])
async def test_a_host_with_usable_tlsa_is_held_to_dane_not_to_the_policy(world, tlsa_matches):
    # The certificate is not for the MX name: the enforced policy alone would defer (sts_certificate).
    await world.start(policy=policy_text(), mx_cert="other.example.test")
    digest = await asyncio.to_thread(_spki_sha256_of, world.mx.port) if tlsa_matches else "ab" * 32
    world.dns.zone[(f"_{world.mx.port}._tcp.{MX}", "TLSA")] = [f"3 1 1 {digest}"]
    world.dns.secure = True                              # every answer DNSSEC-validated
    relay = await world.start_relay()
    await send(relay)
    if tlsa_matches:
        await eventually(lambda: world.mx.messages, what="delivery by DANE")
        assert world.handler.mail_from[-1] == ("alice@contoso.test", True)
        assert [r.policy_type for r in world.results if r.mx_host == MX] == ["tlsa"]   # DANE decided, not STS
    else:
        error = await first_error(relay)
        assert (error["kind"], error["subtype"]) == ("tls.dane", "dane_tlsa_mismatch")   # STS cannot override
