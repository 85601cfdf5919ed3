"""Notices for messages with raw 8-bit headers (hardening issue 9, item 8).

A message accepted under BODY=8BITMIME may carry 8-bit header bytes (UTF-8,
Latin-1, anything).  Its NDR and delay notice are built from those bytes and
must always build; and if a notice ever cannot be built, the recipients the
destination accepted are still recorded and never get the message again.
"""

import asyncio
import email
import email.policy
import logging
import random
import smtplib
import sqlite3
import time
from pathlib import Path

import pytest
from flufl.bounce import all_failures, scan_message

from helpers import LOOPBACK, FakeClock, Sink, SinkHandler, advance, eventually
from relaywatch.model import (
    Destination, Failure, NewMessage, RecipientOutcome, RecipientStatus, Route, RouteKind, StoredBody,
)
from relaywatch.notify.dsn import build_delay_notice, build_ndr
from relaywatch.notify.report import ReportedRecipient
from relaywatch.store.base import QueueQuery
from relaywatch.store.sqlite import SqliteStore

pytestmark = pytest.mark.both_loops   # delivery end to end: asyncio and uvloop (serve runs uvloop)


NOW = 1_800_000_000.0


def _failure(reply: str = "550 5.1.1 <ghost@fabrikam.test>: no such user") -> Failure:
    return Failure("5.1.1", 550, "Unknown recipient", None, "mx.fabrikam.test said: " + reply, "rcpt", True,
                   NOW, "smtp.permanent_reply", Destination("mx.fabrikam.test", "192.0.2.7", 25), reply=reply)


def _ndr(headers: bytes, failure: Failure | None = None, message_id: str = "<8bit@client.test>") -> bytes:
    return build_ndr(reporting_mta="relay.test", original_sender="alice@contoso.test", original_headers=headers,
                     original_message_id=message_id, received_at=NOW - 60, expires_at=NOW + 86400,
                     first_failure_at=None, attempts=1,
                     recipients=[ReportedRecipient("ghost@fabrikam.test", RecipientStatus.FAILED,
                                                 failure or _failure())], now=NOW)


def _headers_part_bytes(raw: bytes) -> bytes:
    """The text/rfc822-headers part, transfer-decoded, with CRLF line ends."""
    part = email.message_from_bytes(raw).get_payload()[2]
    assert part.get_content_type() == "text/rfc822-headers"
    return part.get_payload(decode=True).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _assert_sendable_anywhere(raw: bytes) -> None:
    assert max(raw) < 128, "a notice is 7-bit: it needs no BODY=8BITMIME"
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert b"\r" not in raw.replace(b"\r\n", b"") and b"\n" not in raw.replace(b"\r\n", b"")


EIGHT_BIT_HEADERS = {
    "utf8 subject": (b"From: sender@example.org\r\nSubject: Caf\xc3\xa9 cr\xc3\xa8me \xe2\x82\xac\r\n"
                     b"Message-ID: <8bit@client.test>\r\n\r\n", "Undeliverable: Café crème €"),
    "latin-1 subject": (b"From: sender@example.org\r\nSubject: caf\xe9 na\xefve\r\n"
                        b"Message-ID: <8bit@client.test>\r\n\r\n", "Undeliverable: caf\ufffd na\ufffdve"),
    "utf8 from display name": (b"From: J\xc3\xb6rg M\xc3\xbcller <joerg@example.org>\r\nSubject: plain\r\n\r\n",
                               "Undeliverable: plain"),
    "latin-1 from display name": (b"From: \"J\xf6rg\" <joerg@example.org>\r\nSubject: plain\r\n\r\n",
                                  "Undeliverable: plain"),
    "folded 8-bit subject": (b"Subject: first \xc3\xa9\r\n second \xe9\r\nFrom: a@example.org\r\n\r\n",
                             None),
    "2000-octet header line": (b"Subject: long\r\nX-Long: " + b"y" * 2000 + b"\r\n\r\n", "Undeliverable: long"),
}


