"""The relay that cannot queue: a full disk, a store that is down; and the delivery process's restarts.

The full-disk test mounts a 2 MB tmpfs as data_dir of a real ``relaywatch serve``
(needs root, or CAP_SYS_ADMIN; skipped with the reason otherwise).
"""

import asyncio
import email
import errno
import json
import logging
import os
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import LOOPBACK, Server, Sink, WebhookReceiver, eventually, message
from relaywatch.runtime.child import RestartBackoff
from relaywatch.errors import StoreError, StoreFull
from relaywatch.receive.store_condition import (ConditionChanged, ConditionEnded, ConditionStarted, Place,
                                                PlaceRecovered, StoreCondition, StoreProblem, describe,
                                                problem_from_os_error, problem_from_store_error)

ROOT = Path(__file__).resolve().parents[2]
BIG = ("y" * 998 + "\r\n") * 200          # 200 KB: spills to a spool file
SMALL = ("x" * 70 + "\r\n") * 40           # stays in memory, committed in the queue row


# -- pure parts: mapping, the condition, the back-off -----------------------------------------

def _problem(place=Place.QUEUE, code="SQLITE_FULL", full=True, path="/q"):
    return StoreProblem(place, path, code, "full", full)


@pytest.mark.parametrize("error, reply, code", [
    (OSError(errno.ENOSPC, "No space left on device"), "452 4.3.1 ", "ENOSPC"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "452 4.3.1 ", "EDQUOT"),
    (OSError(errno.EIO, "Input/output error"), "451 4.3.0 ", "EIO"),
    (OSError(errno.ENOTDIR, "Not a directory"), "451 4.3.0 ", "ENOTDIR"),
    (OSError("no errno"), "451 4.3.0 ", "?"),
])
def test_os_errors_map_to_452_when_full_else_451(error, reply, code):
    problem = problem_from_os_error(error, Place.SPOOL, "/data/spool")
    assert problem.reply.startswith(reply) and problem.code == code and problem.path == "/data/spool"


def test_each_message_s_own_spool_file_failing_is_one_condition():
    c = StoreCondition()
    first = OSError(errno.ENOSPC, "No space left on device", "/data/spool/incoming-a1")
    second = OSError(errno.ENOSPC, "No space left on device", "/data/spool/incoming-b2")
    assert type(c.refused_message(problem_from_os_error(first, Place.SPOOL, "/data/spool"), 1)) is ConditionStarted
    assert c.refused_message(problem_from_os_error(second, Place.SPOOL, "/data/spool"), 2) is None


def test_store_errors_map_to_452_when_full_else_451():
    full = problem_from_store_error(StoreFull("database or disk is full", code="SQLITE_FULL"), "/q")
    assert full.reply.startswith("452 4.3.1 ") and full.code == "SQLITE_FULL"
    down = problem_from_store_error(StoreError("queue store is not open"), "/q")
    assert down.reply.startswith("451 4.3.0 ") and down.code == "?"
    pg = problem_from_store_error(StoreError("connection refused", code="08006"), "postgresql://x")
    assert pg.reply.startswith("451 4.3.0 ") and pg.code == "08006"


def test_sqlite_full_becomes_store_full():
    import sqlite3
    from relaywatch.store.driver_errors import driver_error
    conn = sqlite3.connect(":memory:")
    conn.execute("PRAGMA max_page_count=2")
    conn.execute("CREATE TABLE t (x)")
    with pytest.raises(sqlite3.Error) as raised:
        conn.executemany("INSERT INTO t VALUES (?)", [("z" * 4000,)] * 10)
    err = driver_error("queue store write failed", raised.value)
    assert isinstance(err, StoreFull) and err.code == "SQLITE_FULL"
    assert type(driver_error("x", sqlite3.OperationalError("no such table"))) is StoreError


def test_postgresql_disk_full_becomes_store_full():
    errors = pytest.importorskip("psycopg.errors")
    from relaywatch.store.driver_errors import driver_error
    err = driver_error("queue store write failed", errors.DiskFull("could not extend file"))
    assert isinstance(err, StoreFull) and err.code == "53100"
    assert type(driver_error("x", errors.OperationalError("connection refused"))) is StoreError


