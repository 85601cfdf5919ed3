"""/metrics: Prometheus text format (version 0.0.4), prefix ``relaywatch_``.

What counts where, honestly:

- Queue gauges (messages by connector and status, deferred by code, the
  age of the oldest message and of the oldest deferred one) come from the
  store at scrape time, in one statement (store.queue_gauges): every node of
  a PostgreSQL queue reports the same truth.  The counts are the store's
  queue_counts, which triggers keep in the transaction of each write
  (store/schema.py), so a scrape costs the same with a million queued.
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

- The meters (relaywatch/meters.py): delivery attempt durations by
  connector (scheduler), SMTP sessions by listener kind and refusals by reply
  code (receive/session.py), store commit latency per batch (store/batch.py)
  and notification failures by channel (watch/alerts.py).  The delivery
  process exports its attempt durations, commit latencies and notification
  failures in the same file, under ``meters`` (older readers ignore the key).

Labels are bounded: connector (from the config, or local/internet), status,
code (status codes), reply (3 digits), route kind, listener, channel, and
``node`` on every series (server.node_name, else the host name).  Never an
address or a domain.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from relaywatch import events, meters
from relaywatch.incident import Incident

STATUSES = ("queued", "deferred", "held", "active")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
EXPORT_NAME = "counters-deliver.json"
RECEIVE_EXPORT_NAME = "counters-receive.json"   # the receiving process's, for its node's heartbeat (app.py)
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
    ("possible_duplicate", "relaywatch_possible_duplicates_total", (),
     "Queue entries a previous run of this node was handing to their destination when it died, "
     "and so may have delivered already (deliver/handover.py)."),
)


@dataclass
class Family:
    name: str
    type: str                # gauge | counter | histogram
    help: str
    # (labels, value) or, for a histogram's series, (labels, value, "_bucket" | "_sum" | "_count")
    samples: list[tuple] = field(default_factory=list)


def render(families: list[Family], node: str | None = None) -> str:
    """The exposition text; ``node``, if given, is a label on every series."""
    out = []
    tail = f'node="{_label(node)}"' if node is not None else ""
    for f in families:
        out.append(f"# HELP {f.name} {_help(f.help)}")
        out.append(f"# TYPE {f.name} {f.type}")
        for sample in f.samples:
            labels, value = sample[0], sample[1]
            name = f.name + sample[2] if len(sample) > 2 else f.name
            text = ",".join([f'{k}="{_label(v)}"' for k, v in labels.items()] + ([tail] if tail else []))
            out.append(f"{name}{{{text}}} {_value(value)}" if text else f"{name} {_value(value)}")
    return "\n".join(out) + "\n"


def node_name(config) -> str:
    """The ``node`` label: server.node_name where the config has one, else this host's name."""
    return getattr(config.server, "node_name", None) or socket.gethostname()


def _help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _value(v: float) -> str:
    if isinstance(v, float) and math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
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


def incident_family(open_incidents: list[Incident]) -> Family:
    counted: dict[tuple[str, str], int] = {}
    for inc in open_incidents:
        key = inc.key
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


def histogram_samples(h: meters.Histogram, labels: dict[str, str]) -> list[tuple]:
    out, running = [], 0
    for bound, n in zip((*h.bounds, math.inf), h.counts):
        running += n
        out.append(({**labels, "le": "+Inf" if bound == math.inf else repr(float(bound))}, running, "_bucket"))
    out.append((labels, round(h.sum, 6), "_sum"))
    out.append((labels, running, "_count"))
    return out


