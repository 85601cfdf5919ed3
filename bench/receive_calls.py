"""Python calls per message on the receiving process's event-loop thread, counted by cProfile.

    .venv/bin/python bench/receive_calls.py --tree . --messages 6000 --sessions 1

py-spy's shares are not CPU on a loaded 2-core machine (a thread waiting for a core is
sampled as running); counts of calls do not move with the load. A sitecustomize on the
relay's PYTHONPATH gives the receiving process (not ``--role deliver``) a SIGUSR2 handler that
starts a cProfile of the main thread (the event loop) and, on the second SIGUSR2, stops it
and writes the stats; the two signals go ``--start`` s into the run and ``--window`` s apart,
so start-up and the last messages are outside. Messages in the window are the calls of
``received_header`` (one per message); prints the functions with the most calls per message.
The store's writer thread is profiled from its start (a thread can only profile itself) to the
second signal, per batch; and each thread's utime and stime over the run come from
/proc/PID/task/TID/stat (the main thread is the event loop).
"""

from __future__ import annotations

import argparse
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_ab import TICK, relay_class, roles  # noqa: E402
from relays import WORK  # noqa: E402
from relays import wait_port  # noqa: E402
from run import throughput  # noqa: E402

SITECUSTOMIZE = '''
import os, signal, sys, threading
if "deliver" not in sys.argv and os.environ.get("RW_CPROFILE_OUT"):
    import cProfile
    _state = {}
    _run = threading.Thread.run
    def _profiled_run(self):
        # The store's writer thread: profiled from its start (a profile is per thread and
        # only the thread itself can start it); dumped with the loop's at the second signal.
        if self.name != "relaywatch-store-writer":
            return _run(self)
        _state["writer"] = p = cProfile.Profile()
        p.enable()
        try:
            return _run(self)
        finally:
            p.disable()
    threading.Thread.run = _profiled_run
    def _toggle(signum, frame):
        if "p" not in _state:
            _state["p"] = cProfile.Profile()
            _state["p"].enable()
        else:
            _state["p"].disable()
            _state["p"].dump_stats(os.environ["RW_CPROFILE_OUT"])
            if "writer" in _state:
                _state["writer"].dump_stats(os.environ["RW_CPROFILE_OUT"] + ".writer")
    signal.signal(signal.SIGUSR2, _toggle)
'''


def thread_cpu(pid: int) -> dict[int, tuple[float, float]]:
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        out[int(task.name)] = int(fields[11]) / TICK, int(fields[12]) / TICK
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", default=".")
    ap.add_argument("--messages", type=int, default=6000)
    ap.add_argument("--sessions", type=int, default=1)
    ap.add_argument("--start", type=float, default=3.0)
    ap.add_argument("--window", type=float, default=4.0)
    ap.add_argument("--top", type=int, default=45)
    ap.add_argument("--out", default=None, help="keep the stats here (default: a temporary file)")
    a = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    tree = Path(a.tree).resolve()
    site = Path(tempfile.mkdtemp(prefix="rw-cprofile-"))
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    out = Path(a.out or site / "receive.prof").resolve()
    base = relay_class(tree)

    class Profiled(base):
        def launch(self) -> None:
            self.log = open(self.dir / "relaywatch.log", "wb")
            self.proc = subprocess.Popen([sys.executable, "-m", "relaywatch", "serve", "-c",
                                          str(self.dir / "relaywatch.toml")],
                                         stdout=self.log, stderr=subprocess.STDOUT, cwd=tree,
                                         env=dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{site}",
                                                  RW_CPROFILE_OUT=str(out)))
            wait_port(self.port, timeout=self.start_timeout, proc=self.proc)

    def watch(relay):
        deadline = time.monotonic() + 30
        while len(pids := roles(relay.proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)

        def signals():
            time.sleep(a.start)
            os.kill(pids["receive"], signal.SIGUSR2)
            time.sleep(a.window)
            os.kill(pids["receive"], signal.SIGUSR2)
        t = threading.Thread(target=signals, daemon=True)
        t.start()
        before = thread_cpu(pids["receive"])

        def after() -> dict:
            t.join()
            now = thread_cpu(pids["receive"])
            return {"threads": {tid: (u - before.get(tid, (0, 0))[0], s_ - before.get(tid, (0, 0))[1])
                                for tid, (u, s_) in now.items()}, "pid": pids["receive"]}
        return after

    r = throughput(Profiled, a.messages, a.sessions, 1024, watch=watch)
    print(f"{r['end_to_end_per_s']:.0f} msg/s end to end, load {os.getloadavg()[0]:.1f}")
    # CPU per message of each of the receiving process's threads over the whole run (the main
    # thread is the event loop; the busiest other is the store's writer)
    for tid, (user, sys_) in sorted(r["threads"].items(), key=lambda kv: -sum(kv[1]))[:4]:
        role = "loop" if tid == r["pid"] else "thread"
        print(f"  {role} {tid}: user {user / a.messages * 1e3:.3f} + kernel {sys_ / a.messages * 1e3:.3f} ms/msg")
    for _ in range(50):
        if out.exists():
            break
        time.sleep(0.1)
    st = pstats.Stats(str(out))
    n = max([v[1] for k, v in st.stats.items() if k[2] == "received_header"] or [1])
    total = sum(v[1] for v in st.stats.values())
    print(f"{n} messages in the window; {total / n:.0f} Python calls per message on the loop thread")
    show(st, n, a.top)
    writer = Path(f"{out}.writer")
    if writer.exists():
        # The writer thread, from its start to the second signal: per batch (with one message
        # in flight, one batch is one message's commit).
        st = pstats.Stats(str(writer))
        runs = max([v[1] for k, v in st.stats.items() if k[2] == "_run_ops"] or [1])
        total = sum(v[1] for v in st.stats.values())
        print(f"\nwriter thread: {runs} batches; {total / runs:.0f} Python calls per batch")
        show(st, runs, a.top // 2)


def show(st: pstats.Stats, n: int, top: int) -> None:
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][1])[:top]
    for (file, line, name), (cc, nc, tt, ct, _) in rows:
        print(f"{nc / n:8.2f}  {Path(file).name}:{line} {name}")


if __name__ == "__main__":
    main()
