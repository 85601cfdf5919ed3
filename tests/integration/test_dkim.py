"""DKIM signing ([[dkim]], relaywatch/receive/dkim.py and dkim_sign.py).

End to end: keys made by ``relaywatch dkim keygen``, their TXT records served by a loopback DNS
server, a relay that signs, a real destination (aiosmtpd); what arrives is checked by dkimpy's
verifier (``dkim.verify``), which looks the key up in that DNS server.  relaywatch computes the
body hash itself and signs with cryptography (OpenSSL); dkimpy verifies with its own body
canonicalization, its own RSA and PyNaCl (libsodium) for Ed25519.  The header hash is dkimpy's
``hash_headers`` on both sides, so where Perl's Mail::DKIM is installed (Debian:
libmail-dkim-perl) it verifies the RSA signatures too: a verifier that shares no code at all.
"""

import asyncio
import email
import email.policy
import hashlib
import os
import random
import re
import smtplib
from pathlib import Path

import dkim
import dns.resolver
import pytest
from click.testing import CliRunner
from dkim.canonicalization import Relaxed, Simple

from helpers import LOOPBACK, DnsServer, Sink, eventually, to_toml
from relaywatch.cli import main
from relaywatch.config import load_config, parse_config
from relaywatch.errors import ConfigError
from relaywatch.receive import dkim as signing
from relaywatch.receive import dkim_sign
from tests.integration.test_outbound_encoding import SevenBitHandler

UNTRUSTED = "127.0.0.2"
SENDER = "alice@contoso.test"


# -- keys, DNS, verification ---------------------------------------------------------------------

def keygen(tmp_path: Path, domain: str, algorithm: str, selector: str, *extra: str) -> tuple[str, str, str]:
    """`relaywatch dkim keygen`: (record name, TXT rdata as printed, key file)."""
    result = CliRunner().invoke(main, ["dkim", "keygen", domain, "--algorithm", algorithm, "--selector", selector,
                                       "--out", str(tmp_path / "keys"), *extra])
    assert result.exit_code == 0, result.output
    m = re.search(r"^(\S+)\. IN TXT (.+)$", result.output, re.M)
    key_file = re.search(r'^key_file = "(.+)"$', result.output, re.M).group(1)
    return m.group(1), m.group(2), key_file


@pytest.fixture
async def keys(tmp_path):
    """An RSA and an Ed25519 key for contoso.test, published in a loopback DNS server."""
    zone, entries = {}, []
    for algorithm, selector in (("rsa", "rsa-1"), ("ed25519", "ed-1")):
        name, rdata, key_file = keygen(tmp_path, "contoso.test", algorithm, selector)
        zone[(name, "TXT")] = [rdata]
        entries.append({"domain": "contoso.test", "selector": selector, "key_file": key_file})
    server = await DnsServer(zone).start()
    yield server, entries
    server.stop()


def verify_all(message: bytes, dns_port: int) -> list[tuple[bytes, bool]]:
    """(a=, verified) for each DKIM-Signature, the public keys looked up in the loopback DNS server.
    Blocking: call it in a thread (the DNS server runs on the test's loop)."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [LOOPBACK]
    resolver.port = dns_port

    def get_txt(name, timeout=5):
        answer = resolver.resolve(name.decode() if isinstance(name, bytes) else name, "TXT", lifetime=timeout)
        return b"".join(answer[0].strings)
    d = dkim.DKIM(message)
    count = len([1 for k, _ in d.headers if k.lower() == b"dkim-signature"])
    out = []
    for i in range(count):
        ok = d.verify(idx=i, dnsfunc=get_txt)
        out.append((d.signature_fields.get(b"a"), ok))
    return out


# Perl's Mail::DKIM, keys from the loopback DNS server; prints "ALGORITHM RESULT DETAIL" per signature.
PERL_VERIFIER = r"""
use strict; use warnings;
use Mail::DKIM::Verifier; use Mail::DKIM::DNS; use Net::DNS::Resolver;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $ARGV[0],
                                                  udp_timeout => 5, tcp_timeout => 5));
