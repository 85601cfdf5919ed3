"""DSN (RFC 3461) end to end: smtplib and aiosmtplib clients over loopback, the queue on
SQLite and PostgreSQL, aiosmtpd destinations with and without DSN, every notice parsed
back with Python's email parser (RFC 3464 fields)."""

import asyncio
import email
import email.policy
import io
import json
import smtplib

import aiosmtplib
import httpx
import pytest

from helpers import LOOPBACK, FakeClock, Sink, SinkHandler, advance, eventually, free_port, message, settle
from relaywatch import events

pytestmark = [pytest.mark.both_loops, pytest.mark.both_stores]


def connector(port):
    return {"name": "fabrikam", "type": "on_premises", "domains": ["fabrikam.test"],
            "smart_hosts": [f"{LOOPBACK}:{port}"], "tls": "none"}


async def smtplib_send(relay, sender, recipients, body, mail_options=(), rcpt_options=()):
    def submit():
        with smtplib.SMTP(LOOPBACK, relay.port, timeout=30) as client:
            client.ehlo("client.test")
            assert client.has_extn("dsn")
            return client.sendmail(sender, recipients, body, mail_options=list(mail_options),
                                   rcpt_options=list(rcpt_options))
    return await asyncio.to_thread(submit)


async def aiosmtplib_send(relay, sender, recipients, body, mail_options=(), rcpt_options=()):
    client = aiosmtplib.SMTP(hostname=LOOPBACK, port=relay.port, start_tls=False, timeout=10)
    await client.connect()
    try:
        await client.ehlo(hostname="client.test")
        assert client.supports_extension("dsn")
        refused, reply = await client.sendmail(sender, recipients, body, mail_options=list(mail_options),
                                               rcpt_options=list(rcpt_options))
        assert refused == {} and reply.startswith("2.0.0 Queued as"), (refused, reply)
    finally:
        await client.quit()


CLIENTS = [pytest.param(smtplib_send, id="smtplib"), pytest.param(aiosmtplib_send, id="aiosmtplib")]


async def empty(relay):
    return (await relay.store.counts()) == {}


def report(data: bytes):
    """(the notice, per-message fields, per-recipient blocks, the returned part), checked to be RFC 3464."""
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == "delivery-status"
    human, status, returned = msg.get_payload()
    assert status.get_content_type() == "message/delivery-status"
    per_message, *per_recipient = status.get_payload()
    return msg, per_message, per_recipient, returned


@pytest.mark.parametrize("send", CLIENTS)
async def test_notify_success_to_a_destination_without_dsn_gets_a_relayed_notice(relay_factory, send):
    sink = await Sink().start()       # aiosmtpd as it comes: no DSN
    try:
        relay = await relay_factory(connectors=[connector(sink.port)])
        await send(relay, "alice@contoso.test", ["bob@fabrikam.test"], message("hello dsn"),
                   mail_options=["RET=HDRS", "ENVID=QQ314159+2Bx"],
                   rcpt_options=["NOTIFY=SUCCESS", "ORCPT=rfc822;Bob+2Bold@fabrikam.test"])
        await eventually(lambda: sink.messages, what="delivery to the sink")
        got = sink.messages[0]
        # Nothing of DSN to a server that does not offer it (it would refuse the parameters).
        assert not any(o.startswith(("RET", "ENVID")) for o in got.mail_options) and got.rcpt_options == ()
        [notice] = await eventually(lambda: relay.maildir("alice@contoso.test"), what="the success notice")
        msg, per_message, [block], returned = report(notice)
        assert msg["To"] == "alice@contoso.test" and str(msg["Subject"]) == "Delivered: hello dsn"
        assert per_message["Original-Envelope-Id"] == "QQ314159+x"
        assert per_message["Reporting-MTA"] == "dns; relay.test"
        assert block["Action"] == "relayed" and block["Status"] == "2.0.0"
        assert block["Original-Recipient"] == "rfc822;Bob+old@fabrikam.test"
        assert block["Final-Recipient"] == "rfc822; bob@fabrikam.test"
        assert block["Diagnostic-Code"].startswith("smtp; 250 2.0.0 Ok: queued as SINK1")
        assert returned.get_content_type() == "text/rfc822-headers"
        await eventually(lambda: empty(relay), what="the queue to empty")
    finally:
        await sink.stop()


