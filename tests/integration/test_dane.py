"""DANE for SMTP (RFC 7672): TLSA records, the "does DANE apply" decision and
chain matching by table; then a real relay delivering by MX to an aiosmtpd
destination with STARTTLS and certificates made here, the TLSA, MX and A
records served by the loopback DNS server with and without the AD bit (and
SERVFAIL with "DNSSEC Bogus").  Both event loops."""

import datetime
import hashlib
import json
import ssl
import time

import pytest
import trustme
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from cryptography.x509.oid import NameOID

from helpers import LOOPBACK, DnsServer, RecordingHandler, Sink, eventually, first_error, message
from relaywatch.classify.classify import classify
from relaywatch.classify.observation import Observation, Outcome, Phase
from relaywatch.cli import main as cli_main
from relaywatch.config import parse_config
from relaywatch.deliver.dane import TlsaAnswer, TlsaRecord, Verdict, match_chain, tlsa_hosts, tlsa_wanted, verdict
from relaywatch.model import Destination

pytestmark = pytest.mark.both_loops

DOMAIN = "partner.test"
MX = "mx.partner.test"
ALIAS = "mail.hoster.test"           # what MX is a CNAME of, in the alias tests
NOW = datetime.datetime.now(datetime.timezone.utc)


# -- certificates made here ----------------------------------------------------------------------

