"""Pure parts: SMTP client protocol, config validation, routing, NDR (the retry schedule: test_retry.py)."""

import email
import email.policy
import json

import pytest
from flufl.bounce import scan_message

from relaywatch.config import parse_config, parse_duration, parse_size
from relaywatch.errors import ConfigError
from relaywatch.model import Destination, Failure, RecipientOutcome, RecipientStatus, RouteKind
from relaywatch.notify.dsn import build_ndr
from relaywatch.notify.report import ReportedRecipient
from relaywatch.route import decide
from relaywatch.smtpclient.protocol import (
    DotStuffer, RemoteProtocolError, ReplyReader, mail_from, parse_ehlo, rcpt_to,
)


# -- replies -------------------------------------------------------------------------------

def feed(script: bytes):
    reader, replies = ReplyReader(), []
    for line in script.splitlines(keepends=True):
        r = reader.feed_line(line)
        if r:
            replies.append(r)
    return replies


def test_multiline_reply_with_enhanced_code():
    [r] = feed(b"250-mx.test hello\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 STARTTLS\r\n")
    assert r.code == 250 and parse_ehlo(r) == {"PIPELINING": "", "SIZE": "1000", "STARTTLS": ""}
    [r] = feed(b"550 5.1.1 <x@y>: user unknown\r\n")
    assert (r.enhanced, r.text, str(r)) == ("5.1.1", "<x@y>: user unknown", "550 5.1.1 <x@y>: user unknown")
    [r] = feed(b"421 Service closing\r\n")
    assert r.enhanced is None and r.text == "Service closing"
    [r] = feed(b"220\r\n")
    assert r.code == 220 and r.text == ""


@pytest.mark.parametrize("bad", [b"XXXX unrecognized\r\n", b"2500 x\r\n", b"999 x\r\n", b"25\r\n",
                                 b"250-a\r\n251 b\r\n"])
def test_garbage_is_a_remote_protocol_error(bad):
    with pytest.raises(RemoteProtocolError):
        feed(bad)


def test_enhanced_code_must_match_the_reply_class():
    [r] = feed(b"450 5.1.1 mixed up\r\n")
    assert r.enhanced is None


def test_commands_refuse_crlf_injection():
    assert mail_from("a@b.test", 10, True) == b"MAIL FROM:<a@b.test> SIZE=10 BODY=8BITMIME\r\n"
    assert mail_from("") == b"MAIL FROM:<>\r\n"
    with pytest.raises(ValueError):
        rcpt_to("a@b.test>\r\nRCPT TO:<evil@x")


@pytest.mark.parametrize("chunks, wire", [
    ([b"a\r\n.b\r\n"], b"a\r\n..b\r\n.\r\n"),
    ([b".first\r\n"], b"..first\r\n.\r\n"),
    ([b"a\r\n", b".b\r\n"], b"a\r\n..b\r\n.\r\n"),
    ([b"a\r", b"\n.b\r\n"], b"a\r\n..b\r\n.\r\n"),
    ([b"no newline at end"], b"no newline at end\r\n.\r\n"),
    ([b"a\r\n..\r\n"], b"a\r\n...\r\n.\r\n"),
])
def test_dot_stuffing_across_chunk_boundaries(chunks, wire):
    s = DotStuffer()
    assert b"".join(s.stuff(c) for c in chunks) + s.end() == wire


# -- config ---------------------------------------------------------------------------------

def problems(raw):
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    return err.value.problems


def test_config_errors_name_the_key_and_the_problem():
    found = problems({
        "server": {"listen": ["127.0.0.1:99999"], "max_message_size": "lots", "trusted_networks": ["10.0.0.300/8"],
                   "hostnmae": "x"},
        "queue": {"message_expiration": "a day", "retry_intervals": []},
        "dns": {"nameservers": ["ns.example:53"]},
        "domains": [{"name": "contoso.test", "type": "authorative"}],
        "connectors": [{"name": "a", "type": "cloud", "domains": ["x.test"], "tls": "yes", "smart_hosts": "h"},
                       {"name": "a", "type": "partner", "domains": []}],
    })
    text = "\n".join(found)
    for expected in [
        "server.listen: '127.0.0.1:99999' has an invalid port",
        "server.max_message_size: 'lots' is not a size",
        "server.trusted_networks: '10.0.0.300/8' is not an IP network",
        "server.hostnmae: unknown key; did you mean 'hostname'?",
        "queue.message_expiration: 'a day' is not a duration",
        "queue.retry_intervals: must be a non-empty list",
        "dns.nameservers: 'ns.example' must be an IP address",
        "domains[0].type: must be one of authoritative, internal_relay (got 'authorative')",
        "connectors[0].type: must be one of on_premises, partner (got 'cloud')",
        "connectors[0].tls: must be one of none, opportunistic, required (got 'yes')",
        "connectors[0].smart_hosts: must be a list of strings",
        "connectors[1].name: another connector is already called 'a'",
        "connectors[1].domains: must list at least one domain",
    ]:
        assert expected in text, f"missing: {expected}\n{text}"


