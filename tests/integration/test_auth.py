"""Clients that authenticate (RFC 4954), over real sockets: the smtp, submission
(RFC 6409) and submissions (RFC 8314) listeners, with certificates made here
(trustme), users made by ``relaywatch user add``, two independent clients
(stdlib smtplib and aiosmtplib), a real SQLite queue and an aiosmtpd
destination.  The SASL exchange itself is table-tested in
tests/unit/test_conversation.py; the users file and the brute-force counts here."""

import asyncio
import logging
import re
import smtplib
import ssl
import stat

import aiosmtplib
import pytest
import trustme
from click.testing import CliRunner

from helpers import LOOPBACK, FakeClock, Sink, eventually, free_port, message
from relaywatch import events
from relaywatch.cli import main as cli_main
from relaywatch.console import metrics as metrics_module
from relaywatch.config import parse_config
from relaywatch.errors import ConfigError
from relaywatch.receive import auth

pytestmark = pytest.mark.both_loops   # the server end to end: asyncio and uvloop (serve runs uvloop)

UNTRUSTED = "127.0.0.2"   # outside trusted_networks: may relay only once authenticated
PARTNER = "fabrikam.test"


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def tls_files(tmp_path, ca):
    leaf = ca.issue_cert(LOOPBACK, "relay.test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return str(cert), str(key)


@pytest.fixture
def client_tls(ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def user_add(users_file, name, password, *args, prompt=False):
    """``relaywatch user add`` as an administrator runs it (the password typed twice, or on stdin)."""
    options = [] if prompt else ["--password-stdin"]
    given = f"{password}\n{password}\n" if prompt else f"{password}\n"
    result = CliRunner().invoke(cli_main, ["user", "add", name, "--users-file", str(users_file), *options, *args],
                                input=given)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture
async def relay(tmp_path, tls_files, relay_factory, sink):
    users = tmp_path / "users"
    user_add(users, "alice", "correct horse", prompt=True)
    user_add(users, "bob", "battery staple", "--senders", "bob@contoso.test,@bob.contoso.test")

    async def make(dkim=(), clock=None, **server):
        cert, key = tls_files
        return await relay_factory(
            clock=clock,
            dkim=list(dkim),
            server={"trusted_networks": ["127.0.0.1/32"], "tls_cert": cert, "tls_key": key,
                    "users_file": str(users), "submission_listen": [f"{LOOPBACK}:0"],
                    "submissions_listen": [f"{LOOPBACK}:0"], "auth_failure_delay": "0s", **server},
            dns={"nameservers": [f"{LOOPBACK}:{free_port()}"], "timeout": "1s"},
            connectors=[{"name": "partner", "type": "partner", "domains": [PARTNER],
                         "smart_hosts": [f"{LOOPBACK}:{sink.port}"], "tls": "none"}])
    return make


def port(relay, kind: str) -> int:
    return relay.app.receiver.addresses_of(kind)[0][1]


def smtp_client(relay, kind="smtp", source=UNTRUSTED, context=None) -> smtplib.SMTP:
    if kind == "submissions":
        return smtplib.SMTP_SSL(LOOPBACK, port(relay, kind), source_address=(source, 0), context=context, timeout=10)
    return smtplib.SMTP(LOOPBACK, port(relay, kind), source_address=(source, 0), timeout=10)


async def aiosmtplib_client(relay, kind, client_tls, **options) -> aiosmtplib.SMTP:
    """An aiosmtplib client connected to the listener of ``kind``, after EHLO."""
    client = aiosmtplib.SMTP(hostname=LOOPBACK, port=port(relay, kind), tls_context=client_tls, timeout=10, **options)
    await client.connect()
    await client.ehlo(hostname="client.test")
    return client


async def smtplib_session(relay, kind, client_tls, steps):
    """Run ``steps(client)`` on a stdlib client in a thread (after EHLO and STARTTLS where it applies)."""
    def run():
        with smtp_client(relay, kind, context=client_tls) as client:
            client.ehlo("client.test")
            if kind != "submissions":
                client.starttls(context=client_tls)
                client.ehlo("client.test")
            return steps(client)
    return await asyncio.to_thread(run)


def plain_login(client: smtplib.SMTP, user: str, password: str):
    """One AUTH PLAIN (smtplib's login() tries every mechanism offered: one failure each)."""
    client.user, client.password = user, password
    return client.auth("PLAIN", client.auth_plain)


# -- what is offered where ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["smtp", "submission"])
async def test_auth_is_not_offered_before_starttls(relay, client_tls, kind):
    r = await relay()

    def run():
        with smtp_client(r, kind) as client:
            client.ehlo("client.test")
            before = dict(client.esmtp_features)
            code, _ = client.docmd("AUTH", "PLAIN AGFsaWNlAGNvcnJlY3QgaG9yc2U=")
            client.starttls(context=client_tls)
            client.ehlo("client.test")
            return before, code, dict(client.esmtp_features)
    before, code, after = await asyncio.to_thread(run)
    assert "auth" not in before and "starttls" in before
    assert code == 538
    assert after["auth"].split() == ["PLAIN", "LOGIN"]


async def test_submission_refuses_mail_before_auth(relay, client_tls):
    r = await relay()

    def before_tls():
        with smtp_client(r, "submission") as client:
            client.ehlo("client.test")
            return client.mail("alice@contoso.test")
    assert await asyncio.to_thread(before_tls) == (530, b"5.7.0 Must issue a STARTTLS command first")
    assert await smtplib_session(r, "submission", client_tls, lambda c: c.mail("alice@contoso.test")) == (
        530, b"5.7.0 Authentication required")


# -- relaying as an authenticated client -------------------------------------------------------

async def test_an_authenticated_untrusted_client_relays_and_the_received_header_says_who(relay, client_tls, sink,
                                                                                        caplog):
    r = await relay()

    def unauthenticated(client):
        client.mail("someone@example.org")
        return client.rcpt(f"x@{PARTNER}")
    code, text = await smtplib_session(r, "smtp", client_tls, unauthenticated)
    assert (code, text[:5]) == (554, b"5.7.1")

    def authenticated(client):
        client.login("alice", "correct horse")       # PLAIN: smtplib's choice of the two
        return client.sendmail("alice@contoso.test", [f"x@{PARTNER}"], message("relayed"))
    caplog.set_level(logging.INFO, logger="relaywatch.mail")
    assert await smtplib_session(r, "smtp", client_tls, authenticated) == {}
    await eventually(lambda: sink.messages, what="delivery to the partner")
    content = sink.messages[0].content
    assert b"(Authenticated sender: alice)" in content and b"with ESMTPSA" in content
    received = [rec.mail_fields for rec in caplog.records if getattr(rec, "mail_event", None) == "received"]
    assert received and received[0]["auth"] == "alice"
    assert not any("correct horse" in rec.getMessage() + str(getattr(rec, "mail_fields", ""))
                   for rec in caplog.records)


async def test_aiosmtplib_logs_in_with_login_on_submission_and_relays(relay, client_tls, sink):
    r = await relay()
    client = await aiosmtplib_client(r, "submission", client_tls, source_address=(UNTRUSTED, 0), start_tls=False)
    assert not client.supports_extension("auth")
    await client.starttls()
    await client.ehlo(hostname="client.test")
    assert client.supports_extension("auth")
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
        await client.auth_login("alice", "wrong")
    assert refused.value.code == 535
    reply = await client.auth_login("alice", "correct horse")
    assert reply.code == 235
    errors, _ = await client.sendmail("alice@contoso.test", [f"y@{PARTNER}"], message("via aiosmtplib"))
    assert errors == {}
    await client.quit()
    await eventually(lambda: sink.messages, what="delivery to the partner")
    assert b"(Authenticated sender: alice)" in sink.messages[0].content


async def test_submissions_is_tls_from_the_first_byte(relay, client_tls, sink):
    r = await relay()

    def steps(client):
        assert "starttls" not in client.esmtp_features and client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        client.login("alice", "correct horse")
        return client.sendmail("alice@contoso.test", [f"z@{PARTNER}"], message("implicit tls"))
    assert await smtplib_session(r, "submissions", client_tls, steps) == {}
    client = await aiosmtplib_client(r, "submissions", client_tls, use_tls=True)
    assert (await client.auth_plain("alice", "correct horse")).code == 235
    await client.quit()
    await eventually(lambda: sink.messages, what="delivery to the partner")
    assert b"with ESMTPSA" in sink.messages[0].content


async def test_a_user_limited_to_senders_is_refused_others_with_553(relay, client_tls, sink):
    r = await relay()

    def steps(client):
        client.login("bob", "battery staple")
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("ceo@contoso.test", [f"x@{PARTNER}"], message("forged"))
        client.rset()
        ok = client.sendmail("bob@contoso.test", [f"x@{PARTNER}"], message("own address"))
        client.rset()
        by_domain = client.sendmail("anyone@bob.contoso.test", [f"x@{PARTNER}"], message("own domain"))
        return refused.value, ok, by_domain
    refused, ok, by_domain = await smtplib_session(r, "submission", client_tls, steps)
    assert refused.smtp_code == 553 and refused.smtp_error.startswith(b"5.7.1 <ceo@contoso.test>")
    assert ok == {} and by_domain == {}
    await eventually(lambda: len(sink.messages) == 2, what="both allowed messages delivered")


async def test_an_authenticated_client_is_dkim_signed_and_an_unauthenticated_one_is_not(relay, client_tls, tmp_path):
    made = CliRunner().invoke(cli_main, ["dkim", "keygen", "contoso.test", "--algorithm", "ed25519", "--selector",
                                         "s1", "--out", str(tmp_path / "keys")])
    assert made.exit_code == 0, made.output
    key_file = re.search(r'^key_file = "(.+)"$', made.output, re.M).group(1)
    r = await relay(dkim=[{"domain": "contoso.test", "selector": "s1", "key_file": key_file}])

    def send(login):
        def steps(client):
            if login:
                client.login("alice", "correct horse")
            return client.sendmail("alice@contoso.test", ["alice@contoso.test"], message(f"login={login}").replace(
                b"From: sender@example.org", b"From: alice@contoso.test"))
        return steps
    # From 127.0.0.2 (untrusted) to a local mailbox, which an outsider may send to: signed only once logged in.
    assert await smtplib_session(r, "smtp", client_tls, send(False)) == {}
    assert await smtplib_session(r, "smtp", client_tls, send(True)) == {}
    await eventually(lambda: len(r.maildir("alice@contoso.test")) == 2, what="both messages in the mailbox")
    by_login = {b"Authenticated sender" in m: m for m in r.maildir("alice@contoso.test")}
    assert b"DKIM-Signature" in by_login[True] and b"DKIM-Signature" not in by_login[False]


# -- brute force -------------------------------------------------------------------------------

async def test_failed_logins_block_the_ip_even_for_the_right_password(relay, client_tls, caplog):
    caplog.set_level(logging.INFO, logger="relaywatch.mail")
    r = await relay(auth_max_failures=3, auth_block_time="10m")
    receiver = r.app.receiver
    counted_before = dict(events.counts)

    def steps(client):
        codes = []
        for _ in range(3):
            try:
                plain_login(client, "alice", "guess")
            except smtplib.SMTPAuthenticationError as exc:
                codes.append(exc.smtp_code)
        try:
            plain_login(client, "alice", "correct horse")
        except smtplib.SMTPAuthenticationError as exc:
            codes.append((exc.smtp_code, exc.smtp_error[:5]))
        return codes
    assert await smtplib_session(r, "smtp", client_tls, steps) == [535, 535, 535, (454, b"4.7.0")]
    # A new connection from the same address is blocked too; another address is not.
    assert (await smtplib_session(r, "submission", client_tls, steps))[-1:] == [(454, b"4.7.0")]

    def from_trusted():
        with smtp_client(r, source=LOOPBACK) as client:
            client.ehlo("c")
            client.starttls(context=client_tls)
            client.ehlo("c")
            return client.login("alice", "correct horse")[0]
    assert await asyncio.to_thread(from_trusted) == 235
    metrics = receiver.auth_metrics()
    assert metrics["auth_failed"] == 3 and metrics["auth_blocks"] == 1 and metrics["auth_blocked_ips"] == 1
    assert metrics["auth_refused_blocked"] >= 5 and metrics["auth_succeeded"] == 1
    # The console's /metrics counters (console/metrics.py) count the same events.
    counted = {f.name: sum(n for _, n in f.samples) for f in metrics_module.counter_families(events.counts)}
    before = {f.name: sum(n for _, n in f.samples) for f in metrics_module.counter_families(counted_before)}
    assert {name: counted[name] - before.get(name, 0) for name in counted if "auth" in name} == {
        "relaywatch_smtp_auth_succeeded_total": 1, "relaywatch_smtp_auth_failed_total": 3,
        "relaywatch_smtp_auth_blocks_total": 1, "relaywatch_smtp_auth_refused_total": metrics["auth_refused_blocked"]}
    # And the mail log says so: each failure, the block (once) and the logins refused during it, by IP.
    logged = [(rec.mail_event, rec.mail_fields.get("client")) for rec in caplog.records
              if getattr(rec, "mail_event", "").startswith("auth_")]
    assert logged.count(("auth_failed", UNTRUSTED)) == 3 and logged.count(("auth_blocked", UNTRUSTED)) == 1
    assert logged.count(("auth_refused", UNTRUSTED)) == metrics["auth_refused_blocked"]


async def test_the_block_expires(relay, client_tls):
    # On the test's clock: the two failures land in one instant however loaded the
    # machine is, and the block ends when the clock says, not after real seconds.
    clock = FakeClock()
    r = await relay(clock=clock, auth_max_failures=2, auth_block_time="10m")

    def fail_twice(client):
        for _ in range(2):
            with pytest.raises(smtplib.SMTPAuthenticationError):
                plain_login(client, "alice", "guess")
    await smtplib_session(r, "smtp", client_tls, fail_twice)
    assert r.app.receiver.auth_metrics()["auth_blocks"] == 1

    def login(client):
        try:
            return plain_login(client, "alice", "correct horse")[0]
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code
    clock.advance(599)
    assert await smtplib_session(r, "smtp", client_tls, login) == 454      # the right password, still blocked
    assert r.app.receiver.auth_metrics()["auth_blocked_ips"] == 1
    clock.advance(1)
    assert await smtplib_session(r, "smtp", client_tls, login) == 235
    assert r.app.receiver.auth_metrics()["auth_blocked_ips"] == 0


async def test_a_wrong_password_is_answered_only_after_the_delay(relay, client_tls):
    # On the test's clock: the 535 waits for server.auth_failure_delay times the failures so far,
    # and comes when the clock passes it, not before (no real seconds pass, nothing is timed).
    clock = FakeClock()
    r = await relay(clock=clock, auth_max_failures=5, auth_failure_delay="2s")
    client = await aiosmtplib_client(r, "submissions", client_tls, use_tls=True, source_address=(UNTRUSTED, 0))
    for failures in (1, 2):
        reply = asyncio.ensure_future(client.auth_plain("alice", "guess"))
        due = clock.now() + 2 * failures
        await eventually(lambda: any(at == due for at, _ in clock._sleepers), what="the reply to be held back")
        clock.advance(2 * failures - 0.5)
        await asyncio.sleep(0)
        assert not reply.done(), "the 535 came before the delay was over"
        clock.advance(0.5)
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
            await asyncio.wait_for(reply, 10)
        assert refused.value.code == 535
    await client.quit()


# -- the users file ------------------------------------------------------------------------------

def test_user_add_writes_an_owner_only_file_and_replaces_a_user(tmp_path):
    users = tmp_path / "users"
    assert "added user alice" in user_add(users, "alice", "one").output
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    user_add(users, "carol", "two", "--senders", "@Contoso.test")
    assert "updated user alice" in user_add(users, "alice", "three").output
    parsed = auth.load_users(users)
    assert sorted(parsed) == ["alice", "carol"] and parsed["carol"].senders == frozenset({"@contoso.test"})
    assert "one" not in users.read_text() and parsed["alice"].password_hash.startswith("$argon2id$")
    assert auth._verify(parsed["alice"], "three") is parsed["alice"] and auth._verify(parsed["alice"], "one") is None


@pytest.mark.parametrize("args, given, error", [
    (["--senders", "not a sender"], "pw\n", "--senders: 'not a sender' is not an address"),
    (["--password-stdin"], "\n", "the password is empty"),
    ([], "pw\nother\n", "do not match"),
])
def test_user_add_refuses_bad_input(tmp_path, args, given, error):
    result = CliRunner().invoke(cli_main, ["user", "add", "alice", "--users-file", str(tmp_path / "u"), *args],
                                input=given)
    assert result.exit_code != 0 and error in result.output, result.output


@pytest.mark.parametrize("text, error", [
    ("alice\n", "users:1: expected name:hash[:senders]"),
    ("alice:plaintext\n", "users:1: user 'alice' has no Argon2 hash"),
    ("# a comment\n\nbad name:$argon2id$x\n", "users:3: 'bad name' is not a user name"),
    ("a:$argon2id$x\na:$argon2id$y\n", "users:2: user 'a' is listed twice"),
    ("a:$argon2id$x:alice\n", "users:1: user 'a': 'alice' is not an address"),
])
def test_a_broken_users_file_names_the_line(text, error):
    with pytest.raises(auth.UsersFileError) as exc:
        auth.parse_users(text, "users")
    assert str(exc.value).startswith(error)


async def test_the_users_file_is_read_again_when_it_changes(tmp_path):
    users = tmp_path / "users"
    user_add(users, "alice", "one")
    directory = auth.UserDirectory(users)
    assert await directory.check("alice", "one") is not None
    assert await directory.check("dave", "four") is None
    user_add(users, "dave", "four")
    assert await directory.check("dave", "four") is not None
    users.write_text("broken\n")
    with pytest.raises(auth.UsersFileError):
        await directory.check("dave", "four")


@pytest.mark.parametrize("server, expected", [
    ({"submission_listen": ["127.0.0.1:0"]}, "server.submission_listen: needs server.tls_cert"),
    ({"submissions_listen": ["127.0.0.1:0"]}, "server.submissions_listen: needs server.users_file"),
    ({"users_file": "/nonexistent/users"}, "server.users_file: cannot read /nonexistent/users"),
    ({"users_file": "/nonexistent/users"}, "server.users_file: needs server.tls_cert"),
    ({"auth_max_failures": 0}, "server.auth_max_failures: must be"),
    ({"auth_block_time": "0s"}, "server.auth_block_time: must be longer than zero"),
    ({"auth_failure_delay": "soon"}, "server.auth_failure_delay: 'soon' is not a duration"),
    ({"submission_listen": ["127.0.0.1:99999"]}, "server.submission_listen: "),
])
def test_config_check_names_the_auth_keys(server, expected):
    with pytest.raises(ConfigError) as err:
        parse_config({"server": server})
    assert any(p.startswith(expected) for p in err.value.problems), err.value.problems


def test_listener_ports_default_to_587_and_465(tmp_path, tls_files):
    user_add(tmp_path / "users", "alice", "pw")
    cert, key = tls_files
    server = parse_config({"server": {"listen": [], "submission_listen": ["127.0.0.1"], "submissions_listen": ["::1"],
                                      "tls_cert": cert, "tls_key": key, "users_file": str(tmp_path / "users")}}).server
    assert server.submission_listen == (("127.0.0.1", 587),) and server.submissions_listen == (("::1", 465),)
    assert parse_config({}).server.auth_max_failures == 5


# -- the brute-force rules, as a table (no sockets, no clock) -----------------------------------

@pytest.mark.parametrize("what, failures, now, expected_delay, expected_block, blocked_after", [
    ("the first failure waits one delay", [0.0], 0.0, 1.0, False, 0.0),
    ("each failure waits longer", [0.0, 1.0], 1.0, 2.0, False, 0.0),
    ("the third failure blocks for block_time", [0.0, 1.0, 2.0], 2.0, 3.0, True, 100.0),
    ("failures older than block_time are forgotten", [0.0, 1.0, 200.0], 200.0, 1.0, False, 0.0),
])
def test_failure_limits(what, failures, now, expected_delay, expected_block, blocked_after):
    limits = auth.FailureLimits(auth.Limits(max_failures=3, failure_delay=1.0, block_time=100.0))
    for t in failures:
        delay, block = limits.failed("192.0.2.1", t)
    assert (delay, block) == (expected_delay, expected_block)
    assert limits.blocked("192.0.2.1", now) == blocked_after
    assert limits.blocked("192.0.2.2", now) == 0.0


def test_a_block_ends_and_a_success_forgets_the_failures():
    limits = auth.FailureLimits(auth.Limits(max_failures=2, failure_delay=0.5, block_time=10.0))
    limits.failed("ip", 0.0)
    limits.failed("ip", 1.0)
    assert limits.blocked("ip", 5.0) == 6.0 and limits.blocked_now(5.0) == 1
    assert limits.blocked("ip", 11.0) == 0.0 and limits.blocked_now(11.0) == 0
    assert limits.failed("ip", 12.0) == (0.5, False)       # counting starts over after the block
    limits.succeeded("ip")
    assert limits.failed("ip", 13.0) == (0.5, False)
    assert limits.counters == {"auth_succeeded": 1, "auth_failed": 4, "auth_refused_blocked": 0, "auth_blocks": 1}


async def test_a_reload_that_sets_users_file_offers_auth_on_the_smtp_port(tmp_path, tls_files, relay_factory,
                                                                         client_tls):
    cert, key = tls_files
    r = await relay_factory(server={"tls_cert": cert, "tls_key": key})

    def offered():
        with smtp_client(r, source=LOOPBACK) as client:
            client.ehlo("c")
            client.starttls(context=client_tls)
            client.ehlo("c")
            return "auth" in client.esmtp_features
    assert not await asyncio.to_thread(offered)
    user_add(tmp_path / "users", "alice", "pw")
    r.raw["server"]["users_file"] = str(tmp_path / "users")
    r.write_config()
    assert r.app.reload()
    assert await asyncio.to_thread(offered)


# -- client certificates ------------------------------------------------------------------------

def fingerprint(cert: trustme.LeafCert) -> str:
    import hashlib
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())).hexdigest()


