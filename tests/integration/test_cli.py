"""The operator commands, against the store of a running relay."""

import asyncio
import email

import pytest
from click.testing import CliRunner

from helpers import LOOPBACK, Sink, eventually, free_port, message
from relaywatch.cli import main

pytestmark = pytest.mark.both_stores   # the commands against the relay's store: SQLite and PostgreSQL

FIELDS = {"id", "sender", "received_at", "expires_at", "status", "attempts", "next_attempt_at", "connector"}
ERROR_FIELDS = {"code", "smtp_code", "title", "subtype", "detail", "phase", "destination", "at", "reply", "errno",
                "dns", "tls", "permanent", "kind"}


def down_connector(port):
    return [{"name": "onprem", "type": "on_premises", "domains": ["fabrikam.test"],
             "smart_hosts": [f"{LOOPBACK}:{port}"], "tls": "none"}]


async def deferred_relay(relay_factory, n=1, **queue):
    port = free_port()
    relay = await relay_factory(queue={"retry_intervals": ["1h"], **queue}, connectors=down_connector(port))
    for i in range(n):
        await relay.send("alice@contoso.test", ["bob@fabrikam.test"], message(f"m{i}"))

    async def all_tried():
        q = await relay.queue()
        return q if len(q) == n and all(m["attempts"] >= 1 for m in q) else None
    return relay, port, await eventually(all_tried, what="the first attempts")


async def test_queue_list_and_show_json_is_the_documented_shape(relay_factory):
    relay, port, [entry] = await deferred_relay(relay_factory)
    assert FIELDS <= entry.keys()
    assert entry["connector"] == "onprem" and entry["status"] == "deferred" and entry["sender"] == "alice@contoso.test"
    assert entry["received_at"].endswith("Z") and entry["expires_at"].endswith("Z")
    rcpt = entry["recipients"][0]
    assert rcpt["address"] == "bob@fabrikam.test" and rcpt["status"] == "deferred"
    error = rcpt["last_error"]
    assert ERROR_FIELDS <= error.keys()
    assert (error["code"], error["smtp_code"], error["phase"]) == ("4.4.316", 450, "connect")
    assert error["destination"]["host"] == LOOPBACK and error["destination"]["port"] == port
    shown = await relay.show(entry["id"])
    assert shown["attempt_history"][0]["recipients"][0]["error"]["code"] == "4.4.316"
    text = (await relay.cli("queue", "show", entry["id"])).output
    assert "4.4.316 Connection refused [refused]" in text and f"{LOOPBACK}:{port} refused" in text
    listing = (await relay.cli("queue", "list")).output
    assert entry["id"] in listing and "4.4.316" in listing


async def test_filters(relay_factory):
    relay, _, _ = await deferred_relay(relay_factory)
    assert len((await relay.cli_json("queue", "list", "--connector", "onprem"))["messages"]) == 1
    assert (await relay.cli_json("queue", "list", "--connector", "other"))["messages"] == []
    assert (await relay.cli_json("queue", "list", "--status", "queued"))["messages"] == []


async def test_hold_release_and_retry_reach_the_running_server(relay_factory):
    relay, port, [entry] = await deferred_relay(relay_factory)
    await relay.cli("queue", "hold", entry["id"])
    assert (await relay.show(entry["id"]))["status"] == "held"
    await relay.cli("queue", "retry", entry["id"], expect=1)     # held: not retried
    sink = await Sink(port=port).start()
    try:
        await relay.cli("queue", "release", entry["id"])
        await eventually(lambda: sink.messages, what="delivery after release")
    finally:
        await sink.stop()


async def test_retry_by_connector_runs_the_next_attempt_now(relay_factory):
    relay, port, entries = await deferred_relay(relay_factory, n=2)
    sink = await Sink(port=port).start()
    try:
        out = (await relay.cli("queue", "retry", "--connector", "onprem")).output
        assert "2 message(s)" in out
        await eventually(lambda: len(sink.messages) == 2, what="both delivered within the poll interval")
    finally:
        await sink.stop()


async def test_delete_and_bounce(relay_factory):
    relay, _, entries = await deferred_relay(relay_factory, n=2)
    first, second = (e["id"] for e in entries)
    await relay.cli("queue", "delete", first)
    await relay.cli("queue", "show", first, expect=1)
    out = (await relay.cli("queue", "bounce", second)).output
    assert "returned to alice@contoso.test" in out
    ndr = (await eventually(lambda: relay.maildir("alice@contoso.test"), what="the NDR"))[0]
    report = email.message_from_bytes(ndr)
    per_rcpt = report.get_payload()[1].get_payload()[1]
    assert per_rcpt["Action"] == "failed" and "4.4.316" in per_rcpt["Diagnostic-Code"]
    await eventually(lambda: _queue_empty(relay), what="the queue to empty")
    await relay.cli("queue", "delete", "NOSUCHID", expect=1)


async def _queue_empty(relay):
    return await relay.queue() == []


