"""The store reads the console adds (store/base.py ConsoleStore), over memory, SQLite and PostgreSQL."""

import asyncio
import time

import pytest

from relaywatch.model import Attempt, Failure, RecipientOutcome, RecipientStatus, Route, RouteKind
from relaywatch.store.base import QueryPage
from relaywatch.watch_records import AuditRecord, Setting
from tests.contract.test_store import msg, sql_store  # noqa: F401  (a fixture)

A = Route(RouteKind.CONNECTOR, "a")
B = Route(RouteKind.CONNECTOR, "b")


def failure(code: str, at: float) -> Failure:
    return Failure(code=code, smtp_code=450, title="Connection refused", subtype="refused", detail="d",
                   phase="connect", permanent=False, at=at, kind="connect.refused")


async def defer(store, entry_id: str, address: str, code: str, now: float) -> None:
    """Lease the oldest due entry (it must be ``entry_id``) and record a deferral with ``code``."""
    [entry] = await store.lease("w", 1, ttl=60, now=now)
    assert entry.id == entry_id
    outcome = RecipientOutcome(address, RecipientStatus.DEFERRED, failure(code, now))
    await store.record(entry.id, "w", Attempt(now, 0.1, None, (outcome,)), [outcome], now + 3600)


async def test_queue_gauges_group_by_connector_status_and_code(store):
    now = time.time()
    [a1] = await store.enqueue(msg([("1@x.test", A)], now=now - 100))
    [a2] = await store.enqueue(msg([("2@x.test", A)], now=now - 50))
    [a3] = await store.enqueue(msg([("3@x.test", A)], now=now - 10))
    [b1] = await store.enqueue(msg([("4@y.test", B)], now=now - 30))
    await defer(store, a1, "1@x.test", "4.4.316", now)
    await defer(store, a2, "2@x.test", "4.4.316", now)
    await store.hold(b1)
    [active] = await store.lease("w", 1, ttl=60, now=now)
    assert active.id == a3
    rows = {(c, st, code): (n, leased, oldest) for c, st, code, n, leased, oldest in await store.queue_gauges(now + 1)}
    assert rows == {("a", "deferred", "4.4.316"): (2, 0, pytest.approx(now - 100)),
                    ("a", "queued", None): (1, 1, pytest.approx(now - 10)),
                    ("b", "held", None): (1, 0, pytest.approx(now - 30))}


async def test_queue_page_filters_and_pages_by_id(store):
    now = time.time()
    ids = []
    for i in range(7):
        ids += await store.enqueue(msg([(f"u{i}@{'x' if i % 2 else 'y'}.test", A if i < 5 else B)], now=now - 100 + i))
    await store.hold(ids[0])
    await defer(store, ids[1], "u1@x.test", "4.4.316", now)
    await store.release(ids[0], now + 7200)   # due after the others: leases none of them
    await store.hold(ids[2])

    async def page(**kw):
        return [e.id for e in await store.queue_page(QueryPage(**kw), now)]
    assert await page() == sorted(ids)
    first = await page(limit=3)
    assert first == sorted(ids)[:3]
    assert await page(limit=3, after=first[-1]) == sorted(ids)[3:6]
    assert await page(after=sorted(ids)[-1]) == []
    # (ids drawn in the same millisecond sort by their random part: compare sorted)
    assert await page(connector="b") == sorted(ids[5:])
    assert await page(status="held") == [ids[2]]
    assert await page(status="queued") == sorted(i for i in ids if i not in (ids[1], ids[2]))
    assert await page(status="deferred") == [ids[1]]
    assert await page(code="4.4.316") == [ids[1]]
    assert await page(domain="x.test") == sorted([ids[1], ids[3], ids[5]])
    assert await page(domain="_.test") == []          # a LIKE wildcard is taken literally
    assert await page(recipient="U4@Y.TEST") == [ids[4]]
    assert await page(sender="S@X.test") == sorted(ids)
    assert await page(sender="") == []
    assert await page(older_than=96.5) == sorted(ids[:4])
    assert await store.queue_page_ids(QueryPage(domain="x.test", limit=2), now) == sorted([ids[1], ids[3], ids[5]])[:2]


