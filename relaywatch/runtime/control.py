"""How the outside reaches a running server: its pid file and its signals.

``serve`` writes ``<data_dir>/relaywatch.pid`` once it listens and removes it
when it stops; the commands below read it.  The signals a server handles:

    SIGTERM, SIGINT  stop: no new connections, deliveries in flight finish
                     within ``server.shutdown_grace``, the other leases go back
    SIGHUP           re-read the config file (``relaywatch reload``)
    SIGUSR1          look at the queue and the overrides now (queue commands,
                     Fix now); the server polls both anyway, this only saves
                     the wait

The receiving process passes SIGHUP, SIGUSR1 and (at stop) SIGTERM on to the
delivery process it supervises (runtime/child.py); only the receiving (or the
single) process has a pid file.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Callable

PID_FILE_NAME = "relaywatch.pid"


class NoServer(Exception):
    """No usable pid file: no server runs with this data_dir (or it cannot be told)."""

    def __init__(self, pid_file: Path):
        super().__init__(f"no running server found (no usable {pid_file})")
        self.pid_file = pid_file


def pid_file(data_dir: Path) -> Path:
    return data_dir / PID_FILE_NAME


def write_pid_file(data_dir: Path) -> None:
    pid_file(data_dir).write_text(str(os.getpid()))


def remove_pid_file(data_dir: Path) -> None:
    try:
        pid_file(data_dir).unlink()
    except OSError:
        pass


def reload_server(data_dir: Path) -> int:
    """SIGHUP to the server of ``data_dir``; its pid.  Raises NoServer.

    Only to a live relaywatch: a pid file left by a crash may name a process
    that has nothing to do with us, and SIGHUP ends most programs."""
    pid = running_server(data_dir)
    if pid is None:
        raise NoServer(pid_file(data_dir))
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError:
        raise NoServer(pid_file(data_dir)) from None
    return pid


def running_server(data_dir: Path) -> int | None:
    """The pid of a live relaywatch that wrote the pid file of ``data_dir``, other than us."""
    try:
        pid = int(pid_file(data_dir).read_text())
        # A stale pid file must not make another process pass for relaywatch.
        if pid != os.getpid() and b"relaywatch" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    except (OSError, ValueError):
        pass
    return None


def wake_server(data_dir: Path) -> None:
    """SIGUSR1 to the server of ``data_dir``, if one runs: look at the queue now.
    Best effort: the server polls every second anyway."""
    pid = running_server(data_dir)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGUSR1)
        except OSError:
            pass


def handle_signals(loop: asyncio.AbstractEventLoop, *, stop: Callable[[], object],
                   reload: Callable[[], object], wake: Callable[[], object]) -> None:
    """Install the server's handlers (the table in the module docstring)."""
    loop.add_signal_handler(signal.SIGTERM, stop)
    loop.add_signal_handler(signal.SIGINT, stop)
    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGUSR1, wake)
