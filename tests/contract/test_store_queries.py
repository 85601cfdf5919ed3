"""The named queries (store/*.sql) and the one schema: parsed, complete, and fast where it matters."""

import re
import sqlite3
from pathlib import Path

import pytest

from relaywatch.incident import IncidentState
from relaywatch.model import EntryStatus, RecipientStatus
from relaywatch.watch_records import NotificationState
from relaywatch.store import queries, schema

STORE = Path(queries.__file__).parent
# Each file and the modules that run its queries (entry_rows.py reads entries for queue.py).
SQL_FILES = {"queue.sql": (STORE / "queue.py", STORE / "entry_rows.py"), "watch.sql": (STORE / "watch.py",)}
# Queries of a file other modules run too, through its module (``traces.Q[...]``).
SHARED_SQL = {"trace.sql": ("traces", (STORE / "queue.py", STORE / "console.py"))}


def test_a_query_file_is_parsed_by_name_with_enum_constants_and_fragments():
    parsed = queries.parse("""
-- header comment, before any name: ignored
-- cols --
a, b
-- due --
-- what it does (a comment: not part of the query)
SELECT {cols} FROM t
WHERE status IN ({EntryStatus.QUEUED}, {RecipientStatus.PENDING}) AND x IN (?*){where}
""")
    assert parsed == {"cols": "a, b",
                      "due": "SELECT a, b FROM t WHERE status IN ('queued', 'pending') AND x IN (?*){where}"}
    assert queries.in_list(parsed["due"], 3).endswith("x IN (?,?,?){where}")
    with pytest.raises(ValueError, match="defined twice"):
        queries.parse("-- a --\nSELECT 1\n-- a --\nSELECT 2\n")
    with pytest.raises(KeyError):
        queries.parse("-- a --\nSELECT {EntryStatus.NO_SUCH}\n")


@pytest.mark.parametrize("sql_file", sorted(SQL_FILES))
def test_every_query_is_used_and_every_use_is_defined(sql_file):
    defined = set(queries.load(sql_file))
    code = "\n".join(path.read_text() for path in SQL_FILES[sql_file])
    used = set(re.findall(r'(?<![\w.])Q\["([a-z_]+)"', code)) | {
        name for a, b in re.findall(r'Q\["([a-z_]+)" if \w+ else "([a-z_]+)"\]', code) for name in (a, b)}
    fragments = {n for n in defined if "{" + n + "}" in (STORE / sql_file).read_text()}
    assert used - defined == set()
    assert defined - used - fragments == set()


@pytest.mark.parametrize("sql_file", sorted(SHARED_SQL))
def test_every_shared_query_is_used_and_every_use_is_defined(sql_file):
    module, users = SHARED_SQL[sql_file]
    used = {name for path in users for name in re.findall(module + r'\.Q\["([a-z_]+)"', path.read_text())}
    assert used == set(queries.load(sql_file))


def test_no_status_is_spelled_out_in_sql():
    """Statuses come from the enums of model.py ({EntryStatus.QUEUED}), never as literals."""
    values = {m.value for e in (EntryStatus, RecipientStatus, IncidentState, NotificationState) for m in e}
    for path in [*(STORE / f for f in (*SQL_FILES, *SHARED_SQL)), STORE / "schema.py"]:
        text = "\n".join(line.split("--")[0] for line in path.read_text().splitlines())   # not in comments
        assert not [v for v in values if f"'{v}'" in text], path


def test_the_lease_and_the_watch_use_their_partial_indexes_on_sqlite():
    """Why the statuses are rendered into the SQL and not bound: SQLite's planner uses a
    partial index only when the query names the index's own literals."""
    from relaywatch.store.queue import Q as QUEUE, lease_sql
    from relaywatch.store.watch import Q as WATCH
    conn = sqlite3.connect(":memory:")
    conn.executescript(schema.render("sqlite"))
    def plan(sql, params):
        return " ".join(row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params))
    assert "USING INDEX entries_due" in plan(lease_sql(), ("w", 1.0, 1.0, 1.0, 10))
    summary = plan(WATCH["deferred_by_cause"], ())
    assert {"entries_group_age", "entries_deferred_expiry", "entries_deferred_failure"} <= set(summary.split()), summary
    assert "SCAN e " not in summary + " " and "SCAN entries" not in summary, "a seek per group, never every entry"
    assert "entries_notice" in plan(WATCH["held_notices"], ())
    # The same lease with the statuses as parameters scans the table.
    bound = QUEUE["lease"].replace("'queued', 'deferred'", "?, ?").replace("{row_lock}", "")
    assert "USING INDEX entries_due" not in plan(bound, ("w", 1.0, 1.0, "queued", "deferred", 1.0, 10))


