"""The notices the DSN parameters ask for (RFC 3461 with RFC 3464 reports): notify/notices.py (with notify/dsn.py and notify/report.py), pure.

Which recipients a kind of notice is for (``requested``, ``success_owed``), what a
notice returns of the original (RET), and the report fields ENVID and ORCPT
come back in, each report parsed back with Python's email parser."""

import email
import email.policy

import pytest

from relaywatch.classify.retry import decide
from relaywatch.config import QueueConfig
from relaywatch.dsn_params import MessageDsn, RecipientDsn
from relaywatch.model import (Entry, EntryStatus, Failure, Recipient, RecipientOutcome, RecipientStatus, Route,
                              RouteKind)
from relaywatch.notify.notices import notices_for, owed_recipients, requested, success_owed

POLICY = QueueConfig(message_expiration=1000.0, retry_intervals=(60.0,))
FULL_RETURN_LIMIT = POLICY.ndr_return_limit   # queue.ndr_return_limit's default, 64 KiB
SENDER_ROUTE = Route(RouteKind.LOCAL, "local")
REFUSED = Failure("4.4.316", 450, "Connection refused", "refused", "x", "connect", False, 5.0, "connect.refused")
UNKNOWN = Failure("5.1.1", 550, "No such user", None, "x", "rcpt", True, 5.0, "recipient.not_found")
ORIGINAL = b"Subject: the original\r\nMessage-ID: <m1@contoso.test>\r\n\r\nthe body itself\r\n"
D, F, W = RecipientStatus.DELIVERED, RecipientStatus.FAILED, RecipientStatus.DEFERRED


def parse_report(data: bytes):
    """(the notice, its per-message fields, its per-recipient field blocks, the returned part)."""
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == "delivery-status"
    text, status, returned = msg.get_payload()
    assert text.get_content_type() == "text/plain" and status.get_content_type() == "message/delivery-status"
    per_message, *per_recipient = status.get_payload()
    return msg, per_message, per_recipient, returned


def entry(dsn=MessageDsn(), route=Route(RouteKind.INTERNET, "internet"), sender="alice@contoso.test", **rcpts):
    return Entry(id="E1", sender=sender, received_at=0.0, expires_at=10_000.0, status=EntryStatus.DEFERRED,
                 attempts=1, next_attempt_at=None, route=route, size=1, message_id="<m1@contoso.test>",
                 body_id="b", dsn=dsn,
                 recipients=[Recipient(f"{name}@x.test", dsn=d, position=i) for i, (name, d) in enumerate(rcpts.items())])


def build(e, outcomes, headers=ORIGINAL, delay=False, return_limit=FULL_RETURN_LIMIT):
    """What deliver/record.py does with an attempt: the requested notices, built."""
    d = decide(e, outcomes, POLICY, 100.0)
    owed = owed_recipients(e, requested(e, d.bounced, "FAILURE"))
    return notices_for(e, d, headers, owed=owed, delay=delay, ndr_headers=True, route=SENDER_ROUTE,
                       reporting_mta="relay.test", expiration=1000.0, now=100.0, return_limit=return_limit,
                       succeeded=success_owed(e, d.outcomes))


NEVER, SUCCESS = RecipientDsn(("NEVER",)), RecipientDsn(("SUCCESS",))
FAILURE_ONLY, DELAY_ONLY = RecipientDsn(("FAILURE",)), RecipientDsn(("DELAY",))


@pytest.mark.parametrize("dsn, status, delay, expected", [
    # (ndr, delay notice, success notice)
    (RecipientDsn(), F, False, (True, False, False)),        # no NOTIFY: as always
    (RecipientDsn(), W, True, (False, True, False)),
    (RecipientDsn(), D, False, (False, False, False)),
    (NEVER, F, False, (False, False, False)),
    (NEVER, W, True, (False, False, False)),
    (NEVER, D, False, (False, False, False)),
    (SUCCESS, F, False, (False, False, False)),
    (SUCCESS, W, True, (False, False, False)),
    (SUCCESS, D, False, (False, False, True)),
    (FAILURE_ONLY, F, False, (True, False, False)),
    (FAILURE_ONLY, W, True, (False, False, False)),
    (DELAY_ONLY, W, True, (False, True, False)),
    (DELAY_ONLY, F, False, (False, False, False)),
])
def test_notify_decides_which_notices(dsn, status, delay, expected):
    e = entry(bob=dsn)
    failure = {F: UNKNOWN, W: REFUSED}.get(status)
    n = build(e, [RecipientOutcome("bob@x.test", status, failure)], delay=delay)
    assert (n.ndr is not None, n.delay is not None, n.success is not None) == expected
    assert n.ndr_error is None and n.delay_error is None and n.success_error is None