def test_durations_and_sizes():
    assert parse_duration("90s") == 90 and parse_duration("24h") == 86400 and parse_duration("1.5m") == 90
    assert parse_duration(5) == 5
    assert parse_size("36MB") == 36_000_000 and parse_size("1MiB") == 1048576 and parse_size(10) == 10


def test_tls_verify_defaults_to_strict_only_when_tls_is_required():
    c = parse_config({"connectors": [
        {"name": "a", "type": "partner", "domains": ["a.test"], "tls": "required"},
        {"name": "b", "type": "partner", "domains": ["b.test"]}]})
    assert [x.tls_verify for x in c.connectors] == ["ca_and_name", "none"]


# -- routing ------------------------------------------------------------------------------------

def test_routing_order():
    config = parse_config({
        "domains": [{"name": "contoso.test", "type": "authoritative", "mailboxes": ["alice"]},
                    {"name": "hybrid.test", "type": "internal_relay", "mailboxes": ["bob"]}],
        "connectors": [{"name": "onprem", "type": "on_premises", "domains": ["hybrid.test"], "smart_hosts": ["h:25"]},
                       {"name": "fab", "type": "partner", "domains": ["*.fabrikam.test"]},
                       {"name": "off", "type": "partner", "domains": ["off.test"], "enabled": False}]})
    assert decide(config, "Alice@Contoso.test").route.kind is RouteKind.LOCAL
    assert decide(config, "nobody@contoso.test").route is None
    assert decide(config, "bob@hybrid.test").route.kind is RouteKind.LOCAL
    r = decide(config, "carol@hybrid.test")
    assert (r.route.name, r.route.domain, r.accepted_domain) == ("onprem", "", True)
    r = decide(config, "x@eu.fabrikam.test")
    assert (r.route.name, r.route.domain, r.accepted_domain) == ("fab", "eu.fabrikam.test", False)
    assert decide(config, "x@fabrikam.test").route.kind is RouteKind.INTERNET   # wildcard is not the apex
    assert decide(config, "x@off.test").route.kind is RouteKind.INTERNET        # disabled connector


# -- NDR ---------------------------------------------------------------------------------------------

def test_ndr_is_rfc3464_and_readable():
    f = Failure("4.4.316", 450, "Connection refused", "refused",
                "mail.contoso.test[192.0.2.5]:25 refused the TCP connection (ECONNREFUSED).", "connect", False,
                1_800_000_000.0, "connect.refused", Destination("mail.contoso.test", "192.0.2.5", 25))
    raw = build_ndr(reporting_mta="relay.test", original_sender="alice@contoso.test",
                    original_headers=b"Subject: quarterly report\r\nMessage-ID: <1@x>\r\n\r\n",
                    original_message_id="<1@x>", received_at=1_799_913_600.0, expires_at=1_800_000_000.0,
                    first_failure_at=1_799_913_601.0, attempts=31,
                    recipients=[ReportedRecipient("bob@contoso.test", RecipientStatus.EXPIRED, f)],
                    now=1_800_000_000.0)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Subject"] == "Undeliverable: quarterly report"
    assert msg["In-Reply-To"] == "<1@x>"
    assert msg["Auto-Submitted"] == "auto-replied"
    human, status, headers = msg.iter_parts()
    text = human.get_content()
    assert "bob@contoso.test" in text and "31 attempts" in text
    assert "mail.contoso.test[192.0.2.5]:25 refused the TCP connection" in text
    blocks = status.get_payload()
    assert blocks[0]["Reporting-MTA"] == "dns; relay.test"
    assert blocks[1]["Status"] == "4.4.7" and blocks[1]["Action"] == "failed"
    assert blocks[1]["Remote-MTA"] == "dns; mail.contoso.test"
    assert blocks[1]["Diagnostic-Code"].startswith("smtp; 450 4.4.316 Connection refused")
    assert scan_message(email.message_from_bytes(raw)) in ({b"bob@contoso.test"}, {"bob@contoso.test"})
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


# -- DATA parsing ---------------------------------------------------------------------------

