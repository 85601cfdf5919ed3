"""relaywatch nodes (the cluster sharing this queue) and node drain (stop this one cleanly)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

from relaywatch import views
from relaywatch.cli.common import age, config_option, echo_json, fail, read_config, rich, with_store
from relaywatch.runtime import control


@click.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/json.md).")
def nodes(config_path, as_json):
    """The relaywatch nodes sharing this queue: alive, dead or stopped, and which one leads."""
    from relaywatch.cluster.decisions import Timing, leader_now
    config = read_config(config_path)

    async def read(store):
        return await store.nodes(), await store.leader()
    beats, lease = with_store(config, read)
    now = time.time()
    timing = Timing(config.server.heartbeat_interval, config.server.node_lapse)
    data = views.nodes_json(beats, lease, timing, now)
    if as_json:
        echo_json(data)
        return
    shown = data["nodes"]
    if not shown:
        click.echo("No node has registered with this queue (has relaywatch serve run with this config?).")
        return
    console, Table = rich()
    table = Table(box=None, pad_edge=False)
    for col in ("Name", "Address", "Role", "Version", "Started", "Heartbeat", "Leases", "Received", "Delivered",
                "State", "Leader"):
        table.add_column(col, no_wrap=True)
    for n in shown:
        state = {"alive": "[green]alive[/green]", "dead": "[red]dead[/red]"}.get(n["state"], n["state"])
        table.add_row(n["name"], n["address"], n["role"], n["version"], age(n["started_at"], now) + " ago",
                      age(n["heartbeat_at"], now) + " ago", str(n["leases"]), str(n["received"]),
                      str(n["delivered"]), state,
                      f"yes (term {lease.term})" if n["leader"] else "")
    console.print(table)
    dead = sum(1 for n in shown if n["state"] == "dead")
    click.echo(f"{len(shown)} node(s), {dead} dead (no heartbeat for {timing.lapse:g}s)"
               + ("" if leader_now(lease, now) else "; no leader now (one takes over within the lapse)"))


@click.group("node")
def node_group():
    """This node of the cluster."""


@node_group.command("drain")
@config_option
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the node has stopped.")
def node_drain(config_path, wait):
    """Stop this node cleanly (as SIGTERM does): /readyz answers 503, no new mail is accepted,
    deliveries in flight finish within server.shutdown_grace and the rest of its leases go
    back to the queue for the other nodes; the watch moves to another node at once."""
    import signal
    config = read_config(config_path)
    pid = control.running_server(config.server.data_dir)
    try:
        if pid is None:
            raise OSError
        os.kill(pid, signal.SIGTERM)
    except OSError:
        fail(str(control.NoServer(control.pid_file(config.server.data_dir))))
    click.echo(f"draining relaywatch node {config.server.node_name} (pid {pid})")
    if not wait:
        return
    deadline = time.monotonic() + config.server.shutdown_grace + 30
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _running(pid):
        fail(f"node {config.server.node_name} (pid {pid}) has not stopped yet; it is still finishing")
    click.echo(f"node {config.server.node_name} stopped; what it had not delivered is back in the queue")


def _running(pid: int) -> bool:
    """The process exists and has not exited (a zombie waiting for its parent has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
