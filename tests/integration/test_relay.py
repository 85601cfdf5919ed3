"""End to end: SMTP in over loopback, real SQLite queue, SMTP out to real servers."""

import asyncio
import email
import smtplib

import pytest
from flufl.bounce import scan_message

from helpers import (LOOPBACK, FakeClock, RawClient, Scripted, Sink, SinkHandler, advance, eventually, free_port, message,
                     settle)


pytestmark = [pytest.mark.both_loops, pytest.mark.both_stores]


def connector(name, port, domains, **kw):
    return {"name": name, "type": kw.pop("type", "on_premises"), "domains": domains,
            "smart_hosts": [f"{LOOPBACK}:{port}"], "tls": kw.pop("tls", "none"), **kw}


async def test_relays_to_a_healthy_smart_host(relay_factory, sink):
    relay = await relay_factory(connectors=[connector("fabrikam", sink.port, ["fabrikam.test"])])
    await relay.send("alice@contoso.test", ["bob@fabrikam.test"], message("hello", "line\r\n.starts with dot\r\n"))
    await eventually(lambda: sink.messages, what="delivery to the sink")
    got = sink.messages[0]
    assert got.sender == "alice@contoso.test"
    assert got.recipients == ["bob@fabrikam.test"]
    assert got.content.startswith(b"Received: from ")
    assert b"Subject: hello\r\n" in got.content
    assert got.content.endswith(b"line\r\n.starts with dot\r\n")
    await eventually(lambda: relay.queue() if False else _empty(relay), what="queue to empty")


async def test_50_kb_bodies_arrive_byte_exact_whatever_their_dots(relay_factory, sink):
    """The receiver finds the end and the stuffed lines, and the sender the lines to stuff,
    by visiting dots one by one and searching only past many of them (mime.dot_line):
    bodies with no dot, with many dots inside lines before a line that starts with one,
    and with dotted lines throughout, each come out at the sink as they went in."""
    relay = await relay_factory(connectors=[connector("fabrikam", sink.port, ["fabrikam.test"])])
    base64_like = "TWFu" * 19 + "\r\n"
    sentence = "The quick brown fox. Jumps over the lazy dog, again and again. Yes.\r\n"
    bodies = [
        base64_like * 670,                                                        # no dot at all
        sentence * 300 + ".a line starting with a dot\r\n" + sentence * 400 + "..\r\n.\r\n" + "x" * 70 + "\r\n",
        (sentence * 5 + ".\r\n..\r\n. dotted\r\n") * 140 + "end.\r\n",
    ]
    for i, body in enumerate(bodies):
        await relay.send("alice@contoso.test", ["bob@fabrikam.test"], message(f"m{i}", body))
    await eventually(lambda: len(sink.messages) == len(bodies), what="every message at the sink")
    got = {m.content.split(b"Subject: ", 1)[1][:2]: m.content for m in sink.messages}
    for i, body in enumerate(bodies):
        content = got[f"m{i}".encode()]
        assert content.split(b"\r\n\r\n", 1)[1] == body.encode(), f"message {i}"


async def _empty(relay):
    return (await relay.store.counts()) == {}


async def _attempts(relay, n):
    return await relay.attempts() == n


async def test_recipients_are_split_per_route_with_status_per_recipient(relay_factory, tmp_path):
    a = await Sink().start()
    b = await Sink(SinkHandler(rcpt_reply=lambda addr: "550 5.1.1 No such user" if addr.startswith("ghost") else None)).start()
    try:
        relay = await relay_factory(connectors=[connector("a", a.port, ["a.test"]),
                                                connector("b", b.port, ["b.test", "*.b.test"], type="partner")])
        await relay.send("alice@contoso.test", ["x@a.test", "y@sub.b.test", "ghost@b.test", "postmaster@contoso.test"],
                         message("split"))
        await eventually(lambda: a.messages and b.messages and relay.maildir("postmaster@contoso.test"),
                         what="all three routes to deliver")
        assert a.messages[0].recipients == ["x@a.test"]
        assert b.messages[0].recipients == ["y@sub.b.test"]
        # ghost@b.test was refused with 5.1.1: an NDR goes back to alice, who is local.
        ndr = (await eventually(lambda: relay.maildir("alice@contoso.test"), what="the NDR"))[0]
        report = email.message_from_bytes(ndr)
        assert report.get_content_type() == "multipart/report"
        assert scan_message(report) == {b"ghost@b.test"} or scan_message(report) == {"ghost@b.test"}
        assert b"550 5.1.1 No such user" in ndr
    finally:
        await a.stop()
        await b.stop()