def test_the_condition_changes_once_per_change_not_per_message():
    c = StoreCondition()
    queue_full, spool_full = _problem(), _problem(Place.SPOOL, "ENOSPC", path="/spool")
    assert type(c.refused_message(queue_full, 10)) is ConditionStarted
    assert c.refused_message(queue_full, 11) is None                     # same condition: nothing new
    assert type(c.refused_message(spool_full, 12)) is ConditionChanged   # another place fails too
    assert c.refused_message(spool_full, 13) is None
    assert c.written(Place.SPOOL, 13.5) is not None and c.active         # spool ok; the queue is not
    assert type(c.refused_message(spool_full, 14)) is ConditionChanged   # ...and the spool again
    recovered = c.written(Place.QUEUE, 15)
    assert type(recovered) is PlaceRecovered and recovered.still == (spool_full,)
    assert c.written(Place.QUEUE, 16) is None                            # the queue was fine already
    ended = c.written(Place.SPOOL, 20)
    assert type(ended) is ConditionEnded and (ended.since, ended.at, ended.refused) == (10, 20, 5)
    assert ended.problems == (queue_full, spool_full) and not c.active
    assert c.written(Place.QUEUE, 21) is None                            # nothing to end now
    assert type(c.refused_message(queue_full, 30)) is ConditionStarted   # a new outage counts from 1
    assert c.written(Place.QUEUE, 31).refused == 1


def test_another_error_at_the_same_place_is_a_change():
    c = StoreCondition()
    c.refused_message(_problem(), 1)
    assert type(c.refused_message(_problem(code="SQLITE_IOERR", full=False), 2)) is ConditionChanged


def test_the_log_lines_say_path_errno_and_what_is_refused():
    c = StoreCondition()
    line = describe(c.refused_message(_problem(Place.SPOOL, "ENOSPC", path="/data/spool"), 0))
    assert line.startswith("cannot write /data/spool: ENOSPC (full)") and "with 452 4.3.1" in line
    assert "over 128 KiB" in line
    line = describe(c.refused_message(_problem(code="53100", path="postgresql://db"), 1))
    assert line.startswith("also cannot write postgresql://db: 53100") and "every message with 452 4.3.1" in line
    c.written(Place.SPOOL, 2)
    line = describe(c.written(Place.QUEUE, 125))
    assert "after 2m05s" in line and "2 message(s) were refused" in line


@pytest.mark.parametrize("ran_for, expected", [
    # crashes in a row double the wait up to the limit
    ([0.1] * 8, [1, 2, 4, 8, 16, 32, 60, 60]),
    # a healthy run (>= 300 s) starts the back-off over, however many crashes came before
    ([0.1] * 6 + [300, 0.1, 0.1], [1, 2, 4, 8, 16, 32, 1, 2, 4]),
    # six crashes in a process's life, each after healthy minutes: each costs a second
    ([600] * 6, [1] * 6),
    ([299.9, 299.9, 300.0], [1, 2, 1]),
])
def test_restart_backoff(ran_for, expected):
    backoff = RestartBackoff(healthy_after=300)
    assert [backoff.after_exit(r) for r in ran_for] == expected


# -- a store that is down: the condition, the incident, recorded when it is back ---------------

def _alerts(alert_sink, webhook):
    return {"notify": ["admin@ops.test"], "smtp": f"{LOOPBACK}:{alert_sink.port}",
            "webhook_url": f"http://{LOOPBACK}:{webhook.port}/hook", "webhook_secret": "s3cret",
            "evaluate_interval": "0.2s", "cert_probe_interval": "1h"}


async def _data_reply(port: int, body: str) -> tuple[int, bytes]:
    def send():
        with smtplib.SMTP(LOOPBACK, port, timeout=30) as c:
            c.ehlo("client.test")
            assert c.mail("alice@contoso.test")[0] == 250
            assert c.rcpt("bob@fabrikam.test")[0] == 250
            return c.data(message(body=body))
    return await asyncio.to_thread(send)


def _onprem(port):
    return [{"name": "onprem", "type": "on_premises", "domains": ["fabrikam.test"],
             "smart_hosts": [f"{LOOPBACK}:{port}"], "tls": "none"}]


