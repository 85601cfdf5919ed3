"""SMTPUTF8 (RFC 6531/6532/6533): UTF-8 local parts and IDN domains, end to end.

Tables for the pure parts (relaywatch.idn, route.normalize, the client's MAIL
line); real sockets for the rest: smtplib and aiosmtplib (a second, independent
client) with SMTPUTF8 in, aiosmtpd out
(with and without SMTPUTF8), the loopback DNS server for the MX route.  Every
socket test runs on asyncio's loop and on uvloop."""

import asyncio
import email
import smtplib
from email import policy

import pytest

from helpers import LOOPBACK, DnsServer, Sink, SinkHandler, eventually, free_port, message
from relaywatch.classify.catalog import CATALOG
from relaywatch.errors import LocalProtocolError
from relaywatch.idn import BadDomain, address_to_unicode, needs_smtputf8, to_ascii, to_unicode
from relaywatch.route import Refusal, normalize, normalize_sender
from relaywatch.smtpclient.conversation import ClientConversation
from relaywatch.smtpclient.events import Transaction
from relaywatch.smtpclient.protocol import mail_from, rcpt_to

pytestmark = pytest.mark.both_loops

GREEK = "δοκιμή@παράδειγμα.test"
A_LABEL = "xn--hxajbheg2az3al.test"          # παράδειγμα.test


# -- tables -------------------------------------------------------------------------------

@pytest.mark.parametrize("written, stored", [
    ("δοκιμή@παράδειγμα.test", f"δοκιμή@{A_LABEL}"),
    ("δοκιμή@ΠΑΡΆΔΕΙΓΜΑ.TEST.", f"δοκιμή@{A_LABEL}"),          # case and the root dot: UTS #46 lower-cases
    (f"δοκιμή@{A_LABEL.upper()}", f"δοκιμή@{A_LABEL}"),        # A-labels as written, in any case
    ("Δοκιμή@παράδειγμα.test", f"Δοκιμή@{A_LABEL}"),           # the local part is never touched
    ("user@παράδειγμα。test", f"user@{A_LABEL}"),               # UTS #46: the ideographic full stop is a dot
    ("user@faß.de", "user@xn--fa-hia.de"),                      # IDNA2008: ß is kept, not mapped to ss
    ("user@bücher.example", "user@xn--bcher-kva.example"),
    ("user@sub.παράδειγμα.test", f"user@sub.{A_LABEL}"),       # ASCII labels stay as they are
    ("user@_dmarc.contoso.test", "user@_dmarc.contoso.test"),  # ... even where IDNA would refuse them
    ("alice@Contoso.Test", "alice@contoso.test"),
])
def test_domains_are_kept_as_a_labels(written, stored):
    assert normalize(written) == stored


@pytest.mark.parametrize("address", [
    "user@xn--zz.test",            # an A-label that is not Punycode of a valid U-label
    "user@☃.test",                 # a symbol IDNA2008 disallows (IDNA2003 allowed it)
    "user@a\u200db.test",          # a joiner outside the context that permits it (RFC 5892 A.2)
    "user@παρ-.test",              # a U-label ending in a hyphen
    "user@xn--hxajbheg2az3al-.test",
])
def test_invalid_idn_is_refused_at_rcpt_with_553_5_1_3(address):
    refusal = normalize(address)
    assert isinstance(refusal, Refusal)
    assert refusal.reply.startswith("553 5.1.3 ") and refusal.detail == "bad IDN domain"
    assert refusal.reply.isascii()          # an SMTP reply: the character is named, not sent


def test_an_invalid_sender_domain_is_kept_as_given():
    assert normalize_sender("a@☃.test") == "a@☃.test"
    assert normalize_sender("δοκιμή@παράδειγμα.test") == f"δοκιμή@{A_LABEL}"