async def test_authoritative_and_internal_relay_recipients(relay_factory, sink):
    relay = await relay_factory(
        domains=[{"name": "contoso.test", "type": "authoritative", "mailboxes": ["alice"]},
                 {"name": "hybrid.test", "type": "internal_relay", "mailboxes": ["local"]}],
        connectors=[connector("onprem", sink.port, ["hybrid.test"])])
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        await relay.send("x@example.org", ["nobody@contoso.test"], message())
    assert refused.value.recipients["nobody@contoso.test"] == (550, b"5.1.10 Recipient not found")
    await relay.send("x@example.org", ["alice@contoso.test", "local@hybrid.test", "remote@hybrid.test"], message("mixed"))
    await eventually(lambda: relay.maildir("alice@contoso.test") and relay.maildir("local@hybrid.test") and sink.messages,
                     what="local and relayed delivery")
    assert sink.messages[0].recipients == ["remote@hybrid.test"]


async def test_relaying_is_denied_to_untrusted_clients(relay_factory, sink):
    relay = await relay_factory(server={"trusted_networks": ["192.0.2.0/24"]},
                                connectors=[connector("onprem", sink.port, ["elsewhere.test"])])
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        await relay.send("x@example.org", ["someone@elsewhere.test"], message())
    assert refused.value.recipients["someone@elsewhere.test"] == (554, b"5.7.1 Relaying denied")
    # Our own domains are still open to anyone.
    await relay.send("x@example.org", ["alice@contoso.test"], message())
    await eventually(lambda: relay.maildir("alice@contoso.test"), what="local delivery")


async def test_deferred_while_down_then_delivered_when_back(relay_factory):
    port = free_port()
    relay = await relay_factory(queue={"retry_intervals": ["1s"]},
                                connectors=[connector("onprem", port, ["fabrikam.test"])])
    await relay.send("alice@contoso.test", ["bob@fabrikam.test"], message("later"))
    queued = await eventually(_deferred(relay), what="a deferral")
    rcpt = queued["recipients"][0]
    assert queued["status"] == "deferred" and queued["attempts"] >= 1 and queued["next_attempt_at"]
    assert rcpt["status"] == "deferred"
    assert rcpt["last_error"]["code"] == "4.4.316"
    sink = await Sink(port=port).start()
    try:
        await eventually(lambda: sink.messages, what="delivery once the destination is back")
        await eventually(lambda: _empty(relay), what="the queue to empty")
    finally:
        await sink.stop()


def _deferred(relay):
    async def check():
        q = await relay.queue()
        return q[0] if q and q[0]["status"] == "deferred" else None
    return check


def timed_destination(clock: FakeClock, delivered: list, quits: list, hold: asyncio.Event | None = None):
    """A destination that notes on ``clock`` when each message is accepted and each QUIT comes;
    with ``hold``, every message's 250 waits for it."""
    async def destination(c):
        await c.greet_and_ehlo()
        while True:
            command = (await c.hear()).upper()
            if command == "QUIT":
                quits.append(clock.monotonic())
                await c.say("221 bye")
                return
            await c.say("250 2.0.0 OK")
            if command.startswith("MAIL"):
                await c.until_data()
                await c.read_body()
                if hold is not None:
                    await hold.wait()
                delivered.append(clock.monotonic())
                await c.say("250 2.0.0 queued")
    return destination


