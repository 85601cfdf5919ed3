"""The console's reads on SQL (console/api.py, console/metrics.py): queue gauges, pages, the audit log, traces.

Reads only, on the engine's reader connections; the SQL is in console.sql.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Callable

from relaywatch.model import Entry
from relaywatch.store import queries
from relaywatch.store import trace as traces
from relaywatch.store.base import QueryPage
from relaywatch.store.entry_rows import Q as QUEUE, entry_from_row, read_entry, recipient_from_row
from relaywatch.store.watch_rows import audit_of
from relaywatch.watch_records import AuditRecord

Q = queries.load("console.sql")
assert Q["entry_columns"] == QUEUE["entry_columns"], "console.sql reads entries as entry_rows.entry_from_row takes them"
ENTRY_WIDTH = len(Q["entry_columns"].split(","))   # page_entries: the entry's columns, then a recipient's


class SqlConsole:
    engine: Any
    dialect: Any
    clock: Callable[[], float]

    async def queue_gauges(self, now: float) -> list[tuple[str, str, str | None, int, int, float]]:
        def q(conn: Any):
            return [(c, st, code or None, n, leased, oldest)
                    for c, st, code, n, leased, oldest in conn.execute(Q["queue_gauges"], (now,))]
        return await self.engine.read(q)

    async def count_deferred_before(self, connector: str, received_before: float, now: float, cap: int) -> int:
        def q(conn: Any) -> int:
            # Leased entries are counted by the ranges and taken off after: count that many more.
            leased = sum(1 for c, status, at in conn.execute(Q["leased_now"], (now,))
                         if c == connector and status == "deferred" and at < received_before)
            limit, found = cap + leased, 0
            for (code,) in conn.execute(Q["deferred_codes"], (connector,)).fetchall():
                if found >= limit:
                    break
                if code:
                    args = (connector, code, received_before, limit)
                    found += conn.execute(Q["deferred_before"], args).fetchone()[0]
                else:
                    args = (connector, received_before, limit)
                    found += conn.execute(Q["deferred_before_without_code"], args).fetchone()[0]
            return max(0, min(found - leased, cap))
        return await self.engine.read(q)

    async def queue_page(self, page: QueryPage, now: float) -> list[Entry]:
        def entries_of(conn: Any, where: str, args: list, limit: int) -> list[Entry]:
            entries: list[Entry] = []
            for row in conn.execute(Q["page_entries"].replace("{where}", where), (*args, limit)):
                if not entries or entries[-1].id != row[0]:   # rows come in id order, an entry's together
                    entries.append(entry_from_row(row[:ENTRY_WIDTH], now))
                if row[ENTRY_WIDTH] is not None:             # LEFT JOIN: an entry without recipients
                    entries[-1].recipients.append(recipient_from_row(*row[ENTRY_WIDTH:]))
            return entries
        return await self.engine.read(lambda conn: _pages(conn, page, now, self.dialect.last_reply, entries_of))

    async def queue_page_ids(self, page: QueryPage, now: float) -> list[str]:
        def ids_of(conn: Any, where: str, args: list, limit: int) -> list[str]:
            return [i for (i,) in conn.execute(Q["page_ids"].replace("{where}", where), (*args, limit))]
        return await self.engine.read(lambda conn: _pages(conn, page, now, self.dialect.last_reply, ids_of))

    async def audit_log(self, limit: int = 100) -> list[AuditRecord]:
        return await self.engine.read(lambda conn: [audit_of(r) for r in conn.execute(Q["audit_log"], (limit,))])

    async def trace(self, entry_id: str) -> dict | None:
        entry_id = entry_id.upper()

        def q(conn: Any) -> dict | None:
            entry = read_entry(conn, entry_id, self.clock())
            if entry is not None:
                record = traces.trace_record(entry, entry.history, None)
            else:
                row = conn.execute(traces.Q["trace_of"], (entry_id,)).fetchone()
                if row is None:
                    return None
                record = json.loads(row[0])
            record["audit"] = [audit_of(r).to_dict(with_incident=True)
                               for r in conn.execute(traces.Q["audit_of_entry"], (f"%{entry_id}%",))]
            return record
        return await self.engine.read(q)

    async def trace_ids(self, message_id: str) -> list[str]:
        key = traces.lookup_key(message_id)
        if not key:
            return []
        return await self.engine.read(lambda conn: [i for (i,) in conn.execute(traces.Q["ids_of_message"], (key,))])


DOMAIN_IDS = 400          # a domain's recipients read at a time at first (doubling, up to DOMAIN_IDS_MAX)
DOMAIN_IDS_MAX = 6400     # well under SQLite's 32,766 parameters of a statement


def _pages(conn: Any, page: QueryPage, now: float, last_reply: str, fetch: Callable) -> list:
    """Up to ``page.limit`` of ``fetch(conn, where, args, limit)``'s rows (entries or ids) for
    ``page``'s filters, in id order."""
    codes = _codes_now(conn, page.code) if page.code else ()
    if page.code and not codes:
        return []     # no entry has such a code: nothing to read
    if not page.domain:
        where, args = _page_where(page, now, last_reply, codes)
        return fetch(conn, where, args, page.limit)
    found: list = []
    rest = replace(page, domain=None, after=None)
    for ids in _by_domain(conn, page.domain, (page.after or "").upper()):
        where, args = _page_where(rest, now, last_reply, codes, in_ids=len(ids))
        found += fetch(conn, where, [*args, *ids], page.limit - len(found))
        if len(found) == page.limit:
            break
    return found