def self_signed(name: str, days: int = 30, key=None):
    """A self-signed certificate (no CA anyone trusts): (cert, key)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1)).not_valid_after(NOW + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def der(cert) -> bytes:
    return cert.public_bytes(Encoding.DER)


def spki(cert) -> bytes:
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def tlsa(usage, selector, mtype, cert) -> TlsaRecord:
    data = der(cert) if selector == 0 else spki(cert)
    data = {0: data, 1: hashlib.sha256(data).digest(), 2: hashlib.sha512(data).digest()}[mtype]
    return TlsaRecord(usage, selector, mtype, data)


def pem_cert(cert) -> bytes:
    return cert.public_bytes(Encoding.PEM)


CA = trustme.CA()
CA_CERT = x509.load_pem_x509_certificate(CA.cert_pem.bytes())


def ca_leaf(name: str, **kw) -> tuple[x509.Certificate, trustme.LeafCert]:
    leaf = CA.issue_cert(name, **kw)
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()), leaf


# -- pure: records, the decision, matching --------------------------------------------------------

@pytest.mark.parametrize("record, usable", [
    (TlsaRecord(3, 1, 1, b"\0" * 32), True),
    (TlsaRecord(3, 0, 2, b"\0" * 64), True),
    (TlsaRecord(2, 0, 1, b"\0" * 32), True),
    (TlsaRecord(3, 1, 0, b"spki"), True),
    (TlsaRecord(0, 0, 1, b"\0" * 32), False),       # PKIX-TA: unusable for SMTP (RFC 7672 3.1.3)
    (TlsaRecord(1, 1, 1, b"\0" * 32), False),       # PKIX-EE
    (TlsaRecord(3, 2, 1, b"\0" * 32), False),       # unknown selector
    (TlsaRecord(3, 1, 3, b"\0" * 32), False),       # unknown matching type
    (TlsaRecord(3, 1, 1, b"\0" * 31), False),       # a SHA-256 digest of the wrong size
    (TlsaRecord(3, 1, 0, b""), False),
])
def test_usable_records(record, usable):
    assert record.usable is usable


@pytest.mark.parametrize("mode, mx_secure, host_secure, alias_secure, looked_up", [
    ("on", True, True, False, True),
    ("required", True, True, False, True),
    ("off", True, True, False, False),
    ("on", False, True, False, False),     # a forged MX could lead to anyone's TLSA records
    ("on", True, False, False, False),     # an unsigned host, or an alias whose own CNAME is not validated
    ("on", True, False, True, True),       # RFC 7672 2.2.2: a validated alias into an unsigned zone
    ("on", False, False, True, False),
    ("off", True, False, True, False),
])
def test_tlsa_is_looked_up_only_behind_secure_answers(mode, mx_secure, host_secure, alias_secure, looked_up):
    assert (tlsa_wanted(mode, mx_secure, host_secure, alias_secure) is None) is looked_up


@pytest.mark.parametrize("canonical, expansion_secure, hosts", [
    (MX, True, (MX,)),                          # not an alias
    (MX + ".", False, (MX,)),
    (ALIAS, True, (ALIAS, MX)),                 # RFC 7672 2.2.3: the target's records first, then the MX name's
    (ALIAS.upper(), True, (ALIAS, MX)),
    (ALIAS, False, (MX,)),                      # an insecure expansion says nothing about the target
])
def test_the_tlsa_names_of_an_mx_host_that_is_an_alias(canonical, expansion_secure, hosts):
    assert tlsa_hosts(MX, canonical, expansion_secure) == hosts


def test_a_dane_ta_certificate_may_carry_either_name_of_an_alias():
    for name, ok in ((ALIAS, True), (MX, True), ("elsewhere.test", False)):
        leaf, _ = ca_leaf(name)
        match = match_chain((tlsa(2, 0, 1, CA_CERT),), [der(leaf), der(CA_CERT)], (ALIAS, MX), NOW)
        assert match.ok is ok, (name, match.reason)
    assert f"not for {ALIAS} or {MX}" in match.reason


EE = TlsaRecord(3, 1, 1, b"\1" * 32)
PKIX = TlsaRecord(1, 1, 1, b"\1" * 32)


@pytest.mark.parametrize("mode, answer, kw, expected", [
    ("on", TlsaAnswer((EE,), True), {}, Verdict.AUTHENTICATE),
    ("on", TlsaAnswer((EE, PKIX), True), {}, Verdict.AUTHENTICATE),
    ("on", TlsaAnswer((PKIX,), True), {}, Verdict.ENCRYPT),            # published, none usable: TLS, no authentication
    ("on", TlsaAnswer((EE,), False), {}, Verdict.NOT_APPLICABLE),      # insecure: as if none
    ("on", TlsaAnswer((), True), {}, Verdict.NOT_APPLICABLE),
    ("on", None, {"skipped": "the MX answer is not DNSSEC-validated"}, Verdict.NOT_APPLICABLE),
    ("on", None, {"lookup_failed": {"rcode": "SERVFAIL"}}, Verdict.BOGUS),
    ("required", TlsaAnswer((EE,), True), {}, Verdict.AUTHENTICATE),
    ("required", TlsaAnswer((EE,), False), {}, Verdict.REQUIRED),
    ("required", TlsaAnswer((PKIX,), True), {}, Verdict.REQUIRED),
    ("required", None, {"skipped": "the MX answer is not DNSSEC-validated"}, Verdict.REQUIRED),
])
def test_what_a_tlsa_answer_means(mode, answer, kw, expected):
    assert verdict(mode, MX, 25, answer, **kw).verdict is expected


def _cases():
    ee_cert, _ = self_signed("anything.invalid")           # DANE-EE: names do not matter
    other, _ = self_signed("other.invalid")
    right, _ = ca_leaf(MX)
    wrong, _ = ca_leaf("elsewhere.test")
    wildcard, _ = ca_leaf("*.partner.test")
    expired, _ = ca_leaf(MX, not_before=NOW - datetime.timedelta(days=30), not_after=NOW - datetime.timedelta(days=1))
    old_ee, _ = self_signed("anything.invalid", days=-1)   # already expired: DANE-EE does not care
    chain = lambda leaf: [der(leaf), der(CA_CERT)]          # noqa: E731
    return [
        ("3 1 1", [tlsa(3, 1, 1, ee_cert)], [der(ee_cert)], (True, None)),
        ("3 0 1", [tlsa(3, 0, 1, ee_cert)], [der(ee_cert)], (True, None)),
        ("3 1 2", [tlsa(3, 1, 2, ee_cert)], [der(ee_cert)], (True, None)),
        ("3 0 0", [tlsa(3, 0, 0, ee_cert)], [der(ee_cert)], (True, None)),
        ("3 1 1 expired", [tlsa(3, 1, 1, old_ee)], [der(old_ee)], (True, None)),
        ("3 1 1 of another key", [tlsa(3, 1, 1, other)], [der(ee_cert)], (False, "dane_tlsa_mismatch")),
        ("one of two matches", [tlsa(3, 1, 1, other), tlsa(3, 1, 1, ee_cert)], [der(ee_cert)], (True, None)),
        ("2 0 1 right name", [tlsa(2, 0, 1, CA_CERT)], chain(right), (True, None)),
        ("2 1 1 right name", [tlsa(2, 1, 1, CA_CERT)], chain(right), (True, None)),
        ("2 0 1 wildcard", [tlsa(2, 0, 1, CA_CERT)], chain(wildcard), (True, None)),
        ("2 0 1 wrong name", [tlsa(2, 0, 1, CA_CERT)], chain(wrong), (False, "dane_name_mismatch")),
        ("2 0 1 expired leaf", [tlsa(2, 0, 1, CA_CERT)], chain(expired), (False, "dane_chain_invalid")),
        ("2 0 1 TA not sent", [tlsa(2, 0, 1, CA_CERT)], [der(right)], (False, "dane_tlsa_mismatch")),
        ("2 0 1 TA not the issuer", [tlsa(2, 0, 1, other)], [der(right), der(other)], (False, "dane_chain_invalid")),
        ("2 x x matching the leaf", [tlsa(2, 0, 1, right)], chain(right), (False, "dane_tlsa_mismatch")),
        ("1 1 1 PKIX-EE matching", [tlsa(1, 1, 1, ee_cert)], [der(ee_cert)], (False, "dane_tlsa_mismatch")),
        ("0 0 1 PKIX-TA matching", [tlsa(0, 0, 1, CA_CERT)], chain(right), (False, "dane_tlsa_mismatch")),
        ("no certificate", [tlsa(3, 1, 1, ee_cert)], [], (False, "dane_tlsa_mismatch")),
    ]


@pytest.mark.parametrize("case, records, chain, expected", _cases(), ids=[c[0] for c in _cases()])
def test_chain_matching(case, records, chain, expected):
    match = match_chain(tuple(records), chain, (MX,), NOW)
    assert (match.ok, match.subtype) == expected, match.reason
    if chain:
        assert match.presented["spki_sha256"] == hashlib.sha256(
            spki(x509.load_der_x509_certificate(chain[0]))).hexdigest()


D = Destination(MX, LOOPBACK, 25, 1, 1)
_EVIDENCE = {"policy_domain": DOMAIN, "policy_type": "tlsa", "mx_host": MX, "tlsa_name": f"_25._tcp.{MX}",
             "tlsa": ["3 1 1 " + "ab" * 32], "usable": ["3 1 1 " + "ab" * 32]}


@pytest.mark.parametrize("observation, subtype, words", [
    (Observation(Phase.STARTTLS, Outcome.TLSA_MISMATCH, D, dane={
        **_EVIDENCE, "subtype": "dane_tlsa_mismatch", "reason": "no usable TLSA record matches",
        "presented": {"spki_sha256": "cd" * 32}}), "dane_tlsa_mismatch", "SPKI SHA-256 " + "cd" * 32),
    (Observation(Phase.STARTTLS, Outcome.TLSA_MISMATCH, D, dane={**_EVIDENCE, "subtype": "dane_name_mismatch",
                                                              "reason": "not for mx"}), "dane_name_mismatch", "not for mx"),
    (Observation(Phase.STARTTLS, Outcome.TLS_NOT_OFFERED, D, dane=_EVIDENCE), "dane_starttls_not_offered",
     "does not offer STARTTLS"),
    (Observation(Phase.STARTTLS, Outcome.REPLY, D, reply_code=454, dane=_EVIDENCE), "dane_starttls_not_offered",
     "refused STARTTLS"),
    (Observation(Phase.STARTTLS, Outcome.TLS_HANDSHAKE, D, dane=_EVIDENCE, note="NO_SHARED_CIPHER"),
     "dane_tls_handshake", "NO_SHARED_CIPHER"),
    (Observation(Phase.DNS, Outcome.DNSSEC_BOGUS, D, dane=_EVIDENCE,
                 dns={"rcode": "SERVFAIL", "ede": {"code": 6, "text": "DNSSEC Bogus"}}),
     "dane_dnssec_bogus", "\"DNSSEC Bogus\" (EDE 6)"),
    (Observation(Phase.DNS, Outcome.DANE_REQUIRED, D, dane={**_EVIDENCE, "reason": "no TLSA records are published"}),
     "dane_required", "requires DANE"),
])
def test_dane_failures_classify_in_4_7_320(observation, subtype, words):
    failure = classify(observation, 0.0)
    assert (failure.code, failure.kind, failure.subtype, failure.smtp_code) == ("4.7.320", "tls.dane", subtype, 450)
    assert words in failure.detail, failure.detail
    assert failure.dane["mx_host"] == MX and failure.sts is None
    assert failure.to_dict()["dane"]["tlsa"] == _EVIDENCE["tlsa"]


def test_tls_failures_without_tlsa_are_classified_as_before():
    assert classify(Observation(Phase.STARTTLS, Outcome.TLS_NOT_OFFERED, D), 0.0).kind == "connect.rejected"
    assert "dane" not in classify(Observation(Phase.CONNECT, Outcome.REFUSED, D), 0.0).to_dict()


# -- the loopback world: DNS with and without AD, the MX with STARTTLS ----------------------------------

def server_context(tmp_path, cert, key, extra=()) -> ssl.SSLContext:
    chain = tmp_path / "chain.pem"
    chain.write_bytes(pem_cert(cert) + b"".join(pem_cert(c) for c in extra))
    key_path = tmp_path / "key.pem"
    key_path.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain, key_path)
    return ctx


def ca_context(tmp_path, name: str) -> ssl.SSLContext:
    """A leaf from the test CA, served with the CA certificate in the chain (DANE-TA needs it there)."""
    cert, leaf = ca_leaf(name)
    key = tmp_path / "ca-leaf-key.pem"
    key.write_bytes(leaf.private_key_pem.bytes())
    chain = tmp_path / "ca-chain.pem"
    chain.write_bytes(pem_cert(cert) + CA.cert_pem.bytes())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain, key)
    return ctx


def rdata(record: TlsaRecord) -> str:
    return record.text()


class World:
    def __init__(self, tmp_path, relay_factory):
        self.tmp_path, self.relay_factory = tmp_path, relay_factory
        self.dns = self.mx = self.relay = None

    async def start(self, *, records=None, tls_context=None, secure=True, tlsa_entry=None, mx_secure=True,
                    alias_records=None):
        """``alias_records``: MX is a CNAME of ALIAS (its address, and these TLSA records)."""
        self.handler = RecordingHandler()
        self.mx = await Sink(self.handler, tls_context=tls_context).start()
        self.tlsa_name = f"_{self.mx.port}._tcp.{MX}"
        self.alias_tlsa_name = f"_{self.mx.port}._tcp.{ALIAS}"
        zone = {(DOMAIN, "MX"): [f"10 {MX}."], (MX, "A"): [LOOPBACK]}
        if alias_records is not None:
            zone = {(DOMAIN, "MX"): [f"10 {MX}."], (MX, "CNAME"): [f"{ALIAS}."], (ALIAS, "A"): [LOOPBACK]}
            if alias_records:
                zone[(self.alias_tlsa_name, "TLSA")] = [rdata(r) for r in alias_records]
        if records is not None:
            zone[(self.tlsa_name, "TLSA")] = [rdata(r) for r in records]
        if tlsa_entry is not None:
            zone[(self.tlsa_name, "TLSA")] = tlsa_entry
        if secure is True:
            secure = {DOMAIN, MX, ALIAS, self.tlsa_name, self.alias_tlsa_name} - (set() if mx_secure else {DOMAIN})
        self.dns = await DnsServer(zone, secure=secure or set()).start()
        return self

    async def start_relay(self, **sections):
        sections.setdefault("delivery", {})
        sections["delivery"] = {"smtp_port": self.mx.port, "messages_per_connection": 1, **sections["delivery"]}
        self.relay = await self.relay_factory(
            dns={"nameservers": [f"{LOOPBACK}:{self.dns.port}"], "timeout": "1s"},
            mta_sts={"enabled": False}, **sections)
        return self.relay

    @property
    def results(self):
        """The DANE sessions' results, as TLS reporting records them (policy type tlsa)."""
        return [r for r in self.relay.app.routes.tls_results.recent if r.policy_type == "tlsa"]

    async def stop(self):
        if self.dns:
            self.dns.stop()
        if self.mx:
            await self.mx.stop()