@pytest.mark.parametrize("a_labels, u_labels", [
    (A_LABEL, "παράδειγμα.test"),
    ("xn--fa-hia.de", "faß.de"),
    ("contoso.test", "contoso.test"),
    ("xn--zz.test", "xn--zz.test"),    # does not decode: shown as it is, not guessed
])
def test_domains_are_shown_to_people_as_u_labels(a_labels, u_labels):
    assert to_unicode(a_labels) == u_labels
    if a_labels != "xn--zz.test":
        assert to_ascii(u_labels) == a_labels


def test_bad_domain_messages_are_ascii():
    with pytest.raises(BadDomain, match="U\\+2603"):
        to_ascii("☃.test")


def test_only_a_utf8_local_part_needs_smtputf8():
    assert not needs_smtputf8("a@contoso.test", f"b@{A_LABEL}")   # an IDN alone goes as A-labels anywhere
    assert needs_smtputf8("a@contoso.test", f"δοκιμή@{A_LABEL}")
    assert needs_smtputf8("", f"δοκιμή@{A_LABEL}")
    assert address_to_unicode(f"δοκιμή@{A_LABEL}") == GREEK


def test_the_client_sends_smtputf8_and_u_labels_only_in_an_smtputf8_transaction():
    assert mail_from(f"δοκιμή@{A_LABEL}", 10, True, smtputf8=True) == \
        f"MAIL FROM:<{GREEK}> SIZE=10 BODY=8BITMIME SMTPUTF8\r\n".encode()
    assert rcpt_to(f"δοκιμή@{A_LABEL}", smtputf8=True) == f"RCPT TO:<{GREEK}>\r\n".encode()
    assert rcpt_to(f"b@{A_LABEL}") == f"RCPT TO:<b@{A_LABEL}>\r\n".encode()
    with pytest.raises(ValueError, match="without SMTPUTF8"):
        rcpt_to(f"δοκιμή@{A_LABEL}")


def _ready(extensions: bytes) -> ClientConversation:
    conv = ClientConversation("relay.test", "none")
    conv.receive_data(b"220 mx.test ESMTP\r\n")
    conv.next_event()
    conv.receive_data(extensions)
    while type(conv.next_event()).__name__ != "Ready":
        pass
    conv.data_to_send()     # the EHLO
    return conv


def test_the_client_conversation_refuses_smtputf8_to_a_server_without_it():
    tx = Transaction("a@contoso.test", [f"δοκιμή@{A_LABEL}"], 10, smtputf8=True)
    with_it = _ready(b"250-mx.test\r\n250-PIPELINING\r\n250 SMTPUTF8\r\n")
    assert with_it.send(tx).startswith(f"MAIL FROM:<a@contoso.test> SMTPUTF8\r\nRCPT TO:<{GREEK}>".encode())
    without = _ready(b"250-mx.test\r\n250 PIPELINING\r\n")
    with pytest.raises(LocalProtocolError):
        without.send(tx)


def test_the_catalog_explains_5_6_7():
    entry = CATALOG["smtputf8.not_offered"]
    assert (entry.code, entry.smtp_code, entry.permanent) == ("5.6.7", 553, True)


# -- over sockets -------------------------------------------------------------------------

def connector(port: int, domain: str):
    return [{"name": "greek", "type": "partner", "domains": [domain],
             "smart_hosts": [f"{LOOPBACK}:{port}"], "tls": "none"}]


@pytest.mark.parametrize("configured", ["παράδειγμα.test", A_LABEL, "ΠΑΡΆΔΕΙΓΜΑ.test"])
async def test_a_utf8_address_reaches_a_destination_that_offers_smtputf8_exactly(relay_factory, configured):
    sink = await Sink(smtputf8=True).start()
    try:
        relay = await relay_factory(connectors=connector(sink.port, configured))
        await relay.send("alice@contoso.test", [GREEK], message(), mail_options=["SMTPUTF8"])
        await eventually(lambda: sink.messages, what="the delivery")
    finally:
        await sink.stop()
    [got] = sink.messages
    assert got.recipients == [GREEK]
    assert "SMTPUTF8" in got.mail_options
    # Received records the SMTPUTF8 session and the recipient as it is (RFC 6531 4.3).
    received = got.content.split(b"\r\n\t")
    assert b"with UTF8SMTP" in got.content and f"for <δοκιμή@{A_LABEL}>".encode() in got.content, received[:3]


