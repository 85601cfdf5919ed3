"""What a backlog drain costs: backlog_default (bench/run.py) with counters around the drain.

    .venv/bin/python bench/backlog_cost.py                     # 20,000 messages, 3 runs
    .venv/bin/python bench/backlog_cost.py --runs 1 --profile /tmp/spy   # py-spy on the delivering process
    .venv/bin/python bench/backlog_cost.py --tree old=/work/main --tree new=. --runs 2   # A/B, alternating

The sink goes down, N messages are deferred, the sink comes back, nobody intervenes (as
backlog_default).  Read when the sink comes back and again once it has every message:
utime + stime of the receiving and the delivering process (/proc), the store's commits
(``relaywatch_store_commit_duration_seconds_count``, both processes) and the delivery
attempts (``relaywatch_delivery_attempt_duration_seconds_count``) from the console's
/metrics.  Per message these do not depend on the machine's load the way seconds do.
Prints drain_s, first_s, the rate after the first message, and the counts per message,
with the load average.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import threading
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_ab import cpu_seconds, roles  # noqa: E402
from relays import HOST, Relaywatch, free_port  # noqa: E402
from run import SmtpSink, smtp_source  # noqa: E402


def metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10).read().decode()
    return {key: sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))
            for key, name in (("commits", "relaywatch_store_commit_duration_seconds_count"),
                              ("attempts", "relaywatch_delivery_attempt_duration_seconds_count"))}


class LogWatch(threading.Thread):
    """Tails the relay's log; when (monotonic) the line saying the backlog was released came."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path = path
        self.released_at: float | None = None
        self.stopping = False

    def run(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(0, 2)
            while not self.stopping and self.released_at is None:
                line = f.readline()
                if not line:
                    time.sleep(0.01)
                elif b"released" in line and b"probe of" in line:
                    self.released_at = time.monotonic()


def one_run(tree: Path, messages: int, sessions: int, profile: str | None, label: str) -> dict:
    class TreeRelaywatch(Relaywatch):
        root = tree     # relaywatch imported from this tree (PYTHONPATH)
    http_port = free_port()
    port = free_port()
    relay = TreeRelaywatch(port, extra=f'\n[http]\nlisten = "{HOST}:{http_port}"').start()
    sink = None
    spy = None
    try:
        started = time.monotonic()
        smtp_source(relay.port, messages, sessions, 1024)
        time.sleep(3 + messages / 5000)
        pids = roles(relay.proc.pid)
        if profile:
            Path(profile).mkdir(parents=True, exist_ok=True)
            spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pids["deliver"]),
                                    "--format", "raw", "--rate", "200", "--nonblocking",
                                    "-o", f"{profile}/{label}-deliver.txt"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        before_cpu = {role: sum(cpu_seconds(pid)) for role, pid in pids.items()}
        before = metrics(http_port)
        load = os.getloadavg()
        watch = LogWatch(relay.dir / "relaywatch.log")
        watch.start()
        sink = SmtpSink()
        sink.port = port
        sink.start()
        t0 = time.monotonic()
        first = sink.wait_for(1, timeout=600)
        done = sink.wait_for(messages, timeout=600)
        after_cpu = {role: sum(cpu_seconds(pid)) for role, pid in pids.items()}
        time.sleep(0.3)     # the last outcomes' commits
        after = metrics(http_port)
        n = messages
        watch.stopping = True
        return {"drain_s": done - t0, "first_s": first - t0, "outage_s": t0 - started,
                "released_s": watch.released_at - t0 if watch.released_at else None,
                "rate_after_first": (n - 1) / (done - first),
                "deliver_cpu_ms_per_msg": (after_cpu["deliver"] - before_cpu["deliver"]) * 1000 / n,
                "receive_cpu_ms_per_msg": (after_cpu["receive"] - before_cpu["receive"]) * 1000 / n,
                "commits_per_msg": (after["commits"] - before["commits"]) / n,
                "attempts_per_msg": (after["attempts"] - before["attempts"]) / n,
                "load": "%.2f %.2f" % (load[0], os.getloadavg()[0])}
    finally:
        if spy:
            spy.send_signal(signal.SIGINT)     # py-spy writes its stacks on SIGINT
            spy.wait(30)
        relay.stop()
        if sink:
            sink.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--profile", help="a directory for py-spy's raw stacks of the delivering process")
    ap.add_argument("--tree", action="append", default=[],
                    help="LABEL=PATH: a relaywatch tree to run (several: in turn, each round)")
    a = ap.parse_args()
    trees = [t.split("=", 1) for t in a.tree] or [["run", str(Relaywatch.root)]]
    for i in range(a.runs):
        for label, path in trees:
            r = one_run(Path(path).resolve(), a.messages, a.sessions, a.profile, f"{label}-{i + 1}")
            print(f"{label}: " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
                  flush=True)


if __name__ == "__main__":
    main()
