"""The message trace's store contract (store/trace.py), the same over memory, SQLite and PostgreSQL.

A delivered message leaves the queue; what the trace needs of it is kept, in
the transaction that removes it, for queue.trace_retention, and pruned after.
"""

import time

import pytest

from relaywatch.model import (
    Attempt, Destination, NewMessage, RecipientOutcome, RecipientStatus, Route, RouteKind, StoredBody,
)
from relaywatch.store.trace import REPLY_CHARS

from helpers import STORE_BACKENDS, eventually, opened_store

A = Route(RouteKind.CONNECTOR, "a")
DELIVERED, DEFERRED, FAILED = RecipientStatus.DELIVERED, RecipientStatus.DEFERRED, RecipientStatus.FAILED


def msg(*addresses, message_id="<m1@x.test>", is_dsn=False):
    now = time.time()
    data = b"Subject: x\r\n\r\nbody\r\n"
    return NewMessage(sender="s@x.test", recipients=tuple((a, A) for a in addresses),
                      body=StoredBody(size=len(data), data=data), received_at=now, expires_at=now + 3600,
                      message_id=message_id, client="127.0.0.9", helo="client.x.test", auth_user="alice",
                      is_dsn=is_dsn)


def attempt(*outcomes, reply="250 2.0.0 queued as ABC"):
    return Attempt(time.time(), 0.25, Destination("mx.a.test", "127.0.0.10", 25),
                   tuple(RecipientOutcome(a, s, reply=reply) for a, s in outcomes))


@pytest.fixture(params=STORE_BACKENDS)
async def store(request, tmp_path):
    async with opened_store(request.param, tmp_path, request) as s:
        yield s


async def leased(store, entry_id):
    [entry] = [e for e in await store.lease("w", 10, 60, time.time() + 1) if e.id == entry_id]
    return entry


async def test_a_delivered_message_is_traced_after_it_left_the_queue(store):
    [entry_id] = await store.enqueue(msg("1@a.test", "2@a.test"))
    queued = await store.trace(entry_id.lower())
    assert queued["end"] is None and queued["entry"]["status"] == "queued" and queued["attempts"] == []
    entry = await leased(store, entry_id)
    long_reply = "250 " + "x" * 2000
    await store.record(entry.id, "w", attempt(("1@a.test", DELIVERED), ("2@a.test", DELIVERED), reply=long_reply),
                       [RecipientOutcome("1@a.test", DELIVERED), RecipientOutcome("2@a.test", DELIVERED)], None)
    assert await store.get(entry_id) is None
    trace = await store.trace(entry_id)
    assert trace["entry"] | {"received_at": 0} == {
        "id": entry_id, "message_id": "<m1@x.test>", "sender": "s@x.test", "received_at": 0,
        "expires_at": trace["entry"]["expires_at"], "size": 20, "route": "connector", "connector": "a",
        "domain": "", "client": "127.0.0.9", "helo": "client.x.test", "auth_user": "alice", "is_dsn": False,
        "status": "active", "attempts": 1}
    assert trace["recipients"] == [{"address": "1@a.test", "status": "delivered"},
                                   {"address": "2@a.test", "status": "delivered"}]
    [tried] = trace["attempts"]
    assert tried["destination"]["host"] == "mx.a.test" and tried["destination"]["ip"] == "127.0.0.10"
    assert tried["duration"] == 0.25 and len(tried["recipients"][0]["reply"]) == REPLY_CHARS
    assert trace["end"]["event"] == "delivered" and trace["end"]["notices"] == [] and trace["audit"] == []
    for form in ("<m1@x.test>", "m1@x.test"):
        assert await store.trace_ids(form) == [entry_id]
    assert await store.trace_ids("<other@x.test>") == []


async def test_a_first_try_recorded_with_its_leased_entry_keeps_the_trace_the_rows_give(store):
    # The scheduler passes the entry it leased (QueueStore.record's leased): the SQL store
    # builds a first try's trace from it before the transaction; it must be the same trace.
    traces = []
    for passed in (False, True):
        [entry_id] = await store.enqueue(msg("1@a.test", "2@a.test"))
        entry = await leased(store, entry_id)
        done = [RecipientOutcome("1@a.test", DELIVERED), RecipientOutcome("2@a.test", DELIVERED)]
        await store.record(entry.id, "w", attempt(("2@a.test", DELIVERED), ("1@a.test", DELIVERED)), done, None,
                           leased=entry if passed else None)
        trace = await store.trace(entry_id)
        trace["entry"] |= {"id": "", "received_at": 0, "expires_at": 0}
        trace["end"]["at"] = 0
        trace["attempts"][0]["at"] = 0
        traces.append(trace)
    assert traces[0] == traces[1]
    assert traces[1]["recipients"] == [{"address": "1@a.test", "status": "delivered"},
                                       {"address": "2@a.test", "status": "delivered"}]


async def test_a_leased_entry_that_no_longer_matches_the_rows_is_not_what_the_trace_keeps(store):
    # Recipients the caller's copy lacks (or an attempt recorded since): the rows decide.
    [entry_id] = await store.enqueue(msg("1@a.test", "2@a.test"))
    entry = await leased(store, entry_id)
    entry.recipients = entry.recipients[:1]
    await store.record(entry.id, "w", attempt(("1@a.test", DELIVERED), ("2@a.test", DELIVERED)),
                       [RecipientOutcome("1@a.test", DELIVERED), RecipientOutcome("2@a.test", DELIVERED)], None,
                       leased=entry)
    assert (await store.trace(entry_id))["recipients"] == [{"address": "1@a.test", "status": "delivered"},
                                                           {"address": "2@a.test", "status": "delivered"}]


