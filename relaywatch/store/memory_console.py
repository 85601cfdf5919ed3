"""The console's reads for the in-memory store (store/console.py is the SQL one)."""

from __future__ import annotations

import json

from relaywatch.model import Entry
from relaywatch.store.base import QueryPage


class MemoryConsole:
    async def queue_gauges(self, now: float) -> list[tuple[str, str, str | None, int, int, float]]:
        self._check()
        groups: dict[tuple, list] = {}
        for r in self._entries.values():
            g = groups.setdefault((r.route.name, r.status.value, r.last_code), [0, 0, r.received_at])
            g[0] += 1
            g[1] += r.lease_until is not None and r.lease_until > now
            g[2] = min(g[2], r.received_at)
        return [(*key, n, leased, oldest) for key, (n, leased, oldest) in groups.items()]

    def _page_rows(self, page: QueryPage, now: float) -> list:
        rows = sorted(self._entries.values(), key=lambda r: r.id)
        keep = []
        for r in rows:
            leased = r.lease_until is not None and r.lease_until > now
            addresses = [x.address.lower() for x in r.recipients]
            if ((page.after and r.id <= page.after.upper())
                    or (page.connector and r.route.name != page.connector)
                    or (page.status == "active" and not leased)
                    or (page.status and page.status != "active" and (leased or r.status.value != page.status))
                    or (page.sender is not None and r.sender.lower() != page.sender.lower())
                    or (page.code and r.last_code != page.code)
                    or (page.older_than is not None and not r.received_at < now - page.older_than)
                    or (page.recipient and page.recipient.lower() not in addresses)
                    or (page.domain and not any(a.endswith("@" + page.domain.lower()) for a in addresses))):
                continue
            keep.append(r)
            if len(keep) == page.limit:
                break
        return keep

    async def queue_page(self, page: QueryPage, now: float) -> list[Entry]:
        self._check()
        return [self._entry(r, r.recipients) for r in self._page_rows(page, now)]

    async def queue_page_ids(self, page: QueryPage, now: float) -> list[str]:
        self._check()
        return [r.id for r in self._page_rows(page, now)]

    async def audit_log(self, limit: int = 100) -> list[dict]:
        self._check()
        return [{"id": a["id"], "at": a["at"], "who": a["who"], "action": a["action"], "incident_id": a["incident_id"],
                 "detail": json.loads(a["detail"]), "undone_at": a["undone_at"]}
                for a in reversed(self._audit)][:limit]


