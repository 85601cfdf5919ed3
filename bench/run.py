#!/usr/bin/env python3
"""Benchmarks: relaywatch against Postfix, Exim, OpenSMTPD and Haraka, same machine,
same run, alternating.

    make bench                     # all scenarios, 3 repetitions
    python bench/run.py --smoke    # tiny run, to keep the harness working
    python bench/run.py --scenario throughput_1k --repeat 5 --only relaywatch --only exim

Traffic: Postfix's smtp-source -> relay under test -> Postfix's smtp-sink, all on
127.0.0.1.  Every relay keeps its default durable queue (bench/relays.py has one
class per relay, bench/peers/ their configurations).  Before it is measured, each
relay passes an exactly-once check (every Message-Id once at the sink).  Results
go to bench/results/latest.json and bench/results/latest.md (medians, min-max, and
the ratios relaywatch/each other relay).  Needs the postfix package (installed
here with apt-get when missing); a peer that cannot be installed is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import big_queue as big_queue_file
import cluster
from relays import (HOST, PEER_CLASSES, RELAY_CLASSES, ROOT, WORK, Exim, Postfix, Relay, Relaywatch, free_port,
                    private_dir, proc_status, stop_tree, wait_port)

RESULTS = ROOT / "bench" / "results"


# -- the sink -------------------------------------------------------------------------------------

class SmtpSink:
    """Postfix's smtp-sink, counting messages (-c writes "mesg=N" counters).
    With dump=True it also appends every message to a file (-D), so that
    `recipients()` can tell the messages of `smtp_source(numbered=True)` apart."""

    def __init__(self, delay_ms: int = 0, dump: bool = False):
        self.port = free_port()
        self.out = WORK / f"sink-{self.port}.out"
        self.dump = private_dir("sink", self.port) if dump else None
        self.delay_ms = delay_ms
        self.proc = None

    def start(self) -> "SmtpSink":
        cmd = ["smtp-sink", "-c", "-u", "nobody"]
        if self.dump:
            shutil.chown(self.dump, "nobody")        # smtp-sink writes as -u nobody
            cmd += ["-D", f"{self.dump}/dump."]
        cmd += [f"{HOST}:{self.port}", "1000"]
        self.proc = subprocess.Popen(cmd, stdout=open(self.out, "wb"), stderr=subprocess.STDOUT)
        wait_port(self.port)
        return self

    def count(self) -> int:
        data = self.out.read_bytes()[-200:]
        found = re.findall(rb"mesg=(\d+)", data)
        return int(found[-1]) if found else 0

    def recipients(self) -> list[bytes]:
        """The envelope recipient of every message received, in the order received."""
        return [r for f in sorted(self.dump.iterdir())
                for r in re.findall(rb"(?m)^X-Rcpt-Args: (\S+)", f.read_bytes())]

    def wait_for(self, n: int, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count() >= n:
                return time.monotonic()
            if self.proc.poll() is not None:
                raise RuntimeError(f"smtp-sink exited: {self.out.read_bytes()[-300:].decode(errors='replace')}")
            time.sleep(0.01)
        raise RuntimeError(f"sink got {self.count()} of {n} messages within {timeout}s")

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait()
            self.out.unlink(missing_ok=True)
            if self.dump:
                shutil.rmtree(self.dump, ignore_errors=True)


def wait_queue_empty(relay: Relay, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (left := relay.queue_size()) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        raise RuntimeError(f"{relay.name} still has {left} messages queued after {timeout}s")


def smtp_source(port: int, messages: int, sessions: int, size: int, reuse: bool = True,
                numbered: bool = False) -> float:
    """numbered: every message to its own recipient (smtp-source -N: 1rcpt@, 2rcpt@ ...).
    (Its Message-Ids are not unique: pid, socket and a counter shared by the sessions.)"""
    cmd = ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size),
           "-f", "bench@client.test", "-t", "rcpt@sink.test"]
    if reuse:
        cmd.append("-d")
    if numbered:
        cmd.append("-N")
    cmd.append(f"{HOST}:{port}")
    started = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


# -- scenarios ------------------------------------------------------------------------------------

def throughput(relay_cls, messages: int, sessions: int, size: int, watch=None) -> dict:
    """watch: called with the started relay, returns what to call (for a dict) once the run is over."""
    sink = SmtpSink().start()
    relay = relay_cls(sink.port).start()
    watching = watch(relay) if watch else None
    try:
        t0 = time.monotonic()
        inject = smtp_source(relay.port, messages, sessions, size)
        done = sink.wait_for(messages, timeout=600)
        # Once the relay's queue is empty, more at the sink than was sent means duplicates.
        wait_queue_empty(relay, timeout=60)
        if sink.count() != messages:
            raise RuntimeError(f"{relay.name}: the sink got {sink.count()} messages for {messages} sent")
        return {"inject_per_s": messages / inject, "end_to_end_s": done - t0,
                "end_to_end_per_s": messages / (done - t0), **(watching() if watching else {})}
    finally:
        relay.stop()
        sink.stop()


class ConsolePoller:
    """What an open console and a Prometheus server do to a relay: /metrics scraped
    every second, and the overview page, its live part (what an open browser tab
    polls) and the API's connectors, incidents and first queue page fetched every
    second, each in order, from a thread of this process."""

    PATHS = ("/metrics", "/", "/fragments/overview", "/api/v1/connectors", "/api/v1/incidents",
             "/api/v1/queue?limit=50")

    def __init__(self, port: int, interval: float = 1.0):
        import threading
        self.port, self.interval = port, interval
        self.times: dict[str, list[float]] = {p: [] for p in self.PATHS}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console-poller", daemon=True)

    def start(self) -> "ConsolePoller":
        import http.client
        deadline = time.monotonic() + 20
        while True:     # the console may open its listener a moment after the SMTP one
            try:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=2)
                conn.request("GET", "/healthz")
                ok = conn.getresponse().status == 200
                conn.close()
                if ok:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"no console on {HOST}:{self.port}")
            time.sleep(0.05)
        self._thread.start()
        return self

    def _run(self) -> None:
        import http.client
        while not self._stop.is_set():
            tick = time.monotonic()
            for path in self.PATHS:
                t = time.perf_counter()
                try:
                    conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
                    conn.request("GET", path)
                    response = conn.getresponse()
                    response.read()
                    conn.close()
                    if response.status != 200:
                        self.failures.append(f"{path}: {response.status}")
                except OSError as exc:
                    self.failures.append(f"{path}: {exc}")
                self.times[path].append(time.perf_counter() - t)
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - tick)))

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(15)
        scrapes = sorted(self.times["/metrics"])
        out = {"scrapes": len(scrapes), "poll_failures": len(self.failures)}
        if scrapes:
            out["metrics_p99_ms"] = scrapes[min(len(scrapes) - 1, int(len(scrapes) * 0.99))] * 1000
        if self.failures:
            out["first_failure"] = self.failures[0]
        return out


_console_calls = 0


def throughput_console(relay_cls, messages: int, sessions: int, size: int) -> dict:
    """throughput_1k twice in one call: the console off, and on with /metrics
    scraped and the overview's API polled every second; which goes first
    alternates from one call to the next, so drift hits both alike."""
    global _console_calls
    _console_calls += 1

    def plain_run() -> dict:
        return throughput(lambda port: relay_cls(port, extra='\n[http]\nlisten = "off"'), messages, sessions, size)

    def watched_run() -> dict:
        http_port = free_port()
        return throughput(lambda port: relay_cls(port, extra=f'\n[http]\nlisten = "{HOST}:{http_port}"'),
                          messages, sessions, size, watch=lambda relay: ConsolePoller(http_port).start().stop)
    if _console_calls % 2:
        plain, watched = plain_run(), watched_run()
    else:
        watched, plain = watched_run(), plain_run()
    polled = {k: watched[k] for k in ("scrapes", "poll_failures", "metrics_p99_ms", "first_failure") if k in watched}
    if polled.get("poll_failures"):
        raise RuntimeError(f"the console failed while polled: {polled.get('first_failure')}")
    return {"without_per_s": plain["end_to_end_per_s"], "with_per_s": watched["end_to_end_per_s"],
            "with_over_without": watched["end_to_end_per_s"] / plain["end_to_end_per_s"],
            "inject_with_over_without": watched["inject_per_s"] / plain["inject_per_s"], **polled}


def delivery_check(relay_cls, messages: int, sessions: int, timeout: float = 120) -> dict:
    """Every message exactly once: each message goes to its own recipient, the
    sink keeps every message, and once the relay says its queue is empty each
    recipient must have arrived once."""
    sink = SmtpSink(dump=True).start()
    relay = relay_cls(sink.port).start()
    try:
        try:
            smtp_source(relay.port, messages, sessions, 1024, numbered=True)
            sink.wait_for(messages, timeout=timeout)
            wait_queue_empty(relay, timeout=60)
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            return {"ok": False, "sent": messages, "received": sink.count(), "note": str(exc)}
        ids = sink.recipients()
        unique = len(set(ids))
        return {"ok": len(ids) == unique == messages, "sent": messages, "received": len(ids),
                "distinct": unique, "duplicates": len(ids) - unique}
    finally:
        relay.stop()
        sink.stop()


def backlog(relay_cls, messages: int, sessions: int, flush: bool) -> dict:
    """Destination down while `messages` are queued; then back.  Time to empty
    (drain_s), and what it is made of: until the first message reaches the sink
    (first_s: how soon the relay noticed, or the flush took effect) and the rest;
    outage_s, how long the destination was away (relaywatch probes a younger
    backlog more often)."""
    port = free_port()
    relay = relay_cls(port).start()
    sink = None
    try:
        started = time.monotonic()
        smtp_source(relay.port, messages, sessions, 1024)
        time.sleep(3 + messages / 5000)   # let every message be tried once and deferred
        sink = SmtpSink()
        sink.port = port
        sink.start()
        t0 = time.monotonic()
        if flush:
            relay.flush()
        first = sink.wait_for(1, timeout=1200)
        done = sink.wait_for(messages, timeout=1200)
        return {"drain_s": done - t0, "first_s": first - t0, "outage_s": t0 - started}
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


def queue_list_times(config: Path) -> dict:
    """``relaywatch queue list --limit 50 --json``, the whole command: ``queue_list_50_s`` as this
    environment runs it (with PYTHONDONTWRITEBYTECODE set, as here, Python compiles every module of
    relaywatch at each start: a source tree nobody compiled), ``queue_list_50_compiled_s`` with
    bytecode cached, as pip's install has it (a private PYTHONPYCACHEPREFIX, written by one run
    before), and ``version_compiled_s``: ``relaywatch --version`` alike, Python's start-up and the
    CLI's own imports without the command's."""
    def timed(*args: str, cached: bool = False) -> float:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        if cached:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(WORK / "pycache")
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "relaywatch", *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                       env=env)
        return time.monotonic() - started
    listing = ("queue", "list", "--limit", "50", "--json", "-c", str(config))
    out = {"queue_list_50_s": timed(*listing)}
    timed(*listing, cached=True)
    out["queue_list_50_compiled_s"] = timed(*listing, cached=True)
    out["version_compiled_s"] = timed("--version", cached=True)
    return out


# A connector whose destination refuses (port 1): what the big queues are deferred on.
BACKLOG_CONNECTOR = f"""
[[connectors]]
name = "backlog"
type = "on_premises"
domains = ["backlog.test"]
smart_hosts = ["{HOST}:1"]
tls = "none"
"""


def big_queue(relay_cls, size: int, probe_messages: int, sessions: int) -> dict:
    """A queue holding `size` deferred messages (bench/big_queue.py fills it, or a fill kept
    from before, which main() deletes after the last repeat unless --big-queue-keep): server
    start, memory, `queue list` latency, and the enqueue rate compared with an empty queue."""
    if relay_cls is not Relaywatch:
        return {}
    out: dict = {}
    cache = big_queue_file.cached(size)
    for label, fill in (("empty", 0), ("full", size)):
        sink = SmtpSink().start()
        relay = Relaywatch(sink.port, extra_connectors=BACKLOG_CONNECTOR, queue_extra='retry_intervals = ["24h"]')
        relay.prepare()
        queue_file = relay.dir / "data" / "queue.sqlite3"
        if fill:
            if not cache.exists():
                out["fill_s"] = big_queue_file.fill(size)
            cache.rename(queue_file)     # and back below: one fill serves several runs
        started = time.monotonic()
        try:
            relay.launch()
            out[f"start_s_{label}"] = time.monotonic() - started
            time.sleep(2)
            t0 = time.monotonic()
            inject = smtp_source(relay.port, probe_messages, sessions, 1024)
            sink.wait_for(probe_messages, timeout=600)
            out[f"inject_per_s_{label}"] = probe_messages / inject
            out[f"end_to_end_per_s_{label}"] = probe_messages / (time.monotonic() - t0)
            # Empty too: most of the command is Python's start-up and imports, the same for both.
            times = queue_list_times(relay.dir / "relaywatch.toml")
            out.update({key + ("" if fill else "_empty"): value for key, value in times.items()})
            if fill:
                time.sleep(6)    # at least one watch evaluation over the whole queue
                pids = [relay.proc.pid] + [int(p) for p in subprocess.run(
                    ["pgrep", "-P", str(relay.proc.pid)], capture_output=True, text=True).stdout.split()]
                out["peak_rss_mb"] = max(proc_status(p, "VmHWM") for p in pids) / 1024
                out["due_query_plan"] = _due_plan(queue_file)
        finally:
            if fill and relay.proc:
                stop_tree(relay.proc)    # stopped before its queue goes back: relay.stop() removes its directory
            if fill:
                for suffix in ("", "-wal", "-shm"):
                    if Path(f"{queue_file}{suffix}").exists():
                        Path(f"{queue_file}{suffix}").rename(f"{cache}{suffix}")
            relay.stop()
            sink.stop()
    out["loadavg"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
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
        # the server process itself, as peak_rss_kb() (its delivery child is another process)
        before = proc_status(relay.proc.pid, "VmRSS") if isinstance(relay, Relaywatch) else None
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
                reader, writer, lock, pipelining = clients[i % len(clients)]
                body = (f"Subject: t\r\nX-Bench-Id: {i}\r\n\r\n" + "x" * 900 + "\r\n.\r\n").encode()
                commands = [b"MAIL FROM:<b@client.test>\r\n", b"RCPT TO:<r@sink.test>\r\n", b"DATA\r\n"]
                async with lock:
                    if pipelining:
                        writer.write(b"".join(commands))
                        for _ in commands:
                            await reader.readline()
                    else:       # OpenSMTPD does not offer PIPELINING by default
                        for command in commands:
                            writer.write(command)
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
    pipelining = False
    while True:
        line = await reader.readline()
        pipelining |= line[4:].strip().upper() == b"PIPELINING"
        if not line.startswith(b"250-"):
            break
    return reader, writer, asyncio.Lock(), pipelining


SCENARIOS = {
    "throughput_1k": lambda cls, a: throughput(cls, a.messages, a.sessions, 1024),
    "throughput_50k": lambda cls, a: throughput(cls, max(a.messages // 4, 10), a.sessions, 50 * 1024),
    # One client sending serially: each message waits for its own commit (no group commit).
    "single_session": lambda cls, a: throughput(cls, single_session_messages(a.smoke, a.messages), 1, 1024),
    "backlog_flush": lambda cls, a: backlog(cls, a.backlog if not a.smoke else 20, a.sessions, flush=True),
    "backlog_default": lambda cls, a: backlog_default(cls, a.backlog if not a.smoke else 20, a.sessions),
    "big_queue": lambda cls, a: big_queue(cls, big_queue_size(a), max(a.messages // 4, 10), a.sessions),
    "big_messages": lambda cls, a: big_messages(cls, 10 if not a.smoke else 2, 35_000_000 if not a.smoke else 1_000_000),
    "latency": lambda cls, a: latency(cls, a.latency_rate, 11 if not a.smoke else 2),
    "throughput_console": lambda cls, a: throughput_console(cls, a.messages, a.sessions, 1024),
    # PostgreSQL (bench/cluster.py): relaywatch and Postfix; relaywatch alone
    "throughput_1k_pg": lambda cls, a: cluster.throughput_pg(sys.modules[__name__], cls, a.messages, a.sessions,
                                                             1024),
    "cluster_nodes": lambda cls, a: cluster.cluster_nodes(sys.modules[__name__], cls, a.messages, a.sessions, 1024),
    "big_queue_pg": lambda cls, a: cluster.big_queue_pg(sys.modules[__name__], cls,
                                                        a.big_queue if not a.smoke else 2000,
                                                        max(a.messages // 4, 10), a.sessions,
                                                        settle=60.0 if not a.smoke else 2.0),
}

def big_queue_size(a) -> int:
    return a.big_queue if not a.smoke else 2000


def single_session_messages(smoke: bool, messages: int) -> int:
    """5,000, a quarter of the default count (one session is slower); smoke: the smoke count."""
    return messages if smoke else max(messages // 4, 10)


# Which number decides each scenario, and whether more is better.
HEADLINE = {
    "throughput_1k": ("end_to_end_per_s", True),
    "throughput_50k": ("end_to_end_per_s", True),
    "single_session": ("end_to_end_per_s", True),
    "backlog_flush": ("drain_s", False),
    "backlog_default": ("drain_s", False),
    "big_queue": ("enqueue_ratio_full_over_empty", True),
    "big_messages": ("end_to_end_s", False),
    "latency": ("p99_ms", False),
    "throughput_console": ("with_over_without", True),
    "throughput_1k_pg": ("end_to_end_per_s", True),
    "cluster_nodes": ("nodes3_over_nodes1", True),
    "big_queue_pg": ("lease_none_due_ms", False),
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


# Scenarios about relaywatch's own memory and queue: the other relays are not measured there.
RELAYWATCH_ONLY = ("big_messages", "big_queue", "throughput_console", "cluster_nodes", "big_queue_pg")
# Scenarios against the reference only (the other peers have no PostgreSQL queue to compare).
POSTFIX_ONLY = ("throughput_1k_pg",)


def ready_relays(names: list[str] | None, classes=RELAY_CLASSES, peers=PEER_CLASSES,
                 ) -> tuple[list[type], dict[str, str]]:
    """The relays to run (all, or those named), installed; a peer that cannot be
    installed is skipped with its reason.  (Postfix, the reference and the load
    and the sink, is installed before, and failing that the run fails.)"""
    relays, skipped = [], {}
    for cls in classes:
        if names and cls.name not in names:
            continue
        reason = cls.install() if cls in peers else None
        if reason:
            print(f"skipping {cls.name}: {reason}", flush=True)
            skipped[cls.name] = reason
        else:
            relays.append(cls)
    return relays, skipped


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    ap.add_argument("--repeat", type=int, help="default 3 (smoke: 1)")
    ap.add_argument("--messages", type=int, help="default 20000 (smoke: 40)")
    ap.add_argument("--sessions", type=int, help="default 20 (smoke: 4)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny numbers (unless given): checks the harness, measures nothing; writes results/smoke.*")
    ap.add_argument("--only", action="append", choices=[cls.name for cls in RELAY_CLASSES],
                    help="run only this relay (repeatable); default: all, peers skipped when they cannot be installed")
    ap.add_argument("--check-messages", type=int,
                    help="messages of the exactly-once check each relay passes before it is measured "
                         "(default 500, smoke: 100)")
    ap.add_argument("--exim-queue-per-connection", type=int, default=Exim.queue_per_connection,
                    help="Exim's smtp_accept_queue_per_connection (Exim's default: 10; see bench/README.md)")
    ap.add_argument("--latency-rate", type=int, default=500,
                    help="messages/s the latency scenario offers (500; 200 until 2026-12-01)")
    ap.add_argument("--big-queue", type=int, default=1_000_000, help="deferred messages for big_queue")
    ap.add_argument("--big-queue-keep", action="store_true",
                    help="keep big_queue's filled queue (bench/work/big_queue-N.sqlite3, GBs) for the next run; "
                         "a kept one is used instead of filling (bench/big_queue.py)")
    ap.add_argument("--backlog", type=int, default=20_000, help="deferred messages for the backlog scenarios")
    a = ap.parse_args()
    Exim.queue_per_connection = a.exim_queue_per_connection
    defaults = {"repeat": 1, "messages": 40, "sessions": 4, "check_messages": 100} if a.smoke else \
        {"repeat": 3, "messages": 20000, "sessions": 20, "check_messages": 500}
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    Postfix.install()
    relays, skipped = ready_relays(a.only)
    # backlog_default waits out Postfix's 300 s timers: run it on purpose, not by default.
    # The PostgreSQL ones need a server (RELAYWATCH_BENCH_PG): named, not by default either.
    scenarios = a.scenario or [s for s in SCENARIOS if s not in ("backlog_default", *cluster.SCENARIOS)]
    results: dict = {"machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                                 "kernel": platform.release()},
                     "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "params": {"messages": a.messages, "sessions": a.sessions, "repeat": a.repeat, "backlog": a.backlog,
                                "big_queue": a.big_queue, "latency_rate": a.latency_rate,
                                "smoke": a.smoke}, "scenarios": {}, "skipped": skipped, "delivery_check": {}}
    failed = []
    if any(s not in RELAYWATCH_ONLY for s in scenarios):
        for cls in list(relays):
            check = delivery_check(cls, a.check_messages, a.sessions)
            print(f"delivery check {cls.name}: {json.dumps(check)}", flush=True)
            results["delivery_check"][cls.name] = check
            if not check["ok"]:
                print(f"{cls.name} FAILED the exactly-once check: not measured", flush=True)
                relays.remove(cls)
                failed.append(cls.name)
    for name in scenarios:
        runs: dict[str, list[dict]] = {cls.name: [] for cls in relays}
        for i in range(a.repeat):
            for cls in relays:      # alternate, so drift hits all alike
                if name in RELAYWATCH_ONLY and cls is not Relaywatch or name in POSTFIX_ONLY and cls not in (
                        Relaywatch, Postfix):
                    continue
                try:
                    r = SCENARIOS[name](cls, a)
                except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
                    if cls in (Relaywatch, Postfix):
                        raise
                    r = {"error": str(exc)}
                    failed.append(f"{cls.name} in {name}")
                print(f"{name} #{i + 1} {cls.name}: {json.dumps(r)}", flush=True)
                runs[cls.name].append(r)
        entry = {relay: summarise(rs) for relay, rs in runs.items() if rs}
        key, more_is_better = HEADLINE[name]
        for other in [cls.name for cls in relays if cls is not Relaywatch]:
            try:
                rw, them = entry["relaywatch"][key]["median"], entry[other][key]["median"]
                entry[f"ratio_relaywatch_over_{other}"] = rw / them if more_is_better else them / rw
            except (KeyError, ZeroDivisionError, TypeError):
                pass
        entry["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        entry["params"] = dict(results["params"])
        results["scenarios"][name] = entry
    if not a.big_queue_keep:
        big_queue_file.remove(big_queue_size(a))   # GBs at ten million
    out = RESULTS / ("smoke.json" if a.smoke else "latest.json")
    if out.exists():
        # A run updates the scenarios it ran and keeps the others' last results.
        previous = json.loads(out.read_text())
        previous["scenarios"].update(results["scenarios"])
        previous.setdefault("delivery_check", {}).update(results["delivery_check"])
        previous.update(machine=results["machine"], when=results["when"], skipped=skipped)
        results = previous
    out.write_text(json.dumps(results, indent=2))
    md = render(results)
    (RESULTS / ("smoke.md" if a.smoke else "latest.md")).write_text(md)
    print(md)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


def render(results: dict) -> str:
    names = [cls.name for cls in RELAY_CLASSES
             if any(cls.name in entry for entry in results["scenarios"].values())]
    lines = [f"# Benchmark results ({results['when']})", "",
             f"{results['machine']['cores']} cores, Python {results['machine']['python']}. Each scenario: "
             "the relays alternately in the same run; medians (min–max) of the runs; "
             "×: how many times better relaywatch is.", ""]
    if results.get("params", {}).get("smoke"):
        lines += ["**Smoke run: tiny sizes, one run each. These numbers check the harness; they are not results.**",
                  ""]
    lines += ["| scenario | when | messages | sessions | runs |", "|---|---|---|---|---|"]
    for name, entry in results["scenarios"].items():
        p = entry.get("params", results["params"])
        count = {"throughput_1k": p["messages"], "throughput_50k": max(p["messages"] // 4, 10),
                 "single_session": single_session_messages(p.get("smoke", False), p["messages"]),
                 "backlog_flush": p.get("backlog", p["messages"] // 4) if not p.get("smoke") else 20,
                 "backlog_default": p.get("backlog", p["messages"] // 4) if not p.get("smoke") else 20,
                 "big_queue": f"{max(p['messages'] // 4, 10)} "
                              f"(+{p.get('big_queue', 1_000_000) if not p.get('smoke') else 2000} queued)",
                 "big_messages": 10 if not p.get("smoke") else 2, "latency": f"{p.get('latency_rate', 200)}/s",
                 "big_queue_pg": f"{max(p['messages'] // 4, 10)} "
                                 f"(+{p.get('big_queue', 1_000_000) if not p.get('smoke') else 2000} queued)",
                 }.get(name, p["messages"])
        sessions = 1 if name == "single_session" else p["sessions"]
        lines.append(f"| {name} | {entry.get('when', results['when'])} | {count} | {sessions} | {p['repeat']} |")
    checks = results.get("delivery_check", {})
    if checks:
        lines += ["", "Exactly-once check before measuring (a recipient per message, each counted at the sink):", ""]
        for relay, c in checks.items():
            verdict = "ok" if c.get("ok") else "FAILED"
            lines.append(f"- {relay}: {verdict}, {c.get('received')} received of {c.get('sent')} sent, "
                         f"{c.get('duplicates', '?')} duplicates{(' (' + c['note'] + ')') if c.get('note') else ''}")
    for relay, reason in results.get("skipped", {}).items():
        lines.append(f"- {relay}: skipped ({reason})")
    lines += ["", "| scenario | metric | " + " | ".join(f"{n} median (min–max)" for n in names) + " |",
              "|---|---|" + "---|" * len(names)]
    for name, entry in results["scenarios"].items():
        key, _ = HEADLINE[name]
        metrics = sorted({k for relay in names for k in entry.get(relay, {}) if k != "notes"})
        for metric in metrics:
            cells = []
            for relay in names:
                m = entry.get(relay, {}).get(metric)
                cell = f"{_num(m['median'])} ({_num(m['min'])}–{_num(m['max'])})" if m else "–"
                ratio = entry.get(f"ratio_relaywatch_over_{relay}") if metric == key else None
                cells.append(f"{cell} **{ratio:.2f}×**" if ratio else cell)
            lines.append(f"| {name} | {metric} | " + " | ".join(cells) + " |")
    notes = [f"- {name}: {relay}: {k}: {v}" for name, entry in results["scenarios"].items()
             for relay in names for k, v in entry.get(relay, {}).get("notes", {}).items()]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _num(value: float) -> str:
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"


if __name__ == "__main__":
    main()
