"""Backlog probes: the loop around watch/probe_schedule.py.

Every connector with deferred mail is probed on its schedule (not only those
with an open incident: a short outage never opens one), and the moment a
probe passes its whole backlog is released for delivery instead of waiting
out retry timers.  The watch's tick tells the prober which connectors have
deferred mail (``follow``); between ticks the prober wakes when the next
probe is due, so probes are not tied to ``alerts.evaluate_interval``.  At most
``PROBES_AT_ONCE`` probes run at once, one per connector, so a hundred
connectors down together cannot hold the watch up or open a hundred
connections in one go.  With several nodes only the leader probes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from relaywatch import events
from relaywatch.clock import SYSTEM_CLOCK, Clock
from relaywatch.config import Config, Connector
from relaywatch.errors import StoreError
from relaywatch.incident import BacklogSummary, ProbeResult
from relaywatch.watch.probe_schedule import (FailurePattern, ProbeTiming, follow, next_probe_at, probe_gap, probed,
                                             spread)

log = logging.getLogger("relaywatch.watch")
PROBES_AT_ONCE = 8


class BacklogProber:
    """``run_probe``: probe a connector (None if the probe could not run);
    ``on_probe``: keep a backlog probe's result (on the connector's open
    incidents); ``release``: make a connector's deferred mail due now, returning
    how many; ``leading``: whether this node runs the watch."""

    def __init__(self, config_ref: Callable[[], Config],
                 run_probe: Callable[[Connector], Awaitable[ProbeResult | None]],
                 on_probe: Callable[[str, ProbeResult], Awaitable[None]],
                 release: Callable[[str], Awaitable[int]],
                 leading: Callable[[], bool], clock: Clock = SYSTEM_CLOCK):
        self.config_ref = config_ref
        self.run_probe = run_probe
        self.on_probe = on_probe
        self.release = release
        self.leading = leading
        self.clock = clock
        self.patterns: dict[str, FailurePattern] = {}    # connector -> its failure pattern
        self._running: dict[str, asyncio.Task] = {}
        self._slots = asyncio.Semaphore(PROBES_AT_ONCE)
        self._changed = asyncio.Event()
        self._stopping = False

    def timing(self) -> ProbeTiming:
        alerts = self.config_ref().alerts
        return ProbeTiming.of(alerts.probe_min_interval, alerts.probe_interval)

    def follow(self, backlog: tuple[BacklogSummary, ...], now: float) -> None:
        """The deferred mail per (connector, code), as the watch just read it."""
        by_connector: dict[str, list[BacklogSummary]] = {}
        for s in backlog:
            by_connector.setdefault(s.connector, []).append(s)
        self.patterns = {name: pattern for name, groups in by_connector.items()
                         if (pattern := follow(self.patterns.get(name), groups, now)) is not None}
        self._changed.set()

    def due_at(self, name: str) -> float | None:
        pattern = self.patterns.get(name)
        return None if pattern is None else next_probe_at(pattern, self.timing(), spread(name))

    async def probed(self, name: str, probe: ProbeResult) -> None:
        """A probe of ``name`` ended (on the schedule, or because an incident
        opened): it counts for the schedule, and if it passed the backlog goes now."""
        pattern = self._note(name, probe.ok)
        if pattern is None:
            return
        if not probe.ok:
            # Each failed probe is logged while the gaps grow, then once they reach probe_interval.
            timing, before = self.timing(), pattern.probed_at
            capped = before is not None and before >= pattern.since and \
                probe_gap(before - pattern.since, timing) >= timing.longest
            log.log(logging.DEBUG if capped else logging.INFO, "probe of %s failed%s; next probe in %.1f s",
                    name, _why(probe), max(0.0, self.due_at(name) - self.clock.now()))
            return
        released = await self.release(name)
        if released:
            log.info("probe of %s passed after %.0f s of failures: %d deferred message(s) released",
                     name, self.clock.now() - pattern.since, released)
            events.emit("released", connector=name, status="probe passed",
                        detail=f"{released} deferred message(s) released for immediate delivery")

    def _note(self, name: str, ok: bool) -> FailurePattern | None:
        """Count a probe that just ended in the schedule (before anything that may
        fail: a store outage must not make the prober probe without pause);
        the pattern as it was before."""
        pattern = self.patterns.get(name)
        if pattern is not None:
            self.patterns[name] = probed(pattern, ok, self.clock.now())
            self._changed.set()
        return pattern

    # -- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while not self._stopping:
                self._changed.clear()
                wait = self._start_due(self.clock.now())
                await self.clock.wait(self._changed, wait)
        finally:
            for task in self._running.values():
                task.cancel()
            await asyncio.gather(*self._running.values(), return_exceptions=True)

    def stop(self) -> None:
        self._stopping = True
        self._changed.set()

    def _start_due(self, now: float) -> float:
        """Start the probes that are due; the seconds until the next one is."""
        config = self.config_ref()
        if not self.leading():
            return config.alerts.probe_interval
        wait = config.alerts.probe_interval
        for name in sorted(self.patterns):
            connector = config.connector(name)
            if connector is None or not connector.enabled or connector.paused or name in self._running:
                continue
            due = self.due_at(name) - now
            if due > 0:
                wait = min(wait, due)
                continue
            task = asyncio.create_task(self._probe(connector), name=f"probe:{name}")
            self._running[name] = task
            task.add_done_callback(lambda t, n=name: self._ended(n))
        return wait

    def _ended(self, name: str) -> None:
        self._running.pop(name, None)
        self._changed.set()

    async def _probe(self, connector: Connector) -> None:
        async with self._slots:
            try:
                probe = await self.run_probe(connector)
                if probe is None:   # it could not run (logged): again after a gap, not at once
                    self._note(connector.name, False)
                    return
                await self.probed(connector.name, probe)
                await self.on_probe(connector.name, probe)
            except StoreError as exc:   # (a lapsed leader term too) the probe is counted: no retry at once
                log.warning("backlog probe of %s: could not act on its result: %s", connector.name, exc)
            except Exception:   # the loop must outlive a bug in one probe's bookkeeping
                log.exception("backlog probe of %s: could not act on its result", connector.name)


def _why(probe: ProbeResult) -> str:
    error = probe.error
    return "" if error is None else f" ({error.code} {error.title}: {error.detail})"
