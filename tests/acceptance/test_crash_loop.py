"""A crash loop under load (hardening issue 9, "tests the project itself keeps").

``python -m relaywatch serve`` runs as a real process pair (receiver + delivery
process) while client threads send mail without pause.  Round after round the
receiver, the delivery process, or both get SIGKILL (a killed receiver is
started again at once, as a service manager would; a killed delivery process
is restarted by the receiver).  Then the queue drains and:

- every message that got ``250`` to DATA reached the destination;
- duplicates are bounded by what can be in flight when a delivery process
  dies: each kill can repeat at most the entries one delivery process holds
  leased (``delivery.concurrency * 4``, Scheduler._max_inflight).

The fast version (3 rounds) runs in the default suite; RELAYWATCH_LONG_TESTS=1
runs 15 rounds with more mail per round.
"""

import asyncio
import json
import os
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import (LOOPBACK, STARTUP, CountingSink, Load, Sink, base_config, eventually, every_acknowledged_delivered,
                     free_port, to_toml)

ROOT = Path(__file__).resolve().parents[2]
LONG = os.environ.get("RELAYWATCH_LONG_TESTS") == "1"
CONCURRENCY = 4
IN_FLIGHT_PER_KILL = CONCURRENCY * 4      # entries one delivery process holds leased at most


class Serve:
    """``relaywatch serve`` as a process pair; killed and started again at will."""

    def __init__(self, tmp_path: Path, sink_port: int):
        self.port = free_port()
        config = base_config(
            tmp_path,
            server={"listen": [f"{LOOPBACK}:{self.port}"], "delivery_process": True, "shutdown_grace": "2s"},
            queue={"retry_intervals": ["0.5s"], "message_expiration": "1h", "lease_time": "5s"},
            delivery={"concurrency": CONCURRENCY, "per_destination": CONCURRENCY},
            connectors=[{"name": "onprem", "type": "on_premises", "domains": ["fabrikam.test"],
                         "smart_hosts": [f"{LOOPBACK}:{sink_port}"], "tls": "none"}])
        self.config_path = tmp_path / "relaywatch.toml"
        self.config_path.write_text(to_toml(config))
        self.log_path = tmp_path / "relaywatch.log"
        self.env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc: subprocess.Popen | None = None
        self.log = None

    async def start(self) -> None:
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "relaywatch", "serve", "-c", str(self.config_path)],
                                     stdout=self.log, stderr=self.log, env=self.env)
        await eventually(self._listening, timeout=STARTUP, what="the server to listen")
        await eventually(self.child, what="the delivery process")

    def _listening(self) -> bool:
        assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
        try:
            with smtplib.SMTP(LOOPBACK, self.port, timeout=2) as c:
                return c.noop()[0] == 250
        except OSError:
            return False

    def child(self) -> int | None:
        try:
            pids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return None
        return int(pids[0]) if pids else None

    async def kill_receiver(self) -> None:
        self.proc.kill()
        await asyncio.to_thread(self.proc.wait)
        self.log.close()

    async def kill_delivery(self) -> None:
        child = self.child()
        os.kill(child, signal.SIGKILL)
        # The receiver restarts it (after its back-off).
        await eventually(lambda: self.child() not in (None, child), timeout=30, what="a new delivery process")

    async def kill_both(self) -> None:
        child = self.child()
        os.kill(child, signal.SIGKILL)
        self.proc.kill()
        await asyncio.to_thread(self.proc.wait)
        self.log.close()

    async def queue(self) -> list:
        out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "relaywatch", "queue", "list",
                                                       "--json", "-c", str(self.config_path)],
                                      env=self.env, capture_output=True, check=True)
        return json.loads(out.stdout)["messages"]

    async def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(self.proc.wait, 30)
        self.log.close()
        return code


async def _crash_loop(tmp_path, rounds: list[str], per_round: int):
    handler = CountingSink()
    sink = await Sink(handler).start()
    serve = Serve(tmp_path, sink.port)
    await serve.start()
    load = Load(serve.port).start()
    started = time.monotonic()
    try:
        for kind in rounds:
            acked, delivered = len(load.acked), sum(handler.seen.values())
            # Under load: mail is being accepted and delivered when the kill comes.
            await eventually(lambda: len(load.acked) >= acked + per_round
                             and sum(handler.seen.values()) >= delivered + per_round // 2,
                             timeout=60, what=f"progress before killing the {kind}")
            if kind == "delivery":
                await serve.kill_delivery()
            else:
                await (serve.kill_receiver() if kind == "receiver" else serve.kill_both())
                await serve.start()
        await eventually(lambda: len(load.acked) >= acked + per_round, timeout=60, what="mail after the last kill")
    finally:
        load.stop()
    try:
        acked = await every_acknowledged_delivered(load, handler, timeout=60)
        assert await eventually(lambda: _empty(serve), timeout=30, what="the queue to drain")
        duplicates = sum(n - 1 for n in handler.seen.values() if n > 1)
        bound = len(rounds) * IN_FLIGHT_PER_KILL
        print(f"crash loop: {len(rounds)} kills ({', '.join(rounds)}), {len(acked)} acknowledged, "
              f"{sum(handler.seen.values())} delivered, {duplicates} duplicates (bound {bound}), "
              f"{load.failures} client errors while down, {time.monotonic() - started:.1f}s")
        assert "?" not in handler.seen
        assert duplicates <= bound
    finally:
        assert await serve.stop() == 0
        await sink.stop()


async def _empty(serve: Serve) -> bool:
    return await serve.queue() == []


async def test_crash_loop_loses_no_acknowledged_message(tmp_path):
    await _crash_loop(tmp_path, ["delivery", "receiver", "both"], per_round=100)


@pytest.mark.skipif(not LONG, reason="long crash loop: set RELAYWATCH_LONG_TESTS=1")
async def test_crash_loop_long(tmp_path):
    await _crash_loop(tmp_path, ["delivery", "receiver", "both"] * 5, per_round=300)