async def test_queue_page_by_code_class(store):
    """A class "4.4.*" is every code starting "4.4." (not "4.40.x"), "4.*" every transient one;
    an exact code only itself; and the same for the ids (what bulk actions by filter act on)."""
    now = time.time()
    codes = ("4.4.316", "4.4.7", "4.40.1", "4.7.320", "5.7.1")
    ids = []
    for i, _ in enumerate((*codes, None)):
        ids += await store.enqueue(msg([(f"c{i}@x.test", A)], now=now - 100 + i))
    for entry_id, code, i in zip(ids, codes, range(len(codes))):
        await defer(store, entry_id, f"c{i}@x.test", code, now)

    async def page(code, limit=100):
        got = [e.id for e in await store.queue_page(QueryPage(code=code, limit=limit), now)]
        assert await store.queue_page_ids(QueryPage(code=code, limit=limit), now) == got
        return got
    assert await page("4.4.*") == sorted(ids[:2])
    assert await page("4.*") == sorted(ids[:4])
    assert await page("4.*", limit=2) == sorted(ids[:4])[:2]
    assert await page("5.7.*") == [ids[4]]
    assert await page("5.*") == [ids[4]]
    assert await page("2.*") == []
    assert await page("4.4.7") == [ids[1]]
    assert await page("4.4") == []        # a class is "4.4.*" (console/api_input.py code_filter)
    # The codes come from the counts: held (status changes, code stays), then gone.
    await store.hold(ids[4])
    assert await page("5.7.*") == [ids[4]]
    await store.delete(ids[4])
    assert await page("5.*") == [] and await page("5.7.1") == []
    await defer(store, ids[5], "c5@x.test", "5.7.26", now)
    assert await page("5.*") == [ids[5]]


async def test_queue_page_by_text_and_route(store):
    """text: a substring, in any case, of the sender, a recipient or a recipient's last reply; its
    LIKE wildcards and quotes are literal text, never SQL.  route: the route's kind."""
    now = time.time()
    local = Route(RouteKind.LOCAL, "local")
    [a1] = await store.enqueue(msg([("anna@x.test", A)], now=now - 30))
    [a2] = await store.enqueue(msg([("bob@y.test", A)], now=now - 20))
    [l1] = await store.enqueue(msg([("carl@local.test", local)], now=now - 10))
    [entry] = await store.lease("w", 1, ttl=60, now=now)
    assert entry.id == a1
    refused = RecipientOutcome("anna@x.test", RecipientStatus.DEFERRED,
                               Failure(code="4.4.316", smtp_code=451, title="t", subtype=None, detail="d",
                                       phase="rcpt", permanent=False, at=now, kind="k",
                                       reply="451 4.7.1 Greylisted_100%, try later"))
    await store.record(entry.id, "w", Attempt(now, 0.1, None, (refused,)), [refused], now + 3600)

    async def page(**kw):
        return [e.id for e in await store.queue_page(QueryPage(**kw), now)]
    assert await page(text="GREYLISTED") == [a1]                    # the last reply
    assert await page(text="bob@") == [a2]                          # a recipient
    assert await page(text="S@X.TEST") == sorted([a1, a2, l1])      # the sender
    assert await page(text="ed_100%") == [a1]                       # wildcards are letters here
    assert await page(text="x_test") == []                         # not x.test: _ is no wildcard
    assert await page(text="' OR 1=1 --") == []
    assert await page(route="local") == [l1]
    assert await page(route="connector", text="anna") == [a1]
    assert await page(route="internet") == []
    assert await store.queue_page_ids(QueryPage(text="greylisted"), now) == [a1]