async def test_a_store_that_is_down_is_one_condition_one_incident_recorded_when_back(
        relay_factory, watchers, sink, caplog):
    alert_sink, webhook = watchers
    relay = await relay_factory(connectors=_onprem(sink.port), alerts=_alerts(alert_sink, webhook))
    caplog.set_level(logging.INFO, logger="relaywatch")
    await relay.store.close()                        # every commit fails: "not open"
    try:
        for _ in range(3):
            code, reply = await _data_reply(relay.port, SMALL)
            assert (code, reply[:5]) == (451, b"4.3.0")
        await eventually(lambda: webhook.events() == ["open"] and len(alert_sink.messages) == 1,
                         what="one open alert by each channel while the store is down")
        opened = json.loads(webhook.posts[0][1])["incident"]
        assert (opened["kind"], opened["code"], opened["state"]) == ("store", "4.3.0", "open")
        assert opened["problems"][0]["path"] == str(relay.store.where)
        assert "cannot queue mail" in email.message_from_bytes(alert_sink.messages[0].content)["Subject"]
    finally:
        await relay.store.open()
    code, reply = await _data_reply(relay.port, SMALL)
    assert code == 250, reply
    await eventually(lambda: webhook.events() == ["open", "resolve"] and len(alert_sink.messages) == 2,
                     what=lambda: f"the all-clear by each channel: {webhook.events()}")
    resolved = json.loads(webhook.posts[1][1])["incident"]
    assert resolved["refused"] == 3 and resolved["id"] is not None
    lines = [r.getMessage() for r in caplog.records if r.name == "relaywatch.receive"]
    assert len(lines) == 2, lines                    # one when it starts, one when it ends
    assert lines[0] == (f"cannot write {relay.store.where}: ? (queue store is not open); "
                        "refusing every message with 451 4.3.0 until it can")
    assert lines[1].startswith("the queue can be written again after ") and "3 message(s) were refused" in lines[1]
    assert not any(r.exc_info for r in caplog.records)
    # The all-clear's outcomes are recorded once both channels were tried: after the webhook had
    # its POST and the sink its mail, not before.
    await eventually(lambda: any(r.getMessage().startswith("recorded incident ") for r in caplog.records),
                     what="the incident recorded with its notifications")
    [inc] = (await relay.cli_json("incidents", "list", "--all"))["incidents"]
    assert (inc["kind"], inc["state"], inc["refused"]) == ("store", "resolved", 3)
    shown = (await relay.cli("incidents", "show", str(inc["id"]))).output
    for line in ("Notified open by email: sent", "Notified open by webhook: sent",
                 "Notified resolve by email: sent", "Notified resolve by webhook: sent"):
        assert line in shown
    assert "relaywatch queues mail again" in shown
    await eventually(lambda: len(sink.messages) == 1, what="the accepted message delivered")


# -- a full disk, for real -----------------------------------------------------------------------

def _mount_tmpfs(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)],
                              capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command: cannot make a small file system to fill")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")


def _fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\1" * 65536)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    # What is left is less than a page: nothing of a message fits.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        while True:
            os.write(fd, b"\1")
    except OSError:
        pass
    finally:
        os.close(fd)


async def test_a_full_disk_answers_452_logs_each_change_once_and_alerts(tmp_path, watchers, sink):
    alert_sink, webhook = watchers
    data = tmp_path / "data"
    _mount_tmpfs(data)
    server = None
    try:
        server = await Server(tmp_path, connectors=_onprem(sink.port), alerts=_alerts(alert_sink, webhook),
                              server={"delivery_process": True}).start()
        filler = data / "filler"
        _fill(filler)
        # The queue's WAL may still have room from earlier writes (SQLite reuses it after a
        # checkpoint), so a commit or two can still succeed on a full disk: those messages
        # were accepted and must be delivered; after the first 452 every message gets 452.
        accepted_before, deadline = 0, time.monotonic() + 10
        while True:
            code, reply = await _data_reply(server.port, SMALL)
            if code == 452:
                break
            assert code == 250 and time.monotonic() < deadline, (code, reply)
            accepted_before += 1
            _fill(filler)
        for i, body in enumerate([SMALL, BIG, SMALL, BIG, SMALL]):
            code, reply = await _data_reply(server.port, body)
            assert (code, reply[:5]) == (452, b"4.3.1"), (i, code, reply)
        await eventually(lambda: webhook.events() == ["open"] and len(alert_sink.messages) == 1,
                         what=lambda: f"one open alert per channel: {webhook.events()}")
        opened = json.loads(webhook.posts[0][1])["incident"]
        assert (opened["kind"], opened["code"], opened["reply"]) == ("store", "4.3.1", "452 4.3.1")

        filler.unlink()                              # space again
        # The queue's writer reconnects with a short back-off (at most 1 s, store/writer.py):
        # until then a message is still refused as before, never accepted half-way.
        refused, deadline = 6, time.monotonic() + 10
        while True:
            code, reply = await _data_reply(server.port, SMALL)
            if code == 250:
                break
            assert (code, reply[:5]) == (452, b"4.3.1") and time.monotonic() < deadline, (code, reply)
            refused += 1
            await asyncio.sleep(0.1)
        code, reply = await _data_reply(server.port, BIG)
        assert code == 250, reply
        await eventually(lambda: webhook.events() == ["open", "resolve"] and len(alert_sink.messages) == 2,
                         what=lambda: f"the all-clear: {webhook.events()}")
        resolved = json.loads(webhook.posts[1][1])["incident"]
        assert (resolved["state"], resolved["refused"]) == ("resolved", refused)
        assert {p["code"] for p in resolved["seen"]} == {"SQLITE_FULL", "ENOSPC"}
        # Nothing acknowledged is lost: every message answered 250 is delivered.
        await eventually(lambda: len(sink.messages) == 2 + accepted_before, what="the accepted messages delivered")

        found = json.loads(await asyncio.to_thread(_cli_output, server, "incidents", "list", "--all", "--json"))
        [inc] = [i for i in found["incidents"] if i.get("kind") == "store"]
        assert (inc["state"], inc["code"], inc["refused"]) == ("resolved", "4.3.1", refused)
    finally:
        if server is not None and server.proc.poll() is None:
            await server.stop()
        subprocess.run(["umount", "-l", str(data)], check=False)
    log = server.log_path.read_text()
    assert "Traceback" not in log, log
    condition = [line for line in log.splitlines() if "relaywatch.receive:" in line]
    assert len(condition) == 4, condition           # started, also the spool, queue back, ended
    assert f"cannot write {data / 'queue.sqlite3'}: SQLITE_FULL" in condition[0]
    assert "refusing every message with 452 4.3.1" in condition[0]
    assert f"also cannot write {data / 'spool'}: ENOSPC" in condition[1]
    assert "can be written again; still failing" in condition[2]
    assert f"{refused} message(s) were refused" in condition[3]