from relaywatch.receive.data import BARE_CR_LF, LINE_PIECE, DataParser  # noqa: E402


def parse(chunks, limit=None):
    """Feed until the end; p.leftover also gets what was never fed (as the socket would keep it)."""
    p = DataParser(limit)
    out = b""
    for i, c in enumerate(chunks):
        out += p.feed(c)
        if p.done:
            p.leftover += b"".join(chunks[i + 1:])
            break
    return p, out


@pytest.mark.parametrize("chunks", [
    [b"Subject: x\r\n\r\n..dot\r\nline\r\n.\r\nQUIT\r\n"],
    [b"Subject: x\r\n\r\n", b"..dot\r\nline\r\n.\r\nQUIT\r\n"],
    [b"Subject: x\r", b"\n\r\n.", b".dot\r\nli", b"ne\r\n.", b"\r\nQUIT\r\n"],
    [bytes([b]) for b in b"Subject: x\r\n\r\n..dot\r\nline\r\n.\r\nQUIT\r\n"],
])
def test_data_is_unstuffed_and_ends_at_the_dot_line_however_it_is_split(chunks):
    p, out = parse(chunks)
    assert p.done and p.problem is None
    assert out == b"Subject: x\r\n\r\n.dot\r\nline\r\n"
    assert p.leftover == b"QUIT\r\n"


def test_an_empty_message_and_a_dot_inside_a_line():
    p, out = parse([b".\r\n"])
    assert p.done and out == b""
    p, out = parse([b"a.\r\nb . c\r\n.\r\n"])
    assert out == b"a.\r\nb . c\r\n"


@pytest.mark.parametrize("smuggle", [
    b"hello\n.\nMAIL FROM:<evil@x>\r\n.\r\n",
    b"hello\r\n.\nMAIL FROM:<evil@x>\r\n.\r\n",
    b"hello\n.\r\nMAIL FROM:<evil@x>\r\n.\r\n",
    b"hello\r.\r\nx\r\n.\r\n",
])
def test_bare_cr_or_lf_is_refused_and_the_real_end_still_found(smuggle):
    p, out = parse([smuggle])
    assert p.problem == BARE_CR_LF
    assert p.done and out == b""


def test_size_limit_is_enforced_while_reading():
    p, _ = parse([b"x" * 500 + b"\r\n", b"y" * 600 + b"\r\n", b".\r\n"], limit=1000)
    assert p.done and p.problem.startswith("552 5.3.4")


def test_a_long_line_is_accepted_in_pieces_without_holding_it():
    # RFC 5321 allows 1,000 octets; longer lines are accepted (bounded only by
    # the message size) and made to fit on the way out (relaywatch/mime.py).
    p = DataParser(None)
    out = p.feed(b"..dot first\r\nshort\r\n.")     # a stuffed dot at the start of the long line
    for _ in range(40):
        out += p.feed(b"z" * 4096)
        assert len(p._pending) <= LINE_PIECE
    out += p.feed(b"\r\n.\r\n")
    assert p.done and p.problem is None
    assert out == b".dot first\r\nshort\r\n" + b"z" * 40 * 4096 + b"\r\n"


@pytest.mark.parametrize("split", [1, 2, 3, 7, 4096, 70_000])
def test_a_long_line_however_it_is_split(split):
    data = b"a\r\n" + b"." + b"y" * 150_000 + b"\r\n" + b"x" * 70_000 + b"\r\n.\r\nQUIT\r\n"
    p, out = parse([data[i:i + split] for i in range(0, len(data), split)])
    assert p.done and p.problem is None
    assert out == b"a\r\n" + b"y" * 150_000 + b"\r\n" + b"x" * 70_000 + b"\r\n"
    assert p.leftover == b"QUIT\r\n"


@pytest.mark.parametrize("data", [
    b"", b".", b"\r\n.", b".\r\n.\r\n", b"a.b\r\n.c", b"x" * 100,
    b"a.b." * 40 + b"\r\n.x",                    # more dots inside lines than are visited one by one
    (b"a.b." * 40 + b"\r\n") * 3 + b"\r\n..\r\n",
    b"\r\n" + b"." * 50,
])
def test_dot_line_is_the_first_line_starting_with_a_dot(data):
    from relaywatch.mime import dot_line
    for start in range(min(len(data), 10)):
        assert dot_line(data, start) == data.find(b"\r\n.", start)
    assert dot_line(data, len(data)) == -1