my $v = Mail::DKIM::Verifier->new();
binmode STDIN; local $/; $v->PRINT(scalar <STDIN>); $v->CLOSE;
print $_->algorithm, " ", $_->result, " ", ($_->result_detail // ""), "\n" for $v->signatures;
"""


def perl_verify(message: bytes, dns_port: int) -> list[tuple[str, str]] | None:
    """(a=, result) per signature by Mail::DKIM, or None where it is not installed.  Blocking."""
    import shutil
    import subprocess
    if not shutil.which("perl") or subprocess.run(["perl", "-MMail::DKIM::Verifier", "-e", "1"],
                                                  capture_output=True).returncode:
        return None
    out = subprocess.run(["perl", "-e", PERL_VERIFIER, str(dns_port)], input=message, capture_output=True,
                         timeout=30, check=True).stdout.decode()
    return [tuple(line.split(" ")[:2]) for line in out.splitlines()]


async def assert_both_verify(message: bytes, dns_port: int) -> None:
    """Our RSA and Ed25519 signatures verify with dkimpy, and the RSA one with Mail::DKIM where it is installed
    (Mail::DKIM 1.2023 knows no ed25519-sha256 and says "invalid" for it)."""
    assert await asyncio.to_thread(verify_all, message, dns_port) == [(b"rsa-sha256", True), (b"ed25519-sha256", True)]
    perl = await asyncio.to_thread(perl_verify, message, dns_port)
    assert perl is None or perl[0] == ("rsa-sha256", "pass"), perl


def mail(subject: str, body: bytes = b"Hello Bob,\r\n\r\nthe report is attached.\r\n", sender: str = SENDER,
         extra: bytes = b"") -> bytes:
    return (f"From: Alice <{sender}>\r\nTo: bob@fabrikam.test\r\nSubject: {subject}\r\n"
            f"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{abs(hash(subject))}@client.test>\r\n"
            ).encode() + extra + b"\r\n" + body


def connector(port: int) -> list[dict]:
    return [{"name": "fabrikam", "type": "partner", "domains": ["fabrikam.test"],
             "smart_hosts": [f"{LOOPBACK}:{port}"], "tls": "none"}]


async def send_from(port: int, source: str, sender: str, rcpt: str, content: bytes) -> None:
    def submit():
        with smtplib.SMTP(LOOPBACK, port, timeout=30, source_address=(source, 0)) as client:
            client.sendmail(sender, [rcpt], content)
    await asyncio.to_thread(submit)


async def delivered(sink, count: int = 1) -> bytes:
    await eventually(lambda: len(sink.messages) >= count, timeout=20, what="delivery to the destination")
    return sink.messages[count - 1].content


def signed_by(message: bytes) -> list[tuple[bytes, bytes]]:
    """(d=, s=) of each DKIM-Signature."""
    from dkim.util import parse_tag_value
    fields = dkim.DKIM(message).headers
    return [(t[b"d"], t[b"s"]) for t in (parse_tag_value(v.replace(b"\r\n", b"")) for k, v in fields
                                         if k.lower() == b"dkim-signature")]


def signed_headers(message: bytes) -> list[bytes]:
    """The h= lists of all DKIM-Signatures, one after the other."""
    from dkim.util import parse_tag_value
    fields = [parse_tag_value(v.replace(b"\r\n", b"")) for k, v in dkim.DKIM(message).headers
              if k.lower() == b"dkim-signature"]
    return [h.strip() for t in fields for h in t[b"h"].split(b":")]


def header_names(message: bytes) -> list[str]:
    head = message.split(b"\r\n\r\n", 1)[0]
    return [line.split(b":", 1)[0].decode() for line in head.split(b"\r\n") if line[:1] not in (b" ", b"\t")]


# -- end to end ----------------------------------------------------------------------------------

async def test_mail_from_a_trusted_client_is_signed_rsa_and_ed25519_and_verifies_after_delivery(
        relay_factory, sink, keys):
    dns_server, entries = keys
    relay = await relay_factory(dkim=entries, connectors=connector(sink.port))
    await relay.send(SENDER, ["bob@fabrikam.test"], mail("quarterly report"))
    got = await delivered(sink)
    # The signatures come first, above our Received header; one each, nothing else changed.
    assert header_names(got)[:3] == ["DKIM-Signature", "DKIM-Signature", "Received"]
    assert got.endswith(mail("quarterly report"))
    assert b"d=contoso.test;" in got and b"s=rsa-1;" in got and b"s=ed-1;" in got
    await assert_both_verify(got, dns_server.port)
    # The default header set, with From oversigned (one more than present: none can be added).
    assert signed_headers(got) == [b"from", b"to", b"subject", b"date", b"message-id", b"from"] * 2


@pytest.mark.parametrize("canonicalization", ["relaxed/relaxed", "simple/simple", "relaxed/simple", "simple/relaxed"])
async def test_every_canonicalization_verifies_after_delivery_and_with_a_second_verifier(
        relay_factory, sink, tmp_path, canonicalization):
    name, rdata, key_file = keygen(tmp_path, "contoso.test", "rsa", "c1")
    dns_server = await DnsServer({(name, "TXT"): [rdata]}).start()
    try:
        relay = await relay_factory(connectors=connector(sink.port), dkim=[
            {"domain": "contoso.test", "selector": "c1", "key_file": key_file, "canonicalization": canonicalization}])
        body = b"  leading, trailing \t \r\ninner   \t  runs\r\n\r\n \r\n\t\r\n\r\n"   # WSP and empty lines at the end
        folded = b"X-Note: folded\r\n \t across  lines\r\nCc:  carol@fabrikam.test \r\n"
        await relay.send(SENDER, ["bob@fabrikam.test"], mail("canon  " + canonicalization, body, extra=folded))
        got = await delivered(sink)
        assert got.endswith(body)
        assert f"c={canonicalization};".encode() in got
        assert await asyncio.to_thread(verify_all, got, dns_server.port) == [(b"rsa-sha256", True)]
        perl = await asyncio.to_thread(perl_verify, got, dns_server.port)
        assert perl in (None, [("rsa-sha256", "pass")]), perl
    finally:
        dns_server.stop()


async def test_mail_from_an_untrusted_client_is_never_signed(relay_factory, keys):
    # To a local mailbox (an accepted domain, so an outsider may send it), From: our own domain:
    # signing that would put our signature on a forgery.  The same message from a trusted
    # address is signed, so it is the client that decides.
    dns_server, entries = keys
    relay = await relay_factory(server={"trusted_networks": ["127.0.0.1/32"]}, dkim=entries)
    content = mail("from outside", extra=b"")
    await send_from(relay.port, UNTRUSTED, "someone@example.org", SENDER, content)
    await send_from(relay.port, LOOPBACK, "someone@example.org", SENDER, content)
    await eventually(lambda: len(relay.maildir(SENDER)) == 2, what="both messages in the mailbox")
    by_client = {re.search(rb"\(\[(127\.0\.0\.\d)\]\)", m).group(1): m for m in relay.maildir(SENDER)}
    assert b"DKIM-Signature" not in by_client[UNTRUSTED.encode()]
    assert header_names(by_client[LOOPBACK.encode()]).count("DKIM-Signature") == 2


async def test_a_spooled_large_message_is_signed_and_verifies(relay_factory, sink, keys):
    dns_server, entries = keys
    relay = await relay_factory(dkim=entries, connectors=connector(sink.port))
    text = "".join(f"line {i:05d}: trailing space and  double  spaces  \r\n" for i in range(6000))
    body = text.encode() + b"\r\n\r\n\r\n"       # ~300 KB, over the 128 KB inline limit; empty lines at the end
    assert len(body) > 2 * 128 * 1024
    await relay.send(SENDER, ["bob@fabrikam.test"], mail("big", body))
    got = await delivered(sink)
    assert got.endswith(body)
    await assert_both_verify(got, dns_server.port)


async def test_a_2000_octet_line_is_signed_as_it_will_be_sent_and_verifies_after_delivery(
        relay_factory, sink, keys):
    # aiosmtpd refuses lines over 1,000 octets: the message must be line-limited on the way, and
    # a change after signing would break the body hash.  relaywatch fits it before signing.
    dns_server, entries = keys
    relay = await relay_factory(dkim=entries, connectors=connector(sink.port))
    line = "<p>" + "x" * 1993 + "</p>"
    assert len(line) == 2000
    await relay.send(SENDER, ["bob@fabrikam.test"], mail("one long line", f"{line}\r\nthe next line\r\n".encode()))
    got = await delivered(sink)
    assert max(len(x) for x in got.split(b"\r\n")) <= 998
    assert email.message_from_bytes(got, policy=email.policy.default).get_content() == f"{line}\r\nthe next line\r\n"
    await assert_both_verify(got, dns_server.port)


async def test_an_8bit_message_is_signed_7bit_and_verifies_after_a_7bit_destination(relay_factory, keys):
    dns_server, entries = keys
    sink = await Sink(SevenBitHandler()).start()
    try:
        relay = await relay_factory(dkim=entries, connectors=connector(sink.port))
        text = "Gr\u00fc\u00dfe aus K\u00f6ln \u2014 \u00e9t\u00e9 \u20ac\r\n" * 20
        content = mail("umlauts", text.encode(), extra=b"MIME-Version: 1.0\r\nContent-Type: text/plain; "
                                                         b"charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n")
        await relay.send(SENDER, ["bob@fabrikam.test"], content)
        got = await delivered(sink)
        assert all(seen.isascii() for seen in sink.handler.seen)
        assert email.message_from_bytes(got, policy=email.policy.default).get_content() == text
        await assert_both_verify(got, dns_server.port)
    finally:
        await sink.stop()


async def test_a_message_we_signed_already_is_not_signed_again(relay_factory, sink, keys):
    # A message that passes through relaywatch twice (a second hop, a resend) keeps one signature.
    dns_server, entries = keys
    relay = await relay_factory(dkim=entries, connectors=connector(sink.port))
    await relay.send(SENDER, ["bob@fabrikam.test"], mail("twice"))
    first = await delivered(sink)
    await relay.send(SENDER, ["bob@fabrikam.test"], first)
    second = await delivered(sink, 2)
    assert header_names(second)[:4] == ["Received", "DKIM-Signature", "DKIM-Signature", "Received"]
    await assert_both_verify(second, dns_server.port)


async def test_only_the_configured_domain_is_signed_and_subdomains_only_when_asked(relay_factory, sink, tmp_path):
    name, rdata, key_file = keygen(tmp_path, "contoso.test", "ed25519", "s1")
    other_name, other_rdata, other_key = keygen(tmp_path, "sales.contoso.test", "ed25519", "s2")
    relay = await relay_factory(connectors=connector(sink.port), dkim=[
        {"domain": "contoso.test", "selector": "s1", "key_file": key_file, "sub_domains": True},
        {"domain": "sales.contoso.test", "selector": "s2", "key_file": other_key}])
    for sender in ("bob@fabrikam.test", "eve@eu.contoso.test", "carol@sales.contoso.test", "x@notcontoso.test"):
        await relay.send(sender, ["bob@fabrikam.test"], mail(sender, sender=sender))
    await delivered(sink, 4)
    signed = {m.sender: signed_by(m.content) for m in sink.messages}
    assert signed == {"bob@fabrikam.test": [], "x@notcontoso.test": [],
                      "eve@eu.contoso.test": [(b"contoso.test", b"s1")],               # the parent, sub_domains
                      "carol@sales.contoso.test": [(b"sales.contoso.test", b"s2")]}    # the closest entry wins


# -- the pure parts ------------------------------------------------------------------------------

def test_the_streaming_body_hash_is_dkimpys_canonicalization_for_any_chunking():
    rng = random.Random(6376)
    alphabet = [b"a", b"b", b" ", b"\t", b"\r\n", b"\r\n\r\n", b"  \r\n", b"x y", b" \t ", b"\r", b"\n"]
    for _ in range(3000):
        body = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        for relaxed, canon in ((True, Relaxed), (False, Simple)):
            h = dkim_sign.BodyHash(relaxed)
            i = 0
            while i < len(body):
                j = i + rng.randint(1, 7)
                h.feed(body[i:j])
                i = j
            assert h.digest() == hashlib.sha256(canon.canonicalize_body(body)).digest(), (relaxed, body)


def _entries(tmp_path, **keys):
    pem, _ = signing.generate_key(signing.ED25519_SHA256)
    path = tmp_path / "k.key"
    if not path.exists():
        signing.write_key_file(path, pem)
    return parse_config({"dkim": [{"domain": "contoso.test", "selector": "s", "key_file": str(path), **keys}]}).dkim


def test_a_spooled_message_is_signed_exactly_as_the_same_message_in_memory(tmp_path):
    import io
    entries = _entries(tmp_path)
    for body in (b"short\r\n", b"word  \r\n" * 300_000, b"x" * 2500 + b"\r\n", "caf\u00e9\r\n".encode() * 10):
        message = b"Received: by relay.test\r\n" + mail("same", body)
        out = []
        by = dkim_sign.sign_file(entries, io.BytesIO(message), out.append, now=1_800_000_000)
        assert by == ["contoso.test/s"]
        assert b"".join(out) == dkim_sign.sign_message(entries, message, now=1_800_000_000)[0]


@pytest.mark.parametrize("from_field, signed", [
    (b"alice@contoso.test", True),
    (b"Alice Example <Alice@CONTOSO.test>", True),
    (b'"Smith, Alice" <alice@contoso.test>', True),
    (b"=?utf-8?q?Alic=C3=A9?=\r\n <alice@contoso.test>", True),
    (b"alice@fabrikam.test", False),
    (b"alice@contoso.test, bob@contoso.test", False),    # several authors: no single domain to align
    (b"undisclosed", False),
])
def test_which_from_fields_are_signed(tmp_path, from_field, signed):
    entries = _entries(tmp_path)
    message = b"From: " + from_field + b"\r\nSubject: x\r\n\r\nbody\r\n"
    assert (dkim_sign.sign_message(entries, message) is not None) is signed


def test_two_from_fields_and_an_unparsable_header_section_are_not_signed(tmp_path):
    entries = _entries(tmp_path)
    assert dkim_sign.sign_message(entries, b"From: a@contoso.test\r\nFrom: b@contoso.test\r\n\r\nx\r\n") is None
    assert dkim_sign.sign_message(entries, b"From: a@contoso.test\r\nnot a header\r\n\r\nx\r\n") is None


def test_the_signed_header_list_has_every_instance_and_one_more_from(tmp_path):
    entries = _entries(tmp_path, headers=["From", "To", "Subject", "X-Custom"], oversign_headers=["from", "subject"])
    message = b"From: a@contoso.test\r\nTo: b@x.test\r\nTo: c@x.test\r\nX-Other: 1\r\nX-Custom: 2\r\n\r\nbody\r\n"
    signed, _ = dkim_sign.sign_message(entries, message)
    assert re.search(rb"h=([^;]+);", signed.replace(b"\r\n ", b" ")).group(1).split(b" : ") == [
        b"from", b"to", b"to", b"x-custom", b"from", b"subject"]


# -- keygen --------------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm, bits, key_bytes", [("rsa", "2048", 294), ("rsa", "4096", 550), ("ed25519", None, 32)])
def test_keygen_writes_a_private_key_only_its_owner_can_read_and_prints_the_txt_record(tmp_path, algorithm, bits,
                                                                                          key_bytes):
    import base64
    extra = ("--bits", bits) if bits else ()
    name, rdata, key_file = keygen(tmp_path, "contoso.test", algorithm, "sel", *extra)
    assert name == "sel._domainkey.contoso.test"
    assert os.stat(key_file).st_mode & 0o777 == 0o600
    strings = re.findall(r'"([^"]*)"', rdata)
    assert rdata == " ".join(f'"{s}"' for s in strings) and all(len(s) <= 255 for s in strings)
    record = "".join(strings)
    assert record.startswith(f"v=DKIM1; k={algorithm}; p=")
    assert len(base64.b64decode(record.split("p=")[1])) == key_bytes
    entry = parse_config({"dkim": [{"domain": "contoso.test", "selector": "sel", "key_file": key_file}]}).dkim[0]
    assert entry.key.public_record() == record
    # A second key under the same selector would replace the published one: refused.
    again = CliRunner().invoke(main, ["dkim", "keygen", "contoso.test", "--algorithm", algorithm, "--selector", "sel",
                                      "--out", str(tmp_path / "keys")])
    assert again.exit_code == 1 and "exists already; choose another --selector" in again.output


# -- config ---------------------------------------------------------------------------------------

RSA_512 = """\
-----BEGIN PRIVATE KEY-----
MIIBVQIBADANBgkqhkiG9w0BAQEFAASCAT8wggE7AgEAAkEAzJTgvve4fRVF8YK1
gJ0xXgTWBZ8G5ed4D+Yx5AHxHppO58vb9c0deomNiNQruWFqqRs/fi/LwcIh6mP5
qbaQjwIDAQABAkEApBqANW9MY7mew13P7f0pznsemp+3zs9ftZE3T+hm294GkTan
yC4Mb614ChmIAh7aTSOU47Rh6/gsAUKnvNE2cQIhAP0GAZfSm5bLoXQSOCSRZ7yK
Eg2LqNLR43wiaFowij/7AiEAzvz8fMSa87oRhcH8GMlBaKPzNBL0Brdt8YR51zRo
iX0CIEkdhTRUHbXTnhImeabHhcyLsW/MnbpeAHiMkM8PG8QlAiBZZZhjBsLpuxYw
T+zig6GVYSH7/qeYcwawBghdcwwnPQIhAJj4NrqM1uueRHo//owhBXaz8lS6u6SN
2QKwOHjAOBWX
-----END PRIVATE KEY-----
"""


@pytest.fixture
def key_files(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    files = {}

    def write(name, private):
        path = tmp_path / name
        path.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        path.chmod(0o600)
        files[name] = str(path)
    write("rsa1024_key", rsa.generate_private_key(65537, 1024))
    (tmp_path / "rsa512_key").write_text(RSA_512)       # cryptography no longer makes keys this short
    files["rsa512_key"] = str(tmp_path / "rsa512_key")
    write("ec_key", ec.generate_private_key(ec.SECP256R1()))
    locked = rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"))
    (tmp_path / "encrypted_key").write_bytes(locked)
    files["encrypted_key"] = str(tmp_path / "encrypted_key")
    pem, _ = signing.generate_key(signing.ED25519_SHA256)
    (tmp_path / "ed_key").write_bytes(pem)
    (tmp_path / "ed_key").chmod(0o600)
    files["ed_key"] = str(tmp_path / "ed_key")
    (tmp_path / "garbage_key").write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    files["garbage_key"] = str(tmp_path / "garbage_key")
    (tmp_path / "cert.pem").write_text("just text\n")
    files["text"] = str(tmp_path / "cert.pem")
    return files


@pytest.mark.parametrize("keys, expected", [
    ({"key_file": "missing.key"}, "dkim[0].key_file: cannot read {dir}/missing.key: No such file or directory"),
    ({"key_file": "{text}"}, "dkim[0].key_file: {text} holds no PEM private key (no -----BEGIN line)"),
    ({"key_file": "{garbage_key}"}, "dkim[0].key_file: {garbage_key} does not parse as a PEM private key"),
    ({"key_file": "{encrypted_key}"}, "dkim[0].key_file: {encrypted_key}: the key is encrypted; relaywatch needs it"),
    ({"key_file": "{ec_key}"}, "dkim[0].key_file: {ec_key} is an elliptic-curve (secp256r1) key; DKIM signs with RSA"),
    ({"key_file": "{rsa512_key}"}, "dkim[0].key_file: {rsa512_key} is a 512-bit RSA key; DKIM needs at least 1024"),
    ({"algorithm": "rsa-sha256"}, "dkim[0].algorithm: 'rsa-sha256', but {ed_key} is a key for ed25519-sha256"),
    ({"algorithm": "ed448"}, "dkim[0].algorithm: must be one of rsa-sha256, ed25519-sha256 (got 'ed448')"),
    ({"headers": ["subject", "to"]}, "dkim[0].headers: must include \"from\""),
    ({"headers": ["from", "Received"]}, "dkim[0].headers: 'received' must not be signed"),
    ({"oversign_headers": ["bad header"]}, "dkim[0].oversign_headers: 'bad header' is not a header field name"),
    ({"canonicalization": "relaxed"}, "dkim[0].canonicalization: must be one of relaxed/relaxed, relaxed/simple"),
    ({"selector": "not a selector"}, "dkim[0].selector: 'not a selector' is not a selector"),
    ({"domain": "*.contoso.test"}, "dkim[0].domain: '*.contoso.test': write the domain itself and set sub_domains"),
    ({"sub_domain": True}, "dkim[0].sub_domain: unknown key; did you mean 'sub_domains'?"),
    ({"selector": None}, "dkim[0].selector: missing"),
])
def test_config_check_names_the_dkim_key_at_fault(tmp_path, key_files, keys, expected):
    entry = {"domain": "contoso.test", "selector": "s", "key_file": key_files["ed_key"]}
    entry.update({k: v for k, v in keys.items() if v is not None})
    for k in [k for k, v in keys.items() if v is None]:
        del entry[k]
    fill = {**key_files, "dir": str(tmp_path)}
    entry = {k: v.format(**fill) if isinstance(v, str) else v for k, v in entry.items()}
    path = tmp_path / "relaywatch.toml"
    path.write_text(to_toml({"server": {"data_dir": str(tmp_path / "data"), "listen": [f"{LOOPBACK}:0"]},
                             "dkim": [entry]}))
    result = CliRunner().invoke(main, ["config", "check", "-c", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"relaywatch: {path}: {expected.format(**fill)}"), result.output


def test_a_second_entry_with_the_same_selector_is_refused(tmp_path, key_files):
    entry = {"domain": "contoso.test", "selector": "s", "key_file": key_files["ed_key"]}
    with pytest.raises(ConfigError) as exc:
        parse_config({"dkim": [entry, dict(entry)]})
    assert exc.value.problems == ["dkim[1].selector: contoso.test already has an entry with selector 's'"]


def test_config_check_warns_about_a_short_rsa_key_and_a_key_others_can_read(tmp_path, key_files):
    os.chmod(key_files["ed_key"], 0o644)
    path = tmp_path / "relaywatch.toml"
    path.write_text(to_toml({"server": {"data_dir": str(tmp_path / "data"), "listen": [f"{LOOPBACK}:0"]}, "dkim": [
        {"domain": "contoso.test", "selector": "old", "key_file": key_files["rsa1024_key"]},
        {"domain": "contoso.test", "selector": "ed", "key_file": key_files["ed_key"]}]}))
    result = CliRunner().invoke(main, ["config", "check", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert (f"warning: dkim[0].key_file: {key_files['rsa1024_key']} is a 1024-bit RSA key; use 2048 bits"
            in result.output)
    assert f"warning: dkim[1].key_file: {key_files['ed_key']} can be read by any user on this machine" in result.output
    shown = CliRunner().invoke(main, ["config", "show", "-c", str(path)])
    assert (f"dkim contoso.test: s=old rsa-sha256 (1024 bits), c=relaxed/relaxed, key {key_files['rsa1024_key']}"
            in shown.output), shown.output
    config = load_config(path)
    assert [(d.algorithm, d.key.bits, d.canonicalization, d.headers[0], d.oversign_headers) for d in config.dkim] == [
        ("rsa-sha256", 1024, "relaxed/relaxed", "from", ("from",)),
        ("ed25519-sha256", 256, "relaxed/relaxed", "from", ("from",))]
