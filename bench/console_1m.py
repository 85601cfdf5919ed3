"""The console with a million messages queued: /metrics and the pages, server time p50/p99.

    .venv/bin/python bench/console_1m.py [--messages 1000000] [--store sqlite|postgresql://...] [--repeat 20]

Builds the queue with bulk SQL into the store's own schema (relaywatch.store
creates it; SMTP would take a quarter of an hour and is not what is
measured): over four connectors, 90% deferred with one of five codes, 8%
queued, 2% held, one recipient each, a body shared by a thousand entries,
nothing due for a day.  Then starts ``relaywatch serve`` on it (console on a
loopback port, connectors pointing at a closed port, so nothing is delivered
and the watch opens incidents) and fetches /metrics and each page
``--repeat`` times, one after another.  Server time is the console's own
``Server-Timing: app;dur=`` header (console/http.py: from the parsed request
to the response built); client time is the whole request over loopback.

Targets (issue 11): /metrics p50 and p99 <= 100 ms, pages <= 200 ms.
A PostgreSQL store is filled in a schema of its own (``bench_console_1m``,
dropped and made again each run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
HOST = "127.0.0.1"
CONNECTORS = ("onprem", "partner", "fabrikam", "contoso")
CODES = ("4.4.316", "4.4.315", "4.7.320", "4.4.318", "4.4.7")
PG_SCHEMA = "bench_console_1m"
BODY = b"Subject: backlog\r\n\r\n" + b"x" * 1000 + b"\r\n"
PER_BODY = 1000
TARGET_MS = {"metrics": 100.0}
PAGE_TARGET_MS = 200.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rows(n: int, now: float):
    """(body rows, entry rows, recipient rows) for n entries: deterministic, spread over connectors and codes."""
    error = {"code": "", "smtp_code": 450, "title": "Connection refused", "subtype": "refused", "detail": "refused",
             "phase": "connect", "permanent": False, "at": now, "kind": "connect.refused",
             "destination": {"host": HOST, "ip": HOST, "port": 1, "index": 1, "count": 1},
             "reply": None, "errno": "ECONNREFUSED", "dns": None, "tls": None}
    bodies = [(f"B{b:015X}", BODY, len(BODY), min(PER_BODY, n - b * PER_BODY)) for b in range(-(-n // PER_BODY))]
    entries, recipients = [], []
    for i in range(n):
        connector = CONNECTORS[i % len(CONNECTORS)]
        kind = i % 50
        status = "held" if kind == 0 else "queued" if kind <= 4 else "deferred"
        code = CODES[(i // len(CONNECTORS)) % len(CODES)] if status != "queued" else None
        received = now - 86400 + i * 80000 / n      # oldest a day ago, in id order
        entry_id = f"{int(received * 1000):011X}{i % 0x100000:05X}"
        attempts = 0 if status == "queued" else 3
        entries.append((entry_id, f"B{i // PER_BODY:015X}", f"sender{i % 997}@client.test", received,
                        received + 5 * 86400, status, attempts, now + 86400, "connector", connector, "",
                        len(BODY), f"<{i}@client.test>", received if attempts else None, code,
                        1))
        last_error = json.dumps({**error, "code": code}) if code else None
        recipients.append((entry_id, 0, f"user{i}@d{i % 200}.{connector}.test",
                           "pending" if status == "queued" else "deferred", last_error, f"d{i % 200}.{connector}.test"))
    return bodies, entries, recipients


ENTRY_COLUMNS = ("id, body_id, sender, received_at, expires_at, status, attempts, next_attempt_at, route_kind, "
                 "route_name, route_domain, size, message_id, first_failure_at, last_code, waiting")


async def create_schema(store_url: str, data_dir: Path) -> None:
    """The store's own schema, made by opening the store as relaywatch serve would."""
    if store_url == "sqlite":
        from relaywatch.store.sqlite import SqliteStore
        store = SqliteStore(data_dir / "queue.sqlite3")
    else:
        from relaywatch.store.postgres import PostgresStore
        store = PostgresStore(store_url)
    await store.open()
    await store.close()


def fill(store_url: str, data_dir: Path, n: int) -> float:
    import asyncio
    started = time.monotonic()
    asyncio.run(create_schema(store_url, data_dir))
    bodies, entries, recipients = rows(n, time.time())
    if store_url == "sqlite":
        import sqlite3
        conn = sqlite3.connect(data_dir / "queue.sqlite3", isolation_level=None)
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO bodies (id, data, path, size, refs) VALUES (?, ?, NULL, ?, ?)", bodies)
        conn.executemany(f"INSERT INTO entries ({ENTRY_COLUMNS}) VALUES ({', '.join('?' * 16)})", entries)
        conn.executemany("INSERT INTO recipients (entry_id, position, address, status, last_error, domain) "
                         "VALUES (?, ?, ?, ?, ?, ?)", recipients)
        conn.execute("COMMIT")   # no ANALYZE: a relay never runs it, and its plans are the ones measured
        conn.close()
    else:
        import psycopg
        with psycopg.connect(store_url, autocommit=True) as conn:
            with conn.cursor() as cur:
                with cur.copy("COPY bodies (id, data, path, size, refs) FROM STDIN") as copy:
                    for b in bodies:
                        copy.write_row((b[0], b[1], None, b[2], b[3]))
                with cur.copy(f"COPY entries ({ENTRY_COLUMNS}) FROM STDIN") as copy:
                    for e in entries:
                        copy.write_row(e)
                with cur.copy("COPY recipients (entry_id, position, address, status, last_error, domain) FROM STDIN") as copy:
                    for r in recipients:
                        copy.write_row(r)
            from relaywatch.store.cluster import Q as CLUSTER
            conn.execute(CLUSTER["fold_counts"])   # what the relay's first heartbeat would do
            conn.execute("VACUUM ANALYZE")
    return time.monotonic() - started


