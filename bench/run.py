#!/usr/bin/env python3
"""Benchmarks: relaywatch against Postfix, same machine, same run, alternating.

    make bench                     # all scenarios, 3 repetitions
    python bench/run.py --smoke    # tiny run, to keep the harness working
    python bench/run.py --scenario throughput --repeat 5 --messages 20000

Traffic: Postfix's smtp-source -> relay under test -> Postfix's smtp-sink, all on
127.0.0.1.  Both relays keep a durable queue (fsync before 250).  Results go to
bench/results/latest.json and bench/results/latest.md (medians, min-max, and
the ratio relaywatch/Postfix).  Needs the postfix package (installed here with
apt-get when missing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work"
RESULTS = ROOT / "bench" / "results"
POSTFIX_WORK = Path("/var/tmp/relaywatch-bench")
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=1) as s:
                if s.recv(100).startswith(b"220"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing answered on {HOST}:{port}")


def ensure_postfix() -> None:
    if shutil.which("smtp-source") and shutil.which("postfix") and Path("/etc/postfix/main.cf").exists():
        return
    print("installing postfix (for smtp-source, smtp-sink and the reference relay)...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run("echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections",
                   shell=True, check=False)
    subprocess.run(["apt-get", "install", "-y", "-q", "postfix"], env=env, check=True, stdout=subprocess.DEVNULL)
    main_cf = Path("/etc/postfix/main.cf")
    if not main_cf.exists():
        # The instances here use their own config directories; the postfix
        # command still wants a default main.cf to exist.
        main_cf.write_text("compatibility_level = 3.6\n")


# -- the sink -------------------------------------------------------------------------------------

class SmtpSink:
    """Postfix's smtp-sink, counting messages (-c writes "mesg=N" counters)."""

    def __init__(self, delay_ms: int = 0):
        self.port = free_port()
        self.out = WORK / f"sink-{self.port}.out"
        self.delay_ms = delay_ms
        self.proc = None

    def start(self) -> "SmtpSink":
        cmd = ["smtp-sink", "-c", "-u", "nobody", f"{HOST}:{self.port}", "1000"]
        self.proc = subprocess.Popen(cmd, stdout=open(self.out, "wb"), stderr=subprocess.STDOUT)
        wait_port(self.port)
        return self

    def count(self) -> int:
        data = self.out.read_bytes()[-200:]
        found = re.findall(rb"mesg=(\d+)", data)
        return int(found[-1]) if found else 0

    def wait_for(self, n: int, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count() >= n:
                return time.monotonic()
            time.sleep(0.01)
        raise RuntimeError(f"sink got {self.count()} of {n} messages within {timeout}s")

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait()
            self.out.unlink(missing_ok=True)


# -- the relays -----------------------------------------------------------------------------------

class Relaywatch:
    name = "relaywatch"

    def __init__(self, sink_port: int, extra: str = "", extra_connectors: str = "", queue_extra: str = ""):
        self.port = free_port()
        self.dir = WORK / f"relaywatch-{self.port}"
        self.sink_port = sink_port
        self.extra = extra
        self.extra_connectors = extra_connectors
        self.queue_extra = queue_extra or 'retry_intervals = ["1m", "5m", "10m", "15m", "30m", "60m"]'
        self.proc = None

    def start(self) -> "Relaywatch":
        self.prepare()
        self.launch()
        return self

    def prepare(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        (self.dir / "data").mkdir(parents=True)
        (self.dir / "relaywatch.toml").write_text(f"""
[server]
hostname = "bench.relaywatch"
listen = ["{HOST}:{self.port}"]
data_dir = "data"
max_connections_per_ip = 1000
[queue]
{self.queue_extra}
[delivery]
connection_idle = "2s"
{self.extra}
[[connectors]]
name = "sink"
type = "partner"
domains = ["sink.test"]
smart_hosts = ["{HOST}:{self.sink_port}"]
tls = "none"
{self.extra_connectors}
""")

    def launch(self) -> None:
        self.log = open(self.dir / "relaywatch.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "relaywatch", "serve", "-c",
                                      str(self.dir / "relaywatch.toml")],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env=dict(os.environ, PYTHONPATH=str(ROOT)))
        wait_port(self.port)

    def flush(self) -> None:
        subprocess.run([sys.executable, "-m", "relaywatch", "queue", "retry", "--all", "-c",
                        str(self.dir / "relaywatch.toml")], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))

    def peak_rss_kb(self) -> int:
        return _proc_status(self.proc.pid, "VmHWM")

    def rss_kb(self) -> int:
        return _proc_status(self.proc.pid, "VmRSS")

    def stop(self) -> None:
        if self.proc:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.log.close()
            shutil.rmtree(self.dir, ignore_errors=True)