@pytest.mark.parametrize("send", CLIENTS)
async def test_a_destination_that_offers_dsn_gets_the_parameters_and_we_send_no_success_notice(relay_factory, send):
    sink = await Sink(dsn=True).start()
    try:
        relay = await relay_factory(connectors=[connector(sink.port)])
        await send(relay, "alice@contoso.test", ["bob@fabrikam.test", "carol@fabrikam.test"], message("passed on"),
                   mail_options=["RET=HDRS", "ENVID=env+3D1"],
                   rcpt_options=["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;x+2By@old.test"])
        await eventually(lambda: sink.messages, what="delivery to the sink")
        mail, *rcpts = sink.handler.commands
        assert mail.startswith("MAIL FROM:<alice@contoso.test>") and mail.endswith(" RET=HDRS ENVID=env+3D1")
        assert rcpts == [f"RCPT TO:<{r}@fabrikam.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;x+2By@old.test"
                         for r in ("bob", "carol")]
        await eventually(lambda: empty(relay), what="the queue to empty")
        # Empty queue: any notice would have been queued with the outcome and delivered by now.
        assert relay.maildir("alice@contoso.test") == []
    finally:
        await sink.stop()


@pytest.mark.parametrize("send", CLIENTS)
async def test_notify_never_gets_no_ndr_but_the_bounce_is_logged(relay_factory, send):
    sink = await Sink(SinkHandler(rcpt_reply=lambda a: "550 5.1.1 No such user")).start()
    stream = io.StringIO()
    events.configure("json", stream=stream)
    try:
        relay = await relay_factory(connectors=[connector(sink.port)])
        await send(relay, "alice@contoso.test", ["ghost@fabrikam.test"], message("never tell"),
                   rcpt_options=["NOTIFY=NEVER"])
        await eventually(lambda: '"bounced"' in stream.getvalue(), what="the bounce in the mail log")
        await eventually(lambda: empty(relay), what="the refused message to leave the queue")
        assert relay.maildir("alice@contoso.test") == []
    finally:
        events.unconfigure()
        await sink.stop()
    [bounced] = [x for x in map(json.loads, stream.getvalue().splitlines()) if x.get("event") == "bounced"]
    assert (bounced["to"], bounced["code"], bounced["ndr"]) == ("ghost@fabrikam.test", "5.1.1", "not-requested")


@pytest.mark.parametrize("send", CLIENTS)
async def test_notify_failure_with_ret_full_returns_the_whole_message(relay_factory, send):
    sink = await Sink(SinkHandler(rcpt_reply=lambda a: "550 5.1.1 No such user" if a.startswith("ghost") else None),
                      dsn=True).start()
    try:
        relay = await relay_factory(connectors=[connector(sink.port)])
        original = message("return it all", "the whole body\r\n")
        await send(relay, "alice@contoso.test", ["ghost@fabrikam.test"], original,
                   mail_options=["RET=FULL", "ENVID=E1"], rcpt_options=["NOTIFY=FAILURE", "ORCPT=rfc822;g@old.test"])
        [ndr] = await eventually(lambda: relay.maildir("alice@contoso.test"), what="the NDR")
        msg, per_message, [block], returned = report(ndr)
        assert str(msg["Subject"]) == "Undeliverable: return it all"
        assert per_message["Original-Envelope-Id"] == "E1"
        assert (block["Original-Recipient"], block["Final-Recipient"], block["Action"], block["Status"]) == (
            "rfc822;g@old.test", "rfc822; ghost@fabrikam.test", "failed", "5.1.1")
        assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
        assert returned.get_content_type() == "message/rfc822"
        [inner] = returned.get_payload()
        assert inner["Subject"] == "return it all" and "the whole body" in inner.get_content()
        assert original in ndr       # as received, after our Received: line
        await eventually(lambda: empty(relay), what="the queue to empty")
    finally:
        await sink.stop()


