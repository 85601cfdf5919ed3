"""CPU per message of relaywatch's two processes, for comparing trees (A/B) on a busy machine.

    .venv/bin/python bench/cpu_ab.py --tree old=/tmp/perf-old --tree new=. --rounds 3
    .venv/bin/python bench/cpu_ab.py --tree new=. --messages 5000 --sessions 1      # single session

On a machine shared with other work msg/s moves with the load; the CPU the relay's own
processes spend per message moves much less. Each round runs bench/run.py's throughput
scenario (smtp-source -> relaywatch -> smtp-sink, every message checked through) once per
tree, in turn (A, B, A, B ...), with relaywatch imported from that tree (PYTHONPATH), and
reads utime + stime of the receiving process (`serve`) and of the delivering one (`serve
--role deliver`) from /proc before the load starts and once the queue is empty.
Prints per tree: msg/s end to end and the CPU in ms per message of each process (and how
much of it was the kernel's: stime), median and range over the rounds, with the load average.
``--size`` sets the message size (``--size 51200``: throughput_50k's messages).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from relays import WORK, Relaywatch, process_tree  # noqa: E402
from run import throughput  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """utime and stime (fields 14 and 15 of stat): the process's own work and the kernel's for it."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def roles(root_pid: int) -> dict[str, int]:
    out = {}
    for pid in process_tree(root_pid):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        out["deliver" if b"deliver" in cmd else "receive"] = pid
    return out


def relay_class(tree: Path, queue_extra: str = ""):
    class TreeRelaywatch(Relaywatch):
        root = tree

        def __init__(self, sink_port: int):
            super().__init__(sink_port)
            self.queue_extra += "\n" + queue_extra
            if not (tree / "relaywatch" / "console").is_dir():
                # a tree from before the console (2026-11-27) refuses an [http] section; prepare()
                # adds one only when self.extra does not mention it
                self.extra += "\n# [http]: none in this tree"
    return TreeRelaywatch


PROFILE: dict = {}     # --profile: py-spy's binary and where its stacks go


def watch_cpu(relay) -> callable:
    deadline = time.monotonic() + 30
    while len(pids := roles(relay.proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)     # the delivery process's start-up (imports, the first lease) is not the mail's
    spies = []
    if "dir" in PROFILE:
        PROFILE["n"] = PROFILE.get("n", 0) + 1
        spies = [subprocess.Popen([PROFILE["py_spy"], "record", "--pid", str(pid), "--format", "raw", "--rate", "250",
                                   "--nonblocking", "-o", f"{PROFILE['dir']}/{PROFILE['label']}-{role}-{PROFILE['n']}.txt"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for role, pid in pids.items()]
        time.sleep(1.0)
    if "strace_dir" in PROFILE:
        PROFILE["n"] = PROFILE.get("n", 0) + 1
        spies = [subprocess.Popen(["strace", "-f", "-c", "-p", str(pid), "-o",
                                   f"{PROFILE['strace_dir']}/{PROFILE['label']}-{role}-{PROFILE['n']}.txt"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for role, pid in pids.items()]
        time.sleep(1.0)
    before = {role: cpu_seconds(pid) for role, pid in pids.items()}

    def after() -> dict:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        out = {}
        for role, pid in pids.items():
            (user, sys_), (user0, sys0) = cpu_seconds(pid), before[role]
            out[f"cpu_{role}_s"], out[f"cpu_{role}_sys_s"] = user + sys_ - user0 - sys0, sys_ - sys0
        return out
    return after


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", action="append", required=True, help="label=path")
    ap.add_argument("--queue", action="append", default=[], metavar="LABEL=TOML",
                    help='a line for that tree\'s [queue] section, e.g. off=\'trace_retention = "off"\'')
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--profile", metavar="DIR", help="py-spy record both processes; collapsed stacks into DIR")
    ap.add_argument("--py-spy", default="py-spy")
    ap.add_argument("--strace", metavar="DIR", help="strace -c both processes (syscalls per message; slows them)")
    a = ap.parse_args()
    if a.profile:
        Path(a.profile).mkdir(parents=True, exist_ok=True)
        if shutil.which(a.py_spy) is None:   # before any relay starts: a spy that fails to start left them running
            sys.exit(f"cpu_ab: no py-spy at {a.py_spy!r} (--py-spy PATH)")
        PROFILE.update(dir=a.profile, py_spy=a.py_spy)
    if a.strace:
        Path(a.strace).mkdir(parents=True, exist_ok=True)
        PROFILE.update(strace_dir=a.strace)
    WORK.mkdir(parents=True, exist_ok=True)
    trees = [(label, Path(path).resolve()) for label, path in (t.split("=", 1) for t in a.tree)]
    queue_extra = dict(q.split("=", 1) for q in a.queue)
    runs: dict[str, list[dict]] = {label: [] for label, _ in trees}
    for n in range(a.rounds):
        for label, tree in trees:
            PROFILE["label"] = label
            load = os.getloadavg()[0]
            r = throughput(relay_class(tree, queue_extra.get(label, "")), a.messages, a.sessions, a.size, watch=watch_cpu)
            r["load"] = load
            runs[label].append(r)
            print(f"round {n + 1} {label}: {r['end_to_end_per_s']:.0f} msg/s, receive "
                  f"{r['cpu_receive_s'] / a.messages * 1e3:.3f} ms/msg, deliver "
                  f"{r['cpu_deliver_s'] / a.messages * 1e3:.3f} ms/msg (kernel {r['cpu_receive_sys_s'] / a.messages * 1e3:.3f}"
                  f" / {r['cpu_deliver_sys_s'] / a.messages * 1e3:.3f}), load {load:.1f}", flush=True)
    print(f"\n{a.messages} x {a.size} B, {a.sessions} sessions, {a.rounds} rounds alternating: median (range)")
    for label, rs in runs.items():
        def col(key, scale=1.0):
            v = [r[key] * scale for r in rs]
            return f"{statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f})"
        ms = 1e3 / a.messages
        print(f"{label}: msg/s {col('end_to_end_per_s')}; receive ms/msg {col('cpu_receive_s', ms)}; "
              f"deliver ms/msg {col('cpu_deliver_s', ms)}; of which the kernel's: receive "
              f"{col('cpu_receive_sys_s', ms)}, deliver {col('cpu_deliver_sys_s', ms)}; load {col('load')}")


if __name__ == "__main__":
    main()