@pytest.fixture
async def world(tmp_path, relay_factory):
    w = World(tmp_path, relay_factory)
    yield w
    await w.stop()


async def send(relay, subject="dane"):
    await relay.send("alice@contoso.test", [f"bob@{DOMAIN}"], message(subject))


def mail_from_alice(world) -> list[bool]:
    """Whether each session that carried the message was under TLS (the watch's probes send other senders)."""
    return [tls for sender, tls in world.handler.mail_from if sender == "alice@contoso.test"]


async def delivered_under_tls(world):
    await eventually(lambda: world.mx.messages, what="delivery to the MX")
    assert mail_from_alice(world) == [True]


# -- DANE-EE -------------------------------------------------------------------------------------

async def test_a_matching_dane_ee_3_1_1_delivers(world, tmp_path):
    cert, key = self_signed("not-the-mx-name.invalid")          # self-signed, another name: DANE-EE accepts it
    await world.start(records=[tlsa(3, 1, 1, cert)], tls_context=server_context(tmp_path, cert, key))
    relay = await world.start_relay()
    await send(relay)
    await delivered_under_tls(world)
    assert (world.tlsa_name, "TLSA") in world.dns.queries
    assert all(world.dns.dnssec_asked)                            # every query asked for DNSSEC
    [ok] = world.results
    assert (ok.policy_type, ok.policy_domain, ok.result_type, ok.mx_host, ok.receiving_ip) == (
        "tlsa", DOMAIN, None, MX, LOOPBACK)
    assert ok.policy_strings == (tlsa(3, 1, 1, cert).text(),)


