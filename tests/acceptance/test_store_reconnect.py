"""The queue store goes away and comes back: PostgreSQL cut through a loopback proxy.

What must hold (issue 9, item 7): while the database cannot be reached DATA
gets 451 (never 5xx, never a hang); once it is back the relay accepts and
delivers again without a restart; and an outcome that could not be recorded
while the destination accepted the message is kept and recorded later, never
turned into a second delivery.
"""

import asyncio
import collections
import json
import os
import re
import smtplib
import time
from urllib.parse import urlsplit, urlunsplit

import pytest

from helpers import (
    LOOPBACK, CuttableProxy, Server, Sink, SinkHandler, eventually, message,
)

# The 6 s cut with RELAYWATCH_LONG_TESTS=1; 3 s in `make test`.
CUT_SECONDS = 6.0 if os.environ.get("RELAYWATCH_LONG_TESTS") else 3.0
_MESSAGE_ID = re.compile(rb"^Message-ID: (<[^>]+>)", re.MULTILINE | re.IGNORECASE)


def through(proxy: CuttableProxy, dsn: str) -> str:
    """``dsn`` (same database, same schema) by way of the proxy's port."""
    parts = urlsplit(dsn)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"{LOOPBACK}:{proxy.port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


class TimedSink(SinkHandler):
    """A destination that takes a while per message and notes when each arrived;
    with a ``gate``, it answers no DATA before the gate opens."""

    def __init__(self, delay: float, gate: asyncio.Event | None = None):
        super().__init__()
        self.delay = delay
        self.gate = gate
        self.arrivals: list[tuple[float, bytes]] = []     # (monotonic time, Message-ID)

    async def handle_DATA(self, server, session, envelope):
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(self.delay)
        reply = await super().handle_DATA(server, session, envelope)
        self.arrivals.append((time.monotonic(), _MESSAGE_ID.search(envelope.original_content).group(1)))
        return reply


def _submit(port: int, mid: str) -> int:
    """One message over SMTP; the reply code to DATA (or to whatever failed)."""
    try:
        with smtplib.SMTP(LOOPBACK, port, timeout=30) as c:
            c.sendmail("alice@contoso.test", ["bob@fabrikam.test"], message(mid, message_id=mid))
        return 250
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code
    except smtplib.SMTPRecipientsRefused as exc:
        return next(iter(exc.recipients.values()))[0]


def _connector(port: int) -> dict:
    return {"name": "onprem", "type": "on_premises", "domains": ["fabrikam.test"],
            "smart_hosts": [f"{LOOPBACK}:{port}"], "tls": "none"}


def _duplicates(handler: TimedSink) -> dict[bytes, int]:
    return {mid: n for mid, n in collections.Counter(mid for _, mid in handler.arrivals).items() if n > 1}