def _cli_output(server, *args) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "relaywatch", *args, "-c", str(server.config_path)],
                          env=env, check=True, capture_output=True, text=True).stdout


# -- the delivery process's restarts ---------------------------------------------------------

def _child(pid: int) -> int | None:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(children[0]) if children else None


def _age(pid: int) -> float:
    """How long the process has run, from /proc (no clock of ours)."""
    start_ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


async def test_the_restart_backoff_starts_over_after_a_healthy_run(tmp_path, sink):
    server = await Server(tmp_path, server={"delivery_process": True, "delivery_restart_reset": "0.3s"},
                          connectors=_onprem(sink.port)).start()
    try:
        for crash in range(1, 5):
            child = await eventually(lambda: _child(server.proc.pid), what="the delivery process")
            # Healthy for longer than delivery_restart_reset before it is killed.
            await eventually(lambda: _age(child) > 0.4, what="the delivery process to have run a while")
            os.kill(child, signal.SIGKILL)
            lines = await eventually(
                lambda: [l for l in server.log_path.read_text().splitlines() if "restarting it in" in l][crash - 1:],
                what=f"restart {crash} in the log")
            assert lines[0].endswith("restarting it in 1s"), lines[0]
            await eventually(lambda: _child(server.proc.pid) not in (None, child), what="the new delivery process")
        # The last one delivers.
        code, reply = await _data_reply(server.port, SMALL)
        assert code == 250, reply
        await eventually(lambda: len(sink.messages) == 1, what="delivery by the restarted process")
    finally:
        assert await server.stop() == 0


async def test_an_alert_channel_that_fails_during_the_outage_is_recorded_and_never_holds_the_all_clear(
        relay_factory, sink):
    alert_sink = await Sink().start()
    webhook = await WebhookReceiver(status=500).start()
    try:
        relay = await relay_factory(connectors=_onprem(sink.port), alerts=_alerts(alert_sink, webhook))
        await relay.store.close()
        try:
            assert (await _data_reply(relay.port, SMALL))[0] == 451
            await eventually(lambda: webhook.events() == ["open"] and len(alert_sink.messages) == 1,
                             what="the open alert tried on both channels")
        finally:
            await relay.store.open()
        # The webhook's next try is 15 s away; the end of the condition does not wait for it.
        assert (await _data_reply(relay.port, SMALL))[0] == 250
        await eventually(lambda: len(alert_sink.messages) == 2, what="the all-clear by email")
        [inc] = await eventually(lambda: _recorded(relay), what="the incident recorded")
        shown = (await relay.cli("incidents", "show", str(inc["id"]))).output
        assert "Notified open by email: sent" in shown and "Notified resolve by email: sent" in shown
        assert "Notified open by webhook: failed (last error: webhook answered HTTP/1.1 500 X)" in shown
        # The failed all-clear waits in the store's notification queue, retried like any other.
        assert "Notified resolve by webhook: pending" in shown
    finally:
        await alert_sink.stop()
        await webhook.stop()


async def _recorded(relay):
    found = (await relay.cli_json("incidents", "list", "--all"))["incidents"]
    if not found:
        return None
    shown = (await relay.cli("incidents", "show", str(found[0]["id"]))).output
    return found if shown.count("Notified ") == 4 else None
