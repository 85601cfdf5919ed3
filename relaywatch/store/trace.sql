-- The message trace's SQL (store/trace.py), parsed by store/queries.py.

-- insert_trace --
-- What is kept of an entry that left the queue; a second removal of the same id cannot happen.
INSERT INTO traces (entry_id, message_id, ended_at, data) VALUES (?, ?, ?, ?) ON CONFLICT (entry_id) DO NOTHING

-- prune_traces --
DELETE FROM traces WHERE ended_at < ?

-- trace_of --
SELECT data FROM traces WHERE entry_id = ?

-- ids_of_message --
-- The entries of a Message-ID (its key, trace.message_id_key), queued or kept as a trace: one seek of
-- message_ids (schema.py), which keeps a row exactly as long as the entry or its trace.
SELECT entry_id FROM message_ids WHERE message_id = ? ORDER BY entry_id

-- audit_of_entry --
-- Queue actions on one entry: their detail names its id (hex digits, so LIKE needs no escapes).
SELECT id, at, who, action, incident_id, detail, undone_at FROM audit WHERE detail LIKE ? ORDER BY id