@pytest.mark.parametrize("name", list(EIGHT_BIT_HEADERS))
def test_ndr_carries_8bit_headers_octet_for_octet(name):
    headers, subject = EIGHT_BIT_HEADERS[name]
    raw = _ndr(headers)
    _assert_sendable_anywhere(raw)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    if subject is not None:
        assert msg["Subject"] == subject
    human, status, attached = msg.iter_parts()
    assert "ghost@fabrikam.test" in human.get_content()
    assert status.get_payload()[1]["Final-Recipient"] == "rfc822; ghost@fabrikam.test"
    assert attached["Content-Transfer-Encoding"] == "quoted-printable"   # RFC 3462/6522 for non-7-bit headers
    assert _headers_part_bytes(raw) == headers.rstrip(b"\r\n") + b"\r\n"
    assert scan_message(email.message_from_bytes(raw)) in ({b"ghost@fabrikam.test"}, {"ghost@fabrikam.test"})


def test_7bit_headers_stay_as_they_are():
    headers = b"From: sender@example.org\r\nSubject: =?utf-8?q?Caf=C3=A9?=\r\n\r\n"
    raw = _ndr(headers)
    attached = email.message_from_bytes(raw).get_payload()[2]
    assert attached["Content-Transfer-Encoding"] is None
    assert attached.get_payload() .replace("\r\n", "\n") == headers.decode().rstrip("\r\n").replace("\r\n", "\n") + "\n"
    assert email.message_from_bytes(raw, policy=email.policy.default)["Subject"] == "Undeliverable: Café"


def test_delay_notice_with_8bit_headers():
    headers, _ = EIGHT_BIT_HEADERS["latin-1 subject"]
    deferred = Failure("4.4.316", 450, "Connection refused", "refused", "mx.fabrikam.test refused the connection",
                       "connect", False, NOW, "connect.refused", Destination("mx.fabrikam.test"))
    raw = build_delay_notice(reporting_mta="relay.test", original_sender="alice@contoso.test",
                             original_headers=headers.rstrip(b"\r\n") + b"\r\nX-Name: J\xc3\xb6rg\r\n\r\n", original_message_id="<d@x>",
                             received_at=NOW - 3600, expires_at=NOW + 86400,
                             recipients=[ReportedRecipient("bob@fabrikam.test", RecipientStatus.DEFERRED, deferred)],
                             now=NOW)
    _assert_sendable_anywhere(raw)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Subject"] == "Delayed: caf\ufffd na\ufffdve"
    assert msg.get_payload()[1].get_payload()[1]["Action"] == "delayed"
    assert _headers_part_bytes(raw) == headers.rstrip(b"\r\n") + b"\r\nX-Name: J\xc3\xb6rg\r\n"
    temporary, permanent = all_failures(email.message_from_bytes(raw))
    assert not permanent and {a.decode() if isinstance(a, bytes) else a for a in temporary} == {"bob@fabrikam.test"}


def test_diagnostic_with_8bit_reply_text_stays_ascii():
    # The SMTP client decodes an 8-bit reply with U+FFFD; the status fields are ASCII (RFC 6533 escapes).
    raw = _ndr(b"Subject: x\r\n\r\n", _failure("550 5.1.1 Empf\ufffdnger unbekannt"))
    _assert_sendable_anywhere(raw)
    block = email.message_from_bytes(raw).get_payload()[1].get_payload()[1]
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 Empf\\x{FFFD}nger unbekannt"
    text = email.message_from_bytes(raw, policy=email.policy.default).get_payload()[0].get_content()
    assert "Empf\ufffdnger unbekannt" in text


@pytest.mark.parametrize("message_id", ["<caf\ufffd@x>", "<a@x>\rBcc: evil@x", "<" + "x" * 2000 + "@x>", "junk"])
def test_odd_message_ids_never_break_the_ndr(message_id):
    raw = _ndr(b"Subject: x\r\n\r\n", message_id=message_id)
    _assert_sendable_anywhere(raw)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["In-Reply-To"] is None and msg["Bcc"] is None


