"""TLS reporting's state of the in-memory store (store/memory.py), kept as
store/tls_reports.sql keeps it and read back through the same mapping."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Callable, Sequence

from relaywatch.tls_results import TlsCount
from relaywatch.store.tls_reports import post_from_row, report_from_row


class MemoryTlsReports:
    """TLS reporting's half of MemoryStore, which supplies ``_check``."""
    _check: Callable[[], None]

    def __init__(self) -> None:
        self._tls_counts: dict[tuple, TlsCount] = {}
        self._tls_reports: dict[tuple[str, str], tuple] = {}
        self._tls_report_posts: dict[tuple[str, str, str], list] = {}   # key -> [body, attempts, next_try]

    async def add_tls_counts(self, rows: Sequence[TlsCount]) -> None:
        self._check()
        for r in rows:
            held = self._tls_counts.get(r.key())
            self._tls_counts[r.key()] = replace(r, count=r.count + (held.count if held else 0),
                                                detail=r.detail or (held.detail if held else ""))

    async def tls_counts(self, day: str) -> list[TlsCount]:
        self._check()
        return sorted((c for c in self._tls_counts.values() if c.day == day),
                      key=lambda c: (c.policy_domain, c.policy_type, c.result_type, c.mx_host, c.receiving_ip,
                                     c.sending_ip))

    async def claim_tls_report(self, day: str, domain: str, report_id: str, now: float) -> bool:
        self._check()
        if (day, domain) in self._tls_reports:
            return False
        self._tls_reports[(day, domain)] = (day, domain, report_id, now, "{}")
        return True

    async def finish_tls_report(self, day: str, domain: str, outcome: dict) -> None:
        self._check()
        row = self._tls_reports.get((day, domain))
        if row is not None:
            self._tls_reports[(day, domain)] = (*row[:4], json.dumps(outcome))

    async def tls_reports(self, day: str) -> list[dict]:
        self._check()
        return [report_from_row(r) for k, r in sorted(self._tls_reports.items()) if k[0] == day]

    async def add_tls_report_post(self, day: str, domain: str, uri: str, body: bytes, next_try: float) -> None:
        self._check()
        self._tls_report_posts.setdefault((day, domain, uri), [body, 1, next_try])

    async def due_tls_report_posts(self, now: float) -> list[dict]:
        self._check()
        due = sorted((v[2], k) for k, v in self._tls_report_posts.items() if v[2] <= now)
        return [post_from_row((*k, self._tls_report_posts[k][0], self._tls_report_posts[k][1])) for _, k in due]

    async def claim_tls_report_post(self, post: dict, next_try: float) -> bool:
        self._check()
        held = self._tls_report_posts.get((post["day"], post["policy_domain"], post["uri"]))
        if held is None or held[1] != post["attempts"]:
            return False
        held[1:] = [held[1] + 1, next_try]
        return True

    async def drop_tls_report_post(self, post: dict) -> None:
        self._check()
        self._tls_report_posts.pop((post["day"], post["policy_domain"], post["uri"]), None)
