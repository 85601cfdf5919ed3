"""Keep the benchmark harness working: a tiny run (it measures nothing)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not (shutil.which("smtp-source") and shutil.which("smtp-sink") and shutil.which("postfix")
                         and Path("/etc/postfix/main.cf").exists()),
                    reason="Postfix's tools are not installed (make bench installs them)")
def test_bench_harness_smoke_run():
    result = subprocess.run([sys.executable, "bench/run.py", "--smoke", "--scenario", "throughput_1k",
                             "--scenario", "backlog_flush"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((ROOT / "bench" / "results" / "smoke.json").read_text())
    for scenario in ("throughput_1k", "backlog_flush"):
        for relay in ("relaywatch", "postfix"):
            assert data["scenarios"][scenario][relay], (scenario, relay)