def test_an_ndr_names_only_the_recipients_that_asked_for_one():
    e = entry(MessageDsn(envid="ENV 42"), bob=NEVER, carol=RecipientDsn(orcpt="rfc822;Carol@old.test"),
              dan=RecipientDsn())
    n = build(e, [RecipientOutcome(f"{name}@x.test", F, UNKNOWN) for name in ("bob", "carol", "dan")])
    msg, per_message, blocks, returned = parse_report(n.ndr.body.data)
    assert per_message["Original-Envelope-Id"] == "ENV 42"
    assert per_message["Reporting-MTA"] == "dns; relay.test"
    assert [(b["Original-Recipient"], b["Final-Recipient"], b["Action"], b["Status"]) for b in blocks] == [
        ("rfc822;Carol@old.test", "rfc822; carol@x.test", "failed", "5.1.1"),
        (None, "rfc822; dan@x.test", "failed", "5.1.1")]
    assert msg["To"] == "alice@contoso.test" and n.ndr.sender == ""


@pytest.mark.parametrize("route, passed_on, action", [
    (Route(RouteKind.INTERNET, "internet"), False, "relayed"),    # a server without DSN: the last word is ours
    (Route(RouteKind.CONNECTOR, "partner"), False, "relayed"),
    (Route(RouteKind.LOCAL, "local"), False, "delivered"),        # a mailbox here
    (Route(RouteKind.INTERNET, "internet"), True, None),          # the server took the NOTIFY: its job
])
def test_notify_success(route, passed_on, action):
    e = entry(MessageDsn("HDRS", "E-1"), route=route, bob=RecipientDsn(("SUCCESS", "FAILURE"), "rfc822;b@old.test"),
              carol=RecipientDsn())
    outcomes = [RecipientOutcome("bob@x.test", D, reply="250 2.0.0 queued as X1", dsn_passed_on=passed_on),
                RecipientOutcome("carol@x.test", D, reply="250 2.0.0 queued as X1", dsn_passed_on=passed_on)]
    n = build(e, outcomes)
    if action is None:
        assert n.messages == []
        return
    assert n.messages == [n.success]
    msg, per_message, [block], returned = parse_report(n.success.body.data)
    assert str(msg["Subject"]) == "Delivered: the original"
    assert per_message["Original-Envelope-Id"] == "E-1"
    assert (block["Original-Recipient"], block["Final-Recipient"], block["Action"], block["Status"]) == (
        "rfc822;b@old.test", "rfc822; bob@x.test", action, "2.0.0")
    assert block["Diagnostic-Code"] == "smtp; 250 2.0.0 queued as X1"
    assert returned.get_content_type() == "text/rfc822-headers"
    assert "the body itself" not in returned.get_content()


def test_no_success_notice_to_the_null_sender():
    e = entry(sender="", bob=SUCCESS)
    assert build(e, [RecipientOutcome("bob@x.test", D)]).messages == []


def test_a_delay_notice_carries_envid_and_orcpt_of_those_that_asked():
    e = entry(MessageDsn(envid="E-2"), bob=RecipientDsn(("DELAY",), "rfc822;B@old.test"), carol=SUCCESS)
    n = build(e, [RecipientOutcome("bob@x.test", W, REFUSED), RecipientOutcome("carol@x.test", W, REFUSED)],
              delay=True)
    _, per_message, [block], _ = parse_report(n.delay.body.data)
    assert per_message["Original-Envelope-Id"] == "E-2"
    assert (block["Original-Recipient"], block["Final-Recipient"], block["Action"], block["Status"]) == (
        "rfc822;B@old.test", "rfc822; bob@x.test", "delayed", "4.4.316")


