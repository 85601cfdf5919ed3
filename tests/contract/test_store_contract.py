"""The store contract (store/base.py), the same over memory, SQLite and PostgreSQL.

tests/contract/test_store.py has the first part (enqueue, leases, batches); this file the
status rules of record, the operator's and the watch's operations, and that the
protocols are complete: every store has every method, and callers use no other.
"""

import inspect
import re
import time
from pathlib import Path

import pytest

from relaywatch.dsn_params import MessageDsn, RecipientDsn
from relaywatch.errors import LeaseLost, StoreError
from dataclasses import replace

from relaywatch.incident import Diagnosis, Incident, IncidentKind, IncidentState, Severity
from relaywatch.incident_facts import CertificateFacts
from relaywatch.watch_records import (AuditRecord, DueNotification, HeldNotice, LastGood, Notification,
                                      NotificationState, Override, Setting)
from relaywatch.model import (
    Attempt, EntryStatus, Failure, NewMessage, RecipientOutcome, RecipientStatus, Route, RouteKind, StoredBody,
)
from relaywatch.store.base import QueueQuery, QueueStore, Selector, Store, WatchStore
from relaywatch.store.memory import MemoryStore
from relaywatch.store.postgres import PostgresStore
from relaywatch.store.sqlite import SqliteStore

from helpers import STORE_BACKENDS, insert_stored_incident, make_store

A = Route(RouteKind.CONNECTOR, "a")
B = Route(RouteKind.CONNECTOR, "b")
LOCAL = Route(RouteKind.LOCAL, "local")
DELIVERED, DEFERRED, FAILED = RecipientStatus.DELIVERED, RecipientStatus.DEFERRED, RecipientStatus.FAILED
ROOT = Path(__file__).resolve().parents[2]


def msg(*recipients, now=None, path=None, is_dsn=False):
    now = now or time.time()
    data = b"Subject: x\r\n\r\nbody\r\n"
    return NewMessage(sender="s@x.test", recipients=tuple(recipients),
                      body=StoredBody(size=len(data), data=None if path else data, path=path),
                      received_at=now, expires_at=now + 3600, message_id="<m@x>", is_dsn=is_dsn)


def failure(code="4.4.316", at=None):
    return Failure(code=code, smtp_code=450, title="Connection refused", subtype="refused", detail="refused",
                   phase="connect", permanent=code.startswith("5"), at=at or time.time(), kind="connect.refused")


@pytest.fixture(params=STORE_BACKENDS)
async def store(request, tmp_path):
    woken = []
    s = make_store(request.param, tmp_path, request, on_work=lambda: woken.append(1))
    await s.open()
    s.woken = woken
    yield s
    await s.close()


# -- the protocols are complete ---------------------------------------------------------

def _members(protocol) -> dict[str, object]:
    names = {n for cls in protocol.__mro__ if cls.__module__ == "relaywatch.store.base"
             for n in (*vars(cls), *getattr(cls, "__annotations__", {})) if not n.startswith("_")}
    return {n: getattr(protocol, n, None) for n in names}


@pytest.mark.parametrize("cls", [MemoryStore, SqliteStore, PostgresStore])
def test_every_store_has_every_method_of_both_protocols_with_their_signatures(cls):
    for name, member in _members(Store).items():
        assert hasattr(cls, name) or name == "on_work", f"{cls.__name__} lacks {name}"
        if inspect.iscoroutinefunction(member):
            assert inspect.iscoroutinefunction(getattr(cls, name)), f"{cls.__name__}.{name} is not async"
            mine, declared = inspect.signature(getattr(cls, name)), inspect.signature(member)
            assert [(p.name, p.default) for p in mine.parameters.values()] == \
                [(p.name, p.default) for p in declared.parameters.values()], f"{cls.__name__}.{name}"


def test_callers_use_only_what_the_protocols_declare():
    """Nothing above the store reaches past the seam (no getattr workarounds, no SQL)."""
    declared = set(_members(Store))
    used: dict[str, str] = {}
    for path in (ROOT / "relaywatch").rglob("*.py"):
        if "store" in path.relative_to(ROOT / "relaywatch").parts[:1]:
            continue
        text = path.read_text()
        for name in re.findall(r"(?<![\w.])(?:self\.)?store\.([a-z_]+)", text):
            used.setdefault(name, str(path))
        if path.parent.name == "cli":   # with_store(config, lambda s: s.list(...))
            for name in re.findall(r"lambda s: s\.([a-z_]+)", text):
                used.setdefault(name, str(path))
    assert {n: p for n, p in used.items() if n not in declared} == {}
    assert {"enqueue", "lease", "record", "save_incident", "inline_bodies"} <= set(used)