def test_many_dots_inside_lines_before_a_stuffed_one_and_the_end():
    body = (b"a.b.c." * 30 + b"\r\n") * 4 + b"..stuffed\r\n" + b"x.y\r\n" * 20
    p, out = parse([body + b".\r\nQUIT\r\n"])
    assert p.done and out == body.replace(b"\r\n..", b"\r\n.") and p.leftover == b"QUIT\r\n"
    s = DotStuffer()
    assert s.stuff(out) + s.end() == body + b".\r\n"


def test_an_endless_line_is_bounded_by_the_message_size():
    p = DataParser(100_000)
    for _ in range(40):
        assert p.feed(b"z" * 4096) == b"" or p.size <= 100_000
    assert p.problem.startswith("552 5.3.4") and len(p._pending) <= LINE_PIECE
    p.feed(b"\r\n.\r\n")
    assert p.done


def test_stored_failures_of_other_versions_are_read():
    """A queued message keeps its failure JSON for up to a day: a relay must read what an
    older relay wrote (fields missing) and what a newer one wrote (fields it does not know)."""
    from relaywatch.model import FAILURE_FORMAT, Destination, Failure
    failure = Failure(code="4.4.316", smtp_code=450, title="Connection refused", subtype="refused",
                      detail="x refused", phase="connect", permanent=False, at=5.0, kind="connect.refused",
                      destination=Destination("mx.test", "127.0.0.1", 25, 1, 1))
    stored = json.loads(failure.to_json())
    assert stored["v"] == FAILURE_FORMAT
    assert Failure.from_dict(stored) == failure
    newer = {**stored, "v": FAILURE_FORMAT + 1, "mta_sts": {"mode": "enforce"},
             "destination": {**stored["destination"], "tlsa": "3 1 1"}}
    assert Failure.from_dict(newer) == failure
    older = {"code": "4.4.316", "detail": "x refused", "destination": None}
    read = Failure.from_dict(older)
    assert (read.code, read.detail, read.destination, read.kind) == ("4.4.316", "x refused", None, "unknown")


@pytest.mark.parametrize("chunks", [
    [b"z" * 70_000 + b"\n" + b"z" * 10 + b"\r\n.\r\n"],
    [b"z" * 70_000, b"\rz\r\n.\r\n"],
    [b"z" * 70_000 + b"\r", b"z\r\n.\r\n"],
])
def test_a_bare_cr_or_lf_inside_a_long_line_is_refused(chunks):
    # What was passed on before the bare CR/LF arrived is discarded by the
    # caller when the message ends with a problem, as for any refused message.
    p, _ = parse(chunks)
    assert p.done and p.problem == BARE_CR_LF and p.leftover == b""


def test_an_empty_last_line_before_the_end_is_kept_when_the_block_starts_with_it():
    p, out = parse([b"Subject: x\r\n\r\nbody\r\n", b"\r\n.\r\nQUIT\r\n"])
    assert p.done and p.problem is None
    assert out == b"Subject: x\r\n\r\nbody\r\n\r\n"
    assert p.leftover == b"QUIT\r\n"


import asyncio  # noqa: E402
import email.utils  # noqa: E402

from relaywatch.clock import SYSTEM_CLOCK  # noqa: E402
from relaywatch.receive.message import _date  # noqa: E402


def test_the_system_clock_waits_for_an_event_or_its_timeout():
    async def run():
        event = asyncio.Event()
        assert await SYSTEM_CLOCK.wait(event, 0) is False          # not set, no time at all
        assert await SYSTEM_CLOCK.wait(event, 0.01) is False
        asyncio.get_running_loop().call_soon(event.set)
        assert await SYSTEM_CLOCK.wait(event, 60) is True          # set while waiting
        assert await SYSTEM_CLOCK.wait(event, 0) is True           # set already
    asyncio.run(run())


def test_a_wait_for_an_event_already_set_still_lets_the_other_tasks_run():
    """Callers wait in loops (the scheduler's wait for more of a destination's mail): a wait that
    returned without a turn of the loop starved every other task (the PostgreSQL cut test hung)."""
    async def run():
        event = asyncio.Event()
        event.set()
        ran = []
        asyncio.get_running_loop().call_soon(ran.append, "other")
        for _ in range(3):
            assert await SYSTEM_CLOCK.wait(event, 0) is True
        assert ran == ["other"]
    asyncio.run(run())


def test_the_received_date_is_rfc5322s_of_that_second():
    assert _date(0) == "Thu, 01 Jan 1970 00:00:00 -0000"
    assert _date(1_800_000_000) == email.utils.formatdate(1_800_000_000.9, localtime=False)