async def test_audit_log_lists_the_newest_first(store):
    first = await store.apply_fix("ops", "queue hold", None, {"id": "X", "reason": "r"}, {}, (), 1.0)
    second = await store.apply_fix("dev", "pause", 7, {"reason": None}, {Setting.CONNECTOR_PAUSED.of("a"): True}, (),
                                   2.0)
    assert await store.audit_log(limit=10) == [
        AuditRecord(second, 2.0, "dev", "pause", {"reason": None}, incident_id=7),
        AuditRecord(first, 1.0, "ops", "queue hold", {"id": "X", "reason": "r"})]


async def _domain_pages(store, domain: str, now: float, limit: int = 2) -> list[str]:
    """Every id the domain filter finds, page by page (keyset pagination)."""
    found, after = [], None
    while True:
        ids = await store.queue_page_ids(QueryPage(domain=domain, limit=limit, after=after), now)
        if not ids:
            return found
        found, after = found + ids, ids[-1]


async def _brute_force(store, domain: str) -> list[str]:
    from relaywatch.store.base import QueueQuery
    return sorted(e.id for e in await store.list(QueueQuery())
                  if any(r.address.lower().rpartition("@")[2] == domain.lower() for r in e.recipients))


DOMAINS = ("x.test", "X.Test", "sub.x.test", "y.test", "xn--bcher-kva.test", "none.test")


async def test_the_domain_filter_finds_what_reading_every_recipient_finds(store):
    """recipients.domain is filled at enqueue and when recipients move to a new entry."""
    now = time.time()
    ids = []
    for i in range(9):
        rcpts = [(f"u{i}@{'X.test' if i % 3 == 0 else 'y.test'}", A), (f"v{i}@sub.x.test", A)] if i % 2 else \
            [(f"w{i}@xn--bcher-kva.test", A), (f'"a@b.test"{i}@y.test', A)]
        ids += await store.enqueue(msg(rcpts, now=now - 100 + i))
    await store.move_recipients(ids[0], [f'"a@b.test"0@y.test'], B, now)
    await store.move_recipients(ids[3], ["u3@X.test"], B, now)
    for domain in DOMAINS + ("b.test",):
        assert await _domain_pages(store, domain, now) == await _brute_force(store, domain), domain


async def test_the_domain_filter_finds_rows_from_before_the_column_and_from_old_nodes(sql_store, tmp_path, request):
    """The migration fills recipients.domain for the queue's rows; a node of the previous
    version keeps inserting without it (NULL), and the filter still finds those."""
    now = time.time()
    for i in range(4):
        await sql_store.enqueue(msg([(f"u{i}@{'X.test' if i % 2 else 'y.test'}", A), (f"v{i}@sub.x.test", A)],
                                    now=now - 100 + i))
    await sql_store.close()
    if sql_store.backend == "sqlite":
        import sqlite3
        conn = sqlite3.connect(tmp_path / "q.sqlite3")
    else:
        import psycopg
        conn = psycopg.connect(request.getfixturevalue("pg_dsn"), autocommit=True)
    conn.execute("DROP INDEX recipients_domain")
    conn.execute("ALTER TABLE recipients DROP COLUMN domain")
    if sql_store.backend == "sqlite":
        conn.commit()
    conn.close()
    await sql_store.open()

    def old_node(c, cleanup):
        c.execute("INSERT INTO bodies (id, data, path, size, refs) VALUES ('B1', NULL, NULL, 4, 1)")
        c.execute("INSERT INTO entries (id, body_id, sender, received_at, expires_at, status, attempts, "
                  "next_attempt_at, route_kind, route_name, route_domain, size, message_id, client, is_dsn, "
                  "waiting) VALUES ('OLD1', 'B1', 's@x', 1, 9999999999, 'queued', 0, 1, 'connector', 'a', '', "
                  "4, '', '', 0, 2)")
        for position, address in enumerate(("o@X.TEST", "p@y.test")):
            c.execute("INSERT INTO recipients (entry_id, position, address, status) "
                      f"VALUES ('OLD1', {position}, '{address}', 'pending')")
    await sql_store.engine.write(old_node)
    await sql_store.enqueue(msg([("n@x.test", B)], now=now))       # this version's: filled at enqueue
    nulls = await sql_store._read(lambda c: c.execute("SELECT count(*) FROM recipients WHERE domain IS NULL").fetchone())
    assert nulls[0] == 2                # the old node's; the migration filled the others
    for domain in DOMAINS:
        assert await _domain_pages(sql_store, domain, now) == await _brute_force(sql_store, domain), domain
    assert "OLD1" in await _domain_pages(sql_store, "x.test", now)