def test_queue_and_watch_protocols_are_apart():
    assert "record" in _members(QueueStore) and "record" not in _members(WatchStore)
    assert "save_incident" in _members(WatchStore) and "save_incident" not in _members(QueueStore)


async def test_enqueue_returns_one_id_per_route_group_in_by_route_order(store):
    """The receiver names each id's route and recipients from msg.by_route() (its "received" log line)."""
    m = msg(("1@b", B), ("2@a", A), ("3@b", B))
    ids = await store.enqueue(m)
    assert [(r.name, addresses) for r, addresses in m.by_route()] == [("b", ["1@b", "3@b"]), ("a", ["2@a"])]
    for entry_id, (route, addresses) in zip(ids, m.by_route(), strict=True):
        entry = await store.get(entry_id)
        assert entry.route == route and [r.address for r in entry.recipients] == addresses


async def test_utf8_addresses_are_kept_exactly_and_need_smtputf8_at_lease_time(store):
    """SMTPUTF8 is derived from the envelope (Entry.needs_smtputf8), so the store must keep
    UTF-8 addresses as given: no Unicode normalisation (NFD stays NFD), no case folding."""
    nfd = "Jose\u0301@xn--hxajbheg2az3al.test"          # é as e + combining acute
    m = NewMessage(sender="δοκιμή@contoso.test", recipients=((nfd, A), ("b@a", A)),
                   body=StoredBody(size=4, data=b"x\r\n\r\n"), received_at=time.time(),
                   expires_at=time.time() + 3600, message_id="<m@x>")
    [entry_id] = await store.enqueue(m)
    [ascii_id] = await store.enqueue(msg(("c@xn--hxajbheg2az3al.test", A)))
    leased = {e.id: e for e in await store.lease("w", 10, 30, time.time())}
    utf8 = leased[entry_id]
    assert utf8.sender == "δοκιμή@contoso.test"
    assert [r.address for r in utf8.recipients] == [nfd, "b@a"]
    assert utf8.needs_smtputf8 and not leased[ascii_id].needs_smtputf8
    assert (await store.get(entry_id)).recipients[0].address == nfd


async def test_dsn_parameters_are_kept_per_message_and_per_recipient_through_lease_get_and_move(store):
    """RET/ENVID per message and NOTIFY/ORCPT per recipient (RFC 3461) survive every read and a move."""
    m = NewMessage(sender="s@x.test", recipients=(("1@a", A), ("2@a", A), ("3@b", B)),
                   body=StoredBody(size=4, data=b"x\r\n\r\n"), received_at=time.time(),
                   expires_at=time.time() + 3600, dsn=MessageDsn("HDRS", "env 1+2"),
                   recipient_dsn={"1@a": RecipientDsn(("NEVER",)),
                                  "3@b": RecipientDsn(("SUCCESS", "DELAY"), "rfc822;Three@b")})
    a_id, b_id = await store.enqueue(m)
    [plain_id] = await store.enqueue(msg(("4@a", A)))
    leased = {e.id: e for e in await store.lease("w", 10, 30, time.time())}
    for entry in (leased[a_id], await store.get(a_id)):
        assert entry.dsn == MessageDsn("HDRS", "env 1+2")
        assert [r.dsn for r in entry.recipients] == [RecipientDsn(("NEVER",)), RecipientDsn()]
    assert [r.dsn for r in leased[b_id].recipients] == [RecipientDsn(("SUCCESS", "DELAY"), "rfc822;Three@b")]
    assert leased[plain_id].dsn == MessageDsn() and leased[plain_id].recipients[0].dsn == RecipientDsn()
    await store.release_leases("w", time.time())
    moved = await store.move_recipients(a_id, ["1@a"], LOCAL, time.time())
    new = await store.get(moved)
    assert new.dsn == MessageDsn("HDRS", "env 1+2") and new.recipients[0].dsn == RecipientDsn(("NEVER",))
    assert (await store.get(a_id)).recipients[0].dsn == RecipientDsn()
    shown = (await store.get(b_id)).to_dict()
    assert (shown["ret"], shown["envid"]) == ("HDRS", "env 1+2")
    assert [(r["notify"], r["orcpt"]) for r in shown["recipients"]] == [("SUCCESS,DELAY", "rfc822;Three@b")]