def _utf8_email(to: str = GREEK):
    from email.message import EmailMessage
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "alice@contoso.test", to, "Γειά σου"
    msg["Message-ID"] = "<utf8-aiosmtplib@contoso.test>"
    msg.set_content("κείμενο\n")
    return msg


async def _aiosmtplib_send(relay, msg) -> str:
    """A second, independent client: aiosmtplib sees SMTPUTF8 offered and adds it itself
    for a UTF-8 address (send_message), writing the headers as UTF-8 (RFC 6532)."""
    import aiosmtplib
    client = aiosmtplib.SMTP(hostname=LOOPBACK, port=relay.port, start_tls=False, timeout=10)
    await client.connect()
    try:
        await client.ehlo(hostname="client.test")
        assert client.supports_extension("smtputf8")
        refused, reply = await client.send_message(msg)
        assert refused == {} and reply.startswith("2.0.0 Queued as"), (refused, reply)
    finally:
        await client.quit()
    from aiosmtplib.email import flatten_message
    return flatten_message(msg, utf8=True, cte_type="8bit")


async def test_aiosmtplib_sends_a_utf8_address_and_headers_that_arrive_exactly(relay_factory):
    sink = await Sink(smtputf8=True).start()
    try:
        relay = await relay_factory(connectors=connector(sink.port, "παράδειγμα.test"))
        sent = await _aiosmtplib_send(relay, _utf8_email())
        await eventually(lambda: sink.messages, what="the delivery")
    finally:
        await sink.stop()
    [got] = sink.messages
    assert got.recipients == [GREEK] and got.sender == "alice@contoso.test"
    assert "SMTPUTF8" in got.mail_options
    assert "Subject: Γειά σου".encode() in sent and f"To: {GREEK}".encode() in sent      # UTF-8, not RFC 2047
    assert got.content.endswith(sent.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))   # after our Received


async def test_aiosmtplib_to_a_destination_without_smtputf8_gets_the_rfc_6531_failure_and_an_ndr(relay_factory):
    sink = await Sink().start()      # aiosmtpd without SMTPUTF8
    try:
        relay = await relay_factory(connectors=connector(sink.port, "παράδειγμα.test"))
        await _aiosmtplib_send(relay, _utf8_email())
        [ndr] = await eventually(lambda: relay.maildir("alice@contoso.test"), what="the NDR")
    finally:
        await sink.stop()
    assert sink.messages == []
    parsed = email.message_from_bytes(ndr, policy=policy.default)
    assert parsed.get_param("report-type") == "global-delivery-status"
    human = parsed.get_payload()[0].get_content()
    assert GREEK in human and "does not offer SMTPUTF8" in human and "5.6.7" in human
    _per_message, per_rcpt = global_fields(ndr, 1)
    assert (per_rcpt["Status"], per_rcpt["Action"]) == ("5.6.7", "failed")
    assert per_rcpt["Final-Recipient"] == f"utf-8; δοκιμή@{A_LABEL}"       # never mangled
    assert per_rcpt["Diagnostic-Code"].startswith("smtp; 553 5.6.7 ")
    [returned] = global_fields(ndr, 2)
    assert returned["Subject"] == "Γειά σου" and returned["To"] == GREEK

async def test_an_ascii_envelope_with_an_idn_goes_as_a_labels_without_smtputf8(relay_factory):
    sink = await Sink().start()      # aiosmtpd without SMTPUTF8
    try:
        relay = await relay_factory(connectors=connector(sink.port, "παράδειγμα.test"))
        await relay.send("alice@contoso.test", ["bob@παράδειγμα.test"], message(), mail_options=["SMTPUTF8"])
        await eventually(lambda: sink.messages, what="the delivery")
    finally:
        await sink.stop()
    assert sink.messages[0].recipients == [f"bob@{A_LABEL}"]
    assert "SMTPUTF8" not in sink.messages[0].mail_options


