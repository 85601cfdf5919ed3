"""`pip install .` gives a working command: a wheel built from the source tree, installed into a
fresh virtualenv with only what pyproject.toml declares (pip takes the dependencies from the
package index this machine uses), runs `--version`, `--help` and `config check`.

About 10-20 s on the 2-core machine (most of it pip, from its cache when warm); it runs in `make test`.
"""

import re
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PIP = ["-m", "pip", "--disable-pip-version-check", "-q"]


def run(*args, cwd=None, check=True):
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with the relaywatch wheel installed: (python, relaywatch command, wheel)."""
    work = tmp_path_factory.mktemp("pkg")
    # Build from a copy holding only what a checkout has, so build/ and *.egg-info land there.
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "relaywatch", src / "relaywatch", ignore=shutil.ignore_patterns("__pycache__"))
    run(sys.executable, *PIP, "wheel", "--no-deps", "-w", work / "dist", src)
    (wheel,) = (work / "dist").glob("relaywatch-*.whl")
    env = work / "venv"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    run(python, *PIP, "install", wheel)
    return python, env / "bin" / "relaywatch", wheel


def test_the_installed_command_runs(installed):
    python, relaywatch, _ = installed
    version = run(relaywatch, "--version").stdout.strip()
    declared = re.search(r'__version__ = "(.+)"', (ROOT / "relaywatch" / "__init__.py").read_text()).group(1)
    assert version == f"relaywatch {declared}"
    assert "serve" in run(relaywatch, "--help").stdout
    check = run(relaywatch, "config", "check", "-c", ROOT / "examples" / "relaywatch.toml")
    assert "OK" in check.stdout
    # What serve imports on its first lines (uvloop, DNS, TLS diagnosis, the SQLite store, the console) is there too.
    run(python, "-c", "import uvloop, relaywatch.app, relaywatch.deliver.transport, relaywatch.store.sqlite, "
                      "relaywatch.console.server")
    # The console's templates and static files are in the wheel.
    run(python, "-c", "from importlib import resources; from relaywatch.console.web import Web; env = Web(None).env; "
                      "[env.get_template(t) for t in ('overview.html', 'incident.html', 'queue.html')]; "
                      "assert all(resources.files('relaywatch.console').joinpath('static', f).is_file() "
                      "for f in ('console.css', 'console.js'))")


def test_postgresql_is_an_extra_and_config_check_says_so(installed, tmp_path):
    python, relaywatch, wheel = installed
    cfg = tmp_path / "pg.toml"
    cfg.write_text('[server]\nstore = "postgresql://postgres@127.0.0.1/test"\n')
    without = run(relaywatch, "config", "check", "-c", cfg, check=False)
    assert without.returncode == 2
    assert "server.store" in without.stderr and "relaywatch[postgresql]" in without.stderr
    assert "Traceback" not in without.stderr
    run(python, *PIP, "install", f"{wheel}[postgresql]")
    assert run(relaywatch, "config", "check", "-c", cfg).returncode == 0


def test_declared_ranges_admit_the_pinned_set():
    """requirements.txt is the tested set; pyproject's ranges must allow every pin in it."""
    from packaging.requirements import Requirement
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["postgresql"]]
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    for req in declared:
        assert req.name.lower() in pins, f"{req.name} is declared but not pinned in requirements.txt"
        assert req.specifier.contains(pins[req.name.lower()]), f"{req} does not admit the pinned {pins[req.name.lower()]}"