async def test_a_postgresql_cut_answers_451_then_recovers_and_delivers_nothing_twice(pg_dsn, relay_factory,
                                                                                       caplog):
    proxy = await CuttableProxy(5432).start()
    handler = TimedSink(delay=0.1)
    sink = await Sink(handler).start()
    try:
        relay = await relay_factory(
            server={"store": through(proxy, pg_dsn)},
            # A lease shorter than the cut: without a kept outcome, what was
            # delivered during the cut would be leased and delivered again.
            queue={"lease_time": "2s", "retry_intervals": ["1s"]},
            delivery={"concurrency": 4, "per_destination": 4},
            connectors=[_connector(sink.port)])
        replies: dict[str, int] = {}
        n = 0

        async def send(tag: str) -> int:
            nonlocal n
            n += 1
            mid = f"<{tag}-{n}@client.test>"
            replies[mid] = await asyncio.to_thread(_submit, relay.port, mid)
            return replies[mid]

        # A backlog the destination is still working through when the cut comes.
        for _ in range(40):
            assert await send("before") == 250
        await eventually(lambda: len(handler.arrivals) >= 4, what="deliveries to start")

        cut_at = time.monotonic()
        proxy.cut(CUT_SECONDS)
        during = []
        while proxy.is_cut:
            during.append(await send("during"))
        restored_at = time.monotonic()

        async def kept_outcomes_recorded() -> float:
            await eventually(lambda: not relay.app.scheduler.pending, timeout=30, what="the kept outcomes recorded")
            return time.monotonic() - restored_at
        recorded = asyncio.create_task(kept_outcomes_recorded()) if hasattr(relay.app.scheduler, "pending") else None

        # The first message after the database is back.
        first_250 = None
        while first_250 is None:
            assert time.monotonic() - restored_at < 15, "no message accepted within 15 s of the store coming back"
            if await send("after") == 250:
                first_250 = time.monotonic() - restored_at
        for _ in range(10):
            await send("after")

        delivered_in_cut = sum(1 for t, _ in handler.arrivals if cut_at <= t <= restored_at)
        refused = collections.Counter(during)
        print(f"\nstore back -> first 250: {first_250:.2f} s; during the {restored_at - cut_at:.1f} s cut: "
              f"{delivered_in_cut} delivered, DATA replies {dict(refused)}")
        if recorded is not None:
            print(f"store back -> every kept outcome recorded: {await recorded:.2f} s")
        assert delivered_in_cut > 0, "the test must deliver while the store is cut"
        assert refused and all(400 <= code < 500 for code in refused), refused   # never 5xx
        assert refused[451] > 0

        accepted = {mid.encode() for mid, code in replies.items() if code == 250}
        expected = [m for m in replies if m.startswith("<after") and replies[m] == 250]
        assert len(expected) >= 11

        async def drained():
            return (await relay.store.counts() == {} and not getattr(relay.app.scheduler, "pending", ())
                    and accepted <= {mid for _, mid in handler.arrivals})
        await eventually(drained, timeout=30, what=lambda: (
            f"every accepted message delivered and the queue empty "
            f"({len(accepted - {mid for _, mid in handler.arrivals})} missing)"))
        assert _duplicates(handler) == {}
        print(f"{len(handler.arrivals)} delivered, 0 twice")
        # One line when the store went, one when it was back: not one per message.
        store_lines = [r.getMessage() for r in caplog.records if r.name == "relaywatch.store"]
        assert sum("is unavailable:" in m for m in store_lines) == 1, store_lines
        assert sum("is back after" in m for m in store_lines) == 1, store_lines
        # An outage is not a bug: nothing logs a traceback for it.
        tracebacks = [r.getMessage() for r in caplog.records if r.exc_info]
        assert tracebacks == [], tracebacks
    finally:
        await sink.stop()
        await proxy.stop()


def _query(dsn: str, sql: str):
    import psycopg
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql).fetchone()[0]


async def test_outcomes_kept_when_the_process_dies_during_a_cut_are_recorded_by_the_next_run(
        pg_dsn, tmp_path):
    proxy = await CuttableProxy(5432).start()
    gate = asyncio.Event()
    handler = TimedSink(delay=0.02, gate=gate)
    sink = await Sink(handler).start()
    # Leases long enough to outlast the queue's wait for a session: a node delivers a lease past its
    # lease_time only once the store says it is still its own (cluster/fence.py), and the store is cut.
    server = Server(tmp_path, server={"delivery_process": False, "store": through(proxy, pg_dsn)},
                          queue={"lease_time": "6s", "retry_intervals": ["1s"]},
                          delivery={"concurrency": 4, "per_destination": 4},
                          connectors=[_connector(sink.port)])
    journal = server.data_dir / "pending-outcomes.jsonl"
    try:
        await server.start()
        mids = [f"<kill-{i}@client.test>" for i in range(12)]
        for mid in mids:
            assert await asyncio.to_thread(_submit, server.port, mid) == 250
        # Everything leased and on its way, the destination still silent...
        await eventually(lambda: asyncio.to_thread(
            _query, pg_dsn, "SELECT count(*) = 12 FROM entries WHERE lease_owner IS NOT NULL"),
            what="all 12 leased")
        # ...then the store goes away and the destination accepts all of them.
        proxy.cut()
        gate.set()
        await eventually(lambda: len(handler.arrivals) == 12, what="12 deliveries during the cut")

        def kept() -> int:
            return len(journal.read_bytes().splitlines()) if journal.exists() else 0
        await eventually(lambda: kept() == 12, what=lambda: f"12 outcomes kept in the journal ({kept()})")
        server.kill()
        await eventually(lambda: asyncio.to_thread(
            _query, pg_dsn, f"SELECT count(*) = 12 FROM entries WHERE lease_until < "
                            f"{time.time()} - 0.1 OR lease_until IS NULL"),
            timeout=10, what="the dead run's leases to lapse")

        proxy.restore()
        await server.start()
        await eventually(lambda: asyncio.to_thread(_query, pg_dsn, "SELECT count(*) = 0 FROM entries"),
                         what="the kept outcomes recorded by the next run")
        # The journal is rewritten (here: removed) just after the records commit.
        await eventually(lambda: not journal.exists(), what="the journal emptied")
        assert _duplicates(handler) == {} and len(handler.arrivals) == 12
        assert "recording 12 outcome(s) a previous run could not record" in server.log_path.read_text()
        print(f"\nkilled with 12 outcomes kept; {len(handler.arrivals)} delivered, 0 twice")
    finally:
        await server.stop()
        await sink.stop()
        await proxy.stop()


