"""The delivery process: how the receiving process starts, wakes and restarts it.

With ``server.delivery_process`` the receiving process (role RECEIVE) runs
``relaywatch serve --role deliver --wake-fd N`` as its child, and the two
speak a private byte protocol over one socketpair (the child's end is fd N):

    child -> parent   b"R"   ready: the scheduler runs.  The receiver opens its
                             SMTP port only then, so that the first mail waits
                             for no start-up.  Every start says it; the parent
                             waits for the first only and discards the rest.
    parent -> child   b"!"   wake: work was committed, look at the queue now.
                             At most one per event-loop turn, however many
                             messages it committed; a full socket buffer already
                             means "wake", so a byte that does not fit is dropped.
    parent -> child   EOF    the receiving process is gone (even by SIGKILL): the
                             child stops, and the next run takes over the queue.

Nothing else travels on it; the child polls the queue every second anyway,
so a lost byte costs at most that.  Signals are passed on as well
(runtime/control.py): SIGHUP (reload) and SIGUSR1 (look now) to a running
child, SIGTERM at stop.

Waking the scheduler is the ``Waker`` protocol: ``SchedulerWaker`` in one
process (role ALL), ``PipeWaker`` across the socketpair (RECEIVE).

A child that dies is restarted after ``RestartBackoff``: a back-off that
doubles with each crash in a row (1 s to 60 s) and starts over once a process
has run for ``server.delivery_restart_reset``: a crash after healthy hours
costs a second, not a minute without delivery.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Protocol

from relaywatch.config import Config

log = logging.getLogger("relaywatch.app")

READY = b"R"
WAKE = b"!"
_CHILD_SIGNALS_AFTER = 3.0   # seconds: a child still starting has no handlers (SIGUSR1 would kill it)


class Waker(Protocol):
    def wake(self) -> None:
        """New work may be due (called after each commit)."""


class SchedulerWaker:
    """The scheduler runs in this process: tell it directly."""

    def __init__(self, notify: Callable[[], None]):
        self.wake = notify


class PipeWaker:
    """The scheduler runs in the delivery process: one WAKE byte per loop turn."""

    def __init__(self, fd: int):
        self.fd = fd
        self._pending = False

    def wake(self) -> None:
        if not self._pending:
            self._pending = True
            asyncio.get_running_loop().call_soon(self._write)

    def _write(self) -> None:
        self._pending = False
        try:
            os.write(self.fd, WAKE)
        except (BlockingIOError, BrokenPipeError):
            pass   # a full pipe already means "wake up"; a dead child is restarted


# -- the delivery process's end --------------------------------------------------------

class ParentLink:
    """The child's end of the socketpair: say READY, hear wakes and the parent's EOF."""

    def __init__(self, fd: int):
        self.fd = fd
        os.set_blocking(fd, False)

    def listen(self, on_wake: Callable[[], None], on_parent_gone: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()

        def readable() -> None:
            try:
                while True:
                    if not os.read(self.fd, 4096):
                        loop.remove_reader(self.fd)
                        on_parent_gone()
                        return
            except BlockingIOError:
                pass
            on_wake()
        loop.add_reader(self.fd, readable)

    def say_ready(self) -> None:
        try:
            os.write(self.fd, READY)
        except OSError:
            pass   # the receiver is gone; listen() sees the end of file


# -- the receiving process's side --------------------------------------------------------

class RestartBackoff:
    """How long to wait before restarting a process that exited (pure).

    Doubles from ``first`` to ``limit`` while crashes come in a row; a process
    that ran for ``healthy_after`` or longer was healthy, and the next restart
    waits ``first`` again."""

    def __init__(self, healthy_after: float, first: float = 1.0, limit: float = 60.0):
        self.healthy_after = healthy_after
        self.first = first
        self.limit = limit
        self._next = first

    def after_exit(self, ran_for: float) -> float:
        """The wait before the next start, given how long the process that exited ran."""
        if ran_for >= self.healthy_after:
            self._next = self.first
        delay = self._next
        self._next = min(self._next * 2, self.limit)
        return delay


class ChildLink:
    """The receiving process's end of the socketpair: wake the child, hear it is READY."""

    def __init__(self, fd: int):
        self.fd = fd
        os.set_blocking(fd, False)
        self.waker: Waker = PipeWaker(fd)

    async def wait_ready(self, alive: Callable[[], bool], timeout: float = 30.0) -> None:
        """Return once the child said READY.

        Its start (Python, imports, the store) takes about half a second on the
        bench machine; mail accepted before it would wait that long.  Receiving
        never depends on delivery, though: past ``timeout``, or once the child is
        no longer ``alive()``, this returns anyway (the supervisor restarts it)."""
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def readable() -> None:
            try:
                os.read(self.fd, 64)
            except BlockingIOError:
                return
            except OSError:
                pass
            if not ready.done():
                ready.set_result(None)
        loop.add_reader(self.fd, readable)
        try:
            deadline = loop.time() + timeout
            while not ready.done() and alive() and loop.time() < deadline:
                await asyncio.wait({ready}, timeout=0.05)
        finally:
            loop.remove_reader(self.fd)
        if not ready.done():
            log.warning("the delivery process is not ready; accepting mail anyway (it is delivered once it is)")
        # A restarted child says READY again; nobody waits for it then.
        loop.add_reader(self.fd, self._discard)

    def _discard(self) -> None:
        try:
            os.read(self.fd, 64)
        except OSError:
            pass

    def close(self) -> None:
        """The child sees EOF: its receiver is gone."""
        try:
            asyncio.get_running_loop().remove_reader(self.fd)
            os.close(self.fd)
        except OSError:
            pass