async def test_the_tlsa_answer_is_kept_for_its_ttl_not_asked_per_connection(world, tmp_path):
    cert, key = self_signed("not-the-mx-name.invalid")
    await world.start(records=[tlsa(3, 1, 1, cert)], tls_context=server_context(tmp_path, cert, key))
    relay = await world.start_relay()            # one message per connection
    for n in range(3):
        await send(relay, f"dane {n}")
        await eventually(lambda: len(world.mx.messages) == n + 1, what=f"delivery {n + 1}")
    assert mail_from_alice(world) == [True, True, True]
    assert world.dns.queries.count((world.tlsa_name, "TLSA")) == 1     # the answer's TTL is 300 s
    assert len(world.results) == 3 and all(r.result_type is None for r in world.results)
    # Past the TTL it is asked again.
    relay.app.resolver.clock = lambda: time.time() + 301
    await send(relay, "dane later")
    await eventually(lambda: len(world.mx.messages) == 4, what="delivery 4")
    assert world.dns.queries.count((world.tlsa_name, "TLSA")) == 2


async def test_a_mismatching_tlsa_defers_with_the_evidence(world, tmp_path):
    cert, key = self_signed(MX)
    rotated_away, _ = self_signed(MX)                              # the key the TLSA record still names
    stale = tlsa(3, 1, 1, rotated_away)
    await world.start(records=[stale], tls_context=server_context(tmp_path, cert, key))
    relay = await world.start_relay()
    await send(relay)
    error = await first_error(relay)
    assert (error["code"], error["kind"], error["subtype"], error["phase"]) == (
        "4.7.320", "tls.dane", "dane_tlsa_mismatch", "starttls")
    dane = error["dane"]
    assert (dane["mx_host"], dane["policy_domain"], dane["tlsa_name"]) == (MX, DOMAIN, world.tlsa_name)
    assert dane["tlsa"] == [stale.text()] and dane["result_type"] == "tlsa-invalid"
    assert dane["presented"]["spki_sha256"] == hashlib.sha256(spki(cert)).hexdigest()
    assert error["destination"]["ip"] == LOOPBACK
    assert hashlib.sha256(spki(cert)).hexdigest() in error["detail"]
    assert mail_from_alice(world) == [] and world.mx.messages == []   # nothing sent after the handshake
    assert [r.result_type for r in world.results] == ["tlsa-invalid"]
    shown = CliRunner().invoke(cli_main, ["errors", "tls.dane"]).output
    assert "DANE authentication failed" in shown and "dig +dnssec TLSA" in shown


