-- add_tls_count --
-- One tick's count of one report key, added to the day's (watch/monitor.py flushes the tally).
-- The detail is the latest failure's: a tick's, or the stored one when the tick has none.
INSERT INTO tls_counts (day, policy_domain, policy_type, policy_key, result_type, mx_host, receiving_ip,
sending_ip, policy_string, count, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, policy_domain, policy_type, policy_key, result_type, mx_host, receiving_ip, sending_ip)
DO UPDATE SET count = tls_counts.count + excluded.count,
detail = CASE WHEN excluded.detail = '' THEN tls_counts.detail ELSE excluded.detail END

-- tls_counts --
-- A day's counts, every policy domain, for its reports and the CLI.
SELECT day, policy_domain, policy_type, policy_string, result_type, mx_host, receiving_ip, sending_ip, count, detail
FROM tls_counts WHERE day = ? ORDER BY policy_domain, policy_type, result_type, mx_host, receiving_ip, sending_ip

-- claim_tls_report --
-- The day's report of a domain is sent once: by whoever inserts this row first.
INSERT INTO tls_reports (day, policy_domain, report_id, claimed_at, outcome) VALUES (?, ?, ?, ?, '{}')
ON CONFLICT (day, policy_domain) DO NOTHING

-- finish_tls_report --
UPDATE tls_reports SET outcome = ? WHERE day = ? AND policy_domain = ?

-- tls_reports --
SELECT day, policy_domain, report_id, claimed_at, outcome FROM tls_reports WHERE day = ? ORDER BY policy_domain

-- add_tls_report_post --
-- A POST that failed on its first try, kept to try again at next_try.
INSERT INTO tls_report_posts (day, policy_domain, uri, body, attempts, next_try) VALUES (?, ?, ?, ?, 1, ?)
ON CONFLICT (day, policy_domain, uri) DO NOTHING

-- due_tls_report_posts --
SELECT day, policy_domain, uri, body, attempts FROM tls_report_posts WHERE next_try <= ?
ORDER BY next_try, day, policy_domain, uri

-- claim_tls_report_post --
-- The next try is made by whoever moves attempts on from what it read (once per cluster).
UPDATE tls_report_posts SET attempts = attempts + 1, next_try = ?
WHERE day = ? AND policy_domain = ? AND uri = ? AND attempts = ?

-- drop_tls_report_post --
-- Sent at last, or given up.
DELETE FROM tls_report_posts WHERE day = ? AND policy_domain = ? AND uri = ?