async def test_a_destination_without_smtputf8_gets_nothing_and_the_sender_an_ndr_with_5_6_7(relay_factory):
    sink = await Sink().start()      # aiosmtpd without SMTPUTF8
    try:
        relay = await relay_factory(connectors=connector(sink.port, "παράδειγμα.test"))
        await relay.send("alice@contoso.test", [GREEK], message("Γειά"), mail_options=["SMTPUTF8"])
        [ndr] = await eventually(lambda: relay.maildir("alice@contoso.test"), what="the NDR")
    finally:
        await sink.stop()
    assert sink.messages == []
    assert ndr.isascii()                                      # 7-bit: it can go anywhere
    parsed = email.message_from_bytes(ndr, policy=policy.default)
    # RFC 6533: a UTF-8 address makes it a global report, its report-type the second part's subtype.
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "global-delivery-status"
    text, status, headers = parsed.iter_parts()
    human = text.get_content()
    assert GREEK in human                                     # the address as people write it
    assert "does not offer SMTPUTF8" in human and "5.6.7" in human
    assert status.get_content_type() == "message/global-delivery-status"
    per_message, per_rcpt = global_fields(ndr, 1)
    assert per_message["Reporting-MTA"].startswith("dns; ")
    assert per_rcpt["Status"] == "5.6.7"
    assert per_rcpt["Action"] == "failed"
    # RFC 6533 3: in message/global-delivery-status the UTF-8 address is written as it is.
    assert per_rcpt["Final-Recipient"] == f"utf-8; δοκιμή@{A_LABEL}"
    assert per_rcpt["Diagnostic-Code"].startswith("smtp; 553 5.6.7 ")
    # The original's UTF-8 headers come back as message/global-headers, exactly.
    assert headers.get_content_type() == "message/global-headers"
    [returned] = global_fields(ndr, 2)
    assert returned["Subject"] == "Γειά"
    assert (await relay.queue()) == []


async def test_an_ascii_message_keeps_the_rfc_3464_report(relay_factory):
    """Only RFC 6532 content makes a global report: an ASCII message to a destination
    that refuses it gets message/delivery-status and text/rfc822-headers."""
    sink = await Sink(SinkHandler(rcpt_reply=lambda address: "550 5.1.1 No such user")).start()
    try:
        relay = await relay_factory(connectors=connector(sink.port, "fabrikam.test"))
        await relay.send("alice@contoso.test", ["bob@fabrikam.test"], message("plain"))
        [ndr] = await eventually(lambda: relay.maildir("alice@contoso.test"), what="the NDR")
    finally:
        await sink.stop()
    parsed = email.message_from_bytes(ndr, policy=policy.default)
    assert parsed.get_param("report-type") == "delivery-status"
    _text, status, headers = parsed.iter_parts()
    assert (status.get_content_type(), headers.get_content_type()) == (
        "message/delivery-status", "text/rfc822-headers")
    assert status.get_payload()[1]["Final-Recipient"] == "rfc822; bob@fabrikam.test"


@pytest.mark.parametrize("with_smtputf8, offers, outcome", [
    (True, True, "delivered with SMTPUTF8"),       # RFC 6532 headers go on under SMTPUTF8
    (True, False, "5.6.7"),                        # ... and never to a server without it (RFC 6531 3.4)
    (False, False, "delivered as it is"),          # no SMTPUTF8: 8-bit header bytes, passed on as before
])
async def test_utf8_headers_under_an_ascii_envelope_need_smtputf8_only_when_they_came_with_it(
        relay_factory, with_smtputf8, offers, outcome):
    sink = await Sink(smtputf8=offers).start()
    try:
        relay = await relay_factory(connectors=connector(sink.port, "fabrikam.test"))
        await relay.send("alice@contoso.test", ["bob@fabrikam.test"], message("Γειά σου"),
                         mail_options=["SMTPUTF8"] if with_smtputf8 else [])
        if outcome == "5.6.7":
            [ndr] = await eventually(lambda: relay.maildir("alice@contoso.test"), what="the NDR")
        else:
            await eventually(lambda: sink.messages, what="the delivery")
    finally:
        await sink.stop()
    if outcome == "5.6.7":
        assert sink.messages == []
        parsed = email.message_from_bytes(ndr, policy=policy.default)
        human = parsed.get_payload()[0].get_content()
        assert "UTF-8 headers" in human and "5.6.7" in human
        per_rcpt = parsed.get_payload()[1].get_payload()[1]
        assert (per_rcpt["Status"], per_rcpt["Final-Recipient"]) == ("5.6.7", "rfc822; bob@fabrikam.test")
        return
    [got] = sink.messages
    assert "Subject: Γειά σου".encode() in got.content               # the headers exactly as sent
    assert ("SMTPUTF8" in got.mail_options) is (outcome == "delivered with SMTPUTF8")