# -- record: the status rules ----------------------------------------------------------

async def test_a_failed_recipient_queues_its_ndr_in_the_same_record_and_the_entry_goes(store):
    [entry_id] = await store.enqueue(msg(("1@a", A), ("2@a", A)))
    [entry] = await store.lease("w", 10, 30, time.time())
    outcomes = [RecipientOutcome("1@a", DELIVERED), RecipientOutcome("2@a", FAILED, failure=failure("5.1.1"))]
    attempt = Attempt(time.time(), 0.1, None, tuple(outcomes))
    store.woken.clear()
    ndr = msg(("s@x.test", LOCAL), is_dsn=True)
    assert await store.record(entry.id, "w", attempt, outcomes, None, notices=[ndr]) is True
    assert await store.get(entry_id) is None
    [notice] = await store.list(QueueQuery())
    assert notice.is_dsn and notice.route == LOCAL and [r.address for r in notice.recipients] == ["s@x.test"]
    assert (await store.read_body(notice.body_id)).data == ndr.body.data
    assert store.woken, "the NDR is work: the scheduler is woken"


async def test_deferred_keeps_the_entry_with_its_code_first_failure_and_delay_notice(store):
    [entry_id] = await store.enqueue(msg(("1@a", A), ("2@a", A)))
    await store.lease("w", 10, 30, time.time())
    first = time.time()
    outcomes = [RecipientOutcome("1@a", DELIVERED, reply="250 ok"), RecipientOutcome("2@a", DEFERRED, failure=failure())]
    await store.record(entry_id, "w", Attempt(first, 0.1, None, tuple(outcomes)), outcomes, first + 60,
                       delay_notified=True)
    e = await store.get(entry_id)
    assert (e.status, e.attempts, e.next_attempt_at, e.lease_owner) == (EntryStatus.DEFERRED, 1, first + 60, None)
    assert e.first_failure_at is not None and e.delay_notified
    assert [(r.address, r.status) for r in e.recipients] == [("1@a", DELIVERED), ("2@a", DEFERRED)]
    assert e.recipients[1].last_error.code == "4.4.316" and len(e.history) == 1
    assert e.history[0]["recipients"][0]["reply"] == "250 ok"
    [group] = await store.deferred_summary()
    assert (group.connector, group.code, group.messages, group.recipients) == ("a", "4.4.316", 1, 1)
    assert await store.entry_ids("a", "4.4.316") == [entry_id] and await store.entry_ids("a", "4.7.0") == []
    # An operator's record (no owner) without a delay notice never unsets it; a
    # deferral without a failure keeps the code it had.
    await store.record(entry_id, None, None, [RecipientOutcome("2@a", DEFERRED)], first + 120)
    e = await store.get(entry_id)
    assert e.delay_notified and e.attempts == 1 and e.next_attempt_at == first + 120
    assert [g.code for g in await store.deferred_summary()] == ["4.4.316"]


async def test_a_held_entry_stays_held_when_its_outcome_is_recorded(store):
    [entry_id] = await store.enqueue(msg(("1@a", A)))
    [entry] = await store.lease("w", 10, 30, time.time())
    assert await store.hold(entry_id)
    deferred = [RecipientOutcome("1@a", DEFERRED, failure=failure())]
    await store.record(entry_id, "w", Attempt(time.time(), 0.1, None, tuple(deferred)), deferred, time.time())
    assert (await store.get(entry_id)).status is EntryStatus.HELD
    assert await store.lease("w", 10, 30, time.time() + 10) == []
    assert not await store.release(entry_id.lower() + "x", time.time())
    assert await store.release(entry_id.lower(), time.time())          # ids are case-insensitive
    assert (await store.get(entry_id)).status is EntryStatus.DEFERRED   # it was tried before: deferred
    assert [e.id for e in await store.lease("w", 10, 30, time.time() + 1)] == [entry_id]