async def test_a_listed_client_certificate_logs_in_on_the_submission_ports(relay, ca, tmp_path, client_tls, sink):
    listed, unlisted = ca.issue_cert("scanner.client.test"), ca.issue_cert("other.client.test")
    (tmp_path / "client-ca.pem").write_bytes(ca.cert_pem.bytes())
    # Colons and capitals, as openssl x509 -fingerprint -sha256 prints it.
    printed = ":".join(fingerprint(listed)[i:i + 2] for i in range(0, 64, 2)).upper()
    r = await relay(tls_client_ca=str(tmp_path / "client-ca.pem"), client_certs={printed: "bob"})

    def with_cert(cert, kind):
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        cert.configure_cert(ctx)

        def steps(client):
            features = dict(client.esmtp_features)
            return "auth" in features, client.sendmail("bob@contoso.test", [f"x@{PARTNER}"], message(kind))
        return smtplib_session(r, kind, ctx, steps)
    for kind in ("submission", "submissions"):
        offered, refused = await with_cert(listed, kind)
        assert not offered and refused == {}      # logged in already: AUTH is not offered again
    with pytest.raises(smtplib.SMTPSenderRefused) as unlisted_refused:
        await with_cert(unlisted, "submission")
    assert unlisted_refused.value.smtp_code == 530
    # The second client: aiosmtplib presents the certificate on submissions (TLS from the first byte).
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    listed.configure_cert(ctx)
    client = await aiosmtplib_client(r, "submissions", ctx, use_tls=True, source_address=(UNTRUSTED, 0))
    assert not client.supports_extension("auth")
    errors, _ = await client.sendmail("bob@contoso.test", [f"x@{PARTNER}"], message("aiosmtplib cert"))
    assert errors == {}
    await client.quit()
    await eventually(lambda: len(sink.messages) == 3, what="the certificate-authenticated messages delivered")
    assert all(b"(Authenticated sender: bob)" in m.content for m in sink.messages)