async def test_a_utf8_sender_gets_its_ndr_in_its_utf8_mailbox(relay_factory):
    sink = await Sink().start()
    sender = "ünïcode@contoso.test"
    try:
        relay = await relay_factory(
            domains=[{"name": "contoso.test", "type": "authoritative", "mailboxes": ["alice", "postmaster", "ünïcode"]}],
            connectors=connector(sink.port, A_LABEL))
        await relay.send(sender, [GREEK], message(), mail_options=["SMTPUTF8"])
        [ndr] = await eventually(lambda: relay.maildir(sender), what="the NDR in the UTF-8 mailbox")
    finally:
        await sink.stop()
    parsed = email.message_from_bytes(ndr, policy=policy.default)
    assert parsed["To"] == sender                              # RFC 6532: the address, not RFC 2047 words
    assert parsed.iter_parts().__next__().get_content().count(GREEK) == 1


async def test_an_idn_on_the_mx_route_is_looked_up_as_a_labels(relay_factory):
    sink = await Sink(smtputf8=True).start()
    dns_server = await DnsServer({(A_LABEL, "MX"): [f"10 mx.{A_LABEL}."],
                                  (f"mx.{A_LABEL}", "A"): [LOOPBACK]}).start()
    try:
        relay = await relay_factory(dns={"nameservers": [f"{LOOPBACK}:{dns_server.port}"], "timeout": "1s"},
                                    delivery={"smtp_port": sink.port})
        await relay.send("alice@contoso.test", [GREEK], message(), mail_options=["SMTPUTF8"])
        await eventually(lambda: sink.messages, what="delivery by MX")
    finally:
        dns_server.stop()
        await sink.stop()
    assert (A_LABEL, "MX") in dns_server.queries
    assert all(name.isascii() for name, _ in dns_server.queries)
    assert sink.messages[0].recipients == [GREEK]
    queued = await relay.cli("queue", "list")
    assert queued.exit_code == 0


