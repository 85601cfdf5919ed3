"""The retry decision (classify/retry.py), as tables: no store, no clock."""

import pytest

from relaywatch.classify.retry import decide, next_attempt_at, notice_given_up, notice_retry, settle
from relaywatch.config import QueueConfig
from relaywatch.model import Entry, EntryStatus, Failure, RecipientOutcome, RecipientStatus, Route, RouteKind

POLICY = QueueConfig(message_expiration=1000.0, retry_intervals=(60.0, 300.0, 600.0))
REFUSED = Failure("4.4.316", 450, "Connection refused", "refused", "x", "connect", False, 0.0, "connect.refused")
UNKNOWN = Failure("5.1.1", 550, "No such user", None, "x", "rcpt", True, 0.0, "recipient.not_found")
D, F, X, OK = RecipientStatus.DEFERRED, RecipientStatus.FAILED, RecipientStatus.EXPIRED, RecipientStatus.DELIVERED


def entry(attempts=0, expires_at=10_000.0):
    return Entry(id="E1", sender="a@x.test", received_at=0.0, expires_at=expires_at, status=EntryStatus.QUEUED,
                 attempts=attempts, next_attempt_at=None, route=Route(RouteKind.INTERNET, "internet"), size=1,
                 message_id="", body_id="b")


def outcome(address, status):
    failure = {D: REFUSED, X: REFUSED, F: UNKNOWN}.get(status)
    return RecipientOutcome(address, status, failure)


def test_retry_schedule_repeats_the_last_interval_and_stops_at_expiry():
    intervals = (60.0, 300.0, 600.0)
    assert next_attempt_at(1, 0, 10_000, intervals) == 60
    assert next_attempt_at(3, 0, 10_000, intervals) == 600
    assert next_attempt_at(9, 0, 10_000, intervals) == 600
    assert next_attempt_at(9, 9_900, 10_000, intervals) == 10_000   # the last try is at expiry


def test_deferred_recipients_expire_after_the_deadline():
    out = [RecipientOutcome("a@x", D, REFUSED), RecipientOutcome("b@x", OK)]
    assert [o.status for o in settle(out, 99, 100)] == [D, OK]
    assert [o.status for o in settle(out, 100, 100)] == [X, OK]


# (attempts before, expires_at, now, counted, expire, statuses in) ->
#     (attempts after, next_attempt_at, expires_at, statuses recorded, bounced, delayed)
TABLE = [
    # the first failure waits the first interval; a delivered recipient changes nothing
    ((0, 10_000, 100, True, False, [D, OK]), (1, 160, 10_000, [D, OK], [], ["r0"])),
    # the third and later wait the last interval
    ((2, 10_000, 100, True, False, [D]), (3, 700, 10_000, [D], [], ["r0"])),
    ((8, 10_000, 100, True, False, [D]), (9, 700, 10_000, [D], [], ["r0"])),
    # never later than the expiry: the last try is made then
    ((5, 10_000, 9_800, True, False, [D]), (6, 10_000, 10_000, [D], [], ["r0"])),
    # past the expiry deferred recipients expire and bounce; failed ones bounce at once
    ((5, 10_000, 10_000, True, False, [D, F, OK]), (6, 10_000, 10_000, [X, F, OK], ["r0", "r1"], [])),
    ((0, 10_000, 100, True, False, [F, D]), (1, 160, 10_000, [F, D], ["r0"], ["r1"])),
    # no attempt made (an operator's bounce, a held NDR alone): the count stays, the first interval at least
    ((0, 10_000, 100, False, False, [F]), (0, 160, 10_000, [F], ["r0"], [])),
    ((3, 10_000, 100, False, False, []), (3, 700, 10_000, [], [], [])),
    # the operator's expire: the expiry is now
    ((2, 10_000, 100, False, True, [X]), (2, 100, 100, [X], ["r0"], [])),
    ((2, 10_000, 100, False, True, [D]), (2, 100, 100, [X], ["r0"], [])),
    ((2, 50, 100, False, True, [X]), (2, 100, 50, [X], ["r0"], [])),
]


@pytest.mark.parametrize("given,expected", TABLE)
def test_decide(given, expected):
    attempts, expires_at, now, counted, expire, statuses = given
    outcomes = [outcome(f"r{i}", s) for i, s in enumerate(statuses)]
    d = decide(entry(attempts, expires_at), outcomes, POLICY, now, counted=counted, expire=expire)
    assert (d.attempts, d.next_attempt_at, d.expires_at, [o.status for o in d.outcomes],
            [o.address for o in d.bounced], [o.address for o in d.delayed]) == expected
    # failures travel with their recipients
    assert [o.failure for o in d.outcomes] == [o.failure for o in outcomes]


def test_decide_keeps_the_outcomes_object_when_nothing_expires():
    outcomes = [outcome("r0", OK)]
    assert decide(entry(), outcomes, POLICY, 100).outcomes is outcomes   # no copy per delivered message


def test_an_ndr_held_back_alone_is_due_on_its_own_schedule():
    held = {"retry_at": 4242.0}
    alone = decide(entry(1), [], POLICY, 100, counted=False)
    assert alone.next_attempt(held) == 4242.0 and alone.next_attempt(None) == alone.next_attempt_at
    waiting = decide(entry(1), [outcome("r0", D)], POLICY, 100)
    assert waiting.next_attempt(held) == waiting.next_attempt_at == 400   # recipients still wait: their schedule


# (notice_pending, now) -> (tries, since, retry_at) or None (given up)
NOTICE_TABLE = [
    (None, 100, (1, 100, 160)),
    ({"since": 50, "tries": 1}, 100, (2, 50, 400)),
    ({"since": 50, "tries": 7}, 100, (8, 50, 700)),
    ({"since": 50}, 100, (1, 50, 160)),                 # written by another version: tolerated
    ({"since": 50, "tries": 3}, 1049, (4, 50, 1649)),
    ({"since": 50, "tries": 3}, 1050, None),            # a message lifetime later: given up
]


@pytest.mark.parametrize("held,now,expected", NOTICE_TABLE)
def test_notice_retry(held, now, expected):
    r = notice_retry(held, now, POLICY)
    assert (None if r is None else (r.tries, r.since, r.retry_at)) == expected
    assert notice_given_up(held, now, POLICY) is (expected is None)