def meter_families(*sources: dict) -> list[Family]:
    """The meters (relaywatch/meters.py), this process's and the delivery
    process's: each source is a dict like meters.snapshot(), plus, for this
    process, ``sessions_opened``, ``sessions_open`` and ``replies_refused``."""
    attempts: dict[str, meters.Histogram] = {}
    commits = meters.Histogram(meters.COMMIT_BUCKETS)
    failures: dict[str, int] = {}
    for src in sources:
        for connector, (counts, total) in (src.get("attempt_seconds") or {}).items():
            attempts.setdefault(connector, meters.Histogram(meters.ATTEMPT_BUCKETS)).merge(counts, total)
        if src.get("commit_seconds"):
            commits.merge(*src["commit_seconds"])
        for channel, n in (src.get("notification_failures") or {}).items():
            failures[channel] = failures.get(channel, 0) + int(n)
    local = sources[0] if sources else {}
    opened, open_now = local.get("sessions_opened") or {}, local.get("sessions_open") or {}
    refused = local.get("replies_refused") or {}
    attempt_samples = [s for c in sorted(attempts) for s in histogram_samples(attempts[c], {"connector": c})]
    return [
        Family("relaywatch_delivery_attempt_duration_seconds", "histogram",
               "Delivery attempts by connector: from taking the message to its outcome (connect, TLS, transaction).",
               attempt_samples),
        Family("relaywatch_store_commit_duration_seconds", "histogram",
               "Each batch of queue store writes, BEGIN to durable COMMIT (group commit: one batch, many writes).",
               histogram_samples(commits, {})),
        Family("relaywatch_smtp_sessions_opened_total", "counter", "SMTP connections accepted, by listener kind.",
               [({"listener": k}, n) for k, n in sorted(opened.items())]),
        Family("relaywatch_smtp_sessions_open", "gauge", "SMTP connections open now, by listener kind.",
               [({"listener": k}, n) for k, n in sorted(open_now.items())]),
        Family("relaywatch_smtp_rejection_replies_total", "counter",
               "4xx and 5xx replies the SMTP server sent, by reply code and enhanced status code (\"\" when none).",
               [({"reply": r, "enhanced": e}, n) for (r, e), n in sorted(refused.items())]),
        Family("relaywatch_notification_failures_total", "counter",
               "Incident notifications that failed to go out, by channel (each retry that fails counts).",
               [({"channel": c}, n) for c, n in sorted(failures.items())]),
    ]


def local_meters() -> dict:
    return {**meters.snapshot(), "sessions_opened": dict(meters.sessions_opened),
            "sessions_open": dict(meters.sessions_open), "replies_refused": dict(meters.replies_refused)}


# -- the delivery process's counts ---------------------------------------------------

def read_export(data_dir: Path, name: str = EXPORT_NAME) -> dict[tuple[str, str, str], int]:
    return read_export_all(data_dir, name)[0]


def read_export_all(data_dir: Path, name: str = EXPORT_NAME) -> tuple[dict[tuple[str, str, str], int], dict]:
    """The delivery process's event counts and meters (a file without ``meters``: none)."""
    try:
        data = json.loads((data_dir / name).read_text())
        counts = {(e, c, code): int(n) for e, c, code, n in data["counts"]}
        found = data.get("meters")
        return counts, found if isinstance(found, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}, {}   # none yet (or one being replaced): the next scrape has it


def write_export(data_dir: Path, counts: dict[tuple[str, str, str], int], meter_snapshot: dict | None = None,
                 name: str = EXPORT_NAME) -> None:
    path = data_dir / name
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    doc = {"pid": os.getpid(), "at": time.time(), "counts": [[*k, n] for k, n in counts.items()]}
    if meter_snapshot is not None:
        doc["meters"] = meter_snapshot
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)   # readers see the old file or the new one, never half of one


async def export_counters(data_dir: Path, interval: float = EXPORT_INTERVAL, name: str = EXPORT_NAME) -> None:
    """In the delivery process: keep data_dir/counters-deliver.json current (when counts change).
    The receiving process keeps counters-receive.json, which its delivery process's node reads."""
    last = None
    while True:
        snapshot = (dict(events.counts), meters.snapshot())
        if snapshot != last:
            try:
                await asyncio.to_thread(write_export, data_dir, *snapshot, name)
                last = snapshot
            except OSError:
                pass   # a full disk: the console shows older counts until it can write
        await asyncio.sleep(interval)

