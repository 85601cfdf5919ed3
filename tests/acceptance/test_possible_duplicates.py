"""A node killed after handing a message to its destination and before recording it
delivers it again when it comes back: the one duplicate allowed, and it is logged
("possible duplicate", the queue id, the node) and counted in /metrics."""

import asyncio
import re
import urllib.request

import pytest

from helpers import LOOPBACK, Server, Sink, SinkHandler, eventually
from relaywatch.deliver.handover import unfinished


@pytest.mark.parametrize("journal, ids", [
    ("", []),
    ("+a\n-a\n", []),
    ("+a\n+b\n-a\n", ["b"]),
    ("+a\n+b\n-b\n+c\n+b", ["a", "c"]),      # a torn last line: the process died mid-write
    ("-x\n+y\n+y\n", ["y"]),                 # an end without a start (an earlier journal's)
])
def test_the_journal_lists_what_started_and_did_not_end(journal, ids):
    assert unfinished(journal) == ids


class HoldsTheFirstReply(SinkHandler):
    """Takes the first message, then sits on its 250; answers the copies at once."""

    async def handle_DATA(self, server, session, envelope):
        reply = await super().handle_DATA(server, session, envelope)
        if len(self.messages) == 1:
            await asyncio.sleep(30)
        return reply


@pytest.mark.parametrize("delivery_process", [False, True], ids=["one-process", "two-processes"])
async def test_a_node_killed_before_recording_logs_the_redelivery_as_a_possible_duplicate(tmp_path,
                                                                                         delivery_process):
    sink = await Sink(HoldsTheFirstReply()).start()
    server = Server(tmp_path, server={"node_name": "n1", "delivery_process": delivery_process},
                    delivery={"final_timeout": "60s"},
                    connectors=[{"name": "onprem", "type": "on_premises", "domains": ["fabrikam.test"],
                                 "smart_hosts": [f"{LOOPBACK}:{sink.port}"], "tls": "none"}])
    await server.start()
    try:
        import smtplib
        with smtplib.SMTP(LOOPBACK, server.port, timeout=10) as c:
            c.ehlo("client.test")
            c.mail("alice@contoso.test")
            c.rcpt("bob@fabrikam.test")
            code, reply = c.data(b"Subject: once\r\n\r\nhello\r\n")
        assert code == 250
        queue_id = reply.decode().rsplit(" ", 1)[1]
        await eventually(lambda: len(sink.messages) == 1, what="the destination to have the message")
        # kill -9 between the destination's DATA and the 250 (the whole process group: the
        # delivery process too, which would otherwise stop cleanly when its parent goes).
        _kill_all(server)
        first_run = server.log_path.read_text()
        assert "possible duplicate" not in first_run
        await server.start()
        await eventually(lambda: len(sink.messages) == 2, what="the copy delivered again")
        log = await eventually(lambda: _line(server, "possible duplicate"), what="the possible-duplicate line")
        assert queue_id in log and "node n1" in log and "warning" in log
        # The new run's console: it may open after the redelivery (the scheduler starts first),
        # when the dead run's address is the only one in the log.
        url = await eventually(lambda: _console_url(server, since=len(first_run)), what="the console's address")
        metrics = await eventually(lambda: _metric(url, "relaywatch_possible_duplicates_total"),
                                   what="the counter in /metrics")
        assert metrics == 1
    finally:
        await server.stop()
        await sink.stop()


def _kill_all(server):
    import os
    import signal
    children = []
    try:
        children = [int(p) for p in open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read().split()]
    except OSError:
        pass
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    server.kill()


def _line(server, text):
    return next((line for line in server.log_path.read_text().splitlines() if text in line), None)


def _console_url(server, since=0):
    """The address the console logged after the first ``since`` characters of the log."""
    match = re.search(r"console on (http://[\d.:]+)", server.log_path.read_text()[since:])
    return match.group(1) if match else None


async def _metric(url, name):
    def get():
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            return r.read().decode()
    text = await asyncio.to_thread(get)
    total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))
    return total or None
