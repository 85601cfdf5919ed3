-- The message trace's SQL (store/trace.py), parsed by store/queries.py.

-- insert_trace --
-- What is kept of an entry that left the queue; a second removal of the same id cannot happen.
INSERT INTO traces (entry_id, message_id, ended_at, data) VALUES (?, ?, ?, ?) ON CONFLICT (entry_id) DO NOTHING

-- prune_traces --
DELETE FROM traces WHERE ended_at < ?

-- trace_of --
SELECT data FROM traces WHERE entry_id = ?

-- live_ids_of_message --
-- The queued entries of a Message-ID: two seeks of entries_message_id.
SELECT id FROM entries WHERE message_id IN (?, ?) ORDER BY id

-- kept_ids_of_message --
SELECT entry_id FROM traces WHERE message_id IN (?, ?) ORDER BY entry_id

-- audit_of_entry --
-- Queue actions on one entry: their detail names its id (hex digits, so LIKE needs no escapes).
SELECT id, at, who, action, incident_id, detail, undone_at FROM audit WHERE detail LIKE ? ORDER BY id
