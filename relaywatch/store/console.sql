-- The console's reads (store/console.py), parsed by store/queries.py.
-- Placeholders are "?"; {where} is filled in by console._page_where.

-- queue_gauges --
-- /metrics in one pass: per connector, status and code of the latest deferral, the entries, how many
-- are leased now (the parameter) and the oldest received.  Walks the entries_route index in its order.
SELECT route_name, status, last_code, count(*), sum(CASE WHEN lease_until > ? THEN 1 ELSE 0 END),
min(received_at) FROM entries GROUP BY route_name, status, last_code

-- page_entries --
-- A page of the queue for the HTTP API, in id order (keyset pagination).
SELECT {entry_columns} FROM entries{where} ORDER BY id LIMIT ?

-- page_ids --
SELECT id FROM entries{where} ORDER BY id LIMIT ?

-- entry_columns --
id, body_id, sender, received_at, expires_at, status, attempts, next_attempt_at, route_kind, route_name,
route_domain, size, message_id, client, is_dsn, first_failure_at, lease_owner, lease_until, delay_notified,
notice_pending, helo, auth_user, dsn_ret, dsn_envid

-- after_id --
id > ?

-- on_connector --
route_name = ?

-- is_active --
lease_until > ?

-- in_status_unleased --
status = ? AND (lease_until IS NULL OR lease_until <= ?)

-- sent_by --
lower(sender) = ?

-- last_code_is --
last_code = ?

-- received_before --
received_at < ?

-- has_recipient --
EXISTS (SELECT 1 FROM recipients r WHERE r.entry_id = entries.id AND lower(r.address) = ?)

-- has_recipient_in --
-- A recipient in a domain: the parameter is "%@domain" with LIKE's wildcards escaped by "!".
EXISTS (SELECT 1 FROM recipients r WHERE r.entry_id = entries.id AND lower(r.address) LIKE ? ESCAPE '!')

-- routed_as --
route_kind = ?

-- has_text --
-- A substring of the sender, a recipient or a recipient's last reply; the three parameters are
-- "%text%" with LIKE's wildcards escaped by "!"; {last_reply} is the dialect's JSON read of it.
(lower(sender) LIKE ? ESCAPE '!' OR EXISTS (SELECT 1 FROM recipients r WHERE r.entry_id = entries.id
AND (lower(r.address) LIKE ? ESCAPE '!' OR lower({last_reply}) LIKE ? ESCAPE '!')))

-- audit_log --
SELECT id, at, who, action, incident_id, detail, undone_at FROM audit ORDER BY id DESC LIMIT ?