def test_what_serve_reads_at_start_is_a_few_rows_through_partial_indexes_on_sqlite():
    """The spooled bodies (the orphan sweep) and the leases a previous run left: not a scan of ten million."""
    from relaywatch.store.queue import Q as QUEUE
    conn = sqlite3.connect(":memory:")
    conn.executescript(schema.render("sqlite"))
    def plan(sql, params=()):
        return " ".join(row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params))
    assert "bodies_spooled" in plan(QUEUE["spool_paths"])
    release = QUEUE["release_leases"]
    assert "entries_leased" in plan(release.replace("{where}", QUEUE["leased"]), (1.0, 1.0))
    assert "entries_leased" in plan(release.replace("{where}", QUEUE["leased_by"]), (1.0, 1.0, "n:1:x"))


def test_opening_a_counted_queue_reads_no_entry_on_sqlite():
    """The counts' backfill (schema.counting, run at every open: serve, every CLI command) checks first
    that nothing is counted yet; SQLite walked every entry to test that (1.1 s with ten million)."""
    conn = sqlite3.connect(":memory:")
    conn.executescript(schema.render("sqlite") + schema.counting("sqlite"))

    def add(n):
        conn.execute("WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i + 1 < ?) "
                     "INSERT INTO entries (id, body_id, sender, received_at, expires_at, status, route_kind, "
                     "route_name, size) SELECT printf('%016X', i + (SELECT count(*) FROM entries)), 'b', 's', 0, 0, "
                     "'deferred', 'connector', 'a', 1 FROM s", (n,))

    def steps():   # SQLite's virtual-machine steps for the backfill: a count of the work, not a time
        counter = [0]
        conn.set_progress_handler(lambda: counter.__setitem__(0, counter[0] + 1), 1)
        conn.executescript(schema.COUNTS_BACKFILL)
        conn.set_progress_handler(None, 1)
        return counter[0]
    add(10)
    few = steps()
    add(2000)
    assert steps() == few
    assert conn.execute("SELECT n FROM queue_counts").fetchall() == [(2010,)]


def test_one_schema_renders_for_both_databases():
    sqlite_sql, pg_sql = schema.render("sqlite"), schema.render("postgres")
    assert "{" not in sqlite_sql and "{" not in pg_sql
    assert "WITHOUT ROWID" in sqlite_sql and "WITHOUT ROWID" not in pg_sql
    assert "BYTEA" in pg_sql and "AUTOINCREMENT" in sqlite_sql
    assert [m[1] for m in schema.missing_columns({"entries": {"id", "status"}, "recipients": {"address"}})] == \
        ["waiting", "notice_pending", "helo", "auth_user", "dsn_ret", "dsn_envid", "dsn_notify", "dsn_orcpt",
         "is_tls_report", "utf8_headers", "domain"]
    assert schema.missing_columns({}) == []    # a new queue: the schema has every column


def test_the_console_domain_filter_seeks_recipients_domain_on_sqlite():
    """The queue filtered by a recipient domain reads the domain's recipients through their
    index, not every entry with a probe of its recipients (bench/README.md, 1M queued)."""
    import sqlite3
    from relaywatch.store.console import Q as CONSOLE, _page_where
    from relaywatch.store.base import QueryPage
    conn = sqlite3.connect(":memory:")
    conn.executescript(schema.render("sqlite"))
    from relaywatch.store import queries as named

    def plan(sql, args):
        return " ".join(row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, args))
    # The domain's recipients, and those without a domain, each a range of recipients_domain in its order.
    found = plan(CONSOLE["in_domain"], ("x.test", "", 400, "%@x.test", "", 400))
    assert found.count("recipients_domain (domain=? AND entry_id>?)") == 2 and "TEMP B-TREE" not in found, found
    # Then the page's entries among those ids: by key.
    where, args = _page_where(QueryPage(status="queued", limit=50), 1.0, "r.last_error", in_ids=3)
    found = plan(CONSOLE["page_ids"].replace("{where}", where), (*args, "A", "B", "C", 50))
    assert "SEARCH entries USING" in found and "(id=?)" in found and "SCAN entries" not in found, found
    assert named.in_list(CONSOLE["in_ids"], 2) == "entries.id IN (?,?)"


def test_the_console_code_filter_reads_its_codes_from_the_counts_not_the_entries():
    """What a code or class means now comes from queue_counts (a few rows at 1M queued); a class
    none has then reads no entry (store/console.py _codes_now, bench/README.md)."""
    from relaywatch.store.console import Q as CONSOLE
    conn = sqlite3.connect(":memory:")
    conn.executescript(schema.render("sqlite"))
    found = " ".join(row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + CONSOLE["codes_now"]))
    assert "queue_counts" in found and "entries" not in found, found