async def test_the_domain_filter_reads_the_domain_in_batches_as_one_walk(sql_store, monkeypatch):
    """The domain filter reads the domain's recipients a batch at a time (store/console.py
    _by_domain), with and without a domain (an old node's), an entry with two of them once;
    batches of one and two here: every page is still the walk's."""
    from relaywatch.store import console
    monkeypatch.setattr(console, "DOMAIN_IDS", 1)
    monkeypatch.setattr(console, "DOMAIN_IDS_MAX", 2)
    now = time.time()
    ids = []
    for i in range(12):
        rcpts = [(f"u{i}@{'x.test' if i % 3 else 'y.test'}", A), *([(f"v{i}@X.test", A)] if i % 2 else [])]
        ids += await sql_store.enqueue(msg(rcpts, now=now - 100 + i))

    def old_node(c, cleanup):   # a node of the previous version: no domain; its ids among ours
        c.execute("INSERT INTO bodies (id, data, path, size, refs) VALUES ('B1', NULL, NULL, 4, 3)")
        for n, near in enumerate(ids[::4]):
            c.execute("INSERT INTO entries (id, body_id, sender, received_at, expires_at, status, attempts, "
                      "next_attempt_at, route_kind, route_name, route_domain, size, message_id, client, is_dsn, "
                      f"waiting) VALUES ('{near[:-1]}G', 'B1', 's@x', 1, 9999999999, 'queued', 0, 9999999999, "
                      "'connector', 'a', '', 4, '', '', 0, 2)")
            for position, address in enumerate((f"o{n}@X.TEST", f"p{n}@{'x' if n % 2 else 'y'}.test")):
                c.execute("INSERT INTO recipients (entry_id, position, address, status) "
                          f"VALUES ('{near[:-1]}G', {position}, '{address}', 'pending')")
    await sql_store.engine.write(old_node)
    await sql_store.hold(ids[5])
    for limit in (1, 2, 3, 100):
        for domain in ("x.test", "y.test", "none.test"):
            assert await _domain_pages(sql_store, domain, now, limit) == await _brute_force(sql_store, domain), \
                (domain, limit)
    assert [e.id for e in await sql_store.queue_page(QueryPage(domain="x.test", status="held"), now)] == [ids[5]]
    old = [e for e in await sql_store.queue_page(QueryPage(domain="x.test", after=ids[4]), now) if e.id[-1] == "G"]
    assert [e.id for e in old] == [ids[4][:-1] + "G", ids[8][:-1] + "G"]
    assert [r.address for r in old[0].recipients] == ["o1@X.TEST", "p1@x.test"]


