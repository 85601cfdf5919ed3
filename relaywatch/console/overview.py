"""The overview page's numbers, pure: recipients per event and connector, their history, the chart, the rows.

The store keeps no delivered mail, so "delivered in the last hour" and the
24 h chart come from this process's event counters (events.py), sampled every
minute by the console (console/web.py) into a ``FlowHistory``.
"""

from __future__ import annotations

import bisect

HISTORY_STEP = 60.0            # a sample of the event counters every minute ...
HISTORY_KEEP = 24 * 3600.0     # ... for the last 24 h (the overview's chart)
FLOW_EVENTS = ("delivered", "deferred", "bounced")


def flow_counts(counts: dict[tuple[str, str, str], int]) -> dict[tuple[str, str], int]:
    """{(event, connector): recipients} of the counted events (expired counts as bounced: it was returned)."""
    out: dict[tuple[str, str], int] = {}
    for (event, connector, _code), n in counts.items():
        event = "bounced" if event == "expired" else event
        if event in FLOW_EVENTS:
            out[(event, connector)] = out.get((event, connector), 0) + n
    return out


class FlowHistory:
    """Samples of the cumulative event counters, for "delivered in the last hour" and the 24 h chart.

    The store keeps no delivered mail, so this is the counters of this
    process since it started (the page says so), sampled every minute."""

    def __init__(self, started: float, baseline: dict[tuple[str, str], int] | None = None):
        # The counters may not be zero at start (they are the process's, and a console
        # can start later than it): what they say then is the zero of the chart.
        self.started = started
        self.samples: list[tuple[float, dict[tuple[str, str], int]]] = [(started, dict(baseline or {}))]

    def add(self, now: float, counts: dict[tuple[str, str], int]) -> None:
        self.samples.append((now, dict(counts)))
        while len(self.samples) > 2 and self.samples[1][0] < now - HISTORY_KEEP - HISTORY_STEP:
            self.samples.pop(0)

    def at(self, when: float) -> dict[tuple[str, str], int]:
        """The counts of the last sample at or before ``when`` (none before start: zero)."""
        i = bisect.bisect_right(self.samples, when, key=lambda sample: sample[0])
        return self.samples[max(i, 1) - 1][1]   # before start: the baseline

    def since(self, now: float, seconds: float, counts: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
        before = self.at(now - seconds)
        return {k: n - before.get(k, 0) for k, n in counts.items() if n - before.get(k, 0)}

    def hourly(self, now: float, counts: dict[tuple[str, str], int], hours: int = 24) -> list[dict[str, int]]:
        """Per hour, oldest first: {event: recipients} over every connector."""
        out = []
        for h in range(hours, 0, -1):
            start, end = now - h * 3600, now - (h - 1) * 3600
            a, b = self.at(start), (counts if h == 1 else self.at(end))
            out.append({e: sum(n - a.get((ev, c), 0) for (ev, c), n in b.items() if ev == e) for e in FLOW_EVENTS})
        return out


def chart_svg_data(hourly: list[dict[str, int]], width: int = 480, height: int = 80) -> dict:
    """Bars for an inline SVG: one group per hour, delivered / deferred / bounced side by side."""
    top = max([max(h.values(), default=0) for h in hourly] + [1])
    slot = width / max(len(hourly), 1)
    bar = max(slot / 3 - 1, 1)
    bars = []
    for i, h in enumerate(hourly):
        for j, event in enumerate(FLOW_EVENTS):
            n = h[event]
            tall = round(n / top * (height - 4), 1)
            bars.append({"x": round(i * slot + j * bar, 1), "y": round(height - tall, 1), "w": round(bar, 1),
                         "h": tall, "event": event, "n": n, "hours_ago": len(hourly) - i})
    return {"width": width, "height": height, "bars": bars, "top": top}


def connector_rows(names: list[str], gauges, now: float, expiration: float) -> dict[str, dict]:
    """Per connector from the queue gauges: queued, deferred by code, the oldest deferred and its expiry."""
    out = {name: {"queued": 0, "held": 0, "active": 0, "deferred": 0, "deferred_by_code": {},
                  "oldest_deferred": None, "oldest_expires": None} for name in names}
    for connector, status, code, n, leased, oldest in gauges:
        row = out.setdefault(connector, {"queued": 0, "held": 0, "active": 0, "deferred": 0, "deferred_by_code": {},
                                         "oldest_deferred": None, "oldest_expires": None})
        row["active"] += leased
        if status == "deferred":
            row["deferred"] += n
            key = code or "-"
            row["deferred_by_code"][key] = row["deferred_by_code"].get(key, 0) + n
            if oldest is not None and (row["oldest_deferred"] is None or oldest < row["oldest_deferred"]):
                row["oldest_deferred"] = oldest
                row["oldest_expires"] = oldest + expiration
        elif status in row:
            row[status] += n
    return out


def ago(seconds: float) -> str:
    """A duration as people say it: 45s, 12m, 3h 5m, 2d 4h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"
