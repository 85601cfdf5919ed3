"""Keep the benchmark harness working: a tiny run (it measures nothing)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
POSTFIX = (shutil.which("smtp-source") and shutil.which("smtp-sink") and shutil.which("postfix")
           and Path("/etc/postfix/main.cf").exists())


@pytest.mark.skipif(not POSTFIX, reason="Postfix's tools are not installed (make bench installs them)")
def test_bench_harness_smoke_run():
    # The peers (Exim, OpenSMTPD, Haraka) are fetched from apt and npm on first use and take
    # about a minute more: only with RELAYWATCH_LONG_TESTS=1; relaywatch and Postfix always.
    only = [] if os.environ.get("RELAYWATCH_LONG_TESTS") else ["--only", "relaywatch", "--only", "postfix"]
    result = subprocess.run([sys.executable, "bench/run.py", "--smoke", "--scenario", "throughput_1k",
                             "--scenario", "backlog_flush", *only], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((ROOT / "bench" / "results" / "smoke.json").read_text())
    for scenario in ("throughput_1k", "backlog_flush"):
        for relay in ("relaywatch", "postfix"):
            assert data["scenarios"][scenario][relay], (scenario, relay)
    # Every peer either ran (after passing the exactly-once check) or says why not.
    for peer in ("exim", "opensmtpd", "haraka") if not only else ():
        if peer in data["skipped"]:
            assert data["skipped"][peer] and f"skipping {peer}: " in result.stdout, peer
        else:
            assert data["delivery_check"][peer]["ok"], data["delivery_check"][peer]
            for scenario in ("throughput_1k", "backlog_flush"):
                assert data["scenarios"][scenario][peer], (scenario, peer)


def bench_run():
    """bench/run.py, imported from its folder."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import run
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return run


def test_a_peer_that_cannot_be_installed_is_skipped_with_its_reason(capsys):
    run = bench_run()

    class Reference:
        name = "reference"

        @classmethod
        def install(cls):
            raise AssertionError("the reference is installed before, and never skipped")

    class Missing:
        name = "missing"

        @classmethod
        def install(cls):
            return "no such package here"

    class Ready:
        name = "ready"

        @classmethod
        def install(cls):
            return None

    relays, skipped = run.ready_relays(None, classes=(Reference, Missing, Ready), peers=(Missing, Ready))
    assert relays == [Reference, Ready]
    assert skipped == {"missing": "no such package here"}
    assert "skipping missing: no such package here" in capsys.readouterr().out
    relays, skipped = run.ready_relays(["ready"], classes=(Reference, Missing, Ready), peers=(Missing, Ready))
    assert (relays, skipped) == ([Ready], {})


@pytest.mark.skipif(not POSTFIX, reason="Postfix's tools are not installed (make bench installs them)")
@pytest.mark.parametrize("copies", [1, 2, 0])
def test_the_exactly_once_check_counts_every_message_at_the_sink(copies):
    """A stand-in relay that forwards each message `copies` times: only 1 passes."""
    import smtplib

    from aiosmtpd.controller import Controller

    run = bench_run()

    class Forward:
        def __init__(self, sink_port):
            self.sink_port = sink_port

        async def handle_DATA(self, server, session, envelope):
            for _ in range(copies):
                with smtplib.SMTP("127.0.0.1", self.sink_port) as client:
                    client.sendmail(envelope.mail_from, envelope.rcpt_tos, envelope.original_content)
            return "250 ok"

    class Copier:
        name = "copier"

        def __init__(self, sink_port):
            self.port = run.free_port()
            self.controller = Controller(Forward(sink_port), hostname="127.0.0.1", port=self.port)

        def start(self):
            self.controller.start()
            return self

        def queue_size(self):
            return 0

        def stop(self):
            self.controller.stop()

    run.WORK.mkdir(parents=True, exist_ok=True)
    check = run.delivery_check(Copier, messages=12, sessions=3, timeout=3 if copies == 0 else 30)
    if copies == 1:
        assert check == {"ok": True, "sent": 12, "received": 12, "distinct": 12, "duplicates": 0}
    elif copies == 2:
        assert check["ok"] is False and check["duplicates"] == 12, check
    else:
        assert check["ok"] is False and check["received"] == 0, check


@pytest.mark.skipif(not POSTFIX, reason="Postfix's tools are not installed (make bench installs them)")
def test_the_console_scenario_scrapes_while_it_measures():
    """throughput_console at a tiny size: both runs deliver everything, the console answered every poll."""
    run = bench_run()
    r = run.throughput_console(run.Relaywatch, 30, 2, 1024)
    assert r["scrapes"] >= 1 and r["poll_failures"] == 0, r
    assert r["with_per_s"] > 0 and r["without_per_s"] > 0 and r["with_over_without"] > 0
    assert "throughput_console" in run.SCENARIOS and "throughput_console" in run.HEADLINE
    assert "| `throughput_console` |" in (ROOT / "bench" / "README.md").read_text()


def test_the_single_session_scenario_has_its_own_row_with_one_session():
    # Once a one-session run was throughput_1k --sessions 1, overwriting the 20-session result.
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import run
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert "single_session" in run.SCENARIOS and "single_session" in run.HEADLINE
    assert "| `single_session` |" in (ROOT / "bench" / "README.md").read_text()
    params = {"repeat": 3, "messages": 20000, "sessions": 20, "smoke": False}
    summary = {"relaywatch": {"end_to_end_per_s": {"median": 300.0, "min": 290.0, "max": 310.0}}}
    md = run.render({"when": "now", "machine": {"cores": 2, "python": "3"}, "params": params,
                     "scenarios": {"throughput_1k": {**summary, "when": "t1", "params": params},
                                   "single_session": {**summary, "when": "t2", "params": params}}})
    assert "| throughput_1k | t1 | 20000 | 20 | 3 |" in md
    assert "| single_session | t2 | 5000 | 1 | 3 |" in md
