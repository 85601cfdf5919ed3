"""The console's reads for the in-memory store (store/console.py is the SQL one)."""

from __future__ import annotations

import json

from relaywatch.model import Entry
from relaywatch.store import trace as traces
from relaywatch.store.base import QueryPage
from relaywatch.store.queue import domain_of
from relaywatch.store.watch_rows import audit_of
from relaywatch.watch_records import AuditRecord


def _has_text(r, text: str) -> bool:
    """As console.sql has_text: in the sender, a recipient or a recipient's last reply; or, given
    a Message-ID in angle brackets, has_message_id: that Message-ID."""
    message_id = traces.message_id_of(text)
    if message_id is not None:
        return traces.message_id_key(r.message_id) == message_id
    text = text.lower()
    return text in r.sender.lower() or any(
        text in x.address.lower() or (x.last_error is not None and text in (x.last_error.reply or "").lower())
        for x in r.recipients)


def _has_code(last_code: str | None, code: str) -> bool:
    """As store/console.py _codes_now: the exact code, or for a class "4.4.*" every code it starts."""
    if code.endswith(".*"):
        return last_code is not None and last_code.startswith(code[:-1])
    return last_code == code


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

    async def count_deferred_before(self, connector: str, received_before: float, now: float, cap: int) -> int:
        self._check()
        return min(cap, sum(1 for r in self._entries.values()
                            if r.route.name == connector and r.status.value == "deferred"
                            and r.received_at < received_before and not (r.lease_until is not None and r.lease_until > now)))

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
                    or (page.code and not _has_code(r.last_code, page.code))
                    or (page.older_than is not None and not r.received_at < now - page.older_than)
                    or (page.recipient and page.recipient.lower() not in addresses)
                    or (page.domain and page.domain.lower() not in {domain_of(a) for a in addresses})
                    or (page.route and r.route.kind.value != page.route)
                    or (page.text and not _has_text(r, page.text))):
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

    async def audit_log(self, limit: int = 100) -> list[AuditRecord]:
        self._check()
        return [audit_of(tuple(a)) for a in reversed(self._audit)][:limit]

    async def trace(self, entry_id: str) -> dict | None:
        self._check()
        entry_id = entry_id.upper()
        r = self._entries.get(entry_id)
        if r is not None:
            record = traces.trace_record(self._entry(r, r.recipients), r.history, None)
        elif entry_id in self._traces:
            record = json.loads(json.dumps(self._traces[entry_id]))
        else:
            return None
        record["audit"] = [audit_of(tuple(a)).to_dict(with_incident=True) for a in self._audit if entry_id in a[5]]
        return record

    async def trace_ids(self, message_id: str) -> list[str]:
        self._check()
        # As the SQL stores' message_ids: by the key, of the entries queued and the traces kept.
        key = traces.lookup_key(message_id)
        if not key:
            return []
        live = {r.id for r in self._entries.values() if traces.message_id_key(r.message_id) == key}
        kept = {i for i, t in self._traces.items() if traces.message_id_key(t["entry"]["message_id"]) == key}
        return sorted(live | kept)