class Postfix:
    name = "postfix"

    def __init__(self, sink_port: int, extra: str = ""):
        self.port = free_port()
        # Postfix's daemons run as the postfix user: their directories must be
        # reachable by it, which a checkout in a private (0700) folder is not.
        self.dir = POSTFIX_WORK / f"postfix-{self.port}"
        self.sink_port = sink_port
        self.extra = extra

    def _run(self, *args: str, check=True) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), check=check, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def start(self) -> "Postfix":
        shutil.rmtree(self.dir, ignore_errors=True)
        POSTFIX_WORK.mkdir(parents=True, exist_ok=True)
        POSTFIX_WORK.chmod(0o755)
        conf = self.dir / "conf"
        conf.mkdir(parents=True)
        (self.dir / "queue").mkdir()
        (self.dir / "data").mkdir()
        shutil.chown(self.dir / "data", "postfix")
        (conf / "main.cf").write_text(f"""
compatibility_level = 3.6
queue_directory = {self.dir}/queue
data_directory = {self.dir}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = bench.postfix
mydestination =
inet_interfaces = {HOST}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [{HOST}]:{self.sink_port}
smtpd_relay_restrictions = permit_mynetworks, reject
maillog_file = {self.dir}/maillog
maillog_file_prefixes = {self.dir}
alias_maps =
alias_database =
{self.extra}
""")
        master = Path("/etc/postfix/master.cf").read_text()
        master = re.sub(r"^smtp\s+inet\s+.*$", f"{HOST}:{self.port} inet n - n - - smtpd", master, flags=re.M)
        master += "\npostlog   unix-dgram n  -       n       -       1       postlogd\n"
        (conf / "master.cf").write_text(master)
        self.conf = conf
        self._run("postfix", "-c", str(conf), "check", check=False)
        self._run("postfix", "-c", str(conf), "start")
        wait_port(self.port)
        return self

    def flush(self) -> None:
        self._run("postqueue", "-c", str(self.conf), "-f")

    def stop(self) -> None:
        self._run("postfix", "-c", str(self.conf), "stop", check=False)
        # postfix stop returns before every process has exited
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self._run("postfix", "-c", str(self.conf), "status",
                                                        check=False).returncode == 0:
            time.sleep(0.1)
        shutil.rmtree(self.dir, ignore_errors=True)


def _proc_status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def smtp_source(port: int, messages: int, sessions: int, size: int, reuse: bool = True) -> float:
    cmd = ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size),
           "-f", "bench@client.test", "-t", "rcpt@sink.test"]
    if reuse:
        cmd.append("-d")
    cmd.append(f"{HOST}:{port}")
    started = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


# -- scenarios ------------------------------------------------------------------------------------

def throughput(relay_cls, messages: int, sessions: int, size: int) -> dict:
    sink = SmtpSink().start()
    relay = relay_cls(sink.port).start()
    try:
        t0 = time.monotonic()
        inject = smtp_source(relay.port, messages, sessions, size)
        done = sink.wait_for(messages, timeout=600)
        return {"inject_per_s": messages / inject, "end_to_end_s": done - t0,
                "end_to_end_per_s": messages / (done - t0)}
    finally:
        relay.stop()
        sink.stop()


