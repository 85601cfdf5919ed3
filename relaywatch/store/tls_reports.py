"""TLS reporting's state on SQL: the day's session counts per report key, and which
daily reports were sent (tls_reports.sql).  Written once per watch tick (the
tally, deliver/tls_report.py) and once per report, never per delivery."""

from __future__ import annotations

import json
from typing import Any, Sequence

from relaywatch.tls_results import TlsCount
from relaywatch.store import queries
from relaywatch.store.engine import GroupCommitEngine

Q = queries.load("tls_reports.sql")


class SqlTlsReports:
    """TLS reporting's operations; SqlStore (store/sql.py) supplies ``engine``."""
    engine: GroupCommitEngine

    async def add_tls_counts(self, rows: Sequence[TlsCount]) -> None:
        if rows:
            await self.engine.write(lambda conn, cleanup: conn.executemany(Q["add_tls_count"], [
                (*r.key()[:3], r.policy_key, r.result_type, r.mx_host, r.receiving_ip, r.sending_ip,
                 json.dumps(list(r.policy_strings)), r.count, r.detail) for r in rows]))

    async def tls_counts(self, day: str) -> list[TlsCount]:
        return await self.engine.read(lambda conn: [count_from_row(r) for r in conn.execute(
            Q["tls_counts"], (day,)).fetchall()])

    async def claim_tls_report(self, day: str, domain: str, report_id: str, now: float) -> bool:
        """True for the one caller that is to send this report; False if it was claimed already."""
        return await self.engine.write(lambda conn, cleanup: conn.execute(
            Q["claim_tls_report"], (day, domain, report_id, now)).rowcount == 1)

    async def finish_tls_report(self, day: str, domain: str, outcome: dict) -> None:
        await self.engine.write(lambda conn, cleanup: conn.execute(
            Q["finish_tls_report"], (json.dumps(outcome), day, domain)))

    async def tls_reports(self, day: str) -> list[dict]:
        return await self.engine.read(lambda conn: [report_from_row(r) for r in conn.execute(
            Q["tls_reports"], (day,)).fetchall()])

    async def add_tls_report_post(self, day: str, domain: str, uri: str, body: bytes, next_try: float) -> None:
        await self.engine.write(lambda conn, cleanup: conn.execute(
            Q["add_tls_report_post"], (day, domain, uri, body, next_try)))

    async def due_tls_report_posts(self, now: float) -> list[dict]:
        return await self.engine.read(lambda conn: [post_from_row(r) for r in conn.execute(
            Q["due_tls_report_posts"], (now,)).fetchall()])

    async def claim_tls_report_post(self, post: dict, next_try: float) -> bool:
        return await self.engine.write(lambda conn, cleanup: conn.execute(Q["claim_tls_report_post"], (
            next_try, post["day"], post["policy_domain"], post["uri"], post["attempts"])).rowcount == 1)

    async def drop_tls_report_post(self, post: dict) -> None:
        await self.engine.write(lambda conn, cleanup: conn.execute(
            Q["drop_tls_report_post"], (post["day"], post["policy_domain"], post["uri"])))


# -- the row mapping, shared with the memory store (store/memory_tls_reports.py) --------------

def count_from_row(row: Any) -> TlsCount:
    day, domain, policy_type, policy_string, result_type, mx, ip, sending, count, detail = row
    return TlsCount(day, domain, policy_type, tuple(json.loads(policy_string)), result_type, mx, ip, sending,
                    int(count), detail)


def report_from_row(row: Any) -> dict:
    day, domain, report_id, claimed_at, outcome = row
    return {"day": day, "policy_domain": domain, "report_id": report_id, "claimed_at": claimed_at,
            "outcome": json.loads(outcome)}


def post_from_row(row: Any) -> dict:
    day, domain, uri, body, attempts = row
    return {"day": day, "policy_domain": domain, "uri": uri, "body": bytes(body), "attempts": int(attempts)}
