"""Three real ``relaywatch serve`` nodes on one PostgreSQL schema under continuous load,
killed (kill -9) and started again one after the other, the leader too (issue 12).

Round after round: wait for mail to flow, kill a node (rotating; every other round
the leader), wait until the cluster sees it dead (and, if it led, until another node
holds the leader lease: the failover time), start it again.  Then the queue drains and:

- every message that got ``250`` to DATA reached the destination: none lost;
- duplicates are bounded by what one node can have in flight when it dies
  (``delivery.concurrency * 4`` per kill, Scheduler._max_inflight);
- every duplicate was logged as a possible duplicate, with its queue id and the node:
  by the killed node's next start (deliver/handover.py), or, for a node taken for dead
  while it was delivering (its heartbeat late by more than the lapse, which a 2 s lapse
  on a busy machine sees), by that node when its record finds the entry gone or
  leased by another (store/pending.py).

The fast version (3 kills, a 2 s lapse) runs in the default suite;
RELAYWATCH_LONG_TESTS=1 runs 10 kills with the default heartbeat and lapse (5 s, 30 s),
which is what the failover target (<= 30 s) is about.  The numbers are printed (-s).
"""

import asyncio
import contextlib
import os
import re
import signal
import time

import pytest

from helpers import LOOPBACK, STARTUP, CountingSink, Load, Server, Sink, eventually, every_acknowledged_delivered

LONG = os.environ.get("RELAYWATCH_LONG_TESTS") == "1"
CONCURRENCY = 4
IN_FLIGHT_PER_KILL = CONCURRENCY * 4
_POSSIBLE = re.compile(r"possible duplicate: message (\S+) .*? by node (\S+)[ ,]")


def soak_config(pg_dsn, name, sink_port, timing):
    return dict(
        server={"store": pg_dsn, "node_name": name, "delivery_process": False, "shutdown_grace": "5s",
                **({"heartbeat_interval": f"{timing[0]}s", "node_lapse": f"{timing[1]}s"} if timing else {})},
        queue={"retry_intervals": ["0.5s"], "message_expiration": "1h"},
        delivery={"concurrency": CONCURRENCY, "per_destination": CONCURRENCY},
        connectors=[{"name": "onprem", "type": "on_premises", "domains": ["fabrikam.test"],
                     "smart_hosts": [f"{LOOPBACK}:{sink_port}"], "tls": "none"}])