async def test_an_ndr_that_could_not_be_built_keeps_the_entry_for_itself(store):
    [entry_id] = await store.enqueue(msg(("1@a", A)))
    await store.lease("w", 10, 30, time.time())
    held = {"recipients": [{"address": "1@a"}], "error": "no body", "since": 1.0, "tries": 1, "retry_at": 5.0}
    await store.record(entry_id, "w", None, [RecipientOutcome("1@a", FAILED, failure=failure("5.1.1"))],
                       time.time() + 30, notice_pending=held)
    e = await store.get(entry_id)
    assert e.notice_pending == held and e.pending == [] and e.status is EntryStatus.DEFERRED
    assert await store.held_notices() == [HeldNotice(entry_id, "s@x.test", "a", "no body", since=1.0, tries=1,
                                                     retry_at=5.0)]
    # Built at last: recorded without a pending notice, the entry goes.
    await store.record(entry_id, None, None, [], None, notices=[msg(("s@x.test", LOCAL), is_dsn=True)])
    assert await store.get(entry_id) is None and await store.held_notices() == []


async def test_a_record_that_fails_changes_nothing(store):
    [entry_id] = await store.enqueue(msg(("1@a", A)))
    await store.lease("w1", 10, 30, time.time())
    with pytest.raises(LeaseLost):
        await store.record(entry_id, "w2", None, [RecipientOutcome("1@a", DELIVERED)], None,
                           notices=[msg(("s@x.test", LOCAL))])
    with pytest.raises(StoreError, match="being delivered"):
        await store.record(entry_id, None, None, [RecipientOutcome("1@a", DELIVERED)], None)
    with pytest.raises(StoreError, match="being delivered"):
        await store.delete(entry_id)
    [e] = await store.list(QueueQuery())
    assert e.id == entry_id and e.status is EntryStatus.ACTIVE and e.recipients[0].status is RecipientStatus.PENDING


# -- the operator's commands -----------------------------------------------------------

async def test_list_filters_and_get_shows_everything(store):
    now = time.time()
    [a1] = await store.enqueue(msg(("1@a", A), now=now - 3))
    [b1] = await store.enqueue(msg(("1@b", B), now=now - 2))
    [a2] = await store.enqueue(msg(("2@a", A), now=now - 1))
    await store.hold(b1)
    [leased] = await store.lease("w", 1, 30, now)
    assert leased.id == a1 and leased.status is EntryStatus.ACTIVE and leased.lease_owner == "w"
    assert leased.body.data is not None
    assert [e.id for e in await store.list(QueueQuery())] == [a1, b1, a2]
    assert [e.id for e in await store.list(QueueQuery(connector="a"))] == [a1, a2]
    assert [e.id for e in await store.list(QueueQuery(status="active"))] == [a1]
    assert [e.id for e in await store.list(QueueQuery(status="queued"))] == [a2]
    assert [e.id for e in await store.list(QueueQuery(status="held"))] == [b1]
    assert [e.id for e in await store.list(QueueQuery(limit=2))] == [a1, b1]
    assert await store.counts() == {"queued": 2, "held": 1}
    assert await store.get("nosuchid") is None


async def test_retry_makes_due_the_oldest_first_but_not_held_or_leased_ones(store):
    now = time.time()
    [old] = await store.enqueue(msg(("1@a", A), now=now - 100))
    [new] = await store.enqueue(msg(("2@a", A), now=now - 10))
    [held] = await store.enqueue(msg(("3@b", B), now=now - 50))
    await store.hold(held)
    await store.lease("w", 10, 30, now)                                  # old and new: leased
    assert await store.retry(Selector(all=True), now) == 0
    assert await store.release_leases("w", now) == 2
    for e in (old, new):
        await store.record(e, None, None, [RecipientOutcome(f"{1 if e == old else 2}@a", DEFERRED)], now + 600)
    store.woken.clear()
    assert await store.retry(Selector(ids=(old.lower(),)), now) == 1 and store.woken
    assert await store.retry(Selector(connector="a"), now) == 2
    assert await store.retry(Selector(connector="b"), now) == 0          # held
    assert [e.id for e in await store.lease("w", 1, 30, now)] == [old]   # the oldest is due first


async def test_a_lease_batch_is_oldest_first_whatever_order_the_mail_was_queued_in(store):
    # A probe's instant release makes a whole backlog due at once; it must leave
    # oldest first on every store (PostgreSQL's RETURNING gave the rows in table order).
    now = time.time()
    ages = [30, 50, 10, 40, 20]
    ids = {age: (await store.enqueue(msg((f"{age}@a", A), now=now - age)))[0] for age in ages}
    assert await store.retry(Selector(all=True), now) == len(ages)
    assert [e.id for e in await store.lease("w", 10, 30, now)] == [ids[age] for age in sorted(ages, reverse=True)]


