"""The one entry point for changes to the queue that are not deliveries (deliver/queue_actions.py),
over real stores (in memory and SQLite)."""

import time

import pytest

from helpers import base_config, make_store
from relaywatch.config import parse_config
from relaywatch.deliver.queue_actions import QueueActions
from relaywatch.errors import StoreError
from relaywatch.model import Failure, NewMessage, RecipientOutcome, RecipientStatus, Route, RouteKind, StoredBody
from relaywatch.route import LOCAL
from relaywatch.store.base import QueueQuery, Selector

PARTNER = Route(RouteKind.CONNECTOR, "partner")
DATA = b"Subject: the original\r\nMessage-ID: <m1@contoso.test>\r\n\r\nhello\r\n"


def refused(at):
    return Failure(code="4.4.316", smtp_code=450, title="Connection refused", subtype="refused",
                   detail="mx.partner.test refused the connection", phase="connect", permanent=False, at=at,
                   kind="connect.refused")


@pytest.fixture(params=["memory", "sqlite"])
async def store(request, tmp_path):
    s = make_store(request.param, tmp_path, request)
    await s.open()
    yield s
    await s.close()


@pytest.fixture
def queue(store, tmp_path):
    config = parse_config(base_config(tmp_path))
    woken = []
    q = QueueActions(store, lambda: config, wake=lambda: woken.append(1))
    q.woken = woken
    return q


async def deferred(store, *recipients, sender="alice@contoso.test"):
    """A message for ``recipients`` through the partner connector, tried once and deferred."""
    now = time.time()
    [entry_id] = await store.enqueue(NewMessage(
        sender=sender, recipients=tuple((r, PARTNER) for r in recipients),
        body=StoredBody(size=len(DATA), data=DATA), received_at=now - 60, expires_at=now + 3600,
        message_id="<m1@contoso.test>"))
    [leased] = await store.lease("node", 10, 600, now)
    await store.record(leased.id, "node", None, [RecipientOutcome(r, RecipientStatus.DEFERRED, refused(now))
                                                 for r in recipients], now + 600)
    return entry_id


async def notices(store):
    return [e for e in await store.list(QueueQuery()) if e.is_dsn]


async def test_expire_returns_the_message_with_its_last_error_and_removes_it(store, queue):
    entry_id = await deferred(store, "bob@partner.test", "carol@partner.test")
    before = time.time()
    assert await queue.expire([entry_id, "NO-SUCH-ID"]) == 1
    assert await store.get(entry_id) is None
    [ndr] = await notices(store)
    assert ndr.sender == "" and [r.address for r in ndr.recipients] == ["alice@contoso.test"] and ndr.route == LOCAL
    text = (await store.read_body(ndr.body_id)).data.decode()
    assert "bob@partner.test" in text and "carol@partner.test" in text and "4.4.316" in text
    assert "Subject: the original" in text and "Action: failed" in text
    assert ndr.received_at >= before


async def test_a_bounce_fails_the_waiting_recipients_with_the_failure_given(store, queue):
    entry_id = await deferred(store, "bob@partner.test")
    gone = Failure(code="5.1.10", smtp_code=550, title="No such recipient", subtype="decommissioned",
                   detail="decommissioned", phase="rcpt", permanent=True, at=time.time(), kind="recipient.not_found")
    assert await queue.bounce(entry_id, gone) == 1
    assert await store.get(entry_id) is None
    [ndr] = await notices(store)
    assert "5.1.10" in (await store.read_body(ndr.body_id)).data.decode()
    assert await queue.bounce(entry_id, gone) == 0          # nothing left to bounce


async def test_no_ndr_for_a_bounce_but_the_message_still_goes(store, queue):
    entry_id = await deferred(store, "bob@partner.test", sender="")
    assert await queue.expire([entry_id]) == 1
    assert await store.get(entry_id) is None and await notices(store) == []


async def test_retry_now_makes_mail_due_and_wakes_the_scheduler_only_when_it_did(store, queue):
    entry_id = await deferred(store, "bob@partner.test")
    assert await queue.retry_now(Selector(connector="elsewhere")) == 0 and queue.woken == []
    assert await queue.retry_now(Selector(connector="partner")) == 1 and queue.woken == [1]
    assert (await store.get(entry_id)).next_attempt_at <= time.time()


async def test_hold_release_delete(store, queue):
    entry_id = await deferred(store, "bob@partner.test")
    assert await queue.hold(entry_id) and (await store.get(entry_id)).status.value == "held"
    assert await queue.retry_now(Selector(ids=(entry_id,))) == 0          # a held message stays held
    assert await queue.release_held(entry_id) and queue.woken == [1]
    assert not await queue.release_held(entry_id)                         # not held any more
    assert await queue.delete(entry_id) and await store.get(entry_id) is None
    assert await notices(store) == []                                     # deleted: the sender is not told


async def test_reroute_moves_recipients_to_a_new_entry(store, queue):
    entry_id = await deferred(store, "bob@partner.test", "alice@contoso.test")
    new_id = await queue.reroute(entry_id, ["alice@contoso.test"], LOCAL)
    assert [r.address for r in (await store.get(new_id)).recipients] == ["alice@contoso.test"]
    assert [r.address for r in (await store.get(entry_id)).pending] == ["bob@partner.test"]


async def test_a_message_being_delivered_is_not_bounced_under_its_worker(store, queue):
    now = time.time()
    [entry_id] = await store.enqueue(NewMessage(
        sender="alice@contoso.test", recipients=(("bob@partner.test", PARTNER),),
        body=StoredBody(size=len(DATA), data=DATA), received_at=now, expires_at=now + 3600))
    await store.lease("node", 10, 600, now)
    queue.unleased_tries = 2
    with pytest.raises(StoreError, match="stayed in delivery"):
        await queue.expire([entry_id])
    assert [r.address for r in (await store.get(entry_id)).pending] == ["bob@partner.test"]
    assert await notices(store) == []