# -- the parts, one at a time ----------------------------------------------------------------

from relaywatch.config import parse_config                                   # noqa: E402
from relaywatch.errors import ConfigError, LeaseLost, StoreError             # noqa: E402
from relaywatch.model import (                                               # noqa: E402
    Attempt, Destination, Failure, NewMessage, RecipientOutcome, RecipientStatus, Route, RouteKind, StoredBody,
)
from relaywatch.store.pending import Journal, PendingRecord, decode, encode  # noqa: E402
from relaywatch.store.backoff import Backoff                                   # noqa: E402
from relaywatch.store.sqlite import SqliteStore                              # noqa: E402

ROUTE = Route(RouteKind.CONNECTOR, "a")
DELIVERED = RecipientStatus.DELIVERED


def _msg(*addresses: str) -> NewMessage:
    now = time.time()
    data = b"Subject: x\r\n\r\nbody\r\n"
    return NewMessage(sender="s@x.test", recipients=tuple((a, ROUTE) for a in addresses),
                      body=StoredBody(size=len(data), data=data), received_at=now, expires_at=now + 3600)


@pytest.mark.parametrize("steps, delays", [
    ("f", [0.05]),
    ("ffff", [0.05, 0.1, 0.2, 0.4]),
    ("ffffffff", [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]),
    ("ffsf", [0.05, 0.1, None, 0.05]),
])
def test_backoff_doubles_up_to_its_cap_and_starts_over_after_a_success(steps, delays):
    b = Backoff(first=0.05, cap=1.0)
    seen, firsts = [], []
    for now, step in enumerate(steps):
        if step == "f":
            firsts.append(b.failed(float(now), "refused"))
            seen.append(round(b.delay, 3))
            assert not b.due(now) and b.due(now + b.delay)
        else:
            assert b.succeeded(float(now)) == now       # down since the first failure, at 0
            seen.append(None)
    assert seen == delays
    # Only the first failure of a run reports a change (one log line per outage).
    assert firsts[0] and not any(firsts[1:steps.index("s") if "s" in steps else None])


def _record(**kw) -> PendingRecord:
    failure = Failure(code="4.4.316", smtp_code=451, title="refused", subtype=None, detail="no", phase="connect",
                      permanent=False, at=1.5, kind="connect.refused", destination=Destination("h", "127.0.0.1", 25),
                      dns={"a": ["127.0.0.1"]})
    outcomes = (RecipientOutcome("1@a", DELIVERED, reply="250 ok"),
                RecipientOutcome("2@a", RecipientStatus.DEFERRED, failure))
    notice = NewMessage(sender="", recipients=(("s@x.test", Route(RouteKind.LOCAL, "local")),),
                        body=StoredBody(size=3, data=b"\xff\x00x"), received_at=1.0, expires_at=2.0, is_dsn=True,
                        client="relaywatch")
    return PendingRecord(**{"entry_id": "E1", "owner": "node:1:ab", "attempts_before": 2,
                            "attempt": Attempt(1.0, 0.5, Destination("h"), outcomes, (failure,)),
                            "outcomes": outcomes, "next_attempt_at": 9.0, "notices": (notice,),
                            "delay_notified": True, **kw})