async def test_a_worker_keeps_its_connection_for_connection_idle_after_each_message(relay_factory):
    # On the test's clock: the idle time counts from the worker's latest wait, not its first
    # (deliver/idle_watch.py wakes once per idle period, not once per message).
    clock, delivered, quits = FakeClock(), [], []
    dest = await Scripted(timed_destination(clock, delivered, quits)).start()
    try:
        relay = await relay_factory(clock=clock, delivery={"connection_idle": "10s"},
                                    connectors=[connector("onprem", dest.port, ["fabrikam.test"])])
        await relay.send("alice@contoso.test", ["bob@fabrikam.test"], message("first"))
        await eventually(lambda: delivered, what="the first message")
        await settle(clock, relay)
        await advance(clock, relay, 9)
        await relay.send("alice@contoso.test", ["bob@fabrikam.test"], message("second"))
        await eventually(lambda: len(delivered) == 2, what="the second message")
        await settle(clock, relay)
        assert dest.connections == 1 and quits == []        # the connection was kept for the second
        await advance(clock, relay, 9)                      # 18 s after the first wait, 9 after the second
        assert quits == []
        await advance(clock, relay, 1)
        await eventually(lambda: quits, what="the idle connection to be closed")
        assert quits[0] - delivered[1] == pytest.approx(10)
    finally:
        await dest.stop()


async def test_mail_one_at_a_time_after_a_burst_goes_over_one_connection(relay_factory):
    # A burst opens several connections; mail that then comes one message at a time wakes one
    # worker per message, the one idle last, so the burst's other workers stay idle and close
    # after connection_idle (with every worker woken per message they took turns, kept every
    # connection open and each message woke them all).
    clock, hold, delivered, quits = FakeClock(), asyncio.Event(), [], []
    dest = await Scripted(timed_destination(clock, delivered, quits, hold)).start()
    try:
        relay = await relay_factory(clock=clock, delivery={"connection_idle": "10s"},
                                    connectors=[connector("onprem", dest.port, ["fabrikam.test"])])
        for i in range(4):    # while the destination holds the first: queued behind it, more workers start
            await relay.send("alice@contoso.test", ["bob@fabrikam.test"], message(f"burst {i}"))
        await eventually(lambda: dest.connections == 3, what="the burst's three connections")
        hold.set()
        await eventually(lambda: len(delivered) == 4, what="the burst")
        await settle(clock, relay)
        for i in range(12):   # one at a time, a second apart: past the idle time of the burst's workers
            await relay.send("alice@contoso.test", ["bob@fabrikam.test"], message(f"one {i}"))
            await eventually(lambda: len(delivered) == 5 + i, what=f"message {i} on its own")
            await advance(clock, relay, 1)
        await eventually(lambda: len(quits) == 2, what="the burst's two idle connections to close")
        assert dest.connections == 3 and len(quits) == 2     # the one in use stays open
    finally:
        await dest.stop()


async def test_expiry_sends_exactly_one_rfc3464_ndr(relay_factory):
    # On the test's clock: two attempts a second apart, the second at the expiry.
    port, clock = free_port(), FakeClock()
    relay = await relay_factory(clock=clock, queue={"retry_intervals": ["1s"], "message_expiration": "2s"},
                                connectors=[connector("onprem", port, ["fabrikam.test"])])
    await relay.send("alice@contoso.test", ["bob@fabrikam.test"], message("will expire", message_id="<exp@client.test>"))
    await eventually(lambda: _attempts(relay, 1), what="the first attempt")
    await advance(clock, relay, 1)
    assert await relay.attempts() == 2 and relay.maildir("alice@contoso.test") == []
    await advance(clock, relay, 1)
    await eventually(lambda: _empty(relay), what="the expired message to leave the queue")
    ndrs = await eventually(lambda: relay.maildir("alice@contoso.test"), what="the NDR")
    for _ in range(3):      # later polls find nothing more to do
        await advance(clock, relay, 1)
    ndrs = relay.maildir("alice@contoso.test")
    assert len(ndrs) == 1
    report = email.message_from_bytes(ndrs[0])
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    human, status, headers = report.get_payload()
    text = human.get_payload(decode=True).decode()
    assert "bob@fabrikam.test" in text and "gave up" in text and "4.4.316" in text
    blocks = status.get_payload()
    per_rcpt = blocks[1]
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "4.4.7"
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@fabrikam.test"
    assert "4.4.316" in per_rcpt["Diagnostic-Code"]
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Subject: will expire" in headers.get_payload()
    assert report["To"] == "alice@contoso.test"
    found = scan_message(report)
    assert {a.decode() if isinstance(a, bytes) else a for a in found} == {"bob@fabrikam.test"}