@pytest.mark.parametrize("kind, route, status, delay, dsn, found", [
    ("ndr", Route(RouteKind.INTERNET, "internet"), F, False, RecipientDsn(("FAILURE",), "rfc822;b@old.test"),
     "permanent"),
    ("delay", Route(RouteKind.INTERNET, "internet"), W, True, RecipientDsn(("DELAY",)), "temporary"),
    ("success", Route(RouteKind.INTERNET, "internet"), D, False, SUCCESS, None),          # Action: relayed
    ("success", Route(RouteKind.LOCAL, "local"), D, False, SUCCESS, None),                # Action: delivered
])
def test_every_notice_reads_back_through_an_independent_dsn_parser(kind, route, status, delay, dsn, found):
    """flufl.bounce (a DSN parser that shares no code with ours) finds each failed recipient
    as permanent, each delayed one as temporary, and no failure in a success notice.
    The 5.6.7 NDR of SMTPUTF8 (message/global-delivery-status, RFC 6533) is parsed in
    tests/integration/test_smtputf8.py, which flufl.bounce does not read."""
    from flufl.bounce import all_failures
    e = entry(MessageDsn("HDRS", "E-9"), route=route, bob=dsn)
    failure = {F: UNKNOWN, W: REFUSED, D: None}[status]
    n = build(e, [RecipientOutcome("bob@x.test", status, failure, reply="250 2.0.0 ok" if status is D else None)],
              delay=delay)
    notice = {"ndr": n.ndr, "delay": n.delay, "success": n.success}[kind]
    assert notice is not None and n.messages == [notice]
    temporary, permanent = all_failures(email.message_from_bytes(notice.body.data))
    as_text = {k: {a.decode() if isinstance(a, bytes) else a for a in v}
               for k, v in (("temporary", temporary), ("permanent", permanent))}
    # flufl.bounce names a recipient by its Original-Recipient when there is one (the ORCPT given)
    named = dsn.orcpt.split(";", 1)[1] if dsn.orcpt else "bob@x.test"
    assert as_text == {k: ({named} if k == found else set()) for k in ("temporary", "permanent")}


@pytest.mark.parametrize("ret, original, full", [
    ("FULL", ORIGINAL, True),
    ("HDRS", ORIGINAL, False),
    (None, ORIGINAL, False),                                      # no RET: the headers, as always
    ("FULL", ORIGINAL + b"x" * FULL_RETURN_LIMIT, False),         # too big to return: the headers
    ("FULL", ORIGINAL.replace(b"itself", b"caf\xc3\xa9"), False),   # 8-bit: a notice is 7-bit
])
def test_ret_decides_what_an_ndr_returns(ret, original, full):
    e = entry(MessageDsn(ret), bob=RecipientDsn())
    n = build(e, [RecipientOutcome("bob@x.test", F, UNKNOWN)], headers=original[:FULL_RETURN_LIMIT + 1])
    _, _, _, returned = parse_report(n.ndr.body.data)
    if full:
        assert returned.get_content_type() == "message/rfc822"
        [inner] = returned.get_payload()
        assert inner["Subject"] == "the original" and inner.get_content().rstrip() == "the body itself"
        # octet for octet: the original is in the notice as it was received
        assert original in n.ndr.body.data
        assert b"\n" not in n.ndr.body.data.replace(b"\r\n", b"")      # no bare LF around it
    else:
        assert returned.get_content_type() == "text/rfc822-headers"
        assert "Subject: the original" in returned.get_content() and b"the body" not in n.ndr.body.data


@pytest.mark.parametrize("limit, original, full", [
    (len(ORIGINAL), ORIGINAL, True),                  # queue.ndr_return_limit: up to it, all of it
    (len(ORIGINAL) - 1, ORIGINAL, False),             # one octet over: the headers
    (16 * 1024 * 1024, ORIGINAL + (b"x" * 76 + b"\r\n") * 1000, True),   # 78 KB: more than the default returns
])
def test_ret_full_returns_up_to_the_configured_limit(limit, original, full):
    e = entry(MessageDsn("FULL"), bob=RecipientDsn())
    n = build(e, [RecipientOutcome("bob@x.test", F, UNKNOWN)], headers=original[:limit + 1], return_limit=limit)
    _, _, _, returned = parse_report(n.ndr.body.data)
    assert returned.get_content_type() == ("message/rfc822" if full else "text/rfc822-headers")
    assert (original in n.ndr.body.data) is full