async def test_ret_full_of_a_message_over_queue_ndr_return_limit_returns_its_headers(relay_factory):
    sink = await Sink(SinkHandler(rcpt_reply=lambda a: "550 5.1.1 No such user"), dsn=True).start()
    try:
        relay = await relay_factory(connectors=[connector(sink.port)], queue={"ndr_return_limit": "1KiB"})
        await smtplib_send(relay, "alice@contoso.test", ["ghost@fabrikam.test"],
                           message("too big to return", ("x" * 76 + "\r\n") * 20), mail_options=["RET=FULL"])
        await smtplib_send(relay, "alice@contoso.test", ["ghost@fabrikam.test"],
                           message("small enough", "the whole body\r\n"), mail_options=["RET=FULL"])
        ndrs = await eventually(lambda: len(relay.maildir("alice@contoso.test")) == 2 and
                                relay.maildir("alice@contoso.test"), what="the two NDRs")
    finally:
        await sink.stop()
    returned = {str(report(n)[0]["Subject"]): report(n)[3].get_content_type() for n in ndrs}
    assert returned == {"Undeliverable: too big to return": "text/rfc822-headers",
                        "Undeliverable: small enough": "message/rfc822"}

@pytest.mark.parametrize("notify, notices", [("NOTIFY=DELAY", 1), ("NOTIFY=FAILURE", 0), ("NOTIFY=SUCCESS,DELAY", 1)])
async def test_notify_delay_to_a_destination_that_defers_gets_one_delay_notice(relay_factory, notify, notices):
    # On the test's clock: an attempt a second, every one deferred; the notice is due from 2 s on.
    sink = await Sink(SinkHandler(rcpt_reply=lambda a: "451 4.3.0 Try again later")).start()
    try:
        clock = FakeClock()
        relay = await relay_factory(clock=clock, queue={"retry_intervals": ["1s"]},
                                    connectors=[{**connector(sink.port), "delay_notice_after": "2s"}])
        await smtplib_send(relay, "alice@contoso.test", ["bob@fabrikam.test"], message("deferred"),
                           mail_options=["ENVID=D1"], rcpt_options=[notify, "ORCPT=rfc822;bob@old.test"])
        await eventually(lambda: _attempted(relay, 1), what="the first attempt")
        for attempts in (2, 3, 4, 5):         # past the delay, more attempts: still at most one notice
            await advance(clock, relay, 1)
            assert await relay.attempts() == attempts
        await settle(clock, relay)
        found = relay.maildir("alice@contoso.test")
        assert len(found) == notices, [email.message_from_bytes(n)["Subject"] for n in found]
        if notices:
            msg, per_message, [block], _ = report(found[0])
            assert str(msg["Subject"]) == "Delayed: deferred" and per_message["Original-Envelope-Id"] == "D1"
            assert (block["Action"], block["Original-Recipient"]) == ("delayed", "rfc822;bob@old.test")
            assert block["Diagnostic-Code"] == "smtp; 451 4.3.0 Try again later"
        assert sink.messages == [] and await relay.store.counts() != {}       # still queued, nothing lost
    finally:
        await sink.stop()


async def _attempted(relay, n):
    return await relay.attempts() == n


async def test_without_parameters_an_ndr_is_as_it_always_was(relay_factory):
    sink = await Sink(SinkHandler(rcpt_reply=lambda a: "550 5.1.1 No such user")).start()
    try:
        relay = await relay_factory(connectors=[connector(sink.port)])
        await relay.send("alice@contoso.test", ["ghost@fabrikam.test"], message("plain"))
        [ndr] = await eventually(lambda: relay.maildir("alice@contoso.test"), what="the NDR")
        msg, per_message, [block], returned = report(ndr)
        assert per_message["Original-Envelope-Id"] is None and block["Original-Recipient"] is None
        assert (block["Final-Recipient"], block["Action"], block["Status"]) == (
            "rfc822; ghost@fabrikam.test", "failed", "5.1.1")
        assert returned.get_content_type() == "text/rfc822-headers"
    finally:
        await sink.stop()