async def test_a_queue_page_has_every_recipient_of_its_entries_in_order(store):
    """The page and its recipients come from one statement (store/console.sql page_entries): each
    entry has all its recipients, delivered ones too, in position order, with their last reply,
    on every page of a filtered keyset walk."""
    from dataclasses import replace
    now = time.time()
    ids = []
    for i in range(7):
        rcpts = [(f"r{i}-{n}@{'x' if n % 2 else 'y'}.test", A if i % 3 else B) for n in range(i % 4 + 1)]
        ids += await store.enqueue(replace(msg(rcpts, now=now - 100 + i), message_id=f"<m{i}@x>"))
    await defer(store, ids[0], "r0-0@y.test", "4.4.316", now)    # the oldest: one recipient
    three = ids[2]                                                # three recipients on connector a
    await store.record(three, None, None, [RecipientOutcome("r2-1@x.test", RecipientStatus.DELIVERED)], now)

    async def walk(**kw):
        pages, after = [], None
        while True:
            page = await store.queue_page(QueryPage(limit=2, after=after, **kw), now)
            pages += page
            if len(page) < 2:
                return pages
            after = page[-1].id
    for kw in ({}, {"connector": "a"}, {"domain": "x.test"}, {"status": "queued", "connector": "a"}):
        walked = await walk(**kw)
        assert [e.id for e in walked] == [e.id for e in await store.queue_page(QueryPage(**kw), now)], kw
        for e in walked:
            full = await store.get(e.id)
            assert [(r.position, r.address, r.status) for r in e.recipients] == \
                [(r.position, r.address, r.status) for r in full.recipients], (kw, e.id)
            assert [r.last_error for r in e.recipients] == [r.last_error for r in full.recipients]
    by_id = {e.id: e for e in await walk()}
    assert len(by_id) == 7 and [len(by_id[i].recipients) for i in ids] == [i % 4 + 1 for i in range(7)]
    assert by_id[ids[0]].recipients[0].last_error.code == "4.4.316"
    assert [r.status for r in by_id[three].recipients] == [RecipientStatus.PENDING, RecipientStatus.DELIVERED,
                                                           RecipientStatus.PENDING]


async def test_the_text_filter_given_a_message_id_in_brackets_finds_that_message(store):
    """``<left@right>`` is a Message-ID as the header writes it: the entries with it (either form
    stored), through entries_message_id; without the brackets it is a substring as before."""
    from dataclasses import replace
    now = time.time()
    [one] = await store.enqueue(replace(msg([("u1@x.test", A)], now=now - 30), message_id="<id1@client.test>"))
    [bare] = await store.enqueue(replace(msg([("u2@x.test", A)], now=now - 20), message_id="id1@client.test"))
    [other] = await store.enqueue(replace(msg([("id1@client.test", A)], now=now - 10), message_id="<id2@client.test>"))

    async def page(text):
        return [e.id for e in await store.queue_page(QueryPage(text=text), now)]
    assert await page("<id1@client.test>") == sorted([one, bare])
    assert await page("  <id1@client.test> ") == sorted([one, bare])
    assert await page("<ID1@client.test>") == []            # a Message-ID is compared exactly
    assert await page("id1@client.test") == [other]         # no brackets: a substring of a recipient
    assert await page("<id2@client.test>") == [other]
    assert await page("<nobody@client.test>") == []
    assert await store.queue_page_ids(QueryPage(text="<id1@client.test>", limit=1), now) == sorted([one, bare])[:1]
    assert await store.trace_ids("id1@client.test") == sorted([one, bare])


def _raw(sql_store, tmp_path, request):
    """A connection of our own to ``sql_store``'s queue (SQL as someone else writes it)."""
    if sql_store.backend == "sqlite":
        import sqlite3
        return sqlite3.connect(tmp_path / "q.sqlite3", isolation_level=None)
    import psycopg
    return psycopg.connect(request.getfixturevalue("pg_dsn"), autocommit=True)


def _message_ids(conn) -> list[tuple[str, str]]:
    return sorted(tuple(r) for r in conn.execute("SELECT message_id, entry_id FROM message_ids").fetchall())


def _relations(conn, pg: bool, *names: str) -> list[str]:
    """Those of ``names`` that the queue's schema has."""
    sql = ("SELECT relname FROM pg_class WHERE relnamespace = current_schema()::regnamespace AND relname = ANY(%s)"
           if pg else f"SELECT name FROM sqlite_master WHERE name IN ({','.join('?' * len(names))})")
    return sorted(r[0] for r in conn.execute(sql, [list(names)] if pg else names).fetchall())