async def test_leases_are_returned_but_those_kept_and_renewed_only_for_their_owner(store):
    ids = [i for n in range(3) for i in await store.enqueue(msg((f"{n}@a", A)))]
    now = time.time()
    assert len(await store.lease("w1", 2, 30, now)) == 2
    assert len(await store.lease("w2", 2, 30, now)) == 1
    assert await store.renew_leases("w1", ids, now + 90) == set(ids[:2])
    assert await store.renew_leases("w1", [], now + 90) == set()
    assert await store.release_leases("w1", now, keep=[ids[0]]) == 1
    assert (await store.get(ids[1])).status is EntryStatus.QUEUED
    assert (await store.get(ids[0])).lease_owner == "w1"
    assert await store.release_leases(None, now) == 2                    # everyone's (an SQLite start-up)
    assert {e.id for e in await store.lease("w3", 10, 30, now)} == set(ids)


async def test_moved_recipients_share_the_body_which_goes_with_its_last_entry(store, tmp_path):
    spool = tmp_path / "spooled"
    spool.write_bytes(b"Subject: x\r\n\r\nbig\r\n")
    [entry_id] = await store.enqueue(msg(("1@a", A), ("2@a", A), path=str(spool)))
    now = time.time()
    moved = await store.move_recipients(entry_id, ["2@a", "9@a"], LOCAL, now)
    assert moved is not None and await store.move_recipients(entry_id, ["2@a"], LOCAL, now) is None
    old, new = await store.get(entry_id), await store.get(moved)
    assert [r.address for r in old.recipients] == ["1@a"] and [r.address for r in new.recipients] == ["2@a"]
    assert new.route == LOCAL and new.body_id == old.body_id and new.status is EntryStatus.QUEUED
    assert await store.spool_paths() == {str(spool)}
    # The last recipient moved: the old entry goes, the body stays for the new one.
    assert await store.move_recipients(entry_id, ["1@a"], B, now) is not None
    assert await store.get(entry_id) is None
    assert (await store.read_body(new.body_id)).path == str(spool) and spool.exists()
    for e in await store.list(QueueQuery()):
        await store.delete(e.id)
    assert not spool.exists() and await store.spool_paths() == set()
    with pytest.raises(StoreError, match="missing"):
        await store.read_body(new.body_id)


# -- the watch's state ------------------------------------------------------------------

async def test_incidents_notifications_and_fixes(store):
    first = {"id": None, "connector": "a", "code": "4.4.316", "state": "open", "opened_at": 1.0, "messages": 2}
    first["id"] = await store.save_incident(Incident.from_dict(first))
    second = {"id": None, "connector": "b", "code": "4.7.0", "state": "open", "opened_at": 2.0}
    second["id"] = await store.save_incident(Incident.from_dict(second))
    await store.save_incident(Incident.from_dict(dict(second, state="resolved", resolved_at=3.0, messages=0)))
    assert [i.id for i in await store.open_incidents()] == [first["id"]]
    assert [i.id for i in await store.incidents()] == [first["id"]]
    assert [(i.id, i.state, i.messages) for i in await store.incidents(include_resolved=True)] == \
        [(second["id"], "resolved", 0), (first["id"], "open", 2)]
    assert [i.id for i in await store.incidents(include_resolved=True, limit=1)] == [second["id"]]
    assert await store.incident(999) is None

    # A notification tried before the store could be written: recorded once.
    await store.add_notification_outcome(first["id"], "open", "webhook", {"y": 1}, 2, None, "refused")
    await store.add_notification_outcome(first["id"], "open", "webhook", {"y": 1}, 3, 9.0, None)
    assert await store.add_notification(first["id"], "escalate:100", "email", {"x": 1}, 5.0)
    [due] = await store.due_notifications(5.0)
    assert due == DueNotification(due.id, first["id"], "escalate:100", "email", 0, {"x": 1})
    assert await store.due_notifications(4.0) == []
    await store.notification_result(due.id, False, "timeout", 5.0, retry_at=8.0)
    assert await store.due_notifications(7.0) == [] and await store.due_notifications(8.0) == [replace(due, attempts=1)]
    await store.notification_result(due.id, False, "timeout", 8.0, retry_at=None)
    assert await store.due_notifications(100.0) == []
    assert (await store.incident(first["id"])).notifications == (
        Notification("open", "webhook", NotificationState.FAILED, 2, "refused", None),
        Notification("escalate:100", "email", NotificationState.FAILED, 2, "timeout", None))

    # Fix now and its undo: overrides with an audit trail.
    paused, typed = Setting.CONNECTOR_PAUSED.of("a"), Setting.DOMAIN_TYPE.of("x.test")
    version = await store.overrides_version()
    fix = await store.apply_fix("ops", "pause", first["id"], {"undo": {str(paused): None}},
                                {paused: True, typed: "authoritative"}, [], 10.0)
    assert await store.overrides_version() != version
    assert await store.overrides() == {paused: Override(paused, True, 10.0, first["id"]),
                                       typed: Override(typed, "authoritative", 10.0, first["id"])}
    undo = await store.apply_fix("ops", "undo pause", first["id"], {"undoes": fix}, {}, [paused, typed], 11.0)
    assert await store.overrides() == {}
    assert await store.last_undoable(first["id"]) == AuditRecord(fix, 10.0, "ops", "pause", {"undo": {str(paused): None}},
                                                                 first["id"])
    await store.mark_undone(fix, 11.0)
    assert await store.last_undoable(first["id"]) is None
    assert (await store.incident(first["id"])).audit == (
        AuditRecord(fix, 10.0, "ops", "pause", {"undo": {str(paused): None}}, first["id"], undone_at=11.0),
        AuditRecord(undo, 11.0, "ops", "undo pause", {"undoes": fix}, first["id"]))
    assert [a.id for a in await store.audit_log()] == [undo, fix]