def test_random_header_bytes_always_build():
    rng = random.Random(9)
    alphabet = bytes(range(256))
    for _ in range(300):
        lines = [b"Subject: " + bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 120)))
                 .replace(b"\r", b"").replace(b"\n", b"")]
        lines += [bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 80))).replace(b"\n", b"")
                  for _ in range(rng.randrange(0, 5))]
        headers = b"\r\n".join(lines) + b"\r\n\r\n"
        raw = _ndr(headers)
        _assert_sendable_anywhere(raw)
        email.message_from_bytes(raw, policy=email.policy.default).get_payload()


# -- end to end: the crash loop of issue 9 item 8, over real sockets --------------------------

def connector(name, port, domains):
    return {"name": name, "type": "on_premises", "domains": domains,
            "smart_hosts": [f"{LOOPBACK}:{port}"], "tls": "none"}


def _reject_ghost(address: str) -> str | None:
    return "550 5.1.1 <ghost@fabrikam.test>: Recipient address rejected" if address.startswith("ghost") else None


async def _send_8bit(relay, content: bytes) -> None:
    port = relay.port

    def submit():
        with smtplib.SMTP(LOOPBACK, port, timeout=30) as client:
            client.ehlo("client.test")
            refused = client.sendmail("alice@contoso.test", ["bob@fabrikam.test", "ghost@fabrikam.test"], content,
                                      mail_options=["BODY=8BITMIME"])
            assert refused == {}
    await asyncio.to_thread(submit)


def _copies(sink, address="bob@fabrikam.test"):
    return [m for m in sink.messages if address in m.recipients]


async def _empty(relay):
    return (await relay.store.counts()) == {}


SHORT_LEASE = {"retry_intervals": ["0.3s"], "message_expiration": "1h", "lease_time": "0.5s"}


async def test_8bit_subject_partly_bounced_is_delivered_once_and_bounced(relay_factory):
    """The report: an 8-bit Subject under BODY=8BITMIME, one recipient accepted and
    one refused with 550: the NDR could not be built, the lease lapsed and the good
    recipient got a copy every lease period.  Now: one copy, one NDR, queue empty."""
    sink = await Sink(SinkHandler(rcpt_reply=_reject_ghost)).start()
    try:
        clock = FakeClock()     # the lease lapses when the test says
        relay = await relay_factory(clock=clock, queue=SHORT_LEASE,
                                    connectors=[connector("onprem", sink.port, ["fabrikam.test"])])
        headers = (b"From: J\xc3\xb6rg <sender@contoso.test>\r\nTo: bob@fabrikam.test\r\n"
                   b"Subject: R\xc3\xa9sum\xc3\xa9 \xe9t\xe9\r\nMessage-ID: <item8@client.test>\r\n\r\n")
        await _send_8bit(relay, headers + b"Caf\xc3\xa9\r\n")
        await eventually(lambda: relay.maildir("alice@contoso.test") or len(_copies(sink)) > 1,
                         what="the NDR to the sender (or a second copy to bob)")
        assert len(_copies(sink)) == 1, "bob got the message again"
        ndrs = relay.maildir("alice@contoso.test")
        await eventually(lambda: _empty(relay), what="the entry to leave the queue")
        for _ in range(4):      # several lease periods pass, nothing more comes
            await advance(clock, relay, 1)
        assert len(_copies(sink)) == 1
        assert len(relay.maildir("alice@contoso.test")) == 1
        report = email.message_from_bytes(ndrs[0], policy=email.policy.default)
        assert report["Subject"] == "Undeliverable: Résumé \ufffdt\ufffd"
        per_rcpt = report.get_payload()[1].get_payload()[1]
        assert per_rcpt["Final-Recipient"] == "rfc822; ghost@fabrikam.test" and per_rcpt["Status"] == "5.1.1"
        assert b"Subject: R\xc3\xa9sum\xc3\xa9 \xe9t\xe9\r\n" in _headers_part_bytes(ndrs[0])
        assert b"From: J\xc3\xb6rg <sender@contoso.test>\r\n" in _headers_part_bytes(ndrs[0])
        assert scan_message(email.message_from_bytes(ndrs[0])) in ({b"ghost@fabrikam.test"}, {"ghost@fabrikam.test"})
    finally:
        await sink.stop()