PREVIOUS_VERSION = (   # what the previous version had in message_ids' place
    "DROP TRIGGER entries_message_ids{on_entries}", "DROP TRIGGER IF EXISTS entries_message_ids_gone{on_entries}",
    "DROP TRIGGER traces_message_ids_gone{on_traces}", "DROP TABLE message_ids",
    "CREATE INDEX entries_message_id ON entries (message_id)", "CREATE INDEX traces_message_id ON traces (message_id)")


async def test_a_message_id_is_a_seek_of_message_ids_also_in_a_queue_from_before_it(sql_store, tmp_path, request):
    """The trace by Message-ID and the text filter given one read message_ids, not every entry; a
    queue made before it has its entries and traces filled in when it is next opened, and loses the
    indexes message_ids replaced (PostgreSQL: no node of the previous version runs)."""
    from relaywatch.store import trace as traces
    from relaywatch.store.console import Q as CONSOLE, _page_where
    [queued] = await sql_store.enqueue(msg([("u@x.test", A)]))
    [gone] = await sql_store.enqueue(msg([("v@x.test", A)]))
    assert await sql_store.delete(gone)
    await sql_store.close()
    conn = _raw(sql_store, tmp_path, request)
    pg = sql_store.backend == "postgres"
    for sql in PREVIOUS_VERSION:
        conn.execute(sql.format(on_entries=" ON entries" if pg else "", on_traces=" ON traces" if pg else ""))
    await sql_store.open()
    assert _message_ids(conn) == sorted([("m@x", gone), ("m@x", queued)])
    assert not _relations(conn, pg, "entries_message_id", "traces_message_id")
    conn.close()
    where, args = _page_where(QueryPage(text="<m@x>"), 1.0, sql_store.dialect.last_reply)
    page_ids = CONSOLE["page_ids"].replace("{where}", where)

    def plans(c):
        if pg:
            # Tiny tables, read whole: show what the conditions allow when that is not taken.
            c.execute("SET enable_seqscan = off")
        try:
            return [" ".join(str(row[-1]) for row in c.execute("EXPLAIN " + ("" if pg else "QUERY PLAN ") + sql, params))
                    for sql, params in ((traces.Q["ids_of_message"], ("m@x",)), (page_ids, (*args, 50)))]
        finally:
            if pg:
                c.execute("RESET enable_seqscan")
    for plan in await sql_store._read(plans):
        assert "message_ids" in plan and ("message_ids_pkey" in plan if pg else "PRIMARY KEY" in plan), plan
        assert "Seq Scan" not in plan and "SCAN message_ids" not in plan, plan
    assert await sql_store.trace_ids("<m@x>") == sorted([queued, gone])
    assert [e.id for e in await sql_store.queue_page(QueryPage(text="<m@x>"), time.time())] == [queued]


async def test_message_ids_follow_entries_and_traces_whoever_writes_them(sql_store, tmp_path, request):
    """message_ids is kept by triggers: an entry inserted by other SQL (a node of the previous
    version) is in it; an entry removed with no trace kept leaves it, one with a trace leaves it
    with the trace's prune."""
    from dataclasses import replace
    conn = _raw(sql_store, tmp_path, request)
    now = time.time()
    conn.execute("INSERT INTO entries (id, body_id, sender, received_at, expires_at, status, route_kind, route_name, "
                 "size, message_id) VALUES ('0000000000100000', 'B', 's@x', ?, ?, 'held', 'connector', 'a', 1, "
                 "' <old@x> ')".replace("?", "%s" if sql_store.backend == "postgres" else "?"), (now, now + 60))
    assert await sql_store.trace_ids("old@x") == ["0000000000100000"]
    assert [e.id for e in await sql_store.queue_page(QueryPage(text="<old@x>"), now)] == ["0000000000100000"]
    [kept] = await sql_store.enqueue(msg([("u@x.test", A)]))
    [untraced] = await sql_store.enqueue(msg([("v@x.test", A)]))
    [no_id] = await sql_store.enqueue(replace(msg([("w@x.test", A)]), message_id="<>"))
    assert _message_ids(conn) == [("m@x", kept), ("m@x", untraced), ("old@x", "0000000000100000")]
    assert await sql_store.delete(kept)
    sql_store.trace_retention = 0
    assert await sql_store.delete(untraced)
    assert await sql_store.delete(no_id)
    assert _message_ids(conn) == [("m@x", kept), ("old@x", "0000000000100000")]
    assert await sql_store.trace_ids("<m@x>") == [kept] and await sql_store.trace_ids("") == []
    conn.execute("DELETE FROM traces")     # as the prune does
    assert _message_ids(conn) == [("old@x", "0000000000100000")]
    conn.close()