def test_a_kept_outcome_survives_its_journal_and_a_torn_last_line_is_skipped(tmp_path):
    r = _record()
    assert decode(json.loads(json.dumps(encode(r)))) == r
    journal = Journal(tmp_path / "pending-outcomes.jsonl")
    journal.append(r)
    journal.append(_record(entry_id="E2", attempt=None, notices=()))
    with open(journal.path, "ab") as f:
        f.write(b'{"entry_id": "E3", "own')     # the process died mid-write
    assert [x.entry_id for x in journal.load()] == ["E1", "E2"]
    journal.rewrite([r])
    assert journal.load() == [r]
    journal.rewrite([])
    assert not journal.path.exists() and journal.load() == []


async def test_a_record_tried_again_applies_once_and_never_over_another_worker(store):
    ids = [i for _ in range(4) for i in await store.enqueue(_msg("1@a", "2@a"))]
    # Leases that ended a second ago: lapsed, and nobody took the entries yet.
    assert len(await store.lease("w1", 10, ttl=-1, now=time.time())) == 4
    one = [RecipientOutcome("1@a", DELIVERED)]
    attempt = Attempt(time.time(), 0.1, None, tuple(one))

    # Still ours though lapsed: applied; the same again (the first commit went
    # through after all): not applied twice.
    later = time.time() + 3600
    assert await store.record(ids[0], "w1", attempt, one, later, attempts_before=0) is True
    assert await store.record(ids[0], "w1", attempt, one, later, attempts_before=0) is False
    assert (await store.get(ids[0])).attempts == 1

    # Renewed before recording: nobody can lease it meanwhile.
    assert await store.renew_leases("w1", [ids[1], ids[2]], time.time() + 60) == {ids[1], ids[2]}
    # Another worker took the one not renewed.
    taken = await store.lease("w2", 10, ttl=60, now=time.time())
    assert [e.id for e in taken] == [ids[3]]
    with pytest.raises(LeaseLost):
        await store.record(ids[3], "w1", attempt, one, later, attempts_before=0)
    assert await store.renew_leases("w1", [ids[3]], time.time() + 60) == set()

    # Returned unrecorded (an SQLite run's leases at start-up): applied.
    assert await store.release_leases("w1", time.time(), keep=[ids[2]]) == 1      # ids[1] only
    assert await store.record(ids[1], "w1", attempt, one, later, attempts_before=0) is True
    # Delivered to everyone and gone: nothing left to apply.
    both = one + [RecipientOutcome("2@a", DELIVERED)]
    assert await store.record(ids[2], "w1", None, both, None, attempts_before=0) is True
    assert await store.record(ids[2], "w1", None, both, None, attempts_before=0) is False
    assert await store.get(ids[2]) is None


async def test_postgres_connections_the_server_ends_are_replaced(pg_dsn):
    """A failover or a DBA's pg_terminate_backend ends every session: the writer,
    the readers and the listener reconnect, and no write fails for it."""
    psycopg = pytest.importorskip("psycopg")
    from relaywatch.store.postgres import PostgresStore
    woken = asyncio.Event()
    name = f"rw_kill_{os.getpid()}"
    store = PostgresStore(f"{pg_dsn}&application_name={name}", on_work=woken.set)
    await store.open()
    try:
        [entry_id] = await store.enqueue(_msg("1@a"))
        assert (await store.get(entry_id)).id == entry_id           # a reader connection now exists
        await eventually(woken.is_set, what="the listener")
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            ended = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                  "WHERE application_name = %s", (name,)).fetchone()[0]
        assert ended >= 3                                           # writer, reader, listener
        woken.clear()
        assert (await store.get(entry_id)).id == entry_id           # the reader, replaced
        assert len(await store.enqueue(_msg("2@a"))) == 1           # the writer, replaced at once
        await eventually(woken.is_set, what="a wake-up from the reconnected listener")
    finally:
        await store.close()