async def test_a_dane_incident_tells_the_tlsa_failure_as_the_tls_report_does(world, tmp_path):
    """The incident text of a TLSA mismatch has the day's failures by result type, where the
    report goes, and the report's own failure-details row (MX, address, failure-reason-code)."""
    import json as _json
    cert, key = self_signed(MX)
    rotated_away, _ = self_signed(MX)
    await world.start(records=[tlsa(3, 1, 1, rotated_away)], tls_context=server_context(tmp_path, cert, key))
    world.dns.zone[(f"_smtp._tls.{DOMAIN}", "TXT")] = ['"v=TLSRPTv1; rua=mailto:tlsrpt@partner.test"']
    relay = await world.start_relay(alerts={"evaluate_interval": "0.1s", "open_after": "1s", "min_messages": 1},
                                    tls_reporting={"enabled": True, "organization_name": "Contoso Ltd",
                                                   "contact_info": "tls@contoso.test"})
    await send(relay)

    async def opened():
        found = (await relay.cli_json("incidents", "list"))["incidents"]
        return found[0] if found else None
    incident = await eventually(opened, what="the incident")
    assert (incident["code"], incident["subtype"]) == ("4.7.320", "dane_tlsa_mismatch")
    text = (await relay.cli("incidents", "show", str(incident["id"]))).output
    assert f"with tlsa-invalid; the daily TLS report goes to rua=mailto:tlsrpt@partner.test." in text
    [reported] = [r for r in (await relay.cli_json("tls-report", "show"))["domains"] if r["policy_domain"] == DOMAIN]
    [row] = [d for p in reported["policies"] if p["policy"]["policy-type"] == "tlsa" for d in p["failure-details"]]
    assert (row["result-type"], row["receiving-mx-hostname"], row["receiving-ip"]) == ("tlsa-invalid", MX, LOOPBACK)
    assert (f"tlsa-invalid at {MX} [{LOOPBACK}]: "
            f"{_json.dumps(row['failure-reason-code'], ensure_ascii=False)}") in text


async def test_no_starttls_with_tlsa_published_defers(world):
    cert, _ = self_signed(MX)
    await world.start(records=[tlsa(3, 1, 1, cert)], tls_context=None)
    relay = await world.start_relay()
    await send(relay)
    error = await first_error(relay)
    assert (error["subtype"], error["dane"]["result_type"]) == ("dane_starttls_not_offered", "starttls-not-supported")
    assert "nothing was sent in clear" in error["detail"]
    assert mail_from_alice(world) == []