def test_config_check_names_every_bad_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nlisten = ["127.0.0.1:x"]\n[queue]\nmessage_expiration = "soon"\n'
                   '[[connectors]]\nname = "p"\ntype = "partner"\ndomains = ["p.test"]\ntls = "always"\n')
    result = CliRunner().invoke(main, ["config", "check", "-c", str(bad)])
    assert result.exit_code == 2
    assert "server.listen: '127.0.0.1:x' has an invalid port" in result.output
    assert "queue.message_expiration: 'soon' is not a duration" in result.output
    assert "connectors[0].tls: must be one of none, opportunistic, required (got 'always')" in result.output
    assert "Traceback" not in result.output
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\n")
    result = CliRunner().invoke(main, ["config", "check", "-c", str(broken)])
    assert result.exit_code == 2 and "not valid TOML" in result.output
    missing = CliRunner().invoke(main, ["config", "check", "-c", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 2 and "file not found" in missing.output


def test_example_config_is_valid():
    result = CliRunner().invoke(main, ["config", "check", "-c", "examples/relaywatch.toml"])
    assert result.exit_code == 0, result.output


def test_errors_prints_the_catalog():
    result = CliRunner().invoke(main, ["errors", "4.7.320"])
    assert result.exit_code == 0
    assert "Certificate validation failed" in result.output and "What to do" in result.output
    everything = CliRunner().invoke(main, ["errors"]).output
    for code in ("4.4.312", "4.4.315", "4.4.316", "4.4.317", "4.4.318", "4.7.320"):
        assert code in everything
    assert CliRunner().invoke(main, ["errors", "9.9.9"]).exit_code == 1


async def test_queue_commands_without_a_queue_say_so(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[server]\ndata_dir = "{tmp_path / "nothing"}"\n')
    result = await asyncio.to_thread(CliRunner().invoke, main, ["queue", "list", "-c", str(cfg)])
    assert result.exit_code == 1 and "no queue at" in result.output


def test_config_check_warns_when_alerts_would_take_the_failing_path(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[alerts]\nnotify = ["admin@contoso.test"]\n'
                   '[[connectors]]\nname = "onprem"\ntype = "on_premises"\ndomains = ["contoso.test"]\n'
                   'smart_hosts = ["127.0.0.1:2526"]\n')
    result = CliRunner().invoke(main, ["config", "check", "-c", str(cfg)])
    assert result.exit_code == 0
    assert "warning: alerts.notify: admin@contoso.test is delivered through connector onprem" in result.output


async def test_the_commands_read_the_store_the_server_writes(relay_factory):
    # On the PostgreSQL variant the commands must not find (or make) a SQLite queue of their own.
    relay, _, [entry] = await deferred_relay(relay_factory)
    on_postgresql = relay.raw["server"].get("store", "sqlite") != "sqlite"
    assert type(relay.store).__name__ == ("PostgresStore" if on_postgresql else "SqliteStore")
    assert [m["id"] for m in await relay.queue()] == [entry["id"]]
    assert (await relay.cli_json("config", "show"))["overrides"] == {}
    assert (relay.data_dir / "queue.sqlite3").exists() is not on_postgresql


@pytest.mark.parametrize("url, shown", [
    ("postgresql://rw:secret@{host}:{port}/test", "postgresql://rw:***@"),
    ("postgresql://rw@{host}:{port}/test?sslmode=disable&password=secret", "password=***"),
])
async def test_queue_commands_name_a_postgresql_store_they_cannot_reach(tmp_path, url, shown):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n'
                   f'store = "{url.format(host=LOOPBACK, port=free_port())}"\n')
    for command in (["queue", "list"], ["incidents", "list"], ["config", "show"]):
        result = await asyncio.to_thread(CliRunner().invoke, main, [*command, "-c", str(cfg)])
        assert result.exit_code == 1, (command, result.output, result.exception)
        assert "cannot open queue store postgresql://rw" in result.output and shown in result.output, result.output
        assert "secret" not in result.output and "Traceback" not in result.output


async def test_nodes_lists_this_relay_alive_and_leading_and_a_dead_one(relay_factory):
    import json
    import time
    from relaywatch.cluster.model import NodeBeat
    relay = await relay_factory(server={"node_name": "relay-1"})
    gone = time.time() - 600
    await relay.app.store.heartbeat(NodeBeat("relay-0", "relay-0:1:aa", "10.0.0.9:25", "all", "0.0.9", gone - 60, gone))
    await eventually(lambda: relay.app.node.term() is not None, what="relay-1 to lead")
    out = await asyncio.to_thread(CliRunner().invoke, main, ["nodes", "-c", str(relay.config_path)],
                                  env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split() == ["Name", "Address", "Role", "Version", "Started", "Heartbeat", "Leases", "Received",
                                "Delivered", "State", "Leader"]
    assert lines[1].split()[0] == "relay-0" and "dead" in lines[1] and "yes" not in lines[1]
    assert lines[2].split()[0] == "relay-1" and "alive" in lines[2] and "yes (term 1)" in lines[2]
    assert lines[-1].startswith("2 node(s), 1 dead")
    data = json.loads((await asyncio.to_thread(CliRunner().invoke, main, ["nodes", "--json", "-c",
                                                                         str(relay.config_path)])).output)
    assert [(n["name"], n["state"], n["leader"]) for n in data["nodes"]] == [("relay-0", "dead", False),
                                                                            ("relay-1", "alive", True)]
    assert set(data["nodes"][1]) == {"name", "instance", "address", "role", "version", "state", "leader",
                                     "started_at", "heartbeat_at", "heartbeat_age", "leases", "received", "delivered"}
    assert data["nodes"][1]["instance"] == relay.app.scheduler.node and data["leader_term"] == 1