async def test_a_stalled_postgresql_fails_the_write_at_the_statement_timeout_instead_of_hanging(pg_dsn):
    psycopg = pytest.importorskip("psycopg")
    from relaywatch.store.postgres import PostgresStore
    store = PostgresStore(pg_dsn, statement_timeout=0.5)
    await store.open()
    try:
        with psycopg.connect(pg_dsn) as admin:
            admin.execute("LOCK TABLE entries IN ACCESS EXCLUSIVE MODE")   # a stuck migration, a DBA's lock
            started = time.monotonic()
            with pytest.raises(StoreError):
                await asyncio.wait_for(store.enqueue(_msg("1@a")), 20)
            print(f"\nfailed after {time.monotonic() - started:.2f} s (statement_timeout 0.5 s)")
            admin.rollback()
        assert len(await store.enqueue(_msg("1@a"))) == 1
    finally:
        await store.close()


_STALLED_NODE = """
import sys, psycopg
from relaywatch.store.postgres import connection_params
dsn = sys.argv[1]
conn = psycopg.connect(dsn, autocommit=True, **connection_params(dsn, float(sys.argv[2])))
conn.execute("BEGIN")
conn.execute("SELECT id FROM node_locks WHERE id = 1 FOR UPDATE")
print("locked", flush=True)
sys.stdin.read()      # stands still inside the transaction until the test lets it go
"""