@pytest.mark.parametrize("insecure", ["every answer", "the MX answer", "the A answer", "the TLSA answer"])
async def test_an_insecure_answer_delivers_as_before(world, tmp_path, insecure):
    # The TLSA record would forbid this certificate; without the AD bit it is not trusted (opportunistic TLS).
    cert, key = self_signed(MX)
    other, _ = self_signed(MX)
    names = {"every answer": set(), "the MX answer": {MX, "TLSA"}, "the A answer": {DOMAIN, "TLSA"},
             "the TLSA answer": {DOMAIN, MX}}[insecure]
    await world.start(records=[tlsa(3, 1, 1, other)], tls_context=server_context(tmp_path, cert, key), secure=set())
    world.dns.secure = {n if n != "TLSA" else world.tlsa_name for n in names}
    relay = await world.start_relay()
    await send(relay)
    await delivered_under_tls(world)
    assert world.results == []


async def test_dane_off_looks_up_no_tlsa(world, tmp_path):
    cert, key = self_signed(MX)
    other, _ = self_signed(MX)
    await world.start(records=[tlsa(3, 1, 1, other)], tls_context=server_context(tmp_path, cert, key))
    relay = await world.start_relay(delivery={"dane": "off"})
    await send(relay)
    await delivered_under_tls(world)
    assert (world.tlsa_name, "TLSA") not in world.dns.queries


# -- DANE-TA -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, delivers", [(MX, True), ("elsewhere.test", False)])
async def test_dane_ta_2_0_1_with_a_test_ca(world, tmp_path, name, delivers):
    await world.start(records=[tlsa(2, 0, 1, CA_CERT)], tls_context=ca_context(tmp_path, name))
    relay = await world.start_relay()
    await send(relay)
    if delivers:
        await delivered_under_tls(world)
        return
    error = await first_error(relay)
    assert (error["subtype"], error["dane"]["result_type"]) == ("dane_name_mismatch", "certificate-host-mismatch")
    assert f"not for {MX}" in error["detail"]
    assert mail_from_alice(world) == []


# -- an MX host that is an alias (RFC 7672 2.2.2, 2.2.3) ----------------------------------------

async def test_the_tlsa_records_of_an_alias_target_apply(world, tmp_path):
    cert, key = self_signed(ALIAS)
    stale, _ = self_signed(ALIAS)
    await world.start(alias_records=[tlsa(3, 1, 1, stale)], tls_context=server_context(tmp_path, cert, key))
    relay = await world.start_relay()
    await send(relay)
    error = await first_error(relay)
    assert (error["subtype"], error["dane"]["mx_host"]) == ("dane_tlsa_mismatch", MX)
    assert error["dane"]["tlsa_name"] == world.alias_tlsa_name
    assert mail_from_alice(world) == []
    assert (world.tlsa_name, "TLSA") not in world.dns.queries       # the target had records: the MX name is not asked


async def test_an_alias_target_that_matches_delivers(world, tmp_path):
    cert, key = self_signed("anything.invalid")
    await world.start(alias_records=[tlsa(3, 1, 1, cert)], tls_context=server_context(tmp_path, cert, key))
    relay = await world.start_relay()
    await send(relay)
    await delivered_under_tls(world)
    assert [(r.result_type, r.policy_strings) for r in world.results] == [(None, (tlsa(3, 1, 1, cert).text(),))]


async def test_without_records_at_the_target_the_mx_names_apply_and_dane_ta_takes_either_name(world, tmp_path):
    # The certificate is for the alias target only; the 2 0 1 record is at the MX name.
    await world.start(alias_records=[], records=[tlsa(2, 0, 1, CA_CERT)], tls_context=ca_context(tmp_path, ALIAS))
    relay = await world.start_relay()
    await send(relay)
    await delivered_under_tls(world)
    assert world.dns.queries.index((world.alias_tlsa_name, "TLSA")) < world.dns.queries.index((world.tlsa_name, "TLSA"))


