"""message_ids' triggers (the table is schema.py's): the entries of a Message-ID, queued or kept as a trace.

The trace by Message-ID and the queue's text filter given ``<id>`` read message_ids
(store/trace.sql, store/console.sql); the database keeps it, so that whoever writes
entries or traces (a node of the previous version on one PostgreSQL, SQL by hand)
keeps it right.  ``triggers(dialect)`` runs in the transaction that makes the schema.
"""

from __future__ import annotations

# The triggers, per dialect: a row for each entry inserted (a Message-ID's bare form: spaces,
# then angle brackets trimmed, as store/trace.py message_id_key; none for an empty one); gone with
# the entry if no trace of it was kept (the trace is inserted first, store/queue.py), else with the
# trace.  Made with the table, in one transaction with the fill of a queue made before it
# (MESSAGE_IDS_BACKFILL), so that no entry falls between.  Nodes of the previous version (on one
# PostgreSQL) keep it too, through the triggers, while they still look Message-IDs up in their own
# indexes: see RETIRED_INDEXES.  SQLite has no trigger on an entry's delete: a function call in
# one (the key's trim) makes every DELETE of an entry keep a statement journal (store/counts.py),
# so the store forgets the row of an entry it removes without a trace itself (the dialect's
# ``forget_message_id``, store/queue.py _keep_trace); what SQL by hand deletes stays in message_ids,
# a row that finds neither an entry nor a trace.
_SQLITE_KEY = "trim(trim({row}.message_id), '<>')"
_PG_KEY = "btrim(btrim({row}.message_id), '<>')"
MESSAGE_ID_TRIGGERS = {
    "sqlite": f"""
CREATE TRIGGER IF NOT EXISTS entries_message_ids AFTER INSERT ON entries WHEN {_SQLITE_KEY.format(row="NEW")} <> ''
BEGIN
INSERT OR IGNORE INTO message_ids VALUES ({_SQLITE_KEY.format(row="NEW")}, NEW.id);
END;
DROP TRIGGER IF EXISTS entries_message_ids_gone;
CREATE TRIGGER IF NOT EXISTS traces_message_ids_gone AFTER DELETE ON traces WHEN {_SQLITE_KEY.format(row="OLD")} <> ''
BEGIN
DELETE FROM message_ids WHERE message_id = {_SQLITE_KEY.format(row="OLD")} AND entry_id = OLD.entry_id;
END;
""",
    # The traces' prune deletes a minute's traces in one statement: one call with them all.
    "postgres": f"""
CREATE OR REPLACE FUNCTION message_ids_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO message_ids VALUES ({_PG_KEY.format(row="NEW")}, NEW.id) ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION message_ids_gone() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM traces WHERE entry_id = OLD.id) THEN
        DELETE FROM message_ids WHERE message_id = {_PG_KEY.format(row="OLD")} AND entry_id = OLD.id;
    END IF;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION message_ids_pruned() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM message_ids m USING pruned p
    WHERE m.message_id = {_PG_KEY.format(row="p")} AND m.entry_id = p.entry_id;
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER entries_message_ids AFTER INSERT ON entries
    FOR EACH ROW WHEN ({_PG_KEY.format(row="NEW")} <> '') EXECUTE FUNCTION message_ids_add();
CREATE OR REPLACE TRIGGER entries_message_ids_gone AFTER DELETE ON entries
    FOR EACH ROW WHEN ({_PG_KEY.format(row="OLD")} <> '') EXECUTE FUNCTION message_ids_gone();
CREATE OR REPLACE TRIGGER traces_message_ids_gone AFTER DELETE ON traces REFERENCING OLD TABLE AS pruned
    FOR EACH STATEMENT EXECUTE FUNCTION message_ids_pruned();
""",
}
MESSAGE_ID_TRIGGER_NAMES = ("entries_message_ids", "entries_message_ids_gone", "traces_message_ids_gone")
# The message_ids row of an entry removed without a trace (SQLite), run before its row goes.
SQLITE_FORGET = (f"DELETE FROM message_ids WHERE message_id = (SELECT {_SQLITE_KEY.format(row='entries')} "
                 "FROM entries WHERE id = ?) AND entry_id = ?")
# A queue made before message_ids: its entries and traces, once, in the transaction that makes the
# triggers.  An empty message_ids beside entries with a Message-ID is only ever that case.
MESSAGE_IDS_BACKFILL = {dialect: (
    f"INSERT INTO message_ids SELECT {key.format(row='e')}, e.id FROM entries e "
    f"WHERE NOT EXISTS (SELECT 1 FROM message_ids) AND {key.format(row='e')} <> '' "
    f"UNION SELECT {key.format(row='t')}, t.entry_id FROM traces t "
    f"WHERE NOT EXISTS (SELECT 1 FROM message_ids) AND {key.format(row='t')} <> '' ON CONFLICT DO NOTHING;")
    for dialect, key in (("sqlite", _SQLITE_KEY), ("postgres", _PG_KEY))}
# What message_ids replaced.  SQLite (one node) drops them when it opens the queue; a PostgreSQL node
# only once every live node looks Message-IDs up in message_ids (store/postgres.py retire_indexes):
# a node of the previous version would scan entries and traces without them.
RETIRED_INDEXES = ("entries_message_id", "traces_message_id")


def triggers(dialect: str) -> str:
    """message_ids' triggers and its fill from a queue made before it; run in the transaction that
    makes the schema, after it."""
    return MESSAGE_ID_TRIGGERS[dialect] + MESSAGE_IDS_BACKFILL[dialect]