def _codes_now(conn: Any, code: str) -> list[str]:
    """The codes the code filter ``code`` (exact, or a class "4.4.*") means among those the
    queue's entries have now (queue_counts: a few rows, not the entries).  So a class is an
    equality on a few codes (no LIKE per entry; a text range would follow PostgreSQL's
    collation, which may skip punctuation), and a code or class no entry has reads no entry
    at all.  An entry given a new code meanwhile is as one that came after the read."""
    prefix = code[:-1] if code.endswith(".*") else None
    return [c for (c,) in conn.execute(Q["codes_now"])
            if c == code or (prefix is not None and c.startswith(prefix))]


def _by_domain(conn: Any, domain: str, after: str):
    """The ids of the entries with a recipient in ``domain`` after ``after``, in id order, a
    bounded batch at a time: from recipients_domain (the domain's, and those of rows without a
    domain whose address is in it), each read in the index's order, so that the plan is a range
    of one index in SQLite and PostgreSQL alike, however many recipients the domain has."""
    size = DOMAIN_IDS
    while True:
        reads: tuple[list[str], list[str]] = ([], [])
        for part, entry_id in conn.execute(Q["in_domain"], (domain.lower(), after, size,
                                                            "%@" + _like(domain), after, size)):
            reads[part].append(entry_id)
        # Complete up to the lowest last id of a read that came back full; the rest comes next time.
        full = [ids[-1] for ids in reads if len(ids) == size]
        bound = min(full) if full else None
        ids = sorted({i for ids in reads for i in ids if bound is None or i <= bound})
        if ids:
            yield ids
        if bound is None:
            return
        after, size = bound, min(size * 2, DOMAIN_IDS_MAX)


def _like(text: str) -> str:
    """``text`` with LIKE's wildcards escaped by "!" (the queries say ESCAPE '!')."""
    return text.lower().replace("!", "!!").replace("%", "!%").replace("_", "!_")


def _page_where(page: QueryPage, now: float, last_reply: str, codes: tuple | list = (),
                in_ids: int = 0) -> tuple[str, list]:
    """`` WHERE ...`` (or "") and its parameters for a QueryPage's filters; ``last_reply`` is
    the dialect's SQL for a recipient's last reply (store/sqlite.py, store/postgres.py);
    ``codes``: what the code filter means now (_codes_now).
    ``in_ids``: also among that many ids, the last parameters (the caller adds them)."""
    where, args = [], []

    def add(name: str, *values) -> None:
        where.append(Q[name])
        args.extend(values)
    if page.after:
        add("after_id", page.after.upper())
    if page.connector:
        add("on_connector", page.connector)
    if page.status == "active":
        add("is_active", now)
    elif page.status:
        add("in_status_unleased", page.status, now)
    if page.sender is not None:
        add("sent_by", page.sender.lower())
    if page.code:
        where.append(queries.in_list(Q["last_code_in"], len(codes)))
        args.extend(codes)
    if page.older_than is not None:
        add("received_before", now - page.older_than)
    if page.recipient:
        add("has_recipient", page.recipient.lower())
    if page.domain:
        raise ValueError("the domain filter is read from the domain's end: _pages")
    if page.route:
        add("routed_as", page.route)
    message_id = traces.message_id_of(page.text) if page.text else None
    if message_id is not None:
        add("has_message_id", message_id)
    elif page.text:
        where.append(Q["has_text"].replace("{last_reply}", last_reply))
        args.extend(["%" + _like(page.text) + "%"] * 3)
    if in_ids:
        where.append(queries.in_list(Q["in_ids"], in_ids))
    return (" WHERE " + " AND ".join(where) if where else ""), args