@pytest.mark.parametrize("unsigned, mx_record, expected", [
    # The target's zone is not signed, the MX name's CNAME is: the MX name is the TLSA base
    # domain (RFC 7672 2.2.2), its records apply, the target's are never asked.
    ({ALIAS}, "other", "dane_tlsa_mismatch"),
    ({ALIAS}, "cert", "delivered under DANE"),
    # The MX name's own CNAME is not validated either: nothing trustworthy leads to any TLSA.
    ({ALIAS, MX}, "other", "delivered as before"),
])
async def test_an_alias_into_an_unsigned_zone_keeps_the_mx_name_as_its_tlsa_base_domain(
        world, tmp_path, unsigned, mx_record, expected):
    cert, key = self_signed(ALIAS)
    other, _ = self_signed(ALIAS)
    await world.start(alias_records=[tlsa(3, 1, 1, other)],
                      records=[tlsa(3, 1, 1, cert if mx_record == "cert" else other)],
                      tls_context=server_context(tmp_path, cert, key))
    world.dns.secure -= unsigned
    relay = await world.start_relay()
    await send(relay)
    if expected == "dane_tlsa_mismatch":
        error = await first_error(relay)
        assert (error["subtype"], error["dane"]["tlsa_name"], error["dane"]["mx_host"]) == (
            "dane_tlsa_mismatch", world.tlsa_name, MX)
        assert mail_from_alice(world) == []
    else:
        await delivered_under_tls(world)
    if expected == "delivered as before":
        assert world.results == [] and not [q for q in world.dns.queries if q[1] == "TLSA"]
    else:
        assert [r.result_type is None for r in world.results] == [expected == "delivered under DANE"]
        assert (MX, "CNAME") in world.dns.queries and (world.tlsa_name, "TLSA") in world.dns.queries
    assert (world.alias_tlsa_name, "TLSA") not in world.dns.queries


# -- PKIX usages, bogus answers, connectors ----------------------------------------------------------

async def test_pkix_usages_are_ignored_but_tls_is_still_required(world, tmp_path):
    cert, key = self_signed(MX)
    other, _ = self_signed(MX)
    # PKIX-EE/PKIX-TA records that match nothing: unusable for SMTP, so not checked ...
    await world.start(records=[tlsa(1, 1, 1, other), tlsa(0, 0, 1, other)],
                      tls_context=server_context(tmp_path, cert, key))
    relay = await world.start_relay()
    await send(relay)
    await delivered_under_tls(world)                              # ... but TLS was mandatory (RFC 7672 2.2)


async def test_pkix_only_records_without_starttls_defer(world):
    other, _ = self_signed(MX)
    await world.start(records=[tlsa(1, 1, 1, other)], tls_context=None)
    relay = await world.start_relay()
    await send(relay)
    assert (await first_error(relay))["subtype"] == "dane_starttls_not_offered"


async def test_a_bogus_tlsa_answer_defers_without_connecting(world, tmp_path):
    cert, key = self_signed(MX)
    await world.start(tlsa_entry="BOGUS", tls_context=server_context(tmp_path, cert, key))
    relay = await world.start_relay()
    await send(relay)
    error = await first_error(relay)
    assert (error["code"], error["subtype"], error["phase"]) == ("4.7.320", "dane_dnssec_bogus", "dns")
    assert error["dns"]["ede"]["code"] == 6 and "EDE 6" in error["detail"]
    assert error["dane"]["result_type"] == "dnssec-invalid"
    assert mail_from_alice(world) == []


async def test_a_connector_that_requires_dane_defers_without_tlsa(world, tmp_path):
    cert, key = self_signed(MX)
    await world.start(records=None, tls_context=server_context(tmp_path, cert, key))
    relay = await world.start_relay(connectors=[{"name": "partner", "type": "partner", "domains": [DOMAIN],
                                                 "dane": "required"}])
    await send(relay)
    error = await first_error(relay)
    assert (error["subtype"], error["dane"]["result_type"]) == ("dane_required", "dane-required")
    assert mail_from_alice(world) == []


async def test_a_connector_with_smart_hosts_checks_their_tlsa(world, tmp_path):
    cert, key = self_signed(MX)
    other, _ = self_signed(MX)
    await world.start(records=[tlsa(3, 1, 1, other)], tls_context=server_context(tmp_path, cert, key))
    relay = await world.start_relay(connectors=[{"name": "partner", "type": "partner", "domains": [DOMAIN],
                                                 "smart_hosts": [f"{MX}:{world.mx.port}"], "dane": "on"}])
    await send(relay)
    assert (await first_error(relay))["subtype"] == "dane_tlsa_mismatch"


async def test_connectors_leave_dane_off_by_default(world, tmp_path):
    cert, key = self_signed(MX)
    other, _ = self_signed(MX)
    await world.start(records=[tlsa(3, 1, 1, other)], tls_context=server_context(tmp_path, cert, key))
    relay = await world.start_relay(connectors=[{"name": "partner", "type": "partner", "domains": [DOMAIN]}])
    await send(relay)
    await delivered_under_tls(world)


# -- config -----------------------------------------------------------------------------------------

def test_config_defaults():
    config = parse_config({"connectors": [{"name": "p", "type": "partner", "domains": ["p.test"]}]})
    assert config.delivery.dane == "on" and config.connector("p").dane == "off"