async def raw_session(port: int, lines: list[bytes], source: str = LOOPBACK) -> list[str]:
    """Send each line, return each (last) reply line: smtplib would not send UTF-8 without SMTPUTF8."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port, local_addr=(source, 0))
    replies = [(await reader.readline()).decode()]
    try:
        for line in lines:
            writer.write(line)
            await writer.drain()
            reply = await reader.readline()
            while reply[3:4] == b"-":
                reply = await reader.readline()
            replies.append(reply.decode("utf-8").strip())
    finally:
        writer.close()
    return replies


async def test_utf8_without_the_smtputf8_parameter_and_an_invalid_idn_are_refused(relay_factory):
    relay = await relay_factory()
    replies = await raw_session(relay.port, [
        b"EHLO client.test\r\n", b"MAIL FROM:<a@client.test>\r\n", f"RCPT TO:<{GREEK}>\r\n".encode(),
        b"RSET\r\n", b"MAIL FROM:<a@client.test> SMTPUTF8\r\n", "RCPT TO:<user@☃.test>\r\n".encode()])
    assert replies[1] == "250 ENHANCEDSTATUSCODES"
    assert replies[3].startswith("553 5.6.7 "), replies
    assert replies[6].startswith("553 5.1.3 "), replies


async def test_smtplib_sees_smtputf8_offered(relay_factory):
    relay = await relay_factory()

    def features():
        with smtplib.SMTP(LOOPBACK, relay.port, timeout=10) as client:
            client.ehlo("client.test")
            return client.esmtp_features
    assert "smtputf8" in await asyncio.to_thread(features)


async def test_queue_show_shows_the_idn_as_u_labels(relay_factory):
    relay = await relay_factory(connectors=[{"name": "greek", "type": "partner", "domains": ["παράδειγμα.test"],
                                             "tls": "none"}],
                                dns={"nameservers": [f"{LOOPBACK}:{free_port()}"], "timeout": "1s"})
    await relay.send("alice@contoso.test", [GREEK], message(), mail_options=["SMTPUTF8"])
    [entry] = await eventually(relay.queue, what="the queued message")
    assert entry["recipients"][0]["address"] == f"δοκιμή@{A_LABEL}"      # JSON: as stored and routed
    text = (await relay.cli("queue", "show", entry["id"])).output
    assert f"    {GREEK}  " in text                                       # people: U-labels
    assert f"(παράδειγμα.test = {A_LABEL})" in text                       # the route's domain, both ways


async def test_people_see_u_labels_in_every_table_and_page_and_the_json_keeps_a_labels(relay_factory):
    """queue list, queue trace, config show, tls-report show and the console's queue, message,
    trace, connector and TLS report pages show an IDN as U-labels (the route's domain both ways); JSON and links
    keep what is stored and routed (A-labels)."""
    import html
    import time

    import httpx
    from relaywatch.deliver.tls_report import utc_day
    from relaywatch.tls_results import TlsCount
    relay = await relay_factory(connectors=[{"name": "greek", "type": "partner", "domains": ["παράδειγμα.test"],
                                             "tls": "none"}],
                                dns={"nameservers": [f"{LOOPBACK}:{free_port()}"], "timeout": "1s"})
    await relay.send(f"alice@{A_LABEL}", [GREEK], message(), mail_options=["SMTPUTF8"])
    [entry] = await eventually(relay.queue, what="the queued message")
    assert (entry["sender"], entry["recipients"][0]["address"]) == (f"alice@{A_LABEL}", f"δοκιμή@{A_LABEL}")
    day = utc_day(time.time())
    await relay.store.add_tls_counts([TlsCount(day, A_LABEL, "no-policy-found", (), count=2)])
    sender = "alice@παράδειγμα.test"

    from click.testing import CliRunner
    from relaywatch.cli import main as cli_main
    wide = await asyncio.to_thread(CliRunner().invoke, cli_main, ["queue", "list", "-c", str(relay.config_path)],
                                   env={"COLUMNS": "250"})
    listed = wide.output
    assert GREEK in listed and sender in listed and A_LABEL not in listed
    traced = (await relay.cli("queue", "trace", entry["id"])).output
    assert f"<{sender}> -> {GREEK}" in traced and A_LABEL not in traced
    shown = (await relay.cli("config", "show")).output
    assert f"domains παράδειγμα.test = {A_LABEL};" in shown
    tls = (await relay.cli("tls-report", "show")).output
    assert f"παράδειγμα.test = {A_LABEL}" in tls
    assert (await relay.cli_json("tls-report", "show"))["domains"][0]["policy_domain"] == A_LABEL

    host, port = relay.app.console.address
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10) as http:
        assert (await http.get("/")).status_code == 200           # the session cookie
        pages = {path: html.unescape((await http.get(path)).text) for path in (
            "/queue", f"/queue/{entry['id']}", f"/trace?q={entry['id']}", f"/tls-reports?date={day}",
            "/connectors/greek")}
    for path, text in pages.items():
        assert GREEK in text or "παράδειγμα.test" in text, path
    assert sender in pages["/queue"] and GREEK in pages["/queue"] and A_LABEL not in pages["/queue"]
    message_page = pages[f"/queue/{entry['id']}"]
    assert f"From</dt><dd>{sender}" in message_page and f"{GREEK} <i>" in message_page
    assert f"(παράδειγμα.test = {A_LABEL})" in message_page                 # the route's domain, both ways
    assert f"{sender} → {GREEK}" in pages[f"/trace?q={entry['id']}"]
    assert f"<h2>παράδειγμα.test = {A_LABEL}</h2>" in pages[f"/tls-reports?date={day}"]
    assert f"<dd>παράδειγμα.test = {A_LABEL}</dd>" in pages["/connectors/greek"]


@pytest.mark.parametrize("offers, expected", [(True, "250 2.1.5 "), (False, "553 5.6.7 ")])
async def test_verifying_a_utf8_recipient_asks_with_smtputf8_or_refuses_with_5_6_7(relay_factory, offers, expected):
    asked = []
    handler = SinkHandler(rcpt_reply=lambda address: asked.append(address))
    onprem = await Sink(handler, smtputf8=offers).start()
    try:
        relay = await relay_factory(
            server={"trusted_networks": ["127.0.0.1/32"]},
            domains=[{"name": "contoso.test", "type": "internal_relay", "verify_recipients": True}],
            connectors=[{"name": "onprem", "type": "on_premises", "domains": ["contoso.test"],
                         "smart_hosts": [f"{LOOPBACK}:{onprem.port}"], "tls": "none"}])
        replies = await raw_session(relay.port, [
            b"EHLO client.test\r\n", b"MAIL FROM:<a@client.test> SMTPUTF8\r\n",
            "RCPT TO:<δοκιμή@contoso.test>\r\n".encode()], source="127.0.0.2")
    finally:
        await onprem.stop()
    assert replies[3].startswith(expected), replies
    assert asked == (["δοκιμή@contoso.test"] if offers else [])


def global_fields(notice: bytes, index: int) -> list:
    """The header blocks of the ``index``-th part of ``notice``, a message/global-delivery-status
    or message/global-headers.  Python's parser takes any message/* part for a contained
    message and ignores its transfer encoding, so the part's octets are taken between the
    boundaries the parser found, the quoted-printable undone, each block parsed as UTF-8."""
    import quopri
    notice = notice.replace(b"\r\n", b"\n")
    boundary = email.message_from_bytes(notice, policy=policy.default).get_boundary().encode()
    head, _, body = notice.split(b"--" + boundary)[index + 1].lstrip(b"\n").partition(b"\n\n")
    part = email.message_from_bytes(head + b"\n\n", policy=policy.default)
    if part.get("Content-Transfer-Encoding", "").lower() == "quoted-printable":
        body = quopri.decodestring(body)
    blocks = [b for b in body.decode("utf-8").split("\n\n") if b.strip()]
    return [email.message_from_string(b + "\n", policy=policy.default) for b in blocks]


def test_ret_full_of_a_utf8_message_returns_it_as_message_global_exactly():
    import time
    from relaywatch.model import RecipientStatus
    from relaywatch.notify.dsn import build_ndr
    from relaywatch.notify.report import ReportedRecipient, returned_part
    original = "From: ünïcode@contoso.test\r\nSubject: Γειά\r\n\r\nκείμενο " .encode() + b"x" * 100 + b"\r\n"
    ndr = build_ndr(reporting_mta="relay.test", original_sender="ünïcode@contoso.test", original_headers=original,
                    original_message_id="<m@c.test>", received_at=time.time(), expires_at=time.time(),
                    first_failure_at=None, attempts=1, now=time.time(),
                    recipients=[ReportedRecipient(GREEK.replace("παράδειγμα.test", A_LABEL), RecipientStatus.FAILED,
                                                  None)],
                    returned=returned_part(original, "FULL", True, limit=64 * 1024))
    parts = email.message_from_bytes(ndr, policy=policy.default).get_payload()
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/global-delivery-status", "message/global"]
    assert parts[2]["Content-Transfer-Encoding"] == "quoted-printable"
    [head, body] = global_fields(ndr, 2)
    assert (head["From"], head["Subject"]) == ("ünïcode@contoso.test", "Γειά")
    assert body.as_string().strip() == "κείμενο " + "x" * 100