async def test_incidents_go_in_and_come_out_typed(store):
    """What the watch saves is what it reads back, field for field, on every store: the
    kind and its facts, the failure, the diagnosis; resolving it takes it off the open ones."""
    cert = Incident(kind=IncidentKind.CERT_EXPIRING, connector="a", code=IncidentKind.CERT_EXPIRING.code,
                    title="Destination certificate expires soon", opened_at=1.0, severity=Severity.CRITICAL,
                    destinations=("mx.a:25",), latest_error=failure(at=1.0), causes=("renewal failed",),
                    diagnosis=Diagnosis("cert", "expires in 3 days", {"days_left": 3}),
                    facts=CertificateFacts({"days_left": 3}), detail="expires on 2027-01-01")
    backlog = Incident(kind=IncidentKind.BACKLOG, connector="b", code="4.4.316", title="t", opened_at=2.0,
                       catalog_id="network.refused", messages=3, probe_history=({"at": 2.0, "ok": False},))
    cert = replace(cert, id=await store.save_incident(cert))
    backlog = replace(backlog, id=await store.save_incident(backlog))
    assert await store.open_incidents() == [cert, backlog]
    shown = await store.incident(cert.id)
    assert (shown.incident, shown.notifications, shown.audit) == (cert, (), ())
    done = replace(backlog, state=IncidentState.RESOLVED, resolved_at=3.0, messages=0)
    await store.save_incident(done)
    assert await store.open_incidents() == [cert]
    assert await store.incidents(include_resolved=True) == [done, cert]


async def test_incidents_an_older_version_stored_are_read(store):
    """A row of the shape an older version wrote (no kind, no facts fields, a field this
    version does not know) reads as an Incident, and saving it back keeps the unknown field."""
    if isinstance(store, MemoryStore):
        pytest.skip("the memory store keeps no rows of other versions")
    incident_id = await insert_stored_incident(store, {
        "connector": "*", "code": "watch:notice_failed", "state": "open", "opened_at": 5.0, "title": "NDRs",
        "count": 2, "from_a_newer_version": {"x": 1}})
    [old] = await store.open_incidents()
    assert (old.id, old.kind, old.code, old.opened_at, old.updated_at) == (
        incident_id, IncidentKind.NOTICE_FAILED, "watch:notice_failed", 5.0, 5.0)
    assert old.facts.count == 2 and old.other == {"from_a_newer_version": {"x": 1}}
    await store.save_incident(replace(old, state=IncidentState.RESOLVED, resolved_at=6.0))
    [again] = await store.incidents(include_resolved=True)
    assert again.to_dict()["from_a_newer_version"] == {"x": 1} and again.resolved_at == 6.0


