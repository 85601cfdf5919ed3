"""Which notices an attempt calls for, and building them (notify/notices.notices_for): pure, no store."""

import email
import email.policy

import pytest

from relaywatch.classify.retry import decide
from relaywatch.config import QueueConfig
from relaywatch.model import Entry, EntryStatus, Failure, RecipientOutcome, RecipientStatus, Route, RouteKind
from relaywatch.notify.notices import delay_notice_due, held_notice, notices_for, owed_recipients
from relaywatch.notify.report import ReportedRecipient

POLICY = QueueConfig(message_expiration=1000.0, retry_intervals=(60.0,))
SENDER_ROUTE = Route(RouteKind.LOCAL, "local")
REFUSED = Failure("4.4.316", 450, "Connection refused", "refused", "x", "connect", False, 5.0, "connect.refused")
UNKNOWN = Failure("5.1.1", 550, "No such user", None, "x", "rcpt", True, 5.0, "recipient.not_found")
HEAD = b"Subject: the original\r\nMessage-ID: <m1@contoso.test>\r\n\r\nbody that is not attached\r\n"


def entry(sender="alice@contoso.test", **kw):
    return Entry(id="E1", sender=sender, received_at=0.0, expires_at=10_000.0, status=EntryStatus.DEFERRED,
                 attempts=1, next_attempt_at=None, route=Route(RouteKind.INTERNET, "internet"), size=1,
                 message_id="<m1@contoso.test>", body_id="b", **kw)


def build(e, outcomes, headers=HEAD, delay=False, ndr_headers=True, route=SENDER_ROUTE):
    d = decide(e, outcomes, POLICY, 100.0)
    owed = owed_recipients(e, d.bounced)
    return notices_for(e, d, headers, owed=owed, delay=delay, ndr_headers=ndr_headers, route=route,
                       reporting_mta="relay.test", expiration=1000.0, now=100.0,
                       return_limit=POLICY.ndr_return_limit)


def parts(message):
    return email.message_from_bytes(message.body.data, policy=email.policy.default)


def test_a_bounce_gets_an_ndr_from_the_null_sender_with_the_original_headers():
    n = build(entry(), [RecipientOutcome("bob@x.test", RecipientStatus.FAILED, UNKNOWN),
                        RecipientOutcome("carol@x.test", RecipientStatus.DELIVERED)])
    assert n.ndr_error is None and n.delay is None and n.unroutable == 0 and n.messages == [n.ndr]
    m = n.ndr
    assert (m.sender, m.recipients, m.is_dsn, m.received_at, m.expires_at, m.client) == (
        "", (("alice@contoso.test", SENDER_ROUTE),), True, 100.0, 1100.0, "relaywatch")
    text = m.body.data.decode()
    assert "bob@x.test" in text and "carol@x.test" not in text
    assert "Subject: the original" in text and "body that is not attached" not in text
    assert m.body.size == len(m.body.data)


@pytest.mark.parametrize("sender, outcomes, delay, expected", [
    # nothing failed, no delay notice due: nothing
    ("alice@contoso.test", [RecipientStatus.DELIVERED], False, (False, False)),
    # never bounce a bounce
    ("", [RecipientStatus.FAILED], False, (False, False)),
    # deferred: a delay notice only when due
    ("alice@contoso.test", [RecipientStatus.DEFERRED], False, (False, False)),
    ("alice@contoso.test", [RecipientStatus.DEFERRED], True, (False, True)),
    # one recipient failed, another waits and the delay notice is due: both
    ("alice@contoso.test", [RecipientStatus.FAILED, RecipientStatus.DEFERRED], True, (True, True)),
])
def test_which_notices(sender, outcomes, delay, expected):
    failure = {RecipientStatus.FAILED: UNKNOWN, RecipientStatus.DEFERRED: REFUSED}
    n = build(entry(sender), [RecipientOutcome(f"r{i}@x.test", s, failure.get(s)) for i, s in enumerate(outcomes)],
              delay=delay)
    assert (n.ndr is not None, n.delay is not None) == expected
    if n.delay is not None:
        assert "Delayed: the original" in str(parts(n.delay)["Subject"])


def test_no_notice_to_a_sender_without_a_mailbox_here():
    n = build(entry(), [RecipientOutcome("a@x", RecipientStatus.FAILED, UNKNOWN),
                        RecipientOutcome("b@x", RecipientStatus.DEFERRED, REFUSED)], delay=True, route=None)
    assert n.messages == [] and n.unroutable == 2 and n.ndr_error is None and n.delay_error is None


def test_headers_that_cannot_be_read_fail_the_notices_that_need_them_only():
    broken = OSError(5, "Input/output error")
    outcomes = [RecipientOutcome("a@x", RecipientStatus.FAILED, UNKNOWN),
                RecipientOutcome("b@x", RecipientStatus.DEFERRED, REFUSED)]
    n = build(entry(), outcomes, headers=broken, delay=True)
    assert n.ndr_error is broken and n.delay_error is broken and n.messages == []
    # An NDR given up on its headers is still built (without them); the delay notice still fails.
    n = build(entry(), outcomes, headers=broken, delay=True, ndr_headers=False)
    assert n.ndr is not None and n.delay_error is broken and "Subject: the original" not in n.ndr.body.data.decode()
    # The sender's route could not be found: every notice fails, none is called unroutable.
    n = build(entry(), outcomes, headers=broken, delay=True, ndr_headers=False, route=None)
    assert n.ndr_error is broken and n.delay_error is broken and n.unroutable == 0


def test_a_held_back_ndr_is_owed_with_the_new_bounces_and_keeps_its_shape():
    owed = [ReportedRecipient("a@x", RecipientStatus.EXPIRED, REFUSED), ReportedRecipient("b@x", RecipientStatus.FAILED, None)]
    held = held_notice(owed, "ValueError: " + "x" * 600, since=50.0, tries=2, retry_at=160.0)
    assert (held["since"], held["tries"], held["retry_at"], len(held["error"])) == (50.0, 2, 160.0, 500)
    assert owed_recipients(entry(notice_pending=held), []) == owed
    now_failed = RecipientOutcome("c@x", RecipientStatus.FAILED, UNKNOWN)
    assert owed_recipients(entry(notice_pending=held), [now_failed]) == \
        owed + [ReportedRecipient("c@x", RecipientStatus.FAILED, UNKNOWN)]
    assert owed_recipients(entry(notice_pending={"recipients": [{"address": "d@x"}]}), []) == [   # another version
        ReportedRecipient("d@x", RecipientStatus.FAILED, None)]
    n = build(entry(notice_pending=held), [])
    assert n.ndr is not None and "a@x" in n.ndr.body.data.decode() and "b@x" in n.ndr.body.data.decode()


@pytest.mark.parametrize("kw, after, now, due", [
    ({}, 60.0, 59.0, False),
    ({}, 60.0, 60.0, True),
    ({}, None, 1e9, False),                       # the connector sends none
    ({"delay_notified": True}, 60.0, 100.0, False),   # once per message
    ({"is_dsn": True}, 60.0, 100.0, False),
    ({"sender": ""}, 60.0, 100.0, False),
])
def test_delay_notice_due(kw, after, now, due):
    sender = kw.pop("sender", "alice@contoso.test")
    assert delay_notice_due(entry(sender, **kw), after, now) is due
