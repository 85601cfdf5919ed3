-- The queue's SQL (store/queue.py), parsed by store/queries.py.
-- Placeholders are "?"; {EnumClass.MEMBER} is that status as a literal; {other_query} is
-- its text; (?*) is an IN list and {where} / {row_lock} are filled in by the caller.

-- entry_columns --
-- What every read of an entry returns, in the order entry_rows.entry_from_row takes it.
id, body_id, sender, received_at, expires_at, status, attempts, next_attempt_at, route_kind, route_name,
route_domain, size, message_id, client, is_dsn, first_failure_at, lease_owner, lease_until, delay_notified,
notice_pending, helo, auth_user, dsn_ret, dsn_envid, is_tls_report, utf8_headers

-- insert_body --
-- A message's content, shared by its entries (refs of them); the id is drawn by queue._insert_with_new_id.
INSERT INTO bodies (id, data, path, size, refs) VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING

-- insert_entry --
-- One route's share of a message, due at once (the 7th parameter is next_attempt_at).
INSERT INTO entries (id, body_id, sender, received_at, expires_at, status, attempts, next_attempt_at,
route_kind, route_name, route_domain, size, message_id, client, is_dsn, waiting, helo, auth_user, dsn_ret,
dsn_envid, is_tls_report, utf8_headers)
VALUES (?, ?, ?, ?, ?, {EntryStatus.QUEUED}, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING

-- insert_recipient --
INSERT INTO recipients (entry_id, position, address, status, dsn_notify, dsn_orcpt, domain)
VALUES (?, ?, ?, {RecipientStatus.PENDING}, ?, ?, ?)

-- recipient_columns --
entry_id, position, address, status, last_error, dsn_notify, dsn_orcpt

-- lease --
-- The oldest due entries, stamped with our lease in one statement; params (owner, until, until, now, limit).
-- {row_lock} is the dialect's (PostgreSQL: skip rows another node is leasing right now).  The
-- status literals let both databases use the partial index entries_due.
UPDATE entries SET lease_owner = ?, lease_until = ?, next_attempt_at = ?
WHERE id IN (SELECT id FROM entries WHERE status IN ({EntryStatus.QUEUED}, {EntryStatus.DEFERRED})
AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?{row_lock})
RETURNING {entry_columns}

-- waiting_recipients_of --
-- The recipients still to deliver of several entries (a lease's).
SELECT {recipient_columns} FROM recipients WHERE entry_id IN (?*)
AND status IN ({RecipientStatus.PENDING}, {RecipientStatus.DEFERRED}) ORDER BY entry_id, position

-- recipients_of --
-- Every recipient of several entries, delivered and failed ones too (queue show / list).
SELECT {recipient_columns} FROM recipients WHERE entry_id IN (?*)
ORDER BY entry_id, position

-- bodies_of --
SELECT id, data, path, size FROM bodies WHERE id IN (?*)

-- body --
SELECT data, path, size FROM bodies WHERE id = ?

-- entry_to_record --
-- What record() checks first: who holds the entry (as stored: entry_columns hide a lapsed
-- lease), then the entry, which the trace of a first try takes without reading it again.
-- {row_lock} (PostgreSQL: FOR UPDATE) holds the row from this check to the commit, so no
-- other node's lease or the leader's return of it falls between the check and the writes.
SELECT lease_owner, lease_until, {entry_columns} FROM entries WHERE id = ?{row_lock}

-- waiting_addresses --
SELECT address FROM recipients WHERE entry_id = ?
AND status IN ({RecipientStatus.PENDING}, {RecipientStatus.DEFERRED})

-- recipient_statuses --
SELECT position, address, status FROM recipients WHERE entry_id = ?

-- set_recipient_status --
-- An outcome; a delivered recipient keeps the last error it had.
UPDATE recipients SET status = ?, last_error = COALESCE(?, last_error) WHERE entry_id = ? AND position = ?

-- insert_attempt --
INSERT INTO attempts (entry_id, n, data) VALUES (?, ?, ?)

-- count_waiting --
SELECT count(*) FROM recipients WHERE entry_id = ?
AND status IN ({RecipientStatus.PENDING}, {RecipientStatus.DEFERRED})

-- after_attempt --
-- An entry that stays: deferred (held stays held), unleased, due at next_attempt_at.  Params:
-- attempts, next_attempt_at, first_failure_at, waiting (twice), last_code, waiting, notice_pending,
-- delay_notified (twice), id.  last_code is cleared once nobody waits, else kept if none is given.
UPDATE entries SET status = CASE WHEN status = {EntryStatus.HELD} THEN {EntryStatus.HELD} ELSE {EntryStatus.DEFERRED} END,
attempts = ?, next_attempt_at = ?, first_failure_at = ?, lease_owner = NULL,
lease_until = NULL, last_code = CASE WHEN ? = 0 THEN NULL ELSE COALESCE(?, last_code) END,
waiting = ?, notice_pending = ?,
delay_notified = CASE WHEN ? > delay_notified THEN ? ELSE delay_notified END WHERE id = ?

-- delete_entry --
DELETE FROM entries WHERE id = ?

-- delete_recipients --
DELETE FROM recipients WHERE entry_id = ?

-- delete_attempts --
DELETE FROM attempts WHERE entry_id = ?

-- delete_body --
-- The last entry using a body deletes it (and says which spool file to remove) ...
DELETE FROM bodies WHERE id = ? AND refs <= 1 RETURNING path

-- unref_body --
-- ... the others only drop their reference.
UPDATE bodies SET refs = refs - 1 WHERE id = ?

-- ref_body --
UPDATE bodies SET refs = refs + 1 WHERE id = ?

-- release_leases --
-- Leased entries due again (at once, or at their own time if earlier); params (now, now).
UPDATE entries SET lease_owner = NULL, lease_until = NULL,
next_attempt_at = CASE WHEN next_attempt_at < ? THEN next_attempt_at ELSE ? END WHERE {where}

-- leased_by --
-- Through entries_leased (a lease sets lease_until with lease_owner), not a scan of every entry:
-- serve returns what a previous run leased when it starts, also with ten million queued.
lease_until IS NOT NULL AND lease_owner = ?

-- leased --
lease_until IS NOT NULL

-- id_not_in --
id NOT IN (?*)

-- renew_leases --
UPDATE entries SET lease_until = ?, next_attempt_at = ? WHERE lease_owner = ?
AND id IN (?*) RETURNING id

-- entry --
SELECT {entry_columns} FROM entries WHERE id = ?

-- attempts_of --
SELECT data FROM attempts WHERE entry_id = ? ORDER BY n

-- list_entries --
-- {where} is "" or " WHERE " and the conditions below, joined by AND.
SELECT {entry_columns} FROM entries{where} ORDER BY received_at, id LIMIT ?

-- on_connector --
route_name = ?

-- is_active --
lease_until > ?

-- in_status_unleased --
status = ? AND (lease_until IS NULL OR lease_until <= ?)

-- id_in --
id IN (?*)

-- every_entry --
-- (not a bare 1: PostgreSQL wants a boolean after AND)
1 = 1

-- retry --
-- Due at once, and in order of age: leasing takes the smallest next_attempt_at first, so
-- the oldest message goes first.  Params (now, now, now); {where} picks the entries.
UPDATE entries SET next_attempt_at = CASE WHEN received_at < ? THEN received_at ELSE ? END
WHERE status != {EntryStatus.HELD} AND (lease_until IS NULL OR lease_until <= ?) AND {where}

-- hold --
UPDATE entries SET status = {EntryStatus.HELD} WHERE id = ?

-- release --
UPDATE entries SET status = CASE WHEN attempts = 0 THEN {EntryStatus.QUEUED} ELSE {EntryStatus.DEFERRED} END,
next_attempt_at = ? WHERE id = ? AND status = {EntryStatus.HELD}

-- entry_to_delete --
SELECT body_id, lease_until FROM entries WHERE id = ?

-- spool_paths --
-- Every body file a queue row points at (the rest are crash leftovers).
SELECT path FROM bodies WHERE path IS NOT NULL

-- counts --
SELECT status, count(*) FROM entries GROUP BY status

-- take_recipients --
-- move_recipients: the recipients that leave an entry for a new one.
DELETE FROM recipients WHERE entry_id = ? AND address IN (?*)
AND status IN ({RecipientStatus.PENDING}, {RecipientStatus.DEFERRED}) RETURNING address, dsn_notify, dsn_orcpt

-- fewer_waiting --
UPDATE entries SET waiting = waiting - ? WHERE id = ?

-- has_recipients --
SELECT 1 FROM recipients WHERE entry_id = ? LIMIT 1
