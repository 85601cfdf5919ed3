-- The cluster's SQL (store/cluster.py), parsed by store/queries.py; the conventions of queue.sql.
-- Every operation is one statement, atomic on both databases: PostgreSQL from several nodes
-- at once, SQLite from the processes of one box (its write lock).

-- heartbeat --
-- A node's row, made or brought up to date; message_ids_by says this start reads message_ids
-- (message_ids.py RETIRED_INDEXES: a node of the previous version leaves it, so it differs from its instance).
INSERT INTO nodes (name, instance, address, role, version, state, started_at, heartbeat_at, leases,
received, delivered, message_ids_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (name) DO UPDATE SET instance = excluded.instance, address = excluded.address,
role = excluded.role, version = excluded.version, state = excluded.state,
started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at, leases = excluded.leases,
received = excluded.received, delivered = excluded.delivered, message_ids_by = excluded.message_ids_by

-- release_earlier_instances --
-- At a node's start: what an earlier start of the same node had leased is due again at once
-- (that process is gone; its leases would otherwise wait out their own timers).
-- Params (now, now, name, name, name, instance): owners are "name:pid:random".
-- {skip_locked} (PostgreSQL): a row another transaction holds is being returned or leased by it
-- already; waiting for it is how two such statements, locking rows in different orders, deadlocked.
-- lease_until IS NOT NULL (a lease sets it with lease_owner): the leased few through entries_leased.
UPDATE entries SET lease_owner = NULL, lease_until = NULL,
next_attempt_at = CASE WHEN next_attempt_at < ? THEN next_attempt_at ELSE ? END
WHERE id IN (SELECT id FROM entries WHERE lease_until IS NOT NULL AND substr(lease_owner, 1, length(?) + 1) = ? || ':'
AND lease_owner <> ?{skip_locked})

-- nodes --
SELECT name, instance, address, role, version, state, started_at, heartbeat_at, leases, received, delivered
FROM nodes ORDER BY name

-- release_dead_leases --
-- The leases of every node whose heartbeat is older than the lapse, due again at once.
-- Params (now, now, beat_before).  A node that stopped cleanly returned its own.
-- {skip_locked} (PostgreSQL), twice.  On the dead nodes' rows: each is locked until this commits,
-- so a late heartbeat of that node waits for the return and then its own fence (cluster/fence.py)
-- finds the leases gone; a heartbeat committing first is seen (the lock reads the newest row)
-- and the node is not returned; one being written now is skipped: the node beats.  On the
-- entries: a row another transaction holds is being recorded or leased; the next round returns
-- it if it is still the dead node's.  So this statement never waits, and the leader's
-- transaction (which holds the leader row) cannot close a cycle of lock waits.  Through
-- entries_leased (lease_until IS NOT NULL), not a scan of every entry at every heartbeat.
UPDATE entries SET lease_owner = NULL, lease_until = NULL,
next_attempt_at = CASE WHEN next_attempt_at < ? THEN next_attempt_at ELSE ? END
WHERE id IN (SELECT id FROM entries WHERE lease_until IS NOT NULL AND lease_owner IN (SELECT instance FROM nodes WHERE heartbeat_at < ?{skip_locked}){skip_locked})

-- acquire_leader --
-- Take the leader lease if it is free or lapsed, or renew our own; the term we hold, no row if
-- another holds it.  The term grows only when the holder changes.  On PostgreSQL a second node
-- racing for it waits on the row and then finds it taken: exactly one wins.  The op runs first in
-- its batch (engine.write ``first``), so a node waiting here holds no other row yet: the leader's
-- transaction, which holds this row, cannot be waiting for one of its rows.
-- Params (instance, instance, until, instance, now).
UPDATE leader SET holder = ?, term = CASE WHEN holder = ? THEN term ELSE term + 1 END, until = ?
WHERE id = 1 AND (holder = ? OR holder IS NULL OR until < ?)
RETURNING term

-- resign_leader --
-- A clean stop: the lease lapses now, so another node takes it at its next heartbeat.
UPDATE leader SET until = 0 WHERE id = 1 AND holder = ?

-- leader --
SELECT holder, term, until FROM leader WHERE id = 1

-- leader_term --
-- The fence of a leader-only write (store/watch.py), read in the write's own transaction.
-- {row_share} is the dialect's (PostgreSQL: FOR SHARE, so a node taking the lease waits for
-- that write's commit, and then reads what it wrote).
SELECT term FROM leader WHERE id = 1{row_share}

-- fold_counts --
-- PostgreSQL (store/schema.py queue_counts): the count deltas into their groups' rows, in one
-- statement; a node folding at the same time waits for these rows and then finds them gone.
WITH folded AS (DELETE FROM queue_count_deltas RETURNING route_name, status, last_code, delta)
INSERT INTO queue_counts (route_name, status, last_code, n)
SELECT route_name, status, last_code, sum(delta) FROM folded GROUP BY route_name, status, last_code
ON CONFLICT (route_name, status, last_code) DO UPDATE SET n = queue_counts.n + excluded.n

-- fold_waiting --
-- The same for the recipients waiting (queue_waiting).
WITH folded AS (DELETE FROM queue_waiting_deltas RETURNING route_name, status, last_code, delta)
INSERT INTO queue_waiting (route_name, status, last_code, n)
SELECT route_name, status, last_code, sum(delta) FROM folded GROUP BY route_name, status, last_code
ON CONFLICT (route_name, status, last_code) DO UPDATE SET n = queue_waiting.n + excluded.n
