"""A node that stands still while it holds leases does not deliver them when it runs again
(issue 12; cluster/fence.py).

Two real ``relaywatch serve`` nodes on one PostgreSQL schema, a slow destination (each RCPT
answered after a few seconds).  The first node leases the mail and is in the middle of its
sessions when it is stopped (SIGSTOP, as a paused VM or a stalled host).  The second takes it
for dead after the lapse, returns its leases and delivers everything.  Then the first runs again
(SIGCONT): its sessions get their RCPT replies and would go on to DATA, and the mail waiting in
its queues would be sent, each a second copy.  With the fence, it finds its heartbeat was late,
asks the queue, learns the leases are gone, and stops before the final dot: the destination
gets each message once, and the queue holds nothing the stalled node wrote back.
"""

import asyncio
import os
import signal
import smtplib
import time

import pytest

from helpers import LOOPBACK, CountingSink, Server, Sink, eventually, message

N = 6
RCPT_DELAY = 3.0


class SlowAtRcpt(CountingSink):
    """Counts what it accepted (by Message-ID); answers each RCPT after RCPT_DELAY."""

    def __init__(self):
        super().__init__()
        self.rcpts = 0

    async def handle_RCPT(self, server, session, envelope, address, options):
        self.rcpts += 1
        await asyncio.sleep(RCPT_DELAY)
        return await super().handle_RCPT(server, session, envelope, address, options)


def node_config(pg_dsn, name, sink_port):
    return dict(
        server={"store": pg_dsn, "node_name": name, "delivery_process": False, "shutdown_grace": "5s",
                "heartbeat_interval": "0.25s", "node_lapse": "2s"},
        queue={"retry_intervals": ["1s"]},
        delivery={"concurrency": 4, "per_destination": 4, "command_timeout": "60s"},
        connectors=[{"name": "onprem", "type": "on_premises", "domains": ["fabrikam.test"],
                     "smart_hosts": [f"{LOOPBACK}:{sink_port}"], "tls": "none"}])


def send(port):
    with smtplib.SMTP(LOOPBACK, port, timeout=30) as c:
        for i in range(N):
            c.sendmail("alice@contoso.test", ["bob@fabrikam.test"], message(f"fenced {i}"))


@pytest.mark.timeout(240)
async def test_a_stalled_node_does_not_deliver_what_another_took_over(tmp_path, pg_dsn):
    from relaywatch.store.postgres import PostgresStore
    handler = SlowAtRcpt()
    sink = await Sink(handler).start()
    dirs = [tmp_path / "n1", tmp_path / "n2"]
    for d in dirs:
        d.mkdir()
    stalled, other = (Server(d, **node_config(pg_dsn, d.name, sink.port)) for d in dirs)
    store = PostgresStore(pg_dsn)
    await store.open()
    stopped = False
    try:
        await stalled.start(timeout=60)
        await asyncio.to_thread(send, stalled.port)
        # It holds every message, and its sessions wait for their RCPT replies.
        await eventually(lambda: _leased_by(store, "n1", N), timeout=30, what="n1 to lease every message")
        await eventually(lambda: handler.rcpts >= 1, timeout=30, what="n1's sessions to reach RCPT")
        os.kill(stalled.proc.pid, signal.SIGSTOP)
        stopped = True
        in_session = handler.rcpts                  # sessions waiting for their RCPT reply
        assert sum(handler.seen.values()) == 0      # nothing was past DATA yet

        await other.start(timeout=60)
        await eventually(lambda: len(handler.seen) == N, timeout=90, what="n2 to deliver every message")
        await eventually(lambda: _queue_empty(store), timeout=30, what="n2 to record every delivery")

        resumed_at = time.time()
        os.kill(stalled.proc.pid, signal.SIGCONT)
        stopped = False
        # Back: beating again, and holding nothing any more (what it had was checked and dropped).
        await eventually(lambda: _settled(store, "n1", resumed_at), timeout=60, what="n1 to beat again, idle")
        copies = sorted(handler.seen.values())
        print(f"\nstalled node: {N} leases, {in_session} of them mid-session when stopped; copies at the "
              f"destination {copies} ({sum(copies) - N} duplicates)")
        assert copies == [1] * N, handler.seen      # each once: the stalled node sent none again
        assert await _queue_empty(store)            # and wrote nothing back over n2's records
        log = stalled.log_path.read_text()
        assert "heartbeat was late" in log
        assert log.count("not delivering") == N, log    # each lease it had, checked and dropped
        assert "possible duplicate" not in log
    finally:
        if stopped:
            os.kill(stalled.proc.pid, signal.SIGCONT)
        await store.close()
        for s in (stalled, other):
            if s.proc is not None and s.proc.poll() is None:
                assert await s.stop() == 0
        await sink.stop()


async def _leased_by(store, name, n):
    from relaywatch.store.base import QueueQuery
    entries = await store.list(QueueQuery(status="active"))
    return len([e for e in entries if (e.lease_owner or "").startswith(name + ":")]) == n


async def _queue_empty(store):
    from relaywatch.store.base import QueueQuery
    return await store.list(QueueQuery(limit=1)) == []


async def _settled(store, name, since):
    beat = next((b for b in await store.nodes() if b.name == name), None)
    return beat is not None and beat.at > since and beat.leases == 0