class HidesTheBody(SinkHandler):
    """Accepts bob, refuses ghost, and on DATA moves the relay's spool files away:
    the body was sent in full, but reading its headers for the NDR now fails
    (what a disk error or an over-eager cleanup does).  ``restore()`` puts them
    back; so does the next MAIL, so that a redelivery (the bug) really delivers."""

    def __init__(self, spool: Path, hidden: Path):
        super().__init__(rcpt_reply=_reject_ghost)
        self.spool, self.hidden = spool, hidden

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.restore()
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_DATA(self, server, session, envelope):
        self.hidden.mkdir(exist_ok=True)
        for path in self.spool.glob("body-*"):
            path.rename(self.hidden / path.name)
        return await super().handle_DATA(server, session, envelope)

    def restore(self) -> None:
        if not self.hidden.exists():
            return
        for path in self.hidden.glob("body-*"):
            path.rename(self.spool / path.name)


async def test_a_notice_that_cannot_be_built_never_becomes_a_redelivery(relay_factory, tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="relaywatch.scheduler")
    handler = HidesTheBody(tmp_path / "data" / "spool", tmp_path / "hidden")
    sink = await Sink(handler).start()
    try:
        relay = await relay_factory(queue=SHORT_LEASE, alerts={"evaluate_interval": "0.2s"},
                                    connectors=[connector("onprem", sink.port, ["fabrikam.test"])])
        big = b"x" * 200 + b"\r\n"
        content = (b"From: sender@contoso.test\r\nSubject: big one\r\nMessage-ID: <big@client.test>\r\n\r\n"
                   + big * 1000)    # over 128 KiB: the body is a spool file
        await _send_8bit(relay, content)

        async def held_or_sent_again():
            entries = [e for e in await relay.queue() if e.get("notice_pending")]
            return entries[0] if entries else len(_copies(sink)) > 1
        held = await eventually(held_or_sent_again, what="the NDR to be held back (or bob to get a second copy)")
        assert len(_copies(sink)) == 1, "bob got the message again"
        assert {r["address"]: r["status"] for r in held["recipients"]} == {
            "bob@fabrikam.test": "delivered", "ghost@fabrikam.test": "failed"}   # both final
        assert held["notice_pending"]["recipients"] == ["ghost@fabrikam.test"]
        assert "FileNotFoundError" in held["notice_pending"]["error"]
        lines = [r.getMessage() for r in caplog.records if "could not be built" in r.getMessage()]
        assert lines and held["id"] in lines[0] and "tried again" in lines[0]

        incident = await eventually(lambda: _incident(relay, "watch:notice_failed"), what="an incident")
        assert incident["severity"] == "critical"

        # Tried again on its own, several lease periods: still no second copy.
        await eventually(lambda: _notice_tries(relay, held["id"], 3), what="the NDR to be tried again")
        assert len(_copies(sink)) == 1

        handler.restore()    # the cause goes away: the next try sends the NDR with the headers
        ndr = (await eventually(lambda: relay.maildir("alice@contoso.test"), what="the NDR"))[0]
        await eventually(lambda: _empty(relay), what="the entry to leave the queue")
        assert b"Subject: big one" in _headers_part_bytes(ndr)
        await eventually(lambda: _incident(relay, "watch:notice_failed", state="resolved"), what="the resolve")
        assert len(_copies(sink)) == 1
    finally:
        await sink.stop()


async def _incident(relay, code, state="open"):
    for inc in await relay.store.incidents(include_resolved=True):
        if inc.code == code and inc.state == state:
            return inc.to_dict()
    return None


async def _notice_tries(relay, entry_id, n):
    entry = await relay.store.get(entry_id)
    return entry is not None and entry.notice_pending and entry.notice_pending["tries"] >= n


