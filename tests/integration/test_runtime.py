"""The runtime (relaywatch/runtime/): the running config and its reloads, the
connection slots that follow them, the delivery process's wake protocol."""

import asyncio
import socket
import time

import pytest

from helpers import LOOPBACK, Relay, Sink, SinkHandler, base_config, eventually, message

from relaywatch.app import Relaywatch, Role
from relaywatch.config import load_config
from relaywatch.deliver.slots import Slots
from relaywatch.errors import RelaywatchError


class GatedHandler(SinkHandler):
    """A destination that holds every DATA until the gate opens, counting how
    many deliveries (each on its own connection) it holds at once."""

    def __init__(self):
        super().__init__()
        self.gate = asyncio.Event()
        self.inside = 0
        self.most = 0

    async def handle_DATA(self, server, session, envelope):
        self.inside += 1
        self.most = max(self.most, self.inside)
        try:
            await self.gate.wait()
        finally:
            self.inside -= 1
        return await super().handle_DATA(server, session, envelope)

    def close_gate(self) -> None:
        self.gate.clear()
        self.most = self.inside


def _connector(port: int) -> list[dict]:
    return [{"name": "onprem", "type": "on_premises", "domains": ["fabrikam.test"],
             "smart_hosts": [f"{LOOPBACK}:{port}"], "tls": "none"}]


async def test_a_reload_resizes_the_connection_slots_as_it_does_the_lease_window(relay_factory):
    """SIGHUP used to change ``delivery.concurrency`` for the lease window only: the
    connection semaphore kept the size it had at start."""
    handler = GatedHandler()
    sink = await Sink(handler).start()
    try:
        relay = await relay_factory(
            delivery={"concurrency": 1, "data_timeout": "30s", "final_timeout": "30s"},
            connectors=_connector(sink.port))
        handler.close_gate()
        for i in range(3):
            await relay.send("alice@contoso.test", ["bob@fabrikam.test"], message(f"before {i}"))
        await eventually(lambda: handler.inside == 1 and relay.app.scheduler.inflight == 3,
                         what="one delivery at the destination, two waiting for a connection")
        handler.gate.set()
        await eventually(lambda: len(sink.messages) == 3, what="the first three deliveries")
        assert handler.most == 1

        relay.raw["delivery"]["concurrency"] = 3
        relay.write_config()
        assert relay.app.reload()
        handler.close_gate()
        for i in range(6):
            await relay.send("alice@contoso.test", ["bob@fabrikam.test"], message(f"after {i}"))
        await eventually(lambda: handler.inside == 3, what="three deliveries at once after the reload")
        handler.gate.set()
        await eventually(lambda: len(sink.messages) == 9, what="the other six deliveries")
        assert handler.most == 3
    finally:
        handler.gate.set()
        await sink.stop()


async def test_slots_follow_their_limit_up_and_down():
    slots = Slots(1)
    await slots.acquire()
    second = asyncio.create_task(slots.acquire())
    third = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    assert (slots.held, slots.waiting) == (1, 2)
    slots.resize(3)                     # growing lets the waiters in at once
    await asyncio.gather(second, third)
    assert (slots.held, slots.waiting) == (3, 0)
    slots.resize(1)                     # shrinking takes nothing from holders...
    fourth = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    slots.release()
    slots.release()
    await asyncio.sleep(0)
    assert not fourth.done() and slots.held == 1   # ...but admits nobody until below the limit
    slots.release()
    await fourth
    assert (slots.held, slots.waiting) == (1, 0)


async def test_a_cancelled_waiter_takes_no_slot():
    slots = Slots(1)
    await slots.acquire()
    waiter = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    slots.release()
    assert (slots.held, slots.waiting) == (0, 0)
    # Admitted and cancelled before it ran: the slot goes back.
    await slots.acquire()
    waiter = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    slots.release()                     # hands the slot to the waiter...
    waiter.cancel()                     # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (slots.held, slots.waiting) == (0, 0)


async def test_a_part_that_fails_stops_the_whole_relay(tmp_path):
    """The parts run under one TaskGroup: a loop that dies (only a bug does) no
    longer leaves a relay that accepts mail and never delivers it."""
    relay = Relay(tmp_path, base_config(tmp_path))
    relay.write_config()
    app = Relaywatch(load_config(relay.config_path))
    ports = []

    async def broken_watch():
        await eventually(lambda: app.receiver.servers, what="the receiver to listen")
        ports.append(app.receiver.addresses[0][1])
        raise RuntimeError("a bug in the watch")
    app.monitor.run = broken_watch
    with pytest.raises(RelaywatchError, match=r"the monitor part failed \(RuntimeError: a bug in the watch\)"):
        await asyncio.wait_for(app.serve_forever(), 30)   # before, it served on without its watch
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOPBACK, ports[0]), timeout=2).close()
    assert not (relay.data_dir / "relaywatch.pid").exists()


