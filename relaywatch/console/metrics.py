"""/metrics: Prometheus text format (version 0.0.4), prefix ``relaywatch_``.

What counts where, honestly:

- Queue gauges (messages by connector and status, deferred by code, the
  age of the oldest message and of the oldest deferred one) come from the
  store at scrape time, in one GROUP BY (store.queue_gauges): every node of a
  PostgreSQL queue reports the same truth, and nothing on the mail path
  keeps them.
- Open incidents come from the store too.
- The event counters (``*_total``) are counted in events.emit, where the mail
  log is written, by the process that did it.  The receiving process counts
  received and rejected; deliveries, deferrals, bounces and expiries happen
  in the delivery process when there are two (app.py), which writes its
  counts to ``data_dir/counters-deliver.json`` once a second
  (``export_counters``); the console adds them, so they can lag by a second.
  A restarted delivery process starts from zero, which Prometheus reads as
  a counter reset.  Bounces an operator causes (CLI) are counted by the CLI's
  own process and are not seen here; those through the API are.

Labels are bounded: connector (from the config, or local/internet), status,
code (status codes), route kind.  Never an address or a domain.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from relaywatch import events

STATUSES = ("queued", "deferred", "held", "active")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
EXPORT_NAME = "counters-deliver.json"
EXPORT_INTERVAL = 1.0

# (event, metric name, labels it keeps, help)
COUNTERS = (
    ("received", "relaywatch_messages_received_total", ("connector",),
     "Queue entries committed (one per message and route)."),
    ("delivered", "relaywatch_recipients_delivered_total", ("connector",), "Recipients delivered."),
    ("deferred", "relaywatch_recipients_deferred_total", ("connector", "code"),
     "Recipient delivery attempts deferred, by the code of the failure."),
    ("bounced", "relaywatch_recipients_bounced_total", ("connector",),
     "Recipients failed permanently (an NDR was queued where possible)."),
    ("expired", "relaywatch_recipients_expired_total", ("connector",),
     "Recipients given up on after queue.message_expiration."),
    ("rejected", "relaywatch_smtp_rejections_total", ("code",),
     "Commands or connections refused by the SMTP server, by status code (\"\" when none was logged)."),
    ("auth", "relaywatch_smtp_auth_succeeded_total", (), "SMTP AUTH logins (and client certificates) accepted."),
    ("auth_failed", "relaywatch_smtp_auth_failed_total", (), "SMTP AUTH attempts with a wrong password or user."),
    ("auth_blocked", "relaywatch_smtp_auth_blocks_total", (),
     "Client IPs blocked from AUTH after server.auth_max_failures failures."),
    ("auth_refused", "relaywatch_smtp_auth_refused_total", (), "SMTP AUTH attempts refused during a block."),
)


@dataclass
class Family:
    name: str
    type: str                # gauge | counter
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)


def render(families: list[Family]) -> str:
    out = []
    for f in families:
        out.append(f"# HELP {f.name} {_help(f.help)}")
        out.append(f"# TYPE {f.name} {f.type}")
        for labels, value in f.samples:
            text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            out.append(f"{f.name}{{{text}}} {_value(value)}" if text else f"{f.name} {_value(value)}")
    return "\n".join(out) + "\n"


def _help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _value(v: float) -> str:
    if isinstance(v, int) or float(v).is_integer():
        return str(int(v))
    return repr(float(v))


def queue_families(rows, connectors: list[str], now: float) -> list[Family]:
    """The gauges from store.queue_gauges rows: (connector, status, last_code, n, leased, oldest)."""
    depth: dict[tuple[str, str], int] = {(c, s): 0 for c in connectors for s in STATUSES}
    by_code: dict[tuple[str, str], int] = {}
    oldest: dict[str, float] = {}
    oldest_deferred: dict[str, float] = {}
    for connector, status, code, n, leased, first in rows:
        # A leased entry is "active" (model.EntryStatus), as queue list shows it.
        depth[(connector, status)] = depth.get((connector, status), 0) + n - leased
        depth[(connector, "active")] = depth.get((connector, "active"), 0) + leased
        if status == "deferred" and code:
            by_code[(connector, code)] = by_code.get((connector, code), 0) + n
        if first is not None:
            oldest[connector] = min(oldest.get(connector, first), first)
            if status == "deferred":
                oldest_deferred[connector] = min(oldest_deferred.get(connector, first), first)
    names = sorted({c for c, _ in depth})
    return [
        Family("relaywatch_queue_messages", "gauge", "Queue entries by connector and status (active: being delivered).",
               [({"connector": c, "status": s}, n) for (c, s), n in sorted(depth.items())]),
        Family("relaywatch_queue_deferred_messages", "gauge",
               "Deferred queue entries by connector and the code of their latest failure.",
               [({"connector": c, "code": code}, n) for (c, code), n in sorted(by_code.items())]),
        Family("relaywatch_queue_oldest_message_age_seconds", "gauge",
               "Age of the oldest queued message per connector (0: none).",
               [({"connector": c}, max(0.0, round(now - oldest[c], 3)) if c in oldest else 0) for c in names]),
        Family("relaywatch_queue_oldest_deferred_age_seconds", "gauge",
               "Age of the oldest deferred message per connector (0: none).",
               [({"connector": c}, max(0.0, round(now - oldest_deferred[c], 3)) if c in oldest_deferred else 0)
                for c in names]),
    ]


def incident_family(open_incidents: list[dict]) -> Family:
    counted: dict[tuple[str, str], int] = {}
    for inc in open_incidents:
        key = (inc["connector"], inc["code"])
        counted[key] = counted.get(key, 0) + 1
    return Family("relaywatch_incidents_open", "gauge", "Open mail flow incidents by connector and code.",
                  [({"connector": c, "code": code}, n) for (c, code), n in sorted(counted.items())])


def counter_families(*sources: dict[tuple[str, str, str], int]) -> list[Family]:
    """The *_total counters from events.counts (and the delivery process's export)."""
    merged: dict[tuple[str, str, str], int] = {}
    for counts in sources:
        for key, n in counts.items():
            merged[key] = merged.get(key, 0) + n
    out = []
    for event, name, labels, help_text in COUNTERS:
        samples: dict[tuple, int] = {}
        for (ev, connector, code), n in merged.items():
            if ev != event:
                continue
            values = {"connector": connector, "code": code}
            key = tuple(values[k] for k in labels)
            samples[key] = samples.get(key, 0) + n
        out.append(Family(name, "counter", help_text,
                          [(dict(zip(labels, key)), n) for key, n in sorted(samples.items())]))
    return out


# -- the delivery process's counts ---------------------------------------------------

def read_export(data_dir: Path) -> dict[tuple[str, str, str], int]:
    try:
        data = json.loads((data_dir / EXPORT_NAME).read_text())
        return {(e, c, code): int(n) for e, c, code, n in data["counts"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}   # none yet (or one being replaced): the next scrape has it


def write_export(data_dir: Path, counts: dict[tuple[str, str, str], int]) -> None:
    path = data_dir / EXPORT_NAME
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "at": time.time(),
                               "counts": [[*k, n] for k, n in counts.items()]}))
    os.replace(tmp, path)   # readers see the old file or the new one, never half of one


async def export_counters(data_dir: Path, interval: float = EXPORT_INTERVAL) -> None:
    """In the delivery process: keep data_dir/counters-deliver.json current (when counts change)."""
    last = None
    while True:
        snapshot = dict(events.counts)
        if snapshot != last:
            try:
                await asyncio.to_thread(write_export, data_dir, snapshot)
                last = snapshot
            except OSError:
                pass   # a full disk: the console shows older counts until it can write
        await asyncio.sleep(interval)