def backlog(relay_cls, messages: int, sessions: int, flush: bool) -> dict:
    """Destination down while `messages` are queued; then back.  Time to empty."""
    port = free_port()
    relay = relay_cls(port).start()
    sink = None
    try:
        smtp_source(relay.port, messages, sessions, 1024)
        time.sleep(3 + messages / 5000)   # let every message be tried once and deferred
        sink = SmtpSink()
        sink.port = port
        sink.start()
        t0 = time.monotonic()
        if flush:
            relay.flush()
        done = sink.wait_for(messages, timeout=1200)
        return {"drain_s": done - t0}
    except RuntimeError as exc:
        return {"drain_s": None, "note": str(exc)}
    finally:
        relay.stop()
        if sink:
            sink.stop()


def backlog_default(relay_cls, messages: int, sessions: int) -> dict:
    """As backlog_flush, but nobody intervenes: relaywatch's probe (30 s) against
    Postfix's own timers (queue_run_delay / minimal_backoff_time, 300 s)."""
    return backlog(relay_cls, messages, sessions, flush=False)


def fill_deferred(db: Path, count: int, connector: str) -> float:
    """Put `count` deferred messages straight into a relaywatch queue (as a long
    outage would leave them); returns seconds taken."""
    import sqlite3
    sys.path.insert(0, str(ROOT))
    from relaywatch.store.sqlite import SCHEMA
    started = time.monotonic()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA)
    now = time.time()
    body = b"Subject: backlog\r\n\r\n" + b"x" * 1000 + b"\r\n"
    error = json.dumps({"code": "4.4.316", "smtp_code": 450, "title": "Connection refused", "subtype": "refused",
                        "detail": "refused", "phase": "connect", "permanent": False, "at": now,
                        "kind": "connect.refused", "destination": {"host": HOST, "ip": HOST, "port": 1,
                                                                   "index": 1, "count": 1},
                        "reply": None, "errno": "ECONNREFUSED", "dns": None, "tls": None})
    batch = 20000
    for start in range(0, count, batch):
        n = min(batch, count - start)
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO bodies (id, data, path, size, refs) VALUES (?, ?, NULL, ?, 1)",
                         ((f"B{start + i:011d}", body, len(body)) for i in range(n)))
        conn.executemany(
            "INSERT INTO entries (id, body_id, sender, received_at, expires_at, status, attempts, next_attempt_at, "
            "route_kind, route_name, route_domain, size, message_id, first_failure_at, last_code) "
            "VALUES (?, ?, 'bench@client.test', ?, ?, 'deferred', 1, ?, 'connector', ?, '', ?, '', ?, '4.4.316')",
            ((f"E{start + i:011d}", f"B{start + i:011d}", now - 3600 + (start + i) / count, now + 80000,
              now + 80000, connector, len(body), now - 3600) for i in range(n)))
        conn.executemany("INSERT INTO recipients (entry_id, position, address, status, last_error) "
                         "VALUES (?, 0, 'rcpt@backlog.test', 'deferred', ?)",
                         ((f"E{start + i:011d}", error) for i in range(n)))
        conn.execute("COMMIT")
    conn.close()
    return time.monotonic() - started


