"""``python -m relaywatch serve`` as a real process: memory, signals, restart."""

import asyncio
import os
import signal
import smtplib
import subprocess
from pathlib import Path

from helpers import LOOPBACK, Server, Sink, SinkHandler, eventually, free_port, message, to_toml


def send_stream(port: int, sender: str, rcpt: str, size: int) -> None:
    """Send a message of ``size`` bytes without holding it in memory twice."""
    line = b"x" * 998 + b"\r\n"
    with smtplib.SMTP(LOOPBACK, port, timeout=120) as c:
        c.ehlo("client.test")
        code, _ = c.mail(sender)
        assert code == 250
        assert c.rcpt(rcpt)[0] == 250
        code, _ = c.docmd("DATA")
        assert code == 354
        c.send(b"Subject: big\r\nMessage-ID: <big@client.test>\r\n\r\n")
        for _ in range(size // len(line)):
            c.send(line)
        c.send(b".\r\n")
        code, reply = c.getreply()
        assert code == 250, reply


async def test_a_35mb_message_is_relayed_with_bounded_memory(tmp_path):
    sink = await Sink(SinkHandler(keep_content=False), data_size_limit=64_000_000).start()
    server = await Server(tmp_path, connectors=[{
        "name": "onprem", "type": "on_premises", "domains": ["fabrikam.test"],
        "smart_hosts": [f"{LOOPBACK}:{sink.port}"], "tls": "none"}]).start()
    try:
        before = server.status("VmRSS")
        size = 35_000_000
        await asyncio.to_thread(send_stream, server.port, "alice@contoso.test", "bob@fabrikam.test", size)
        await eventually(lambda: sink.handler.bytes_received >= size, timeout=60, what="the 35 MB delivery")
        peak = server.status("VmHWM")
        # Bodies stream to disk and back out in chunks: far less than one copy.
        print(f"35 MB relay: RSS before {before} kB, peak {peak} kB")
        assert peak - before < 25 * 1024, f"peak RSS grew by {(peak - before) // 1024} MB"
    finally:
        assert await server.stop() == 0
        await sink.stop()


async def test_sigterm_finishes_and_a_restart_delivers_what_was_queued(tmp_path):
    port = free_port()
    server = await Server(tmp_path, queue={"retry_intervals": ["1h"]}, connectors=[{
        "name": "onprem", "type": "on_premises", "domains": ["fabrikam.test"],
        "smart_hosts": [f"{LOOPBACK}:{port}"], "tls": "none"}]).start()
    await asyncio.to_thread(_send, server.port)
    await eventually(lambda: "deferred id=" in server.log_path.read_text(), what="the deferral in the log")
    assert await server.stop() == 0
    assert "stopping" in server.log_path.read_text()
    sink = await Sink(port=port).start()
    try:
        # Deferred for an hour, but a restart plus `queue retry` sends it now.
        await server.start()
        await server.cli("queue", "retry", "--all")
        await eventually(lambda: sink.messages, what="delivery after restart")
        # The mail log is written out within 100 ms of the event (events.py).
        await eventually(lambda: "delivered id=" in server.log_path.read_text(), what="the delivery in the log")
        assert "msgid=<restart@client.test>" in server.log_path.read_text()
    finally:
        await server.stop()
        await sink.stop()


async def test_sighup_reloads_the_config(tmp_path, sink):
    server = await Server(tmp_path).start()
    try:
        # fabrikam.test is not routed anywhere yet: it would go by MX.
        server.raw["connectors"] = [{"name": "onprem", "type": "on_premises", "domains": ["fabrikam.test"],
                                     "smart_hosts": [f"{LOOPBACK}:{sink.port}"], "tls": "none"}]
        server.config_path.write_text(to_toml(server.raw))
        server.proc.send_signal(signal.SIGHUP)
        await eventually(lambda: "configuration reloaded" in server.log_path.read_text(), what="the reload")
        await asyncio.to_thread(_send, server.port)
        await eventually(lambda: sink.messages, what="delivery through the new connector")
    finally:
        await server.stop()


def _send(port):
    with smtplib.SMTP(LOOPBACK, port) as c:
        c.sendmail("alice@contoso.test", ["bob@fabrikam.test"], message("restart", message_id="<restart@client.test>"))


async def test_sigkill_loses_nothing_and_leaves_no_orphan(tmp_path):
    port = free_port()
    server = await Server(tmp_path, queue={"retry_intervals": ["1h"]}, connectors=[{
        "name": "onprem", "type": "on_premises", "domains": ["fabrikam.test"],
        "smart_hosts": [f"{LOOPBACK}:{port}"], "tls": "none"}]).start()
    children = await eventually(lambda: _children(server.proc.pid), what="the delivery process")
    await asyncio.to_thread(_send, server.port)
    await eventually(lambda: "deferred id=" in server.log_path.read_text(), what="the deferral")
    server.proc.kill()                                  # no chance to clean up
    await asyncio.to_thread(server.proc.wait)
    server.log.close()
    # The delivery child notices its parent is gone and stops by itself.
    await eventually(lambda: not any(Path(f"/proc/{c}").exists() for c in children), what="the child to exit")
    sink = await Sink(port=port).start()
    try:
        await server.start()
        await server.cli("queue", "retry", "--all")
        await eventually(lambda: sink.messages, what="delivery after the crash")
        assert len(sink.messages) == 1
    finally:
        await server.stop()
        await sink.stop()


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


async def test_the_port_opens_only_once_the_delivery_process_is_ready(tmp_path):
    """Mail accepted before the delivery process runs would wait for its start-up
    (about half a second of Python): the receiver listens only after it says ready."""
    server = await Server(tmp_path, server={"delivery_process": True}).start()
    try:
        # The moment the port answers, the delivery process already has the queue open.
        [child] = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
        fds = Path(f"/proc/{child}/fd")
        opened = {os.readlink(fds / fd) for fd in os.listdir(fds)}
        assert str(tmp_path / "data" / "queue.sqlite3") in opened, opened
    finally:
        await server.stop()


async def test_a_pid_file_that_cannot_be_written_leaves_the_server_serving(tmp_path, sink):
    """serve writes its pid file once the port is open.  A write that fails then (a disk that
    fills up at that moment, as the full-disk test's did on a loaded machine) ended
    serve_forever outside its stop: the loop tore down under the mail in flight (451) and the
    process hung on SIGTERM.  Here the pid file's path is a directory, so the write fails."""
    server = Server(tmp_path, connectors=[{"name": "onprem", "type": "on_premises", "domains": ["fabrikam.test"],
                                           "smart_hosts": [f"{LOOPBACK}:{sink.port}"], "tls": "none"}])
    (server.data_dir / "relaywatch.pid").mkdir(parents=True)
    await server.start()
    try:
        await eventually(lambda: "cannot write the pid file" in server.log_path.read_text(),
                         what="the pid file's error")
        await asyncio.to_thread(_send, server.port)
        await eventually(lambda: sink.messages, what="delivery with no pid file")
    finally:
        assert await server.stop() == 0
    assert "Traceback" not in server.log_path.read_text()