async def _soak(tmp_path, pg_dsn, kills: int, per_round: int, timing: tuple[float, float] | None):
    lapse = timing[1] if timing else 30.0   # server.node_lapse's default
    from relaywatch.store.postgres import PostgresStore
    handler = CountingSink()
    sink = await Sink(handler).start()
    nodes = []
    for i in range(3):
        d = tmp_path / f"n{i + 1}"
        d.mkdir()
        nodes.append(Server(d, **soak_config(pg_dsn, f"n{i + 1}", sink.port, timing)))
    try:
        for n in nodes:
            await n.start(timeout=STARTUP)
        store = PostgresStore(pg_dsn)
        await store.open()
        load = Load(*(n.port for n in nodes), threads=3, tag="soak").start()
        failovers, victims = [], []
        started = time.monotonic()
        try:
            leader = await eventually(lambda: _leader(store), timeout=lapse * 3, what="a leader")
            for r in range(kills):
                acked, delivered = len(load.acked), sum(handler.seen.values())
                await eventually(lambda: len(load.acked) >= acked + per_round
                                 and sum(handler.seen.values()) >= delivered + per_round // 2,
                                 timeout=120, what=f"progress before kill {r + 1}")
                leader = await eventually(lambda: _leader(store), timeout=lapse * 3, what="a leader")
                leading = next(n for n in nodes if leader.holder.startswith(_name(n) + ":"))
                if r % 2 == 0:
                    victim = leading
                else:   # the next node after the last victim that does not lead
                    after = nodes.index(victims[-1]) if victims else 0
                    victim = next(nodes[(after + k) % 3] for k in range(1, 4) if nodes[(after + k) % 3] is not leading)
                victims.append(victim)
                victim.proc.send_signal(signal.SIGKILL)
                await asyncio.to_thread(victim.proc.wait)
                killed_at = time.monotonic()
                if victim is leading:
                    await eventually(lambda: _leader(store, not_instance=leader.holder), timeout=lapse * 3,
                                     what="another node to take the leader lease")
                    failovers.append(time.monotonic() - killed_at)
                # Seen dead by the cluster (its leases were returned by the leader), then back.
                await eventually(lambda: _dead(store, _name(victim), lapse), timeout=lapse * 3,
                                 what=f"{_name(victim)} to be seen dead")
                await victim.start(timeout=STARTUP)
            await eventually(lambda: len(load.acked) >= acked + per_round, timeout=120, what="mail after the last kill")
        finally:
            load.stop()
        try:
            acked = await every_acknowledged_delivered(load, handler, timeout=120)
            await eventually(lambda: _queue_empty(store), timeout=60, what="the queue to drain")

            def logged_and_unlogged() -> tuple[dict, set]:
                logged = {}
                for n in nodes:
                    for m in _POSSIBLE.finditer(n.log_path.read_text()):
                        logged[m.group(1)] = m.group(2)
                duplicated = {mid for mid, n in handler.seen.items() if n > 1}
                return logged, {mid for mid in duplicated if not any(q in logged for q in load.acked[mid])}
            # A node taken for dead while it delivered logs its copy when its record finds the entry
            # gone (or leased by another): just after the destination counted that copy, so the log
            # may lag the count by a moment.  The assertion below says which, if it stays so.
            with contextlib.suppress(AssertionError):
                await eventually(lambda: not logged_and_unlogged()[1], timeout=10, what="every duplicate logged")
            logged, unlogged = logged_and_unlogged()
            duplicated = {mid for mid, n in handler.seen.items() if n > 1}
            duplicates = sum(handler.seen[mid] - 1 for mid in duplicated)
            bound = kills * IN_FLIGHT_PER_KILL
            print(f"\ncluster soak: {kills} kills ({', '.join(_name(v) for v in victims)}), {len(acked)} acknowledged, "
                  f"{len(acked - set(handler.seen))} lost, {sum(handler.seen.values())} delivered, {duplicates} "
                  f"duplicates (bound {bound}), {len(logged)} logged as possible duplicates, leader failover "
                  f"{', '.join(f'{f:.1f}s' for f in failovers)} (lapse {lapse:.0f}s), {load.failures} client errors "
                  f"while nodes were down, {time.monotonic() - started:.0f}s")
            assert "?" not in handler.seen
            assert duplicates <= bound
            assert not unlogged, f"duplicates not logged as possible duplicates: {sorted(unlogged)}"
        finally:
            await store.close()
            codes = [await n.stop() for n in nodes if n.proc is not None and n.proc.poll() is None]
            await sink.stop()
            assert codes == [0] * len(codes), codes
    finally:   # a start or a stop that failed: nothing outlives the test
        for n in nodes:
            if n.proc is not None and n.proc.poll() is None:
                n.kill()


def _name(server) -> str:
    return server.raw["server"]["node_name"]


async def _leader(store, not_instance=None):
    lease = await store.leader()
    if lease.holder is None or lease.holder == not_instance or lease.until <= time.time():
        return None
    return lease


async def _dead(store, name, lapse):
    beat = next(b for b in await store.nodes() if b.name == name)
    return time.time() - beat.at > lapse


async def _queue_empty(store):
    from relaywatch.store.base import QueueQuery
    return await store.list(QueueQuery(limit=1)) == []


@pytest.mark.timeout(300)
async def test_three_nodes_killed_in_turn_lose_nothing_and_log_every_duplicate(tmp_path, pg_dsn):
    await _soak(tmp_path, pg_dsn, kills=3, per_round=60, timing=(0.25, 2.0))


@pytest.mark.skipif(not LONG, reason="long cluster soak: set RELAYWATCH_LONG_TESTS=1")
@pytest.mark.timeout(1800)
async def test_cluster_soak_long_ten_kills_default_lapse(tmp_path, pg_dsn):
    await _soak(tmp_path, pg_dsn, kills=10, per_round=300, timing=None)   # the defaults: 5 s, 30 s