def big_queue(relay_cls, size: int, probe_messages: int, sessions: int) -> dict:
    """A queue holding `size` deferred messages: server memory, `queue list`
    latency, and the enqueue rate compared with an empty queue."""
    if relay_cls is not Relaywatch:
        return {}
    out: dict = {}
    for label, fill in (("empty", 0), ("full", size)):
        sink = SmtpSink().start()
        relay = Relaywatch(sink.port, extra_connectors=f"""
[[connectors]]
name = "backlog"
type = "on_premises"
domains = ["backlog.test"]
smart_hosts = ["{HOST}:1"]
tls = "none"
""", queue_extra='retry_intervals = ["24h"]')
        relay.prepare()
        if fill:
            out["fill_s"] = fill_deferred(relay.dir / "data" / "queue.sqlite3", fill, "backlog")
        relay.launch()
        try:
            time.sleep(2)
            t0 = time.monotonic()
            inject = smtp_source(relay.port, probe_messages, sessions, 1024)
            sink.wait_for(probe_messages, timeout=600)
            out[f"inject_per_s_{label}"] = probe_messages / inject
            out[f"end_to_end_per_s_{label}"] = probe_messages / (time.monotonic() - t0)
            if fill:
                started = time.monotonic()
                subprocess.run([sys.executable, "-m", "relaywatch", "queue", "list", "--limit", "50", "--json",
                                "-c", str(relay.dir / "relaywatch.toml")], cwd=ROOT, check=True,
                               stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)))
                out["queue_list_50_s"] = time.monotonic() - started
                time.sleep(6)    # at least one watch evaluation over the whole queue
                pids = [relay.proc.pid] + [int(p) for p in subprocess.run(
                    ["pgrep", "-P", str(relay.proc.pid)], capture_output=True, text=True).stdout.split()]
                out["peak_rss_mb"] = max(_proc_status(p, "VmHWM") for p in pids) / 1024
                out["due_query_plan"] = _due_plan(relay.dir / "data" / "queue.sqlite3")
        finally:
            relay.stop()
            sink.stop()
    out["enqueue_ratio_full_over_empty"] = out["inject_per_s_full"] / out["inject_per_s_empty"]
    return out


def _due_plan(db: Path) -> str:
    import sqlite3
    conn = sqlite3.connect(db)
    plan = conn.execute("EXPLAIN QUERY PLAN SELECT id FROM entries WHERE status IN ('queued', 'deferred') "
                        "AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT 256", (time.time(),)).fetchall()
    conn.close()
    return "; ".join(row[-1] for row in plan)


def big_messages(relay_cls, count: int, size: int) -> dict:
    """`count` messages of `size` bytes in parallel; relaywatch's peak RSS growth."""
    sink = SmtpSink().start()
    relay = relay_cls(sink.port).start()
    try:
        before = relay.rss_kb() if hasattr(relay, "rss_kb") else None
        t0 = time.monotonic()
        smtp_source(relay.port, count, count, size, reuse=False)
        done = sink.wait_for(count, timeout=600)
        out = {"end_to_end_s": done - t0}
        if before is not None:
            out["rss_growth_mb"] = (relay.peak_rss_kb() - before) / 1024
        return out
    finally:
        relay.stop()
        sink.stop()