async def test_permanent_reply_bounces_at_once(relay_factory):
    sink = await Sink(SinkHandler(data_reply="554 5.7.1 Rejected by content policy")).start()
    try:
        relay = await relay_factory(queue={"retry_intervals": ["1h"]},
                                    connectors=[connector("onprem", sink.port, ["fabrikam.test"])])
        await relay.send("alice@contoso.test", ["bob@fabrikam.test"], message("rejected"))
        ndr = (await eventually(lambda: relay.maildir("alice@contoso.test"), what="the NDR"))[0]
        report = email.message_from_bytes(ndr)
        per_rcpt = report.get_payload()[1].get_payload()[1]
        assert per_rcpt["Status"] == "5.7.1"
        assert per_rcpt["Diagnostic-Code"] == "smtp; 554 5.7.1 Rejected by content policy"
        await eventually(lambda: _empty(relay), what="the queue to empty")
    finally:
        await sink.stop()


async def test_a_bounce_is_never_bounced(relay_factory, caplog):
    sink = await Sink(SinkHandler(data_reply="554 5.7.1 Rejected")).start()
    try:
        relay = await relay_factory(connectors=[connector("onprem", sink.port, ["fabrikam.test"])])
        await relay.send("<>", ["bob@fabrikam.test"], message("a bounce"))
        await eventually(lambda: _empty(relay), what="the failed bounce to leave the queue")
        assert relay.maildir("postmaster@contoso.test") == []
        # Nothing else was queued in its place.
        assert await relay.store.counts() == {}
    finally:
        await sink.stop()


async def test_messages_survive_a_restart(relay_factory):
    port = free_port()
    relay = await relay_factory(queue={"retry_intervals": ["1h"]},
                                connectors=[connector("onprem", port, ["fabrikam.test"])])
    for i in range(3):
        await relay.send("alice@contoso.test", ["bob@fabrikam.test"], message(f"restart {i}"))
    await eventually(lambda: _all_deferred(relay, 3), what="three deferrals")
    await relay.stop()
    sink = await Sink(port=port).start()
    try:
        await relay.start()
        await relay.cli("queue", "retry", "--all")
        await eventually(lambda: len(sink.messages) == 3, what="all three after the restart")
        assert sorted(m.content.split(b"Subject: ")[1].split(b"\r\n")[0] for m in sink.messages) == [
            b"restart 0", b"restart 1", b"restart 2"]
    finally:
        await sink.stop()


async def _all_deferred(relay, n):
    q = await relay.queue()
    return len(q) == n and all(m["status"] == "deferred" for m in q)


async def test_bare_lf_smuggling_is_refused(relay_factory, sink):
    relay = await relay_factory(connectors=[connector("onprem", sink.port, ["fabrikam.test"])])
    client = await RawClient.connect(relay.port)
    assert (await client.envelope("alice@contoso.test", "bob@fabrikam.test")).startswith(b"354")
    smuggled = (b"Subject: innocent\r\n\r\nhello\n.\r\nMAIL FROM:<evil@evil.test>\r\n"
                b"RCPT TO:<bob@fabrikam.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n")
    reply = await client.cmd(smuggled)
    assert reply.startswith(b"554 5.6.11"), reply
    client.close()
    await asyncio.sleep(0.3)
    assert sink.messages == [] and await relay.store.counts() == {}


