"""store/trace.py: the trace's JSON built from stored attempt text is the record trace_record builds."""

import json

from relaywatch.model import (Attempt, Destination, Entry, EntryStatus, Failure, Recipient, RecipientOutcome,
                              RecipientStatus, Route, RouteKind)
from relaywatch.store.trace import REPLY_CHARS, TRACE_ATTEMPTS, end_of, trace_json, trace_record

MX = Destination("mx.a.test", "127.0.0.10", 25, 1, 1)


def entry() -> Entry:
    return Entry(id="E1", sender="s@x.test", received_at=1.0, expires_at=9.0, status=EntryStatus.ACTIVE,
                 attempts=0, next_attempt_at=1.0, route=Route(RouteKind.CONNECTOR, "a"), size=20, message_id="<m1@x.test>", body_id="B1",
                 recipients=[Recipient("1@a.test", RecipientStatus.DEFERRED),
                             Recipient("2@a.test", RecipientStatus.DELIVERED, position=1)])


def deferral(at: float, reply: str | None) -> str:
    """An attempt as the attempts table keeps it (store/queue.py: json.dumps, compact)."""
    failure = Failure(code="4.4.316", smtp_code=451, title="Connection refused", subtype="refused",
                      detail="mx.a.test refused the connection", phase="connect", permanent=False, at=at,
                      kind="connect.refused", destination=MX, reply=reply, errno="ECONNREFUSED")
    outcome = RecipientOutcome("1@a.test", RecipientStatus.DEFERRED, failure)
    data = Attempt(at, 0.01, MX, (outcome,), tried=(failure,)).to_dict()
    return json.dumps(data, separators=(",", ":"))


def test_stored_attempts_go_in_as_they_are_and_long_replies_are_cut_as_trace_record_cuts_them():
    stored = [deferral(2.0, None), deferral(3.0, "421 " + "é\"x" * 400), deferral(4.0, "421 4.3.2 busy"),
              deferral(5.0, "4" * REPLY_CHARS)]
    delivered = RecipientOutcome("1@a.test", RecipientStatus.DELIVERED, reply="250 " + "y" * 900)
    attempt = Attempt(6.0, 0.02, MX, (delivered,)).to_dict()
    end = end_of((), 6.0)
    got = json.loads(trace_json(entry(), stored, attempt, end, [delivered]))
    assert got == trace_record(entry(), [*map(json.loads, stored), attempt], end, [delivered])
    assert [len(a["recipients"][0]["error"]["reply"] or "") for a in got["attempts"][:4]] == [
        0, REPLY_CHARS, 14, REPLY_CHARS]
    assert got["end"]["event"] == "delivered" and got["entry"]["attempts"] == 5


def test_past_the_attempts_kept_only_the_newest_stay_and_the_count_is_of_all():
    stored = [deferral(float(n), "421 busy") for n in range(TRACE_ATTEMPTS + 5)]
    for attempt in (None, Attempt(99.0, 0.02, MX, ()).to_dict()):
        got = json.loads(trace_json(entry(), stored, attempt, None))
        assert got == trace_record(entry(), [*map(json.loads, stored), *([attempt] if attempt else [])], None)
        assert len(got["attempts"]) == TRACE_ATTEMPTS and got["end"] is None