def latency(relay_cls, rate: int, seconds: float) -> dict:
    """Offer `rate` messages/s for `seconds`; time from our final dot's 250 to the sink."""
    import asyncio
    sys.path.insert(0, str(ROOT))
    from aiosmtpd.smtp import SMTP as Server

    arrivals: dict[str, float] = {}

    class Timing:
        async def handle_DATA(self, server, session, envelope):
            m = re.search(rb"X-Bench-Id: (\d+)", envelope.original_content)
            if m:
                arrivals[m.group(1).decode()] = time.monotonic()
            return "250 ok"

    async def run() -> dict:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Server(Timing(), hostname="sink"), HOST, 0)
        sink_port = server.sockets[0].getsockname()[1]
        relay = await asyncio.to_thread(lambda: relay_cls(sink_port).start())
        sent: dict[str, float] = {}
        try:
            total = int(rate * seconds)
            interval = 1.0 / rate
            clients = [await _client(relay.port) for _ in range(8)]
            start = time.monotonic()

            async def one(i: int) -> None:
                reader, writer, lock = clients[i % len(clients)]
                body = (f"Subject: t\r\nX-Bench-Id: {i}\r\n\r\n" + "x" * 900 + "\r\n.\r\n").encode()
                async with lock:
                    writer.write(b"MAIL FROM:<b@client.test>\r\nRCPT TO:<r@sink.test>\r\nDATA\r\n")
                    for _ in range(3):
                        await reader.readline()
                    writer.write(body)
                    line = await reader.readline()
                    if line.startswith(b"250"):
                        sent[str(i)] = time.monotonic()
            tasks = []
            for i in range(total):
                target = start + i * interval
                delay = target - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
            deadline = time.monotonic() + 60
            while len(arrivals) < len(sent) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            await asyncio.to_thread(relay.stop)
            server.close()
        # The first second is warm-up (connections to the sink being opened);
        # the target is about the steady state.  Its worst case is reported too.
        warm = rate
        lat = sorted((arrivals[k] - sent[k]) * 1000 for k in sent if k in arrivals and int(k) >= warm)
        first = [(arrivals[k] - sent[k]) * 1000 for k in sent if k in arrivals and int(k) < warm]
        if not lat:
            return {"p50_ms": None, "p99_ms": None}
        return {"p50_ms": lat[len(lat) // 2], "p99_ms": lat[int(len(lat) * 0.99) - 1],
                "warmup_max_ms": max(first) if first else None,
                "delivered": len(lat) + len(first), "offered": int(rate * seconds)}

    return asyncio.run(run())


async def _client(port: int):
    import asyncio
    reader, writer = await asyncio.open_connection(HOST, port)
    await reader.readline()
    writer.write(b"EHLO bench\r\n")
    while not (await reader.readline()).startswith(b"250 "):
        pass
    return reader, writer, asyncio.Lock()


SCENARIOS = {
    "throughput_1k": lambda cls, a: throughput(cls, a.messages, a.sessions, 1024),
    "throughput_50k": lambda cls, a: throughput(cls, max(a.messages // 4, 10), a.sessions, 50 * 1024),
    "backlog_flush": lambda cls, a: backlog(cls, a.backlog if not a.smoke else 20, a.sessions, flush=True),
    "backlog_default": lambda cls, a: backlog_default(cls, a.backlog if not a.smoke else 20, a.sessions),
    "big_queue": lambda cls, a: big_queue(cls, a.big_queue if not a.smoke else 2000, max(a.messages // 4, 10),
                                          a.sessions),
    "big_messages": lambda cls, a: big_messages(cls, 10 if not a.smoke else 2, 35_000_000 if not a.smoke else 1_000_000),
    "latency": lambda cls, a: latency(cls, 200, 11 if not a.smoke else 2),
}

# Which number decides each scenario, and whether more is better.
HEADLINE = {
    "throughput_1k": ("end_to_end_per_s", True),
    "throughput_50k": ("end_to_end_per_s", True),
    "backlog_flush": ("drain_s", False),
    "backlog_default": ("drain_s", False),
    "big_queue": ("enqueue_ratio_full_over_empty", True),
    "big_messages": ("end_to_end_s", False),
    "latency": ("p99_ms", False),
}


def summarise(runs: list[dict]) -> dict:
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if values:
            out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}
        elif isinstance(runs[0].get(key), str):
            out.setdefault("notes", {})[key] = runs[0][key]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="tiny numbers: checks the harness, measures nothing")
    ap.add_argument("--only", choices=["relaywatch", "postfix"])
    ap.add_argument("--big-queue", type=int, default=1_000_000, help="deferred messages for big_queue")
    ap.add_argument("--backlog", type=int, default=20_000, help="deferred messages for the backlog scenarios")
    a = ap.parse_args()
    if a.smoke:
        a.repeat, a.messages, a.sessions = 1, 40, 4
    ensure_postfix()
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    relays = [cls for cls in (Relaywatch, Postfix) if a.only in (None, cls.name)]
    # backlog_default waits out Postfix's 300 s timers: run it on purpose, not by default.
    scenarios = a.scenario or [s for s in SCENARIOS if s != "backlog_default"]
    results: dict = {"machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                                 "kernel": platform.release()},
                     "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "params": {"messages": a.messages, "sessions": a.sessions, "repeat": a.repeat, "backlog": a.backlog,
                                "big_queue": a.big_queue,
                                "smoke": a.smoke}, "scenarios": {}}
    for name in scenarios:
        runs: dict[str, list[dict]] = {cls.name: [] for cls in relays}
        for i in range(a.repeat):
            for cls in relays:      # alternate, so drift hits both alike
                if name in ("big_messages", "big_queue") and cls is Postfix:
                    continue        # targets on relaywatch's own memory and queue; Postfix is not measured here
                r = SCENARIOS[name](cls, a)
                print(f"{name} #{i + 1} {cls.name}: {json.dumps(r)}", flush=True)
                runs[cls.name].append(r)
        entry = {relay: summarise(rs) for relay, rs in runs.items() if rs}
        key, more_is_better = HEADLINE[name]
        try:
            rw, pf = entry["relaywatch"][key]["median"], entry["postfix"][key]["median"]
            entry["ratio_relaywatch_over_postfix"] = rw / pf if more_is_better else pf / rw
        except (KeyError, ZeroDivisionError, TypeError):
            pass
        entry["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        entry["params"] = dict(results["params"])
        results["scenarios"][name] = entry
    out = RESULTS / ("smoke.json" if a.smoke else "latest.json")
    if out.exists():
        # A run updates the scenarios it ran and keeps the others' last results.
        previous = json.loads(out.read_text())
        previous["scenarios"].update(results["scenarios"])
        previous.update(machine=results["machine"], when=results["when"])
        results = previous
    out.write_text(json.dumps(results, indent=2))
    md = render(results)
    (RESULTS / ("smoke.md" if a.smoke else "latest.md")).write_text(md)
    print(md)


def render(results: dict) -> str:
    lines = [f"# Benchmark results ({results['when']})", "",
             f"{results['machine']['cores']} cores, Python {results['machine']['python']}. Each scenario: "
             "relaywatch and Postfix alternately in the same run; medians (min–max) of the runs.", "",
             "| scenario | when | messages | sessions | runs |", "|---|---|---|---|---|"]
    for name, entry in results["scenarios"].items():
        p = entry.get("params", results["params"])
        count = {"throughput_1k": p["messages"], "throughput_50k": p["messages"] // 4,
                 "backlog_flush": p.get("backlog", p["messages"] // 4),
                 "backlog_default": p.get("backlog", p["messages"] // 4),
                 "big_queue": f"{p['messages'] // 4} (+{p.get('big_queue', 1_000_000)} queued)",
                 "big_messages": 10, "latency": "200/s"}.get(name, p["messages"])
        lines.append(f"| {name} | {entry.get('when', results['when'])} | {count} | {p['sessions']} | {p['repeat']} |")
    lines += ["",
             "| scenario | metric | relaywatch median (min–max) | Postfix median (min–max) | ratio (>1: relaywatch better) |",
             "|---|---|---|---|---|"]
    for name, entry in results["scenarios"].items():
        key, _ = HEADLINE[name]
        metrics = sorted({k for relay in ("relaywatch", "postfix") for k in entry.get(relay, {}) if k != "notes"})
        for metric in metrics:
            cells = []
            for relay in ("relaywatch", "postfix"):
                m = entry.get(relay, {}).get(metric)
                cells.append(f"{m['median']:.1f} ({m['min']:.1f}–{m['max']:.1f})" if m else "–")
            ratio = entry.get("ratio_relaywatch_over_postfix") if metric == key else None
            lines.append(f"| {name} | {metric} | {cells[0]} | {cells[1]} | {f'{ratio:.2f}×' if ratio else ''} |")
    notes = [f"- {name}: {k}: {v}" for name, entry in results["scenarios"].items()
             for k, v in entry.get("relaywatch", {}).get("notes", {}).items()]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


if __name__ == "__main__":
    main()
