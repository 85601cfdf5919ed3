"""The relay's own incident: it cannot queue mail (a full disk, a store that is down).

Every other incident lives in the store and is told through it (monitor.py);
this one cannot be, since the store is what fails.  The receiving process
opens it in memory when receive/store_condition.py says the condition
started, tells the admins at once straight through alerts.py (email to
``[alerts] smtp`` or their MX, the signed webhook), and once the condition has
ended (a write succeeded everywhere it had failed) records it in the store's
incident history, resolved, with the notifications sent, and sends the
all-clear.  A resolve notification that cannot go out at once is left in the
store's notification queue, whose retries the watch loop runs.

The incident builders are pure; ``StoreIncidentReporter`` does the I/O.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from typing import Callable

from relaywatch.clock import SYSTEM_CLOCK, Clock
from relaywatch.config import Config
from relaywatch.errors import StoreError
from relaywatch.receive.store_condition import (Change, ConditionChanged, ConditionEnded, ConditionStarted,
                                                PlaceRecovered, StoreProblem, span)
from relaywatch.store.base import WatchStore
from relaywatch.watch import alerts
from relaywatch.incident_facts import StoreFacts
from relaywatch.incident import Alert, Incident, IncidentKind, IncidentState, Severity

log = logging.getLogger("relaywatch.watch")


def _problem(p: StoreProblem) -> dict:
    return {"place": p.place.value, "path": p.path, "code": p.code, "detail": p.detail, "full": p.full,
            "refusing": p.refusing}


def _fixes(problems: list[StoreProblem]) -> tuple[str, ...]:
    fixes = []
    for p in problems:
        if p.full:
            fixes.append(f"Free space on the file system that holds {p.path} (df -h; a quota: quota -v): "
                         "relaywatch writes the queue and the spool there.")
        else:
            fixes.append(f"Make {p.path} writable again: {p.code} ({p.detail}).")
    return tuple(dict.fromkeys(fixes))


def _facts(inc: Incident) -> StoreFacts:
    return inc.facts if isinstance(inc.facts, StoreFacts) else StoreFacts("451 4.3.0", 0)


def _failing(inc: Incident, failing: list[StoreProblem], refused: int, seen: tuple[dict, ...], at: float) -> Incident:
    full = any(p.full for p in failing)
    return replace(inc, code="4.3.1" if full else "4.3.0",
                   title="Disk full: relaywatch cannot queue mail" if full else "relaywatch cannot queue mail",
                   fixes=_fixes(failing), updated_at=at, last_seen=at,
                   facts=StoreFacts("452 4.3.1" if full else "451 4.3.0", refused,
                                    tuple(_problem(p) for p in failing), seen))


def open_store_incident(problem: StoreProblem, at: float) -> Incident:
    inc = Incident(kind=IncidentKind.STORE, connector="-", code="4.3.0", title="", opened_at=at,
                   severity=Severity.CRITICAL, connector_type="-", first_seen=at, oldest_received_at=at,
                   first_expires_at=at)
    return _failing(inc, [problem], 1, (_problem(problem),), at)


def update_store_incident(inc: Incident, failing: list[StoreProblem], refused: int, at: float) -> Incident:
    seen = _facts(inc).seen
    known = {(s.get("place"), s.get("code")) for s in seen}
    seen += tuple(_problem(p) for p in failing if (p.place.value, p.code) not in known)
    return _failing(inc, failing, refused, seen, at)


def resolve_store_incident(inc: Incident, ended: ConditionEnded) -> Incident:
    seen = tuple(_problem(p) for p in ended.problems)
    return replace(inc, state=IncidentState.RESOLVED, resolved_at=ended.at, updated_at=ended.at,
                   facts=replace(_facts(inc), refused=ended.refused, seen=seen, problems=seen),
                   fixes=_fixes(list(ended.problems)))


# -- the I/O -----------------------------------------------------------------------------

@dataclass
class _Told:
    alert: Alert
    channel: str
    payload: dict
    attempts: int = 0
    sent_at: float | None = None
    last_error: str | None = None
    recorded: bool = False       # in the store's notifications (sent, failed, or queued for its retries)


@dataclass
class _Outage:
    incident: Incident
    told: list[_Told] = field(default_factory=list)
    alerting: asyncio.Task | None = None
    over: asyncio.Event = field(default_factory=asyncio.Event)   # the condition ended


class StoreIncidentReporter:
    """The receiver's ``ConditionListener`` (receive/store_condition.py), wired in app.py."""

    def __init__(self, config_ref: Callable[[], Config], store: WatchStore, routes,
                 clock: Clock = SYSTEM_CLOCK):
        self.config_ref = config_ref
        self.store = store
        self.routes = routes         # SmtpRoutes, for alert email by MX
        self.clock = clock
        self._current: _Outage | None = None
        self._unrecorded: list[_Outage] = []
        self._recording: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def incident(self) -> Incident | None:
        """The open incident, while the relay cannot queue mail."""
        return self._current.incident if self._current is not None else None

    def on_change(self, change: Change, failing: list[StoreProblem], refused: int) -> None:
        if type(change) is ConditionStarted:
            outage = _Outage(open_store_incident(change.problem, change.at))
            self._current = outage
            outage.alerting = self._spawn(self._tell_until_told(outage, Alert.opened()))
        elif type(change) in (ConditionChanged, PlaceRecovered) and self._current is not None:
            self._current.incident = update_store_incident(self._current.incident, failing, refused, change.at)
        elif type(change) is ConditionEnded and self._current is not None:
            outage, self._current = self._current, None
            outage.over.set()           # no more retries of the open alert: the all-clear follows it
            outage.incident = resolve_store_incident(outage.incident, change)
            self._unrecorded.append(outage)
            self.wrote()

    def wrote(self) -> None:
        """The store took a write: record what waits to be recorded."""
        if self._unrecorded and (self._recording is None or self._recording.done()):
            self._recording = self._spawn(self._record())

    async def stop(self) -> None:
        if self._current is not None or self._unrecorded:
            log.warning("stopping before the store took writes again: the incident that relaywatch could not "
                        "queue mail is not recorded in the store (the alerts sent say what happened)")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _record_told(self, outage: _Outage) -> None:
        for told in outage.told:
            if not told.recorded:
                await self.store.add_notification_outcome(outage.incident.id, told.alert.name, told.channel,
                                                          told.payload, told.attempts, told.sent_at, told.last_error)
                told.recorded = True

    async def _tell(self, outage: _Outage, alert: Alert) -> list[_Told]:
        """One try on every channel; returns the notifications that failed."""
        config, now = self.config_ref(), self.clock.now()
        data = alerts.payload(outage.incident, alert, now)
        failed = []
        for channel in alerts.channels(config):
            told = next((t for t in outage.told if (t.alert, t.channel) == (alert, channel)), None)
            if told is None:
                told = _Told(alert, channel, data)
                outage.told.append(told)
            elif told.sent_at is not None or told.recorded:
                continue
            told.attempts += 1
            try:
                await alerts.deliver_notification(config, self.routes, channel, data)
            except Exception as exc:    # a channel that fails must never touch the SMTP side
                told.last_error = str(exc)[:300]
                failed.append(told)
                log.warning("%s alert that relaywatch cannot queue mail (%s) failed: %s", channel, alert.name, exc)
            else:
                told.sent_at = self.clock.now()
        return failed

    async def _tell_until_told(self, outage: _Outage, alert: Alert) -> None:
        attempts = 0
        while await self._tell(outage, alert):
            retry = alerts.retry_at(attempts, self.clock.now())
            if retry is None:
                return
            attempts += 1
            if await self.clock.wait(outage.over, max(retry - self.clock.now(), 0)):
                return

    async def _record(self) -> None:
        while self._unrecorded:
            outage = self._unrecorded[0]
            if outage.alerting is not None:
                await asyncio.gather(outage.alerting, return_exceptions=True)   # a try in flight ends first
            try:
                if outage.incident.id is None:
                    outage.incident = replace(outage.incident,
                                              id=await self.store.save_incident(outage.incident))
                await self._record_told(outage)
                for told in await self._tell(outage, Alert.resolved()):
                    # The store works again: its notification queue retries it (monitor.py).
                    await self.store.add_notification(outage.incident.id, told.alert.name, told.channel,
                                                      told.payload, self.clock.now())
                    told.recorded = True
                await self._record_told(outage)
            except StoreError as exc:
                # Failing again: the next write that succeeds tries once more.
                log.warning("cannot record the incident that relaywatch could not queue mail yet: %s", exc)
                return
            self._unrecorded.pop(0)
            log.info("recorded incident %s: relaywatch could not queue mail for %s",
                     outage.incident.id, span((outage.incident.resolved_at or 0) - outage.incident.opened_at))