def pg_schema_url(base: str) -> str:
    import psycopg
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE")
        conn.execute(f"CREATE SCHEMA {PG_SCHEMA}")
    return f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{PG_SCHEMA}"


def config(work: Path, smtp_port: int, http_port: int, store_url: str) -> Path:
    connectors = "".join(f"""
[[connectors]]
name = "{name}"
type = "partner"
domains = ["{name}.test"]
smart_hosts = ["{HOST}:1"]
tls = "none"
""" for name in CONNECTORS)
    path = work / "relaywatch.toml"
    path.write_text(f"""
[server]
hostname = "bench.relaywatch"
listen = ["{HOST}:{smtp_port}"]
data_dir = "data"
store = "{store_url}"
[queue]
retry_intervals = ["24h"]
[http]
listen = "{HOST}:{http_port}"
{connectors}""")
    return path


def server_ms(response: httpx.Response) -> float:
    for part in response.headers.get("server-timing", "").split(","):
        name, _, rest = part.strip().partition(";dur=")
        if name == "app":
            return float(rest)
    raise RuntimeError(f"no Server-Timing from {response.request.url}")


def measure(client: httpx.Client, path: str, repeat: int) -> dict:
    server, wall = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        r = client.get(path)
        wall.append((time.perf_counter() - t) * 1000)
        if r.status_code != 200:
            raise RuntimeError(f"GET {path}: {r.status_code} {r.text[:200]}")
        server.append(server_ms(r))
    return {"server_p50_ms": statistics.median(server), "server_p99_ms": quantile(server, 0.99),
            "client_p50_ms": statistics.median(wall), "client_p99_ms": quantile(wall, 0.99)}


def quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise RuntimeError(f"gave up waiting for {what} after {timeout:.0f} s")


def run(messages: int, store: str, repeat: int, only: list[str] | None = None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="console-1m-"))
    (work / "data").mkdir()
    store_url = store if store == "sqlite" else pg_schema_url(store)
    out: dict = {"messages": messages, "store": store.split("?")[0], "repeat": repeat}
    proc = None
    try:
        out["fill_s"] = round(fill(store_url, work / "data", messages), 1)
        print(f"filled {messages} in {out['fill_s']} s", flush=True)
        http_port = free_port()
        path = config(work, free_port(), http_port, store_url)
        log = open(work / "relaywatch.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "relaywatch", "serve", "-c", str(path)], cwd=work,
                                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        client = httpx.Client(base_url=f"http://{HOST}:{http_port}", timeout=60)

        def up():
            try:
                return client.get("/healthz").status_code == 200
            except httpx.TransportError:
                if proc.poll() is not None:
                    raise RuntimeError(f"relaywatch serve exited: {(work / 'relaywatch.log').read_text()[-2000:]}")
                return False
        wait_until(up, 120, "the console")
        incidents = wait_until(lambda: client.get("/api/v1/incidents").json()["incidents"], 120, "an incident")
        first = client.get("/api/v1/queue", params={"limit": 1}).json()["messages"][0]["id"]
        paths = {
            "metrics": "/metrics",
            "overview": "/",
            "overview_fragment": "/fragments/overview",
            "queue": "/queue",
            "queue_deferred_on_connector": "/queue?status=deferred&connector=partner",
            "queue_code": f"/queue?code={CODES[2]}",
            "queue_code_class": "/queue?code=4.7",                 # the class of CODES[2]
            "queue_code_none": "/queue?code=5.7.1",                # none: every entry read, as for
            "queue_code_class_none": "/queue?code=5.7",            # a class that none has
            "queue_held_on_connector": "/queue?status=held&connector=fabrikam",
            "queue_older_than": "/queue?older_than=20h",
            "queue_domain": "/queue?domain=d7.partner.test",          # none: d7 is always contoso's
            "queue_domain_5000": "/queue?domain=d7.contoso.test",     # 1 entry in 200
            "incident": f"/incidents/{incidents[0]['id']}",
            "message": f"/queue/{first}",
            "api_queue": "/api/v1/queue",
            # A Message-ID (message_ids): the queue's text filter given one, the trace page by it.
            "queue_message_id": f"/queue?text=<{messages // 2}@client.test>",
            "trace_message_id": f"/trace?q=<{messages // 2}@client.test>",
        }
        for name, url in paths.items():
            if only and name not in only:
                continue
            client.get(url)   # warm: the first fetch of a page compiles its template
            out[name] = measure(client, url, repeat)
            target = TARGET_MS.get(name, PAGE_TARGET_MS)
            ok = out[name]["server_p99_ms"] <= target
            print(f"{name:30} server p50 {out[name]['server_p50_ms']:7.1f} ms  p99 {out[name]['server_p99_ms']:7.1f}"
                  f"  client p50 {out[name]['client_p50_ms']:7.1f}  p99 {out[name]['client_p99_ms']:7.1f}"
                  f"  (target {target:.0f}{' ok' if ok else ' MISSED'})", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--store", default="sqlite", help='"sqlite" or a postgresql:// URL')
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--only", action="append", help="measure only these (metrics, overview, queue, ...)")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))   # a stopped bench stops its relay and removes its queue
    out = run(a.messages, a.store, a.repeat, a.only)
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