class DeliveryChild:
    """Starts the delivery process, restarts it when it dies, passes signals on, stops it."""

    def __init__(self, config_ref: Callable[[], Config]):
        self.config_ref = config_ref
        parent_end, child_end = socket.socketpair()
        self._child_fd = child_end.detach()
        self.link = ChildLink(parent_end.detach())
        self.process: subprocess.Popen | None = None
        self._started = 0.0
        self._stopping = False

    def spawn(self) -> None:
        self._started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "relaywatch", "serve", "--role", "deliver", "--wake-fd", str(self._child_fd),
             "-c", str(self.config_ref().source)],
            pass_fds=(self._child_fd,))

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def forward(self, sig: signal.Signals) -> None:
        """Pass SIGHUP or SIGUSR1 on.  A child still starting up has no handler yet
        (SIGUSR1 would kill it); it reads the config and the queue as it starts anyway."""
        if sig is signal.SIGUSR1 and time.monotonic() - self._started <= _CHILD_SIGNALS_AFTER:
            return
        self.process.send_signal(sig)

    async def supervise(self) -> None:
        """Restart the delivery process if it dies; its leases lapse or are returned."""
        backoff = RestartBackoff(self.config_ref().server.delivery_restart_reset)
        while not self._stopping:
            code = await asyncio.to_thread(self.process.wait)
            if self._stopping:
                return
            ran_for = time.monotonic() - self._started
            backoff.healthy_after = self.config_ref().server.delivery_restart_reset   # a reload may change it
            delay = backoff.after_exit(ran_for)
            log.error("the delivery process exited with %s after %.1fs; restarting it in %.0fs", code, ran_for, delay)
            await asyncio.sleep(delay)
            if not self._stopping:
                self.spawn()

    async def stop(self) -> None:
        """SIGTERM; the child finishes within shutdown_grace, else it is killed."""
        self._stopping = True
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.process.wait, self.config_ref().server.shutdown_grace + 10)
        except subprocess.TimeoutExpired:
            log.error("the delivery process did not stop in time; killing it (its leases lapse)")
            self.process.kill()