def test_errors_explains_dane_under_4_7_320():
    both = CliRunner().invoke(cli_main, ["errors", "4.7.320"]).output
    assert "DANE authentication failed" in both and "MTA-STS policy not met" in both


# -- the incident's diagnosis reads the same facts ------------------------------------------------

from relaywatch.model import Failure  # noqa: E402
from relaywatch.watch.diagnosis import diagnose  # noqa: E402
from relaywatch.incident import Incident, IncidentKind  # noqa: E402


def _dane_incident(subtype, **dane):
    failure = Failure.from_dict({"code": "4.7.320", "kind": "tls.dane", "subtype": subtype,
                                 "dane": {**_EVIDENCE, **dane}, "destination": {"host": MX, "ip": LOOPBACK, "port": 25}})
    return Incident(kind=IncidentKind.BACKLOG, connector="internet", code="4.7.320", title="", opened_at=0.0,
                    latest_error=failure)


@pytest.mark.parametrize("subtype, dane, cause, words", [
    ("dane_tlsa_mismatch", {"presented": {"spki_sha256": "cd" * 32}}, "dane_key_rotated",
     f"publish 3 1 1 {'cd' * 32}); check with `dig +dnssec TLSA _25._tcp.{MX}`"),
    ("dane_name_mismatch", {"reason": "the certificate is not for mx.partner.test"}, "dane_ta_certificate",
     "the certificate is not for mx.partner.test"),
    ("dane_starttls_not_offered", {}, "dane_starttls_missing", "does not offer STARTTLS"),
    ("dane_dnssec_bogus", {}, "dnssec_bogus", "do not validate"),
    ("dane_required", {"reason": "no TLSA records are published"}, "dane_missing", "no TLSA records are published"),
])
def test_the_diagnosis_of_a_dane_failure(subtype, dane, cause, words):
    d = diagnose(_dane_incident(subtype, **dane), None)
    assert d.cause == cause and words in d.text, d.text
    assert d.facts["dane"]["mx_host"] == MX


async def test_connector_test_checks_tlsa_as_delivery_does(world, tmp_path):
    cert, key = self_signed(MX)
    await world.start(records=[tlsa(3, 1, 1, cert)], tls_context=server_context(tmp_path, cert, key))
    relay = await world.start_relay(connectors=[{"name": "partner", "type": "partner", "domains": [DOMAIN],
                                                 "dane": "on"}])
    probe = await relay.cli_json("connector", "test", "partner")
    steps = {s["step"]: s for s in probe["steps"]}
    assert steps["dane"]["ok"] and tlsa(3, 1, 1, cert).text() in steps["dane"]["detail"]
    assert f"verified: DANE, {tlsa(3, 1, 1, cert).text()}" in steps["certificate"]["detail"]
    other, _ = self_signed(MX)
    world.dns.zone[(world.tlsa_name, "TLSA")] = [tlsa(3, 1, 1, other).text()]
    probe = json.loads((await relay.cli("connector", "test", "partner", "--json", expect=1)).output)
    assert probe["ok"] is False and probe["error"]["subtype"] == "dane_tlsa_mismatch"


@pytest.mark.parametrize("nameserver, dane, warned", [
    ("192.0.2.53", "on", True),
    ("127.0.0.1", "on", False),
    ("192.0.2.53", "off", False),
])
def test_config_check_warns_of_a_resolver_across_the_network(tmp_path, nameserver, dane, warned):
    path = tmp_path / "c.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path / "d"}"\nlisten = ["127.0.0.1:0"]\n[http]\nlisten = "off"\n'
                    f'[dns]\nnameservers = ["{nameserver}"]\n[delivery]\ndane = "{dane}"\n')
    result = CliRunner().invoke(cli_main, ["config", "check", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert ("warning: dns.nameservers: DANE trusts the AD bit of 192.0.2.53" in result.output) is warned, result.output


async def test_unusable_records_keep_the_connectors_own_certificate_check(world, tmp_path):
    # PKIX-only records make TLS mandatory but authenticate nothing: the connector's tls_verify still holds.
    cert, key = self_signed(MX)
    await world.start(records=[tlsa(1, 1, 1, cert)], tls_context=server_context(tmp_path, cert, key))
    relay = await world.start_relay(connectors=[{"name": "partner", "type": "partner", "domains": [DOMAIN],
                                                 "dane": "on", "tls": "required", "tls_verify": "ca_and_name"}])
    await send(relay)
    error = await first_error(relay)
    assert (error["kind"], error["subtype"]) == ("tls.certificate_invalid", "self_signed")
    assert mail_from_alice(world) == []