async def test_postgresql_keeps_the_indexes_message_ids_replaced_while_a_node_of_the_previous_version_runs(
        sql_store, tmp_path, request):
    """A node of the previous version looks Message-IDs up through entries_message_id and
    traces_message_id: a node starting beside it keeps them; once every running node's heartbeat
    says it reads message_ids (or the old one stopped), the next start drops them."""
    if sql_store.backend != "postgres":
        pytest.skip("SQLite is one node: it drops them when it opens the queue")
    from relaywatch.cluster.model import NodeBeat, NodeState
    await sql_store.heartbeat(NodeBeat("new", "new:1:a", "", "all", "0", time.time(), time.time(), 0, 0, 0,
                                       NodeState.RUNNING))
    await sql_store.close()
    conn = _raw(sql_store, tmp_path, request)
    conn.execute("CREATE INDEX entries_message_id ON entries (message_id)")
    conn.execute("CREATE INDEX traces_message_id ON traces (message_id)")
    # The previous version's heartbeat names no message_ids_by (its row's is left as it was).
    conn.execute("INSERT INTO nodes (name, instance, address, role, version, state, started_at, heartbeat_at) "
                 "VALUES ('old', 'old:1:b', '', 'all', '0', 'running', %s, %s)", (time.time(), time.time()))
    both = ["entries_message_id", "traces_message_id"]
    await sql_store.open()
    assert _relations(conn, True, *both) == both
    await sql_store.close()
    conn.execute("UPDATE nodes SET state = 'stopped' WHERE name = 'old'")
    await sql_store.open()
    assert _relations(conn, True, *both) == []
    conn.close()


async def test_postgresql_starts_when_running_nodes_hold_the_tables_the_retired_indexes_are_on(
        sql_store, tmp_path, request):
    """Dropping entries_message_id waits for every open transaction on entries: a start that cannot
    have the table within the schema's lock wait leaves the indexes for a later start, and starts."""
    if sql_store.backend != "postgres":
        pytest.skip("PostgreSQL's retire_indexes")
    import psycopg
    await sql_store.close()
    conn = _raw(sql_store, tmp_path, request)
    conn.execute("CREATE INDEX entries_message_id ON entries (message_id)")
    running = psycopg.connect(request.getfixturevalue("pg_dsn"))     # a running node's batch, mid-way
    try:
        running.execute("LOCK TABLE entries IN ROW EXCLUSIVE MODE")
        await asyncio.wait_for(sql_store.open(), 60)
        assert _relations(conn, True, "entries_message_id") == ["entries_message_id"]
        running.commit()
        await sql_store.close()
        await sql_store.open()
        assert _relations(conn, True, "entries_message_id") == []
    finally:
        running.close()
        conn.close()


async def test_postgresql_a_role_that_does_not_own_the_tables_leaves_the_retired_indexes_and_opens(pg_dsn):
    """Only an owner may drop an index: a role granted the tables by another opens the queue as before."""
    import psycopg

    from helpers import open_as_a_role_granted_the_tables
    await open_as_a_role_granted_the_tables(
        pg_dsn, lambda conn: conn.execute("CREATE INDEX entries_message_id ON entries (message_id)"))
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert _relations(conn, True, "entries_message_id") == ["entries_message_id"]
