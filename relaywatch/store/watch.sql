-- The watch's SQL (store/watch.py), parsed by store/queries.py; the conventions of queue.sql.

-- deferred_by_cause --
-- Deferred mail grouped by (connector, code), whatever the queue holds, since the watch runs it
-- every few seconds: the groups, their entries (queue_counts) and the recipients still waiting
-- (queue_waiting), each with the deltas not folded yet (store/schema.py); then per group one
-- seek each for the oldest received (entries_group_age, ordered by its columns as console.sql's
-- queue_gauges), the first to expire (entries_deferred_expiry) and the first failure
-- (entries_deferred_failure).  It read every deferred entry's index row before (0.5 s a million).
SELECT c.route_name, c.last_code, c.n, COALESCE(w.n, 0),
(SELECT e.received_at FROM entries e WHERE e.route_name = c.route_name AND e.status = {EntryStatus.DEFERRED}
AND e.last_code = c.last_code ORDER BY e.route_name, e.status, e.last_code, e.received_at LIMIT 1),
(SELECT e.expires_at FROM entries e WHERE e.route_name = c.route_name AND e.status = {EntryStatus.DEFERRED}
AND e.last_code = c.last_code ORDER BY e.route_name, e.last_code, e.expires_at LIMIT 1),
(SELECT e.first_failure_at FROM entries e WHERE e.route_name = c.route_name AND e.status = {EntryStatus.DEFERRED}
AND e.last_code = c.last_code AND e.first_failure_at IS NOT NULL
ORDER BY e.route_name, e.last_code, e.first_failure_at LIMIT 1)
FROM (SELECT route_name, last_code, sum(n) AS n FROM (SELECT route_name, status, last_code, n FROM queue_counts
UNION ALL SELECT route_name, status, last_code, delta FROM queue_count_deltas) counted
WHERE status = {EntryStatus.DEFERRED} AND last_code <> '' GROUP BY route_name, last_code) c
LEFT JOIN (SELECT route_name, last_code, sum(n) AS n FROM (SELECT route_name, status, last_code, n FROM queue_waiting
UNION ALL SELECT route_name, status, last_code, delta FROM queue_waiting_deltas) waiting
WHERE status = {EntryStatus.DEFERRED} AND last_code <> '' GROUP BY route_name, last_code) w
ON w.route_name = c.route_name AND w.last_code = c.last_code
WHERE c.n > 0

-- latest_errors --
-- The newest evidence of one (connector, code) group.
SELECT last_error FROM recipients r JOIN entries e ON e.id = r.entry_id
WHERE e.status = {EntryStatus.DEFERRED} AND e.route_name = ? AND e.last_code = ?
AND r.last_error IS NOT NULL ORDER BY e.received_at DESC LIMIT 20

-- held_notices --
-- Entries whose NDR could not be built yet (through the entries_notice index).
SELECT id, sender, route_name, notice_pending FROM entries WHERE notice_pending IS NOT NULL

-- entry_ids --
SELECT id FROM entries WHERE route_name = ? AND status = ? ORDER BY received_at

-- entry_ids_with_code --
SELECT id FROM entries WHERE route_name = ? AND status = ? AND last_code = ? ORDER BY received_at

-- incident_columns --
id, connector, code, state, opened_at, resolved_at, data

-- open_incidents --
SELECT {incident_columns} FROM incidents WHERE state = {IncidentState.OPEN} ORDER BY id

-- recent_open_incidents --
SELECT {incident_columns} FROM incidents WHERE state = {IncidentState.OPEN} ORDER BY id DESC LIMIT ?

-- recent_incidents --
SELECT {incident_columns} FROM incidents ORDER BY id DESC LIMIT ?

-- incident --
SELECT {incident_columns} FROM incidents WHERE id = ?

-- notifications_of --
SELECT transition, channel, state, attempts, last_error, sent_at FROM notifications
WHERE incident_id = ? ORDER BY id

-- audit_columns --
-- As store/watch_rows.py audit_of reads them (console.sql's audit_log, trace.sql's too).
id, at, who, action, incident_id, detail, undone_at

-- audit_of --
SELECT {audit_columns} FROM audit WHERE incident_id = ? ORDER BY id

-- insert_incident --
INSERT INTO incidents (connector, code, state, opened_at, resolved_at, data)
VALUES (?, ?, ?, ?, ?, ?) RETURNING id

-- update_incident --
UPDATE incidents SET state = ?, resolved_at = ?, data = ? WHERE id = ?

-- add_notification --
-- Once per (incident, transition, channel): the UNIQUE constraint makes a second one a no-op.
INSERT INTO notifications (incident_id, transition, channel, state, next_try, payload)
VALUES (?, ?, ?, {NotificationState.PENDING}, ?, ?) ON CONFLICT DO NOTHING

-- add_notification_outcome --
INSERT INTO notifications (incident_id, transition, channel, state, attempts, next_try,
last_error, sent_at, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING

-- due_notifications --
SELECT id, incident_id, transition, channel, attempts, payload FROM notifications
WHERE state = {NotificationState.PENDING} AND next_try <= ? ORDER BY id

-- notification_result --
UPDATE notifications SET state = ?, attempts = attempts + 1, last_error = ?,
sent_at = ?, next_try = COALESCE(?, next_try) WHERE id = ?

-- set_last_good --
INSERT INTO last_good (connector, at, data) VALUES (?, ?, ?) ON CONFLICT (connector)
DO UPDATE SET at = excluded.at, data = excluded.data

-- last_good --
SELECT connector, at, data FROM last_good

-- overrides --
SELECT key, value, set_at, incident_id FROM overrides

-- overrides_version --
-- Cheap to poll: the processes re-read the overrides only when this changes.
SELECT count(*), max(set_at) FROM overrides

-- set_override --
INSERT INTO overrides (key, value, set_at, incident_id) VALUES (?, ?, ?, ?)
ON CONFLICT (key) DO UPDATE SET value = excluded.value, set_at = excluded.set_at,
incident_id = excluded.incident_id

-- clear_override --
DELETE FROM overrides WHERE key = ?

-- insert_audit --
INSERT INTO audit (at, who, action, incident_id, detail) VALUES (?, ?, ?, ?, ?) RETURNING id

-- last_undoable --
-- The latest fix of an incident that was not undone and is not itself an undo.
SELECT {audit_columns} FROM audit WHERE incident_id = ? AND undone_at IS NULL
AND action NOT LIKE 'undo %' ORDER BY id DESC LIMIT 1

-- mark_undone --
UPDATE audit SET undone_at = ? WHERE id = ?

-- add_invalid_recipient --
INSERT INTO invalid_recipients (at, domain, connector, source) VALUES (?, ?, ?, ?)

-- invalid_recipients_since --
SELECT domain, connector, source, count(*) FROM invalid_recipients WHERE at >= ?
GROUP BY domain, connector, source ORDER BY count(*) DESC