def test_client_certs_are_checked(tmp_path, tls_files):
    user_add(tmp_path / "users", "alice", "pw")
    cert, key = tls_files
    base = {"tls_cert": cert, "tls_key": key, "users_file": str(tmp_path / "users")}
    for server, expected in [
        ({"client_certs": {"ab" * 32: "alice"}}, "server.client_certs: needs server.tls_client_ca"),
        ({"client_certs": {"nothex": "alice"}}, "server.client_certs: 'nothex' is not a SHA-256 fingerprint"),
        ({"tls_client_ca": cert, "client_certs": {"ab" * 32: "mallory"}},
         "server.client_certs: abababababababab... maps to 'mallory', who is not in"),
        ({"tls_client_ca": str(tmp_path / "users")}, "server.tls_client_ca: "),
    ]:
        with pytest.raises(ConfigError) as err:
            parse_config({"server": {**base, **server}})
        assert any(p.startswith(expected) for p in err.value.problems), err.value.problems


def test_user_add_finds_the_users_file_in_the_config_and_config_check_accepts_it(tmp_path, tls_files):
    cert, key = tls_files
    config = tmp_path / "relaywatch.toml"
    config.write_text(f'[server]\nusers_file = "users"\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
                      f'data_dir = "{tmp_path / "data"}"\nlisten = ["127.0.0.1:0"]\n'
                      f'submission_listen = ["127.0.0.1:0"]\n'
                      # config check tries the console's default port too: held by anything else, it fails
                      '[http]\nlisten = "127.0.0.1:0"\n')
    runner = CliRunner()
    check = runner.invoke(cli_main, ["config", "check", "-c", str(config)])
    assert check.exit_code != 0 and "server.users_file: cannot read" in check.output     # not made yet
    added = runner.invoke(cli_main, ["user", "add", "alice", "-c", str(config), "--password-stdin"], input="pw\n")
    assert added.exit_code == 0, added.output
    assert auth.load_users(tmp_path / "users")["alice"].senders is None
    check = runner.invoke(cli_main, ["config", "check", "-c", str(config)])
    assert check.exit_code == 0 and "submission 127.0.0.1:0" in check.output, check.output
    unset = tmp_path / "bare.toml"
    unset.write_text("[server]\n")
    refused = runner.invoke(cli_main, ["user", "add", "alice", "-c", str(unset), "--password-stdin"], input="pw\n")
    assert refused.exit_code != 0 and "server.users_file is not set" in refused.output