@pytest.mark.both_loops
async def test_receive_and_deliver_roles_over_a_socketpair_in_one_process(tmp_path, caplog):
    """The production topology (serve on two cores: a receiving process and the
    delivery process it supervises), here as two apps in one event loop joined by
    a socketpair, with every byte of their protocol (runtime/child.py) exercised:
    the receiver listens only once the deliverer said READY, each commit sends a
    wake, and the receiver's end closing stops the deliverer."""
    sink = await Sink().start()
    try:
        relay = Relay(tmp_path, base_config(tmp_path, connectors=_connector(sink.port)))
        relay.write_config()
        receive_end, deliver_end = socket.socketpair()
        receiving = Relaywatch(load_config(relay.config_path), role=Role.RECEIVE, wake_fd=receive_end.detach())
        delivering = Relaywatch(load_config(relay.config_path), role=Role.DELIVER, wake_fd=deliver_end.detach())
        assert receiving.scheduler is None and delivering.receiver is None
        woken = []                               # wakes that came through the socketpair
        link, listen = delivering._parent_link, delivering._parent_link.listen
        link.listen = lambda on_wake, on_gone: listen(lambda: (woken.append(True), on_wake()), on_gone)

        starting = asyncio.create_task(receiving.start())
        # Its parts are made just before it waits for READY (nothing awaited in between).
        await eventually(lambda: receiving.parts or starting.done(), what="the receiver to wait for READY")
        assert not starting.done() and receiving.receiver.servers == [], "listening before delivery runs"
        serving = asyncio.create_task(delivering.serve_forever())
        await asyncio.wait_for(starting, 30)
        relay.app = receiving

        await relay.send("alice@contoso.test", ["bob@fabrikam.test"], message("two roles"))
        await eventually(lambda: sink.messages, what="delivery by the delivering role")
        assert woken, "the commit did not wake the delivering role through the socketpair"
        assert await receiving.store.counts() == {}

        await receiving.stop()
        await asyncio.wait_for(serving, 30)     # EOF on its end: it stops by itself
        assert "the receiving process is gone; the delivery process stops" in caplog.text
    finally:
        await sink.stop()


async def test_a_delivering_node_on_postgresql_hears_other_nodes_work(pg_dsn, tmp_path):
    """The scheduler's wake is the store's on_work from before the store opens: only
    then does a PostgreSQL store LISTEN for what other nodes (and this node's
    receiving process) commit, instead of waiting for the next poll."""
    from relaywatch.model import NewMessage, Route, RouteKind, StoredBody
    relay = Relay(tmp_path, base_config(tmp_path, server={"store": pg_dsn}, queue={"retry_intervals": ["1h"]}))
    relay.write_config()
    delivering = Relaywatch(load_config(relay.config_path), role=Role.DELIVER)
    assert delivering.store.on_work is not None, "the store opens without the scheduler's wake"
    heard = asyncio.Event()
    wake = delivering.store.on_work
    delivering.store.on_work = lambda: (heard.set(), wake())
    other_node = Relaywatch(load_config(relay.config_path), role=Role.RECEIVE).store
    await delivering.start()
    await other_node.open()
    try:
        await asyncio.wait_for(heard.wait(), 10)   # once when it starts listening
        heard.clear()
        data, now = message("from another node"), time.time()
        await other_node.enqueue(NewMessage(
            sender="alice@contoso.test", recipients=(("bob@fabrikam.test", Route(RouteKind.CONNECTOR, "x")),),
            body=StoredBody(size=len(data), data=data), received_at=now, expires_at=now + 3600))
        await asyncio.wait_for(heard.wait(), 10)
    finally:
        await other_node.close()
        await delivering.stop()


def test_reload_never_signals_a_process_a_stale_pid_file_names(tmp_path):
    """After a crash the pid file may name a process that is not relaywatch (pids are reused):
    `relaywatch reload` must say no server runs, and leave that process alone (SIGHUP ends most)."""
    import subprocess

    from click.testing import CliRunner

    from relaywatch.cli import main
    data = tmp_path / "data"
    data.mkdir()
    config = tmp_path / "relaywatch.toml"
    config.write_text(f'[server]\ndata_dir = "{data}"\n')
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        (data / "relaywatch.pid").write_text(str(bystander.pid))
        result = CliRunner().invoke(main, ["reload", "-c", str(config)])
        assert result.exit_code != 0 and "no running server" in result.output, result.output
        assert bystander.poll() is None, "the bystander got the SIGHUP"
    finally:
        bystander.kill()
        bystander.wait()