async def test_watch_rows_another_version_wrote_are_read(store):
    """An override of a setting this version does not know is left out (and kept: undoing
    it is for the version that knows it); a last good delivery stored in an older shape reads."""
    if isinstance(store, MemoryStore):
        pytest.skip("the memory store keeps no rows of other versions")
    from relaywatch.store.watch import Q
    await store.engine.write(lambda conn, cleanup: conn.execute(Q["set_override"], ("connector:a:weight", "3", 1.0, None)))
    await store.engine.write(lambda conn, cleanup: conn.execute(Q["set_last_good"], ("a", 2.0, '{"tls": "1.3"}')))
    paused = Setting.CONNECTOR_PAUSED.of("a")
    await store.apply_fix("ops", "pause", None, {}, {paused: True}, [], 3.0)
    assert await store.overrides() == {paused: Override(paused, True, 3.0)}
    assert (await store.overrides_version())[0] == 2
    assert await store.last_good() == {"a": LastGood("a", 2.0)}


async def test_last_good_and_invalid_recipients(store):
    await store.set_last_good(LastGood("a", 1.0, "mx.a", "192.0.2.1", 25, {"version": "TLSv1.3"}))
    later = LastGood("a", 2.0, "mx.a", "192.0.2.2", 25, None)
    await store.set_last_good(later)
    await store.set_last_good(LastGood("b", 3.0, "mx.b", None, None, {"version": "TLSv1.2", "sans": ["mx.b"]}))
    assert await store.last_good() == {"a": later, "b": LastGood("b", 3.0, "mx.b", None, None,
                                                                  {"version": "TLSv1.2", "sans": ["mx.b"]})}
    await store.add_invalid_recipients([])
    await store.add_invalid_recipients([(1.0, "x.test", "a", "rcpt"), (5.0, "x.test", "a", "rcpt"),
                                        (6.0, "x.test", "a", "rcpt"), (6.0, "y.test", "b", "verify")])
    assert await store.invalid_recipients_since(5.0) == [("x.test", "a", "rcpt", 2), ("y.test", "b", "verify", 1)]


async def test_tls_counts_add_up_per_day_and_key_and_a_report_is_claimed_once(store):
    from relaywatch.tls_results import TlsCount
    lines = ("version: STSv1", "mode: enforce", "mx: mx.partner.test", "max_age: 86400")
    ok = TlsCount("2026-11-30", "partner.test", "sts", lines, count=3)
    bad = TlsCount("2026-11-30", "partner.test", "sts", lines, "certificate-host-mismatch", "mx.partner.test",
                   "127.0.0.2", "127.0.0.1", 1)
    other_day = TlsCount("2026-12-01", "partner.test", "no-policy-found", (), count=1)
    await store.add_tls_counts([])
    await store.add_tls_counts([ok, bad, other_day])
    await store.add_tls_counts([TlsCount(**{**ok.__dict__, "count": 2}), bad])   # a later tick adds to them
    assert await store.tls_counts("2026-11-30") == [TlsCount(**{**ok.__dict__, "count": 5}),
                                                    TlsCount(**{**bad.__dict__, "count": 2})]
    assert await store.tls_counts("2026-12-01") == [other_day]
    assert await store.tls_counts("2026-11-29") == []
    # The detail is the latest failure's, not a key: a tick without one keeps the stored one.
    await store.add_tls_counts([TlsCount(**{**bad.__dict__, "detail": "mx names another host"})])
    await store.add_tls_counts([bad])
    assert [c.detail for c in await store.tls_counts("2026-11-30")] == ["", "mx names another host"]
    assert (await store.tls_counts("2026-11-30"))[1].count == 4
    assert await store.claim_tls_report("2026-11-30", "partner.test", "r1", 10.0) is True
    assert await store.claim_tls_report("2026-11-30", "partner.test", "r1", 11.0) is False   # another node
    await store.finish_tls_report("2026-11-30", "partner.test", {"mailto:tlsrpt@partner.test": "queued X"})
    assert await store.tls_reports("2026-11-30") == [
        {"day": "2026-11-30", "policy_domain": "partner.test", "report_id": "r1", "claimed_at": 10.0,
         "outcome": {"mailto:tlsrpt@partner.test": "queued X"}}]
    assert await store.tls_reports("2026-12-01") == []
