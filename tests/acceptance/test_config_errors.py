"""Configs that must not start: each is one line naming the key (or file, line and column) and a
non-zero exit from `relaywatch config check` and from `relaywatch serve` (a real process on the
loop production uses), before anything listens: no port open, no queue created, no traceback.
"""

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trustme
from click.testing import CliRunner

from helpers import LOOPBACK, STARTUP, eventually, free_port, to_toml
from relaywatch.app import Relaywatch, Role
from relaywatch.cli import main
from relaywatch.config import load_config, parse_config
from relaywatch.errors import ConfigError
from relaywatch.model import RouteKind
from relaywatch.route import decide

ROOT = Path(__file__).resolve().parents[2]
RELAYWATCH = [sys.executable, "-m", "relaywatch"]


def connector(**keys):
    return {"connectors": [{"name": "p", "type": "partner", "domains": ["p.test"], **keys}]}


# (id, config, the line expected).  A config is sections merged into a valid base (a dict) or the
# whole file (a str).  {data}, {port}, {file}, {ca}, {cert}, {key}, {other_key}, {garbage} are
# filled in by the test; a line starting ":" follows the file's name directly (a TOML position).
CASES = [
    # -- the defects the issue lists
    ("size-zero", {"server": {"max_message_size": "0MB"}},
     "server.max_message_size: must be larger than zero (got '0MB')"),
    ("size-zero-bytes", {"server": {"max_message_size": 0}}, "server.max_message_size: must be positive"),
    ("size-fraction-of-a-byte", {"server": {"max_message_size": "0.4B"}}, "server.max_message_size: must be larger"),
    ("tls-verify-without-tls", connector(tls="none", tls_verify="ca_and_name"),
     "connectors[0].tls_verify: 'ca_and_name' needs TLS, but tls = \"none\" sends in plain text"),
    ("tls-name-without-tls", connector(tls="none", tls_name="mx.p.test"),
     "connectors[0].tls_name: has no effect with tls = \"none\""),
    ("ca-file-without-verify", connector(tls="opportunistic", ca_file="{ca}"),
     "connectors[0].ca_file: has no effect with tls_verify = \"none\""),
    ("tls-name-with-ca-only", connector(tls="required", tls_verify="ca", tls_name="mx.p.test"),
     "connectors[0].tls_name: has no effect with tls_verify = \"ca\""),
    ("mailbox-in-another-domain", {"domains": [{"name": "contoso.test", "mailboxes": ["alice@fabrikam.test"]}]},
     "domains[0].mailboxes: 'alice@fabrikam.test' is an address in fabrikam.test, not in contoso.test"),
    ("mailbox-empty", {"domains": [{"name": "contoso.test", "mailboxes": [""]}]},
     "domains[0].mailboxes: '' is not a mailbox name"),
    ("mailbox-only-domain", {"domains": [{"name": "contoso.test", "mailboxes": ["@contoso.test"]}]},
     "domains[0].mailboxes: '@contoso.test' is not a mailbox name"),
    ("smtp-port-too-big", {"delivery": {"smtp_port": 70000}},
     "delivery.smtp_port: must be a port number from 1 to 65535 (got 70000)"),
    ("smtp-port-zero", {"delivery": {"smtp_port": 0}}, "delivery.smtp_port: must be a port number from 1 to 65535"),
    ("dane-unknown", {"delivery": {"dane": "required"}}, "delivery.dane: must be one of off, on (got 'required')"),
    ("dane-bool", {"delivery": {"dane": True}}, "delivery.dane: must be one of off, on (got True)"),
    ("connector-dane-unknown", {"connectors": [{"name": "p", "type": "partner", "domains": ["p.test"], "dane": "yes"}]},
     "connectors[0].dane: must be one of off, on, required (got 'yes')"),
    ("connector-dane-without-tls", {"connectors": [{"name": "p", "type": "partner", "domains": ["p.test"],
                                                    "dane": "on", "tls": "none"}]},
     "connectors[0].dane: 'on' needs TLS, but tls = \"none\" sends in plain text"),
    ("toml-table", "[server\nhostname = \"x\"\n", ":1:8: not valid TOML: expected ']' at the end of a table declaration"),
    ("toml-value", "[server]\nhostname = relay\n", ":2:12: not valid TOML: invalid value"),
    ("toml-duplicate", "[queue]\nlease_time = \"1m\"\nlease_time = \"2m\"\n", ":3:18: not valid TOML: cannot overwrite a value"),
    ("toml-unterminated", "[server]\nhostname = \"relay", ":2:18: not valid TOML: unterminated string"),
    ("not-utf8", b"[server]\nhostname = \"r\xe9lay\"\n", "not UTF-8 text"),
    ("data-dir-is-a-file", {"server": {"data_dir": "{file}"}}, "server.data_dir: {file} is a file, not a directory"),
    ("data-dir-under-a-file", {"server": {"data_dir": "{file}/data"}},
     "server.data_dir: {file}/data cannot be created: {file} is a file, not a directory"),
    # -- the rest of the keys: values that would start and mean nonsense
    ("listen-twice", {"server": {"listen": ["127.0.0.1:{port}", "127.0.0.1:{port}"]}},
     "server.listen: 127.0.0.1:{port} is listed twice"),
    ("listen-wildcard-covers", {"server": {"listen": ["0.0.0.0:{port}", "127.0.0.1:{port}"]}},
     "server.listen: 0.0.0.0:{port} already covers 127.0.0.1:{port}"),
    ("listen-port-range", {"server": {"listen": ["127.0.0.1:70000"]}},
     "server.listen: '127.0.0.1:70000' has an invalid port (use 0-65535)"),
    ("listen-empty-port", {"server": {"listen": ["127.0.0.1:"]}}, "server.listen: '127.0.0.1:' has an invalid port"),
    ("listen-none", {"server": {"listen": []}}, "server.listen: needs at least one address"),
    ("hostname-empty", {"server": {"hostname": " "}}, "server.hostname: must be a non-empty string"),
    ("hostname-space", {"server": {"hostname": "relay contoso"}}, "server.hostname: 'relay contoso' is not a host name"),
    ("idle-timeout-zero", {"server": {"idle_timeout": "0s"}}, "server.idle_timeout: must be longer than zero"),
    ("max-connections-zero", {"server": {"max_connections": 0}}, "server.max_connections: must be a positive whole"),
    ("tls-cert-without-key", {"server": {"tls_cert": "{cert}"}},
     "server.tls_key: tls_cert and tls_key must be set together"),
    ("tls-cert-garbage", {"server": {"tls_cert": "{garbage}", "tls_key": "{key}"}},
     "server.tls_cert: {garbage} holds no PEM certificate"),
    ("tls-key-of-another-cert", {"server": {"tls_cert": "{cert}", "tls_key": "{other_key}"}},
     "server.tls_key: {other_key} is not the key of the certificate in server.tls_cert"),
    ("tls-key-garbage", {"server": {"tls_cert": "{cert}", "tls_key": "{garbage}"}},
     "server.tls_key: {garbage} is not a usable PEM private key"),
    ("lease-time-zero", {"queue": {"lease_time": 0}}, "queue.lease_time: must be longer than zero"),
    ("trace-retention-zero", {"queue": {"trace_retention": "0s"}},
     'queue.trace_retention: must be longer than zero (or "off" to keep no trace of messages that left the queue)'),
    ("ndr-return-limit-zero", {"queue": {"ndr_return_limit": "0KiB"}},
     "queue.ndr_return_limit: must be larger than zero (got '0KiB')"),
    ("ndr-return-limit-huge", {"queue": {"ndr_return_limit": "1GiB"}},
     "queue.ndr_return_limit: '1GiB' is more than the 16MiB an NDR may carry"),
    ("retry-interval-zero", {"queue": {"retry_intervals": ["1m", "0s"]}},
     "queue.retry_intervals: every interval must be longer than zero"),
    ("dns-port-zero", {"dns": {"nameservers": ["127.0.0.1:0"]}}, "dns.nameservers: '127.0.0.1:0' has an invalid port"),
    ("dns-timeout-zero", {"dns": {"timeout": "0ms"}}, "dns.timeout: must be longer than zero"),
    ("connect-timeout-negative", {"delivery": {"connect_timeout": -5}}, "delivery.connect_timeout: must not be negative"),
    ("concurrency-zero", {"delivery": {"concurrency": 0}}, "delivery.concurrency: must be a positive whole number"),
    ("accepted-domain-wildcard", {"domains": [{"name": "*.contoso.test"}]},
     "domains[0].name: '*.contoso.test': an accepted domain is one exact name"),
    ("accepted-domain-bad-idn", {"domains": [{"name": "xn--zz.test"}]},
     "domains[0].name: 'xn--zz.test' is not a domain name: 'xn--zz' is not a valid IDNA2008 label (Invalid A-label)"),
    ("connector-no-domains", connector(domains=[]), "connectors[0].domains: must list at least one domain"),
    ("connector-missing-domains", {"connectors": [{"name": "p", "type": "partner"}]}, "connectors[0].domains: missing"),
    ("connector-name-empty", connector(name=""), "connectors[0].name: must be a non-empty string"),
    ("connector-names-twice", {"connectors": [{"name": "p", "type": "partner", "domains": ["a.test"]},
                                              {"name": "p", "type": "partner", "domains": ["b.test"]}]},
     "connectors[1].name: another connector is already called 'p'"),
    ("smart-host-port-zero", connector(smart_hosts=["127.0.0.1:0"]),
     "connectors[0].smart_hosts: '127.0.0.1:0' has an invalid port (use 1-65535)"),
    ("ca-file-missing", connector(tls="required", ca_file="{data}/nope.pem"),
     "connectors[0].ca_file: file {data}/nope.pem does not exist"),
    ("ca-file-garbage", connector(tls="required", ca_file="{garbage}"),
     "connectors[0].ca_file: {garbage} holds no PEM certificate"),
    ("crl-file-is-a-certificate", connector(tls="required", ca_file="{ca}", crl_file="{ca}"),
     "connectors[0].crl_file: {ca} holds no PEM CRL"),
    ("delay-notice-after-expiry", {"queue": {"message_expiration": "24h"}, **connector(delay_notice_after="2d")},
     "connectors[0].delay_notice_after: 2d is not shorter than queue.message_expiration (1d)"),
    ("webhook-not-http", {"alerts": {"webhook_url": "ftp://hooks.test/x"}},
     "alerts.webhook_url: 'ftp://hooks.test/x' is not an http:// or https:// URL"),
    ("webhook-bad-port", {"alerts": {"webhook_url": "http://127.0.0.1:99999/x"}},
     "alerts.webhook_url: 'http://127.0.0.1:99999/x' is not an http:// or https:// URL"),
    ("webhook-secret-alone", {"alerts": {"webhook_secret": "s3cret"}},
     "alerts.webhook_secret: set, but there is no alerts.webhook_url"),
    ("alerts-smtp-port", {"alerts": {"smtp": "127.0.0.1:99999"}}, "alerts.smtp: '127.0.0.1:99999' has an invalid port"),
    ("probe-min-interval-zero", {"alerts": {"probe_min_interval": "0s"}},
     "alerts.probe_min_interval: must be longer than zero"),
    ("probe-min-interval-not-duration", {"alerts": {"probe_min_interval": "soon"}},
     "alerts.probe_min_interval: 'soon' is not a duration"),
    ("alerts-notify-not-address", {"alerts": {"notify": ["admin@"]}}, "alerts.notify: 'admin@' is not an email address"),
    ("alerts-from-not-address", {"alerts": {"from": "relaywatch"}}, "alerts.from: 'relaywatch' is not an email address"),
    ("unknown-key", {"server": {"listn": ["127.0.0.1:25"]}}, "server.listn: unknown key; did you mean 'listen'?"),
    # -- [http], the console's listener
    ("http-unknown-key", {"http": {"token": ["ops:0123456789abcdef"]}},
     "http.token: unknown key; did you mean 'tokens'?"),
    ("http-listen-port-range", {"http": {"listen": "127.0.0.1:70000"}},
     "http.listen: '127.0.0.1:70000' has an invalid port (use 0-65535)"),
    ("http-listen-not-a-string", {"http": {"listen": 8025}}, "http.listen: must be a non-empty string"),
    ("http-listen-is-the-smtp-port", {"http": {"listen": "127.0.0.1:{port}"}},
     "http.listen: 127.0.0.1:{port} is also in server.listen (the SMTP port)"),
    ("http-public-without-tokens", {"http": {"listen": "0.0.0.0:0"}},
     "http.tokens: needed, since http.listen (0.0.0.0:0) is not a loopback address"),
    ("http-token-without-name", {"http": {"tokens": ["0123456789abcdef0123"]}},
     "http.tokens[0]: must be \"name:token\""),
    ("http-token-weak", {"http": {"tokens": ["ops:secret"]}},
     "http.tokens[0]: the token of ops is too weak: use at least 16 characters"),
    ("http-token-name-twice", {"http": {"tokens": ["ops:0123456789abcdef", "ops:fedcba9876543210"]}},
     "http.tokens[1]: the name ops is given twice"),
    ("http-token-shared", {"http": {"tokens": ["ops:0123456789abcdef", "dev:0123456789abcdef"]}},
     "http.tokens[1]: the token of dev is also another name's token"),
    ("http-token-name-bad", {"http": {"tokens": ["o p:0123456789abcdef"]}},
     "http.tokens[0]: the name 'o p' may only have letters"),
    ("http-tokens-not-a-list", {"http": {"tokens": 5}},
     "http.tokens: must be a list of \"name:token\" strings or the path of a file of them"),
    ("http-token-file-missing", {"http": {"tokens": "{data}/tokens"}},
     "http.tokens: cannot read the token file {data}/tokens"),
    ("http-token-file-bad-line", {"http": {"tokens": "{tokens_bad}"}},
     "http.tokens ({tokens_bad}:4): the token of dev is too weak"),
    ("http-tls-cert-without-key", {"http": {"tls_cert": "{cert}"}},
     "http.tls_key: tls_cert and tls_key must be set together"),
    ("http-tls-key-of-another-cert", {"http": {"tls_cert": "{cert}", "tls_key": "{other_key}"}},
     "http.tls_key: {other_key} is not the key of the certificate in http.tls_cert"),
    ("http-tls-cert-missing", {"http": {"tls_cert": "{data}/c.pem", "tls_key": "{key}"}},
     "http.tls_cert: file {data}/c.pem does not exist"),
    ("tls-reporting-without-organization", {"tls_reporting": {"enabled": True, "contact_info": "tls@contoso.test"}},
     "tls_reporting.organization_name: missing; every report names it (RFC 8460 4.4)"),
    ("tls-reporting-submitter-bad", {"tls_reporting": {"submitter": "not a domain"}},
     "tls_reporting.submitter: 'not a domain' is not a domain name"),
    ("tls-reporting-key-misspelt", {"tls_reporting": {"organisation_name": "Contoso"}},
     "tls_reporting.organisation_name: unknown key; did you mean 'organization_name'?"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Certificates, a key of another certificate, a file of garbage, a plain file."""
    d = tmp_path_factory.mktemp("files")
    ca = trustme.CA()
    leaf, other = ca.issue_cert("relay.test"), ca.issue_cert("other.test")
    paths = {"ca": d / "ca.pem", "cert": d / "cert.pem", "key": d / "key.pem", "other_key": d / "other-key.pem",
             "garbage": d / "garbage.pem", "file": d / "plain-file", "tokens_bad": d / "tokens-bad"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    leaf.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    other.private_key_pem.write_to_path(str(paths["other_key"]))
    paths["garbage"].write_text("this is not PEM\n")
    paths["file"].write_text("a file where a directory should be\n")
    paths["tokens_bad"].write_text("# admins\nops:0123456789abcdef0123\n\ndev:short-one\n")
    return {k: str(v) for k, v in paths.items()}


def fill(value, names):
    if isinstance(value, str):
        return value.format(**names)
    if isinstance(value, dict):
        return {k: fill(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, names) for v in value]
    return value


def write_config(tmp_path, config, names) -> Path:
    path = tmp_path / "relaywatch.toml"
    if isinstance(config, bytes):
        path.write_bytes(config)
        return path
    if isinstance(config, str):
        path.write_text(config)
        return path
    base = {"server": {"hostname": "relay.test", "listen": [f"{LOOPBACK}:{names['port']}"], "data_dir": names["data"]},
            "http": {"listen": f"{LOOPBACK}:0"},   # not the default 8025, which another test may hold
            "domains": [{"name": "contoso.test", "type": "authoritative", "mailboxes": ["postmaster"]}]}
    for key, value in fill(config, names).items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    path.write_text(to_toml(base))
    return path


def refused(port: int) -> bool:
    try:
        socket.create_connection((LOOPBACK, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def serve(path: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """`relaywatch serve` as a process; one that starts (when it should not) is stopped and fails.
    Refusing takes the interpreter's start and the imports: 7 s was seen on a loaded machine,
    hence the long deadline (a refusing serve ends long before it; only a bad one waits it out)."""
    proc = subprocess.Popen([*RELAYWATCH, "serve", "-c", str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"serve started with this config instead of refusing it:\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_one_line(output: str, path: Path, expected: str):
    lines = output.strip().splitlines()
    assert "Traceback" not in output, output
    assert len(lines) == 1, f"expected one line, got:\n{output}"
    prefix = f"relaywatch: {path}" + ("" if expected.startswith(":") else ": ")
    assert lines[0].startswith(prefix + expected), f"expected {prefix + expected!r}, got {lines[0]!r}"


@pytest.mark.parametrize("config, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_config_that_must_not_start(tmp_path, files, config, expected):
    port = free_port()
    names = {**files, "data": str(tmp_path / "data"), "port": port}
    path = write_config(tmp_path, config, names)
    expected = fill(expected, names)

    check = CliRunner().invoke(main, ["config", "check", "-c", str(path)])
    assert check.exit_code == 2, check.output
    assert_one_line(check.output, path, expected)

    result = serve(path)
    assert result.returncode == 2
    assert_one_line(result.stderr, path, expected)
    assert refused(port), "something listens on the configured port"
    assert not (tmp_path / "data" / "queue.sqlite3").exists(), "serve opened the queue before refusing"


def test_a_full_address_of_its_own_domain_is_the_mailbox():
    config = parse_config({"domains": [{"name": "contoso.test", "mailboxes": ["Alice@Contoso.test.", "bob"]}]})
    assert config.domain("contoso.test").mailboxes == {"alice", "bob"}
    assert decide(config, "alice@contoso.test").route.kind is RouteKind.LOCAL


# The three arrays of tables are read by one helper (config/values.py Reader.entries): the same
# problems, in the same order, for a section that is no array, an entry that is no table, and an
# entry's unknown and missing keys (keys set only at run time, like paused and key, are unknown).
@pytest.mark.parametrize("raw, expected", [
    ({"domains": {"name": "contoso.test"}}, ["domains: must be an array of tables ([[domains]])"]),
    ({"domains": [{"type": "authoritative"}, 3]}, ["domains[0].name: missing", "domains[1]: must be a table"]),
    ({"connectors": ["p"]}, ["connectors[0]: must be a table"]),
    ({"connectors": [{"paused": True}]},
     ["connectors[0].paused: unknown key", "connectors[0].name: missing", "connectors[0].type: missing",
      "connectors[0].domains: missing"]),
    ({"dkim": "example.test"}, ["dkim: must be an array of tables ([[dkim]])"]),
    ({"dkim": [7, {"key": "x", "sub_domains": True}]},
     ["dkim[0]: must be a table", "dkim[1].key: unknown key", "dkim[1].domain: missing", "dkim[1].selector: missing",
      "dkim[1].key_file: missing"]),
])
def test_an_array_of_tables_of_the_wrong_shape_is_named(raw, expected):
    with pytest.raises(ConfigError) as exc:
        parse_config(raw)
    assert exc.value.problems == expected


def test_problems_are_all_listed_one_line_each(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[server]\nmax_message_size = "0MB"\n[delivery]\nsmtp_port = 70000\n')
    result = CliRunner().invoke(main, ["config", "check", "-c", str(path)])
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        f"relaywatch: {path}: server.max_message_size: must be larger than zero (got '0MB')",
        f"relaywatch: {path}: delivery.smtp_port: must be a port number from 1 to 65535 (got 70000)"]


def test_serve_refuses_a_listen_address_in_use(tmp_path):
    busy = socket.create_server((LOOPBACK, 0))
    free = free_port()
    try:
        busy_port = busy.getsockname()[1]
        path = write_config(tmp_path, {"server": {"listen": [f"{LOOPBACK}:{free}", f"{LOOPBACK}:{busy_port}"]}},
                            {"data": str(tmp_path / "data"), "port": free})
        expected = f"server.listen: {LOOPBACK}:{busy_port} is already in use by another program"
        result = serve(path)
        assert result.returncode == 2
        assert_one_line(result.stderr, path, expected)
        assert refused(free), "the other address was left listening"
        assert not (tmp_path / "data" / "queue.sqlite3").exists()
        check = CliRunner().invoke(main, ["config", "check", "-c", str(path)])
        assert check.exit_code == 2
        assert_one_line(check.output, path, expected)
    finally:
        busy.close()


async def test_config_check_while_serve_runs_does_not_blame_it(tmp_path):
    port = free_port()
    path = write_config(tmp_path, {"server": {"delivery_process": False}}, {"data": str(tmp_path / "data"), "port": port})
    proc = await asyncio.create_subprocess_exec(*RELAYWATCH, "serve", "-c", str(path), cwd=ROOT,
                                                stderr=asyncio.subprocess.DEVNULL)
    try:
        await eventually(lambda: (tmp_path / "data" / "relaywatch.pid").exists() and not refused(port),
                         timeout=STARTUP, what="serve listening")
        check = await asyncio.to_thread(CliRunner().invoke, main, ["config", "check", "-c", str(path)])
        assert check.exit_code == 0, check.output
        second = await asyncio.to_thread(serve, path)
        assert second.returncode == 2
        assert_one_line(second.stderr, path,
                        f"server.listen: {LOOPBACK}:{port} is already in use by the running relaywatch "
                        f"(pid {proc.pid}); stop it first")
        assert not refused(port), "the running server lost its port"
    finally:
        proc.terminate()
        await proc.wait()


def test_data_dir_on_a_read_only_file_system(tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {made.stderr.decode().strip()}")
    try:
        for data_dir, expected in [
                (mount, f"server.data_dir: {mount} is on a read-only file system"),
                (mount / "data", f"server.data_dir: {mount / 'data'} cannot be created: {mount} is on a read-only "
                                 f"file system")]:
            port = free_port()
            path = write_config(tmp_path, {}, {"data": str(data_dir), "port": port})
            result = serve(path)
            assert result.returncode == 2
            assert_one_line(result.stderr, path, expected)
            assert refused(port)
            check = CliRunner().invoke(main, ["config", "check", "-c", str(path)])
            assert check.exit_code == 2
            assert_one_line(check.output, path, expected)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere; the read-only mount covers the case")
def test_data_dir_not_writable(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o500)
    path = write_config(tmp_path, {}, {"data": str(data), "port": free_port()})
    check = CliRunner().invoke(main, ["config", "check", "-c", str(path)])
    assert check.exit_code == 2
    assert f"server.data_dir: {data} is not writable by" in check.output


async def test_an_address_taken_after_the_check_is_named_and_nothing_stays_open(tmp_path):
    """The race the check cannot close: the bind itself fails.  The delivery process it started
    is stopped, the other address closed, and the error names the key."""
    busy = socket.create_server((LOOPBACK, 0))
    free = free_port()
    try:
        path = write_config(tmp_path, {"server": {"listen": [f"{LOOPBACK}:{free}", f"{LOOPBACK}:{busy.getsockname()[1]}"]}},
                            {"data": str(tmp_path / "data"), "port": free})
        app = Relaywatch(load_config(path), role=Role.RECEIVE)
        with pytest.raises(ConfigError) as err:
            await app.serve_forever()
        assert str(err.value).startswith("server.listen: cannot listen: ")
        assert "address already in use" in str(err.value).lower()
        assert refused(free)
        assert app.child is not None and app.child.process.poll() is not None, "the delivery process outlived the start"
    finally:
        busy.close()


async def test_a_data_dir_that_cannot_be_made_at_start_is_named(tmp_path):
    """The same race for data_dir: made a file after the check; serve_forever names the key."""
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    path = write_config(tmp_path, {}, {"data": str(blocker / "data"), "port": 0})
    with pytest.raises(ConfigError) as err:
        await Relaywatch(load_config(path)).serve_forever()
    assert str(err.value).startswith(f"server.data_dir: cannot create {blocker / 'data'}: ")


def test_config_check_warns_about_valid_but_unintended_settings(tmp_path):
    path = write_config(tmp_path, {
        "server": {"trusted_networks": ["0.0.0.0/0"]},
        "domains": [{"name": "contoso.test", "type": "authoritative"}],
        "connectors": [{"name": "all-fabrikam", "type": "partner", "domains": ["*.fabrikam.test"]},
                       {"name": "eu", "type": "partner", "domains": ["eu.fabrikam.test"]},
                       {"name": "onprem", "type": "on_premises", "domains": ["contoso.test"]}]},
        {"data": str(tmp_path / "data"), "port": free_port()})
    result = CliRunner().invoke(main, ["config", "check", "-c", str(path)])
    assert result.exit_code == 0, result.output
    for expected in [
            "warning: server.trusted_networks: 0.0.0.0/0 lets every address relay to any domain (an open relay)",
            "warning: connectors[1].domains: eu.fabrikam.test is already served by connector all-fabrikam",
            "warning: connectors[2].domains: contoso.test is an authoritative domain",
            "warning: connectors[2].smart_hosts: none, so onprem delivers by the domains' MX"]:
        assert expected in result.output, result.output


def test_a_bad_value_from_the_environment_names_the_variable(tmp_path):
    path = write_config(tmp_path, {}, {"data": str(tmp_path / "data"), "port": free_port()})
    result = CliRunner().invoke(main, ["config", "check", "-c", str(path)],
                                env={"RELAYWATCH_DELIVERY__SMTP_PORT": "70000", "RELAYWATCH_QUEUE__LEASE_TIM": "1m"})
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        f"relaywatch: {path}: queue.lease_tim: unknown key; did you mean 'lease_time'? (set by RELAYWATCH_QUEUE__LEASE_TIM)",
        f"relaywatch: {path}: delivery.smtp_port: must be a port number from 1 to 65535 (got 70000) "
        f"(set by RELAYWATCH_DELIVERY__SMTP_PORT)"]


@pytest.mark.parametrize("url, expected", [
    ("postgresql://relay:secret@db.test:99999/queue", "server.store: the URL's port '99999' is not a port number"),
    ("postgresql://relay:secret@[::1/queue", "server.store: not a valid PostgreSQL URL: end of string reached"),
])
def test_a_postgresql_url_that_cannot_work_is_refused_without_its_password(tmp_path, url, expected):
    pytest.importorskip("psycopg")
    path = write_config(tmp_path, {"server": {"store": url}}, {"data": str(tmp_path / "data"), "port": free_port()})
    result = CliRunner().invoke(main, ["config", "check", "-c", str(path)])
    assert result.exit_code == 2
    assert_one_line(result.output, path, expected)
    assert "secret" not in result.output