@pytest.mark.parametrize("send", CLIENTS)
async def test_notify_success_to_a_local_mailbox_gets_a_delivered_notice(relay_factory, send):
    stream = io.StringIO()
    events.configure("json", stream=stream)
    try:
        relay = await relay_factory()
        await send(relay, "alice@contoso.test", ["postmaster@contoso.test"], message("to a mailbox"),
                   mail_options=["ENVID=local-1"], rcpt_options=["NOTIFY=SUCCESS,FAILURE"])
        await eventually(lambda: relay.maildir("postmaster@contoso.test"), what="local delivery")
        [notice] = await eventually(lambda: relay.maildir("alice@contoso.test"), what="the success notice")
        await eventually(lambda: stream.getvalue().count('"delivered"') == 2, what="both deliveries in the log")
    finally:
        events.unconfigure()
    delivered = [x for x in map(json.loads, stream.getvalue().splitlines()) if x.get("event") == "delivered"]
    assert [(x["to"], x.get("dsn")) for x in delivered] == [("postmaster@contoso.test", "queued"),
                                                            ("alice@contoso.test", None)]   # the notice itself
    _, per_message, [block], _ = report(notice)
    assert per_message["Original-Envelope-Id"] == "local-1"
    assert (block["Final-Recipient"], block["Action"], block["Status"]) == (
        "rfc822; postmaster@contoso.test", "delivered", "2.0.0")


async def test_queue_show_has_the_dsn_parameters(relay_factory):
    relay = await relay_factory(connectors=[connector(free_port())])     # nobody listens: it stays queued
    await smtplib_send(relay, "alice@contoso.test", ["bob@fabrikam.test", "carol@fabrikam.test"], message("kept"),
                       mail_options=["RET=HDRS", "ENVID=show+201"],
                       rcpt_options=["NOTIFY=DELAY,FAILURE", "ORCPT=rfc822;b@old.test"])
    [listed] = await eventually(relay.queue, what="the queued message")
    shown = await relay.show(listed["id"])
    assert (shown["ret"], shown["envid"]) == ("HDRS", "show 1")
    assert [(r["address"], r["notify"], r["orcpt"]) for r in shown["recipients"]] == [
        ("bob@fabrikam.test", "FAILURE,DELAY", "rfc822;b@old.test"),
        ("carol@fabrikam.test", "FAILURE,DELAY", "rfc822;b@old.test")]
    text = (await relay.cli("queue", "show", listed["id"])).output
    assert "DSN:         RET=HDRS ENVID=show+201" in text
    assert "bob@fabrikam.test  " in text and "NOTIFY=FAILURE,DELAY ORCPT=rfc822;b@old.test" in text


async def test_the_console_message_page_has_the_dsn_parameters_escaped(relay_factory):
    relay = await relay_factory(connectors=[connector(free_port())])     # nobody listens: it stays queued
    await smtplib_send(relay, "alice@contoso.test", ["bob@fabrikam.test"], message("kept"),
                       mail_options=["RET=HDRS", "ENVID=<i>E+201</i>"],
                       rcpt_options=["NOTIFY=DELAY,FAILURE", "ORCPT=rfc822;b@old.test"])
    [listed] = await eventually(relay.queue, what="the queued message")
    host, port = relay.app.console.address
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10) as http:
        assert (await http.get("/")).status_code == 200           # the session cookie
        page = await http.get(f"/queue/{listed['id']}")
    assert page.status_code == 200, page.text
    assert "RET <code>HDRS</code>, ENVID <code>&lt;i&gt;E 1&lt;/i&gt;</code>" in page.text
    assert "<i>E" not in page.text
    assert "NOTIFY <code>FAILURE,DELAY</code> ORCPT <code>rfc822;b@old.test</code>" in page.text
