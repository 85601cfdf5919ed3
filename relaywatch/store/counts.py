"""The triggers that keep queue_counts and queue_waiting (the tables are schema.py's), per dialect,
and the backfill of a queue made before them; ``counting(dialect)`` runs in the transaction that
makes the schema, after it.
"""

from __future__ import annotations

# The triggers that keep queue_counts, per dialect; made with the table (see COUNTS_BACKFILL).
# SQLite's add with INSERT OR IGNORE then UPDATE, not an upsert: a statement whose triggers may
# abort (an upsert's NOT NULL checks; a function call, see message_ids.py) keeps a statement
# journal, a copy of every page it changes, and the DELETE of a delivered entry changes about 16
# (the table, eight indexes, the counts): past 64 KiB SQLite writes that journal to a temp file,
# most of that DELETE's cost (bench/README.md, backlog_default).  Those columns are NOT NULL in
# entries, so OR IGNORE never ignores a row.  Dropped first: a queue opened before has the upserts.
_SQLITE_COUNT = """
DROP TRIGGER IF EXISTS {name};
CREATE TRIGGER {name} AFTER {event} ON entries{when}
BEGIN
{statements}END;
"""
_SQLITE_ADD = ("INSERT OR IGNORE INTO {table} VALUES ({row}.route_name, {row}.status, COALESCE({row}.last_code, ''), "
               "0);\nUPDATE OR IGNORE {table} SET n = n + {delta} WHERE route_name = {row}.route_name "
               "AND status = {row}.status AND last_code = COALESCE({row}.last_code, '');\n")
_CHANGED = ("OLD.route_name IS NOT NEW.route_name OR OLD.status IS NOT NEW.status "
            "OR OLD.last_code IS NOT NEW.last_code")


def _sqlite_triggers(prefix: str, table: str, columns: str, changed: str, new: str, old: str) -> str:
    add = _SQLITE_ADD.format
    return "".join(_SQLITE_COUNT.format(name=f"{prefix}_{name}", event=event, when=when, statements=statements)
                   for name, event, when, statements in (
        ("insert", "INSERT", "", add(table=table, row="NEW", delta=new)),
        ("delete", "DELETE", "", add(table=table, row="OLD", delta=old)),
        ("update", f"UPDATE OF {columns}", f" WHEN {changed}",
         add(table=table, row="OLD", delta=old) + add(table=table, row="NEW", delta=new))))


COUNT_TRIGGERS = {
    "sqlite": _sqlite_triggers("entries_counted", "queue_counts", "route_name, status, last_code", _CHANGED,
                               "1", "-1")
    + _sqlite_triggers("entries_waiting", "queue_waiting", "route_name, status, last_code, waiting",
                       f"{_CHANGED} OR OLD.waiting IS NOT NEW.waiting", "NEW.waiting", "(-OLD.waiting)"),
    "postgres": """
CREATE OR REPLACE FUNCTION queue_counts_track() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        INSERT INTO queue_count_deltas VALUES (OLD.route_name, OLD.status, COALESCE(OLD.last_code, ''), -1);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        INSERT INTO queue_count_deltas VALUES (NEW.route_name, NEW.status, COALESCE(NEW.last_code, ''), 1);
    END IF;
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER entries_counted AFTER INSERT OR DELETE ON entries
    FOR EACH ROW EXECUTE FUNCTION queue_counts_track();
CREATE OR REPLACE TRIGGER entries_counted_update AFTER UPDATE OF route_name, status, last_code ON entries
    FOR EACH ROW WHEN (OLD.route_name IS DISTINCT FROM NEW.route_name OR OLD.status IS DISTINCT FROM NEW.status
                       OR OLD.last_code IS DISTINCT FROM NEW.last_code)
    EXECUTE FUNCTION queue_counts_track();
CREATE OR REPLACE FUNCTION queue_waiting_track() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        INSERT INTO queue_waiting_deltas VALUES (OLD.route_name, OLD.status, COALESCE(OLD.last_code, ''),
                                                 -OLD.waiting);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        INSERT INTO queue_waiting_deltas VALUES (NEW.route_name, NEW.status, COALESCE(NEW.last_code, ''),
                                                 NEW.waiting);
    END IF;
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER entries_waiting AFTER INSERT OR DELETE ON entries
    FOR EACH ROW EXECUTE FUNCTION queue_waiting_track();
CREATE OR REPLACE TRIGGER entries_waiting_update AFTER UPDATE OF route_name, status, last_code, waiting ON entries
    FOR EACH ROW WHEN (OLD.route_name IS DISTINCT FROM NEW.route_name OR OLD.status IS DISTINCT FROM NEW.status
                       OR OLD.last_code IS DISTINCT FROM NEW.last_code OR OLD.waiting IS DISTINCT FROM NEW.waiting)
    EXECUTE FUNCTION queue_waiting_track();
""",
}
# A queue made before queue_counts has entries but no counts: they are counted once, in the
# transaction that makes the triggers (which holds the write lock, so no write falls between).
# No counts and no deltas with entries is only ever that case: once a trigger exists, every entry
# written leaves a row or a delta, and a fold turns deltas into rows, which are never deleted.
# queue_waiting the same way, made later (a queue counted already gets its waiting recipients).
# The check comes first (CROSS JOIN: SQLite's loop order), else SQLite walks every entry at every
# open to test it (1.1 s with ten million queued; the CLI opens the store too).
COUNTS_BACKFILL = "".join(
    f"INSERT INTO {table} SELECT route_name, status, COALESCE(last_code, ''), {value} "
    f"FROM (SELECT 1 AS uncounted WHERE NOT EXISTS (SELECT 1 FROM {table}) AND NOT EXISTS (SELECT 1 FROM {deltas})) "
    "u CROSS JOIN entries GROUP BY route_name, status, COALESCE(last_code, '');\n" for table, deltas, value in (
        ("queue_counts", "queue_count_deltas", "count(*)"), ("queue_waiting", "queue_waiting_deltas", "sum(waiting)")))


def counting(dialect: str) -> str:
    """queue_counts' and queue_waiting's triggers and the count of a queue made before them; run in
    the transaction that makes the schema, after it."""
    return COUNT_TRIGGERS[dialect] + COUNTS_BACKFILL