def test_a_node_stopped_inside_a_transaction_loses_its_row_locks_after_the_statement_timeout(pg_dsn):
    """A node stopped (SIGSTOP) between two statements of a transaction holds
    its row locks; PostgreSQL ends that session after
    server.store_statement_timeout, so the other nodes get the rows back."""
    psycopg = pytest.importorskip("psycopg")
    import signal
    import subprocess
    import sys
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("CREATE TABLE node_locks (id INTEGER PRIMARY KEY)")
        admin.execute("INSERT INTO node_locks VALUES (1)")
    node = subprocess.Popen([sys.executable, "-c", _STALLED_NODE, pg_dsn, "1.0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert node.stdout.readline().strip() == "locked"
        node.send_signal(signal.SIGSTOP)
        with psycopg.connect(pg_dsn, autocommit=True) as other:
            other.execute("SET lock_timeout = '20s'")     # bounded: without the fix this fails after 20 s
            started = time.monotonic()
            other.execute("BEGIN")
            assert other.execute("SELECT id FROM node_locks WHERE id = 1 FOR UPDATE").fetchone() == (1,)
            other.execute("COMMIT")
            print(f"\nthe row was free after {time.monotonic() - started:.2f} s (timeout 1 s)")
    finally:
        node.send_signal(signal.SIGCONT)
        node.kill()
        node.wait(10)


def test_the_statement_timeout_goes_on_every_postgresql_connection_beside_the_dsn_options():
    from relaywatch.store.postgres import connection_params
    p = connection_params("postgresql://u@h/db?options=-csearch_path%3Ds1", 30)
    assert p["options"] == ("-csearch_path=s1 -c statement_timeout=30000"
                            " -c idle_in_transaction_session_timeout=30000")
    assert p["connect_timeout"] == 5 and p["keepalives"] == 1 and p["tcp_user_timeout"] == 30000
    p = connection_params("postgresql://u@h/db?connect_timeout=9&tcp_user_timeout=1000", None)
    assert "options" not in p and "connect_timeout" not in p and "tcp_user_timeout" not in p


def test_store_statement_timeout_is_a_duration_or_off():
    assert parse_config({}).server.store_statement_timeout == 30.0
    assert parse_config({"server": {"store_statement_timeout": "off"}}).server.store_statement_timeout is None
    assert parse_config({"server": {"store_statement_timeout": "5s"}}).server.store_statement_timeout == 5.0
    with pytest.raises(ConfigError) as err:
        parse_config({"server": {"store_statement_timeout": "soon"}})
    assert any(p.startswith("server.store_statement_timeout") for p in err.value.problems), err.value.problems


async def test_an_sqlite_queue_locked_too_long_fails_that_write_and_the_writer_goes_on(tmp_path, monkeypatch,
                                                                                      caplog):
    """A batch that fails as a whole gets a new SQLite connection too; the lock
    file and the settings stay as they were."""
    import sqlite3
    import relaywatch.store.sqlite as sqlite_store
    monkeypatch.setattr(sqlite_store, "_LOCK_WAIT_LIMIT", 0.3)
    store = SqliteStore(tmp_path / "q.sqlite3", sync_commits=False)
    await store.open()
    try:
        admin = sqlite3.connect(tmp_path / "q.sqlite3", isolation_level=None)
        admin.execute("BEGIN IMMEDIATE")          # an admin's sqlite3 shell, mid-transaction
        with pytest.raises(StoreError):
            await store.enqueue(_msg("1@a"))
        admin.execute("ROLLBACK")
        admin.close()

        async def writes() -> bool:
            try:
                return len(await store.enqueue(_msg("2@a"))) == 1
            except StoreError:
                return False
        await eventually(writes, what="a write after the lock was released")
        assert (await store.counts()) == {"queued": 1}

        def lines(text: str) -> int:
            return sum(text in r.getMessage() for r in caplog.records if r.name == "relaywatch.store")
        # The writer thread logs "back" just after it answered the batch's waiters.
        await eventually(lambda: lines("is back after") == 1, what="the store's 'back' line")
        assert lines("is unavailable:") == 1 and lines("is back after") == 1
    finally:
        await store.close()


async def test_an_outcome_kept_while_the_store_is_down_is_recorded_when_it_is_back(tmp_path, caplog):
    """PendingOutcomes on a real SQLite store: closed (every write fails), then
    open again; and a lease another worker took is a "possible duplicate"."""
    from relaywatch.store.pending import PendingOutcomes
    store = SqliteStore(tmp_path / "q.sqlite3")
    await store.open()
    kept = PendingOutcomes(store, tmp_path / "pending-outcomes.jsonl", lambda: 60.0)
    try:
        ids = [i for _ in range(2) for i in await store.enqueue(_msg("1@a"))]
        assert len(await store.lease("w1", 1, ttl=60, now=time.time())) == 1            # ids[0]
        assert len(await store.lease("w1", 1, ttl=-1, now=time.time())) == 1            # ids[1], lapsed
        assert len(await store.lease("w2", 1, ttl=60, now=time.time())) == 1            # ids[1] again
        await store.close()
        await kept.record(PendingRecord(ids[0], "w1", 0, None, (RecipientOutcome("1@a", DELIVERED),), None))
        assert ids[0] in kept and len(kept.journal.load()) == 1
        await store.open()
        # Recorded first, then (in a thread) the journal rewritten without it: removed, here.
        await eventually(lambda: not kept and not kept.journal.path.exists(), what="the kept outcome recorded")
        assert await store.get(ids[0]) is None

        await kept.record(PendingRecord(ids[1], "w1", 0, None, (RecipientOutcome("1@a", DELIVERED),), None))
        assert not kept
        assert any("possible duplicate" in r.getMessage() and ids[1] in r.getMessage() for r in caplog.records)
    finally:
        await kept.close()
        await store.close()


async def test_an_outcome_for_an_entry_gone_meanwhile_is_a_possible_duplicate(tmp_path, caplog):
    """This node was taken for dead (its heartbeat late) while it delivered: another node
    delivered and recorded the entry first, so it is gone when this one records."""
    from relaywatch.store.pending import PendingOutcomes
    store = SqliteStore(tmp_path / "q.sqlite3")
    await store.open()
    kept = PendingOutcomes(store, tmp_path / "pending-outcomes.jsonl", lambda: 60.0)
    try:
        [gone] = await store.enqueue(_msg("1@a"))
        await store.lease("n2:1:a", 1, ttl=60, now=time.time())
        await store.record(gone, "n2:1:a", None, [RecipientOutcome("1@a", DELIVERED)], None)
        await kept.record(PendingRecord(gone, "n1:1:b", 0, None, (RecipientOutcome("1@a", DELIVERED),), None))
        assert any("possible duplicate" in r.getMessage() and gone in r.getMessage() and "node n1" in r.getMessage()
                   for r in caplog.records)
    finally:
        await kept.close()
        await store.close()
