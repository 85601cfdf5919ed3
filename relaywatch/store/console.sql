-- The console's reads (store/console.py), parsed by store/queries.py.
-- Placeholders are "?"; {where} is filled in by console._page_where.

-- queue_gauges --
-- /metrics in one statement (one snapshot), whatever the queue holds: per connector, status and
-- code of the latest deferral ('' for none), the entries (queue_counts and its deltas, kept by triggers), how
-- many are leased now (the parameter; through the small entries_leased index) and the oldest
-- received: one seek of entries_group_age per group (ORDER BY its columns, so that PostgreSQL does
-- not walk entries_received from the oldest message looking for the group's first).
SELECT c.route_name, c.status, c.last_code, c.n, COALESCE(l.leased, 0),
CASE WHEN c.last_code = '' THEN (SELECT e.received_at FROM entries e WHERE e.route_name = c.route_name
AND e.status = c.status AND e.last_code IS NULL
ORDER BY e.route_name, e.status, e.last_code, e.received_at LIMIT 1)
ELSE (SELECT e.received_at FROM entries e WHERE e.route_name = c.route_name AND e.status = c.status
AND e.last_code = c.last_code ORDER BY e.route_name, e.status, e.last_code, e.received_at LIMIT 1) END
FROM (SELECT route_name, status, last_code, sum(n) AS n FROM ({counted}) counted
GROUP BY route_name, status, last_code) c
LEFT JOIN (SELECT route_name, status, COALESCE(last_code, '') AS last_code, count(*) AS leased FROM entries
WHERE lease_until > ? GROUP BY route_name, status, COALESCE(last_code, '')) l
ON l.route_name = c.route_name AND l.status = c.status AND l.last_code = c.last_code
WHERE c.n > 0

-- counted --
-- The entries per group: folded counts and the deltas not folded yet (store/schema.py).
SELECT route_name, status, last_code, n FROM queue_counts
UNION ALL SELECT route_name, status, last_code, delta FROM queue_count_deltas

-- deferred_codes --
-- The codes (or '' for none) a connector's deferred entries have now.
SELECT last_code FROM ({counted}) counted WHERE route_name = ? AND status = {EntryStatus.DEFERRED}
GROUP BY last_code HAVING sum(n) > 0

-- deferred_before --
-- The overview's forecast: one range of entries_group_age per code, counted up to a cap.
SELECT count(*) FROM (SELECT 1 FROM entries WHERE route_name = ? AND status = {EntryStatus.DEFERRED}
AND last_code = ? AND received_at < ? LIMIT ?) found

-- deferred_before_without_code --
SELECT count(*) FROM (SELECT 1 FROM entries WHERE route_name = ? AND status = {EntryStatus.DEFERRED}
AND last_code IS NULL AND received_at < ? LIMIT ?) found

-- leased_now --
-- Every entry leased at the parameter (a few, through entries_leased), to leave out of counts.
SELECT route_name, status, received_at FROM entries WHERE lease_until > ?

-- page_entries --
-- A page of the queue for the HTTP API, in id order (keyset pagination), with every recipient of
-- its entries in the same statement: one round trip, not one for the page and one for its
-- recipients (the page's entries, then each one's recipients by recipients' key).
SELECT page.*, r.position, r.address, r.status, r.last_error, r.dsn_notify, r.dsn_orcpt
FROM (SELECT {entry_columns} FROM entries{where} ORDER BY id LIMIT ?) page
LEFT JOIN recipients r ON r.entry_id = page.id ORDER BY page.id, r.position

-- page_ids --
SELECT id FROM entries{where} ORDER BY id LIMIT ?

-- entry_columns --
id, body_id, sender, received_at, expires_at, status, attempts, next_attempt_at, route_kind, route_name,
route_domain, size, message_id, client, is_dsn, first_failure_at, lease_owner, lease_until, delay_notified,
notice_pending, helo, auth_user, dsn_ret, dsn_envid, is_tls_report, utf8_headers

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

-- last_code_in --
-- The code filter: the codes it means now (store/console.py _codes_now).
last_code IN (?*)

-- codes_now --
-- The codes the queue's entries have now (from the counts: a few rows, whatever the queue holds).
SELECT last_code FROM ({counted}) counted WHERE last_code <> '' GROUP BY last_code HAVING sum(n) > 0

-- received_before --
received_at < ?

-- has_recipient --
EXISTS (SELECT 1 FROM recipients r WHERE r.entry_id = entries.id AND lower(r.address) = ?)

-- in_domain --
-- The queue filtered by a recipient domain is read from the domain's end (store/console.py
-- _by_domain): a batch of ids, then the page's entries among them ({in_ids}).  A semi-join left
-- the order to the planner, and PostgreSQL walked all of recipients when a domain it counted on
-- finding had few or no recipients (350 ms at 1M).  Each part is a range of recipients_domain in
-- its order (0: the domain's; 1: rows without a domain, written by a node of the previous
-- version, by address: "%@domain" with LIKE's wildcards escaped by "!"), in one round trip.
SELECT 0, entry_id FROM (SELECT entry_id FROM recipients WHERE domain = ? AND entry_id > ?
ORDER BY entry_id LIMIT ?) domain_ids
UNION ALL SELECT 1, entry_id FROM (SELECT entry_id FROM recipients WHERE domain IS NULL
AND lower(address) LIKE ? ESCAPE '!' AND entry_id > ? ORDER BY entry_id LIMIT ?) no_domain_ids

-- in_ids --
entries.id IN (?*)

-- routed_as --
route_kind = ?

-- has_message_id --
-- The text filter given a Message-ID in angle brackets: its key (store/trace.py message_id_of), one
-- seek of message_ids, then entries by id.
id IN (SELECT entry_id FROM message_ids WHERE message_id = ?)

-- has_text --
-- A substring of the sender, a recipient or a recipient's last reply; the three parameters are
-- "%text%" with LIKE's wildcards escaped by "!"; {last_reply} is the dialect's JSON read of it.
(lower(sender) LIKE ? ESCAPE '!' OR EXISTS (SELECT 1 FROM recipients r WHERE r.entry_id = entries.id
AND (lower(r.address) LIKE ? ESCAPE '!' OR lower({last_reply}) LIKE ? ESCAPE '!')))

-- audit_log --
SELECT id, at, who, action, incident_id, detail, undone_at FROM audit ORDER BY id DESC LIMIT ?