async def test_a_deferral_then_a_bounce_keeps_both_attempts_and_the_ndr(store):
    [entry_id] = await store.enqueue(msg("1@a.test"))
    entry = await leased(store, entry_id)
    await store.record(entry.id, "w", attempt(("1@a.test", DEFERRED)), [RecipientOutcome("1@a.test", DEFERRED)],
                       time.time())
    assert [a["recipients"][0]["status"] for a in (await store.trace(entry_id))["attempts"]] == ["deferred"]
    entry = await leased(store, entry_id)
    await store.record(entry.id, "w", attempt(("1@a.test", FAILED)), [RecipientOutcome("1@a.test", FAILED)], None,
                       notices=[msg("s@x.test", message_id="<ndr@relay>", is_dsn=True)])
    trace = await store.trace(entry_id)
    [ndr_id] = trace["end"]["notices"]
    assert trace["end"]["event"] == "bounced" and trace["recipients"][0]["status"] == "failed"
    assert [a["recipients"][0]["status"] for a in trace["attempts"]] == ["deferred", "failed"]
    assert trace["attempts"][1]["notices"] == [ndr_id]
    assert (await store.get(ndr_id)).is_dsn


async def test_an_operator_delete_is_traced_with_the_audit_record(store):
    [entry_id] = await store.enqueue(msg("1@a.test"))
    await store.apply_fix("ops", "queue delete", None, {"id": entry_id, "reason": "spam"}, {}, (), time.time())
    assert await store.delete(entry_id)
    trace = await store.trace(entry_id)
    assert trace["end"]["event"] == "deleted"
    assert [(a["who"], a["action"], a["detail"]["reason"]) for a in trace["audit"]] == [("ops", "queue delete", "spam")]


async def test_a_bulk_jobs_batch_record_is_in_the_trace_of_each_id_it_names(store):
    """console/jobs.py writes one record per batch, {ids, job, reason}: each id's trace has it, no other's."""
    a, b, c = [(await store.enqueue(msg(f"{i}@a.test", message_id=f"<b{i}@x>")))[0] for i in range(3)]
    job = await store.apply_fix("ops", "queue bulk hold", None, {"filter": {"connector": "a"}, "matched": 2,
                                                                 "reason": "r"}, {}, (), time.time())
    await store.apply_fix("ops", "queue hold", None, {"ids": [a, b], "job": job, "reason": "r"}, {}, (), time.time())
    for entry_id in (a, b):
        assert [(x["action"], x["detail"]["job"]) for x in (await store.trace(entry_id))["audit"]] == \
            [("queue hold", job)]
    assert (await store.trace(c))["audit"] == []

async def test_traces_are_pruned_after_the_retention_and_off_keeps_none(store):
    store.trace_retention, store._traces_pruned_at = 0.001, 0.0
    store.trace_prune_every = 0.0
    [first] = await store.enqueue(msg("1@a.test", message_id="<p1@x>"))
    assert await store.delete(first)
    assert await store.trace(first) is not None
    ended = (await store.trace(first))["end"]["at"]
    await eventually(lambda: time.time() > ended + 0.01 or None, what="the retention to pass")
    [second] = await store.enqueue(msg("1@a.test", message_id="<p2@x>"))
    assert await store.delete(second)
    assert await store.trace(first) is None and await store.trace(second) is not None
    store.trace_retention = 0
    [third] = await store.enqueue(msg("1@a.test", message_id="<p3@x>"))
    assert await store.delete(third)
    assert await store.trace(third) is None and await store.trace_ids("<p3@x>") == []


async def test_a_message_delivered_after_deferrals_keeps_each_attempt_with_long_replies_cut(store):
    # A released backlog: each message was deferred before and is delivered now; the SQL store
    # puts the stored attempts into the trace as they are unless a reply must be cut.
    [entry_id] = await store.enqueue(msg("1@a.test", "2@a.test"))
    for reply in ("421 4.3.2 " + "é" * 2000, "421 4.3.2 try again later"):
        entry = await leased(store, entry_id)
        await store.record(entry.id, "w", attempt(("1@a.test", DEFERRED), ("2@a.test", DEFERRED), reply=reply),
                           [RecipientOutcome("1@a.test", DEFERRED), RecipientOutcome("2@a.test", DEFERRED)],
                           time.time(), leased=entry)
    entry = await leased(store, entry_id)
    await store.record(entry.id, "w", attempt(("1@a.test", DELIVERED), ("2@a.test", DELIVERED)),
                       [RecipientOutcome("1@a.test", DELIVERED), RecipientOutcome("2@a.test", DELIVERED)], None,
                       leased=entry)
    trace = await store.trace(entry_id)
    assert trace["entry"]["attempts"] == 3 and trace["end"]["event"] == "delivered"
    assert trace["recipients"] == [{"address": "1@a.test", "status": "delivered"},
                                   {"address": "2@a.test", "status": "delivered"}]
    assert [[r["reply"] for r in a["recipients"]] for a in trace["attempts"]] == [
        [("421 4.3.2 " + "é" * 2000)[:REPLY_CHARS]] * 2, ["421 4.3.2 try again later"] * 2,
        ["250 2.0.0 queued as ABC"] * 2]
    assert [a["recipients"][0]["status"] for a in trace["attempts"]] == ["deferred", "deferred", "delivered"]
