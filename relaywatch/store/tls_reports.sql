-- add_tls_count --
-- One tick's count of one report key, added to the day's (watch/monitor.py flushes the tally).
INSERT INTO tls_counts (day, policy_domain, policy_type, policy_key, result_type, mx_host, receiving_ip,
sending_ip, policy_string, count) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, policy_domain, policy_type, policy_key, result_type, mx_host, receiving_ip, sending_ip)
DO UPDATE SET count = tls_counts.count + excluded.count

-- tls_counts --
-- A day's counts, every policy domain, for its reports and the CLI.
SELECT day, policy_domain, policy_type, policy_string, result_type, mx_host, receiving_ip, sending_ip, count
FROM tls_counts WHERE day = ? ORDER BY policy_domain, policy_type, result_type, mx_host, receiving_ip, sending_ip

-- claim_tls_report --
-- The day's report of a domain is sent once: by whoever inserts this row first.
INSERT INTO tls_reports (day, policy_domain, report_id, claimed_at, outcome) VALUES (?, ?, ?, ?, '{}')
ON CONFLICT (day, policy_domain) DO NOTHING

-- finish_tls_report --
UPDATE tls_reports SET outcome = ? WHERE day = ? AND policy_domain = ?

-- tls_reports --
SELECT day, policy_domain, report_id, claimed_at, outcome FROM tls_reports WHERE day = ? ORDER BY policy_domain