async def test_too_big_is_refused_with_552(relay_factory):
    relay = await relay_factory(server={"max_message_size": 2000})
    big = message(body=("x" * 900 + "\r\n") * 3)
    # Declared with SIZE: refused at MAIL FROM.
    with pytest.raises(smtplib.SMTPSenderRefused) as err:
        await relay.send("x@example.org", ["alice@contoso.test"], big)
    assert err.value.smtp_code == 552 and err.value.smtp_error.startswith(b"5.3.4")

    # Not declared (plain HELO): refused after the upload, nothing queued.
    def undeclared():
        with smtplib.SMTP(LOOPBACK, relay.port) as c:
            c.helo("client.test")
            return c.sendmail("x@example.org", ["alice@contoso.test"], big)
    with pytest.raises(smtplib.SMTPDataError) as err:
        await asyncio.to_thread(undeclared)
    assert err.value.smtp_code == 552 and err.value.smtp_error.startswith(b"5.3.4")
    assert await relay.store.counts() == {}


async def test_store_failure_answers_451_never_5xx(relay_factory):
    relay = await relay_factory()
    await relay.store.close()   # the writer is gone: every commit fails
    with pytest.raises(smtplib.SMTPDataError) as err:
        await relay.send("x@example.org", ["alice@contoso.test"], message())
    assert err.value.smtp_code == 451 and err.value.smtp_error.startswith(b"4.3.0")
    await relay.store.open()


async def test_connection_limit_per_ip(relay_factory):
    relay = await relay_factory(server={"max_connections_per_ip": 1})
    first = await asyncio.to_thread(smtplib.SMTP, LOOPBACK, relay.port)
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, relay.port)
        assert (await reader.readline()).startswith(b"421 4.7.0")
        assert await reader.read() == b""   # and the relay hung up
        writer.close()
    finally:
        await asyncio.to_thread(first.quit)
    # The slot is free again once the first client left.
    await eventually(lambda: relay.app.receiver.limiter.total == 0, what="the slot to be released")
    await relay.send("x@example.org", ["alice@contoso.test"], message())


async def test_ehlo_advertises_what_the_relay_supports(relay_factory):
    relay = await relay_factory()

    def ehlo():
        with smtplib.SMTP(LOOPBACK, relay.port) as c:
            c.ehlo("client.test")
            return c.esmtp_features
    features = await asyncio.to_thread(ehlo)
    for ext in ("size", "8bitmime", "pipelining", "enhancedstatuscodes"):
        assert ext in features
    assert "starttls" not in features   # no certificate configured


async def test_starttls_is_offered_and_works_when_a_certificate_is_configured(relay_factory, tmp_path):
    import ssl

    import trustme
    ca = trustme.CA()
    leaf = ca.issue_cert("relay.test", LOOPBACK)
    leaf.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "relay.pem"))
    relay = await relay_factory(server={"tls_cert": str(tmp_path / "relay.pem"), "tls_key": str(tmp_path / "relay.pem")})
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    def over_tls():
        with smtplib.SMTP(LOOPBACK, relay.port) as c:
            c.ehlo("client.test")
            assert c.has_extn("starttls")
            c.starttls(context=client_ctx)
            c.ehlo("client.test")
            assert not c.has_extn("starttls")
            c.sendmail("x@example.org", ["alice@contoso.test"], message("secret"))
    await asyncio.to_thread(over_tls)
    mail = (await eventually(lambda: relay.maildir("alice@contoso.test"), what="local delivery"))[0]
    assert b"with ESMTPS" in mail