async def test_a_notice_that_never_builds_goes_without_headers_in_the_end(relay_factory, tmp_path):
    handler = HidesTheBody(tmp_path / "data" / "spool", tmp_path / "hidden")
    sink = await Sink(handler).start()
    try:
        relay = await relay_factory(queue={**SHORT_LEASE, "message_expiration": "2s"},
                                    connectors=[connector("onprem", sink.port, ["fabrikam.test"])])
        await _send_8bit(relay, b"Subject: big\r\n\r\n" + (b"y" * 200 + b"\r\n") * 1000)
        ndr = (await eventually(lambda: relay.maildir("alice@contoso.test"), what="the NDR without headers"))[0]
        await eventually(lambda: _empty(relay), what="the entry to leave the queue")
        assert b"Subject" not in _headers_part_bytes(ndr)
        report = email.message_from_bytes(ndr)
        assert report.get_payload()[1].get_payload()[1]["Final-Recipient"] == "rfc822; ghost@fabrikam.test"
        assert len(_copies(sink)) == 1
    finally:
        await sink.stop()


# -- the store keeps a held-back NDR: SQLite and PostgreSQL ------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request, tmp_path):
    if request.param == "sqlite":
        s = SqliteStore(tmp_path / "q.sqlite3")
    else:
        from relaywatch.store.postgres import PostgresStore
        s = PostgresStore(request.getfixturevalue("pg_dsn"))
    await s.open()
    yield s
    await s.close()


async def test_store_keeps_an_entry_for_its_held_back_ndr_alone(store):
    now = time.time()
    route = Route(RouteKind.CONNECTOR, "a")
    data = b"Subject: x\r\n\r\nbody\r\n"
    [entry_id] = await store.enqueue(NewMessage(
        sender="s@x.test", recipients=(("bob@a", route), ("ghost@a", route)),
        body=StoredBody(size=len(data), data=data), received_at=now, expires_at=now + 3600))
    [entry] = await store.lease("w", 10, 30, now)
    held = {"recipients": [{"address": "ghost@a", "status": "failed", "failure": _failure().to_dict()}],
            "error": "OSError: disk", "since": now, "tries": 1, "retry_at": now + 5}
    await store.record(entry_id, "w", None, [RecipientOutcome("bob@a", RecipientStatus.DELIVERED),
                                             RecipientOutcome("ghost@a", RecipientStatus.FAILED, _failure())],
                       now + 5, notice_pending=held)
    kept = await store.get(entry_id)
    assert kept is not None and kept.notice_pending == held and kept.pending == []
    assert [(h.entry_id, h.error) for h in await store.held_notices()] == [(entry_id, "OSError: disk")]
    assert kept.status.value == "deferred" and kept.next_attempt_at == pytest.approx(now + 5)
    assert await store.lease("w", 10, 30, now + 1) == []          # not before its retry
    [again] = await store.lease("w", 10, 30, now + 6)
    assert again.notice_pending == held and again.pending == []   # nothing left to deliver
    ndr = NewMessage(sender="", recipients=(("s@x.test", route),), body=StoredBody(size=3, data=b"NDR"),
                     received_at=now, expires_at=now + 3600, is_dsn=True)
    await store.record(entry_id, "w", None, [], None, [ndr])
    assert await store.get(entry_id) is None and await store.held_notices() == []
    assert [e.is_dsn for e in await store.list(QueueQuery())] == [True]


async def test_a_queue_made_before_notice_pending_is_migrated(tmp_path):
    path = tmp_path / "old.sqlite3"
    s = SqliteStore(path)
    await s.open()
    await s.close()
    conn = sqlite3.connect(path)
    conn.execute("DROP INDEX entries_notice")
    conn.execute("ALTER TABLE entries DROP COLUMN notice_pending")
    conn.commit()
    conn.close()
    s = SqliteStore(path)
    await s.open()
    try:
        assert await s.counts() == {}
        assert await s.lease("w", 10, 30, 0) == []
        assert await s.held_notices() == []
    finally:
        await s.close()