async def test_commands_pipelined_after_starttls_in_the_clear_are_dropped(relay_factory, tmp_path):
    import ssl

    import trustme
    ca = trustme.CA()
    ca.issue_cert("relay.test", LOOPBACK).private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "r.pem"))
    relay = await relay_factory(server={"tls_cert": str(tmp_path / "r.pem"), "tls_key": str(tmp_path / "r.pem")})
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    reader, writer = await asyncio.open_connection(LOOPBACK, relay.port)
    await reader.readline()
    writer.write(b"EHLO client.test\r\n")
    while not (await reader.readline()).startswith(b"250 "):
        pass
    # The injected MAIL rides in the same packet as STARTTLS, before the handshake.
    writer.write(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
    assert (await reader.readline()).startswith(b"220 ")
    await writer.start_tls(client_ctx, server_hostname="relay.test")
    writer.write(b"EHLO client.test\r\nMAIL FROM:<x@example.org>\r\nQUIT\r\n")
    # Every reply is to what was sent over TLS: nothing answers the injected MAIL.
    replies = (await reader.read()).decode().splitlines()
    assert [r[:4] for r in replies] == ["250-"] * (len(replies) - 3) + ["250 ", "250 ", "221 "], replies
    writer.close()


async def test_global_connection_limit(relay_factory):
    relay = await relay_factory(server={"max_connections": 1})
    first = await asyncio.to_thread(smtplib.SMTP, LOOPBACK, relay.port)
    try:
        # In a transaction, the only session cannot be evicted (tests/integration/test_slowloris.py): a new client is refused.
        await asyncio.to_thread(first.ehlo, "client.test")
        assert (await asyncio.to_thread(first.mail, "x@example.org"))[0] == 250
        reader, writer = await asyncio.open_connection(LOOPBACK, relay.port)
        assert (await reader.readline()) == b"421 4.7.0 Too many connections, try again later\r\n"
        writer.close()
        assert (await asyncio.to_thread(first.rcpt, "alice@contoso.test"))[0] == 250
        assert (await asyncio.to_thread(first.data, message()))[0] == 250
    finally:
        await asyncio.to_thread(first.quit)


async def test_json_mail_log_lines(relay_factory, sink):
    import io
    import json as json_module

    from relaywatch import events
    stream = io.StringIO()
    events.configure("json", stream=stream)
    try:
        relay = await relay_factory(connectors=[connector("onprem", sink.port, ["fabrikam.test"])])
        await relay.send("alice@contoso.test", ["bob@fabrikam.test"], message(message_id="<json@client.test>"))
        await eventually(lambda: '"delivered"' in stream.getvalue(), what="the delivered line")
    finally:
        events.unconfigure()
    lines = [x for x in map(json_module.loads, stream.getvalue().splitlines()) if "event" in x]
    received = next(x for x in lines if x["event"] == "received")
    delivered = next(x for x in lines if x["event"] == "delivered")
    assert received["msgid"] == delivered["msgid"] == "<json@client.test>"
    assert received["id"] == delivered["id"]
    assert delivered["relay"] == f"{LOOPBACK}:{sink.port}" and delivered["status"] == "sent"


async def test_a_slow_upload_that_keeps_moving_is_not_cut_off(relay_factory):
    relay = await relay_factory(server={"idle_timeout": "1s"})
    client = await RawClient.connect(relay.port)
    assert (await client.envelope("x@example.org", "alice@contoso.test")).startswith(b"354")
    writer = client.writer
    writer.write(b"Subject: slow\r\n\r\n")
    for _ in range(10):                     # 3 s in all, three times the idle timeout
        writer.write(b"still coming\r\n")
        await writer.drain()
        await asyncio.sleep(0.3)
    assert (await client.cmd(b".\r\n")).startswith(b"250 2.0.0")
    client.close()
    await eventually(lambda: relay.maildir("alice@contoso.test"), what="local delivery")


async def test_a_message_the_disk_refuses_is_answered_after_its_end_and_the_session_goes_on(relay_factory):
    relay = await relay_factory()
    spool = relay.app.config.server.data_dir / "spool"
    spool.rmdir()
    spool.write_text("not a directory")         # big bodies spill here: now they cannot
    try:
        client = await RawClient.connect(relay.port)
        assert (await client.envelope("x@example.org", "alice@contoso.test")).startswith(b"354")
        line = b"MAIL FROM:<smuggled@evil.test>\r\n"   # must stay body, never become a command
        reply = await client.cmd(b"Subject: big\r\n\r\n" + line * 10_000 + b".\r\n")
        assert reply.startswith(b"451 4.3.0 ")
        assert (await client.cmd(b"NOOP\r\n")).startswith(b"250 ")
        assert (await client.envelope("x@example.org", "alice@contoso.test")).startswith(b"354")
        assert (await client.cmd(b"Subject: small\r\n\r\nfits in memory\r\n.\r\n")).startswith(b"250 2.0.0")
        client.close()
    finally:
        spool.unlink()
        spool.mkdir()


async def test_a_stalled_client_is_disconnected_with_421(relay_factory):
    relay = await relay_factory(server={"idle_timeout": "1s"})
    client = await RawClient.connect(relay.port)
    assert (await client.envelope("x@example.org", "alice@contoso.test")).startswith(b"354")
    client.writer.write(b"Subject: stalled\r\n")          # then nothing more
    reply = await asyncio.wait_for(client.reader.readline(), 10)
    assert reply.startswith(b"421 4.4.2 ")
    assert await asyncio.wait_for(client.reader.read(), 10) == b""   # and the connection is closed
    await eventually(lambda: relay.app.receiver.limiter.total == 0, what="the slot to be released")
    assert list((relay.app.config.server.data_dir / "spool").iterdir()) == []


async def test_a_pipelined_session_in_one_write_gets_every_reply_in_order(relay_factory):
    relay = await relay_factory()
    reader, writer = await asyncio.open_connection(LOOPBACK, relay.port)
    assert (await reader.readline()).startswith(b"220 ")
    writer.write(b"EHLO client.test\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<alice@contoso.test>\r\n"
                 b"RCPT TO:<nobody@contoso.test>\r\nDATA\r\n")
    ehlo = [await reader.readline()]
    while ehlo[-1].startswith(b"250-"):        # as many lines as there are extensions
        ehlo.append(await reader.readline())
    assert ehlo[-1].startswith(b"250 ") and b"PIPELINING" in b"".join(ehlo)
    replies = [await reader.readline() for _ in range(4)]
    assert [r[:3] for r in replies] == [b"250", b"250", b"550", b"354"]
    writer.write(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert (await reader.readline()).startswith(b"250 2.0.0 Queued as ")
    assert (await reader.readline()).startswith(b"221 ")
    writer.close()
    mail = (await eventually(lambda: relay.maildir("alice@contoso.test"), what="local delivery"))[0]
    assert b"Subject: pipelined" in mail


async def test_the_relay_on_postgresql(pg_dsn, relay_factory):
    """The same relay with its queue in PostgreSQL: deliver, defer, show, retry, incidents."""
    port = free_port()
    sink = await Sink().start()
    try:
        relay = await relay_factory(
            server={"store": pg_dsn}, queue={"retry_intervals": ["1h"]},
            connectors=[connector("ok", sink.port, ["fabrikam.test"]), connector("down", port, ["down.test"])],
            alerts={"open_after": "0s", "evaluate_interval": "0.2s", "probe_interval": "1h"})
        big = message("big", ("b" * 998 + "\r\n") * 200)     # over the inline limit: stored in the database too
        await relay.send("alice@contoso.test", ["bob@fabrikam.test", "carol@down.test"], big)
        await eventually(lambda: sink.messages, what="delivery through PostgreSQL")
        assert sink.messages[0].content.endswith(("b" * 998 + "\r\n").encode())
        [entry] = await eventually(_deferred(relay), what="the deferral") and await relay.queue()
        assert entry["recipients"][0]["last_error"]["code"] == "4.4.316"
        [inc] = await eventually(lambda: _incidents(relay), what="the incident")
        assert inc["code"] == "4.4.316" and inc["connector"] == "down"
        down = await Sink(port=port).start()
        try:
            await relay.cli("queue", "retry", "--connector", "down")
            await eventually(lambda: down.messages, what="delivery after retry")
        finally:
            await down.stop()
    finally:
        await sink.stop()


async def _incidents(relay):
    return (await relay.cli_json("incidents", "list"))["incidents"]
