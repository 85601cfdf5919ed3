"""The watch loop: incidents, probes, instant recovery, notifications.

Runs beside the scheduler (in the delivering process).  Every
``alerts.evaluate_interval`` it reads the deferred backlog per (connector,
code), applies watch/incidents.py's rules, probes connectors in trouble and
releases their backlog the moment a probe passes, checks certificates and
the invalid-recipient quota, and sends the notifications due.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from relaywatch import events
from relaywatch.config import Config
from relaywatch.deliver.smtp import SmtpRoutes
from relaywatch.errors import StoreError
from relaywatch.model import Destination, Entry, RecipientOutcome, RecipientStatus
from relaywatch.store.base import Selector
from relaywatch.watch import alerts
from relaywatch.watch.diagnosis import diagnose
from relaywatch.watch.incidents import headline
from relaywatch.watch.model import BacklogSummary, Incident, IncidentKind, TransitionKind, kind_of
from relaywatch.watch.rules import WatchFacts, evaluate
from relaywatch.watch.probe import probe_connector

log = logging.getLogger("relaywatch.watch")
_WATCH_DUTY = 20   # wait at least this many times as long as a tick took


class Monitor:
    def __init__(self, config_ref: Callable[[], Config], store, routes: SmtpRoutes,
                 wake_scheduler: Callable[[], None], clock: Callable[[], float] = time.time):
        self.config_ref = config_ref
        self.store = store
        self.routes = routes
        self.wake_scheduler = wake_scheduler
        self.clock = clock
        self._late: dict[str, int] = {}                  # connector -> late deliveries since last tick
        self._expired: dict[tuple[str, str], int] = {}   # (connector, code) -> expiries since last tick
        self._good: dict[str, dict] = {}                 # connector -> last good delivery, not yet saved
        self._invalid: list[tuple[float, str, str, str]] = []
        self._last_probe: dict[str, float] = {}
        self._last_cert_probe = 0.0
        self._summary_cost = 0.0                         # seconds the last deferred summary took
        self._stopping = False
        self.tick_done = asyncio.Event()

    # -- fed by the scheduler after each recorded attempt ----------------------------

    def on_attempt(self, entry: Entry, outcomes: list[RecipientOutcome], dest: Destination | None,
                   tls: dict | None) -> None:
        connector, now = entry.route.name, self.clock()
        for o in outcomes:
            if o.status is RecipientStatus.DELIVERED:
                if entry.attempts > 0:
                    self._late[connector] = self._late.get(connector, 0) + 1
                if dest is not None and dest.host != "local":
                    self._good[connector] = {"host": dest.host, "ip": dest.ip, "port": dest.port, "at": now,
                                             "tls": _tls_summary(tls)}
            elif o.status is RecipientStatus.EXPIRED and o.failure is not None:
                key = (connector, o.failure.code)
                self._expired[key] = self._expired.get(key, 0) + 1
            if o.status in (RecipientStatus.FAILED, RecipientStatus.EXPIRED) and o.failure is not None \
                    and (o.failure.code.startswith("5.1.") or o.status is RecipientStatus.EXPIRED):
                source = "expired" if o.status is RecipientStatus.EXPIRED else "destination"
                self._invalid.append((now, o.address.rsplit("@", 1)[-1].lower(), connector, source))

    # -- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        while not self._stopping:
            try:
                await self.tick()
            except StoreError as exc:
                log.error("watch: store unavailable: %s", exc)
            except Exception:
                log.exception("watch: evaluation failed; trying again at the next interval")
            self.tick_done.set()
            # The summary reads an index of every deferred message (0.5 s with a
            # million deferred, bench big_queue). The watch spends at most a
            # twentieth of its time on it so that delivery never waits for it; a
            # queue that large changes slowly anyway.  (Only the query counts:
            # sending alerts may wait on the network without costing anything.)
            await asyncio.sleep(max(self.config_ref().alerts.evaluate_interval, self._summary_cost * _WATCH_DUTY))

    def stop(self) -> None:
        self._stopping = True

    async def tick(self) -> None:
        config, now = self.config_ref(), self.clock()
        await self._flush_facts()
        last_good = await self.store.last_good()
        started = time.monotonic()
        summaries = tuple(BacklogSummary.from_dict(s) for s in await self.store.deferred_summary())
        self._summary_cost = time.monotonic() - started
        open_incidents = [Incident.from_dict(i) for i in await self.store.open_incidents()]
        facts = WatchFacts(summaries, self._late, self._expired)
        self._late, self._expired = {}, {}
        for t in evaluate(facts, open_incidents, config, now):
            inc = t.incident.to_dict()
            if t.kind is TransitionKind.OPEN:
                probe = await self._probe(inc["connector"])
                inc["probe"] = probe
                inc["diagnosis"] = diagnose(inc, last_good.get(inc["connector"]), probe)
            inc["id"] = await self.store.save_incident(inc)
            if t.notify:
                await self._notify(inc, t.notify, now)
        await self._probe_backlogs(config, summaries, now)
        await self._check_certificates(config, now)
        await self._check_invalid_quota(config, now)
        await self._check_notices(now)
        await self.send_due()

    async def _flush_facts(self) -> None:
        good, self._good = self._good, {}
        for connector, facts in good.items():
            await self.store.set_last_good(connector, facts["at"], facts)
        invalid, self._invalid = self._invalid, []
        await self.store.add_invalid_recipients(invalid)

    async def _notify(self, inc: dict, transition: str, now: float) -> None:
        config = self.config_ref()
        events.emit("incident", id=inc["id"], connector=inc["connector"], code=inc["code"],
                    status=transition, detail=headline(inc))
        data = alerts.payload(inc, transition, now)
        for channel in alerts.channels(config):
            await self.store.add_notification(inc["id"], transition, channel, data, now)

    async def _probe(self, connector_name: str) -> dict | None:
        connector = self.config_ref().connector(connector_name)
        if connector is None or not connector.enabled:
            return None
        self._last_probe[connector_name] = self.clock()
        try:
            return await probe_connector(self.config_ref(), self.routes, connector)
        except Exception as exc:   # a probe must never take the watch down
            log.warning("probe of %s failed to run: %s", connector_name, exc)
            return None

    async def _probe_backlogs(self, config: Config, summaries: tuple[BacklogSummary, ...], now: float) -> None:
        """Probe every connector with deferred mail (not only those with an open
        incident: a short outage never opens one); the moment a probe passes,
        release that connector's backlog instead of waiting out retry timers."""
        open_by_connector: dict[str, list[dict]] = {}
        for inc in await self.store.open_incidents():
            open_by_connector.setdefault(inc["connector"], []).append(inc)
        for name in sorted({s.connector for s in summaries}):
            connector = config.connector(name)
            if connector is None or not connector.enabled or connector.paused:
                continue
            if now - self._last_probe.get(name, 0) < config.alerts.probe_interval:
                continue
            probe = await self._probe(name)
            if probe is None:
                continue
            for inc in open_by_connector.get(name, []):
                if kind_of(inc) is IncidentKind.BACKLOG:
                    inc["probe"] = probe
                    await self.store.save_incident(inc)
            if probe["ok"]:
                released = await self.store.retry(Selector(connector=name), self.clock())
                if released:
                    self.wake_scheduler()
                    events.emit("released", connector=name, status="probe passed",
                                detail=f"{released} deferred message(s) released for immediate delivery")

    async def _check_certificates(self, config: Config, now: float) -> None:
        if now - self._last_cert_probe < config.alerts.cert_probe_interval:
            return
        self._last_cert_probe = now
        open_by_connector = {i["connector"]: i for i in await self.store.open_incidents()
                             if i["code"] == "watch:cert_expiring"}
        for connector in config.connectors:
            if not connector.enabled or connector.tls == "none":
                continue
            probe = await self._probe(connector.name)
            cert = (probe or {}).get("certificate") or {}
            days = cert.get("days_left")
            existing = open_by_connector.get(connector.name)
            if days is not None and days < config.alerts.cert_warning_days:
                if existing is None:
                    inc = _watch_incident(connector.name, connector.type, "watch:cert_expiring",
                                          "Destination certificate expires soon", now)
                    inc["detail"] = (f"The certificate of {probe['steps'][0]['detail'].split(' ->')[0]} "
                                     f"({cert.get('subject')}, issued by {cert.get('issuer')}) expires on "
                                     f"{(cert.get('not_after') or '?')[:10]}, in {days} days. Mail will stop "
                                     "with 4.7.320 then unless it is renewed.")
                    inc["certificate"] = cert
                    inc["fixes"] = (["Renew and install the server's certificate before it expires."]
                                    if connector.type == "on_premises" else
                                    ["Tell the partner their certificate expires on "
                                     f"{(cert.get('not_after') or '?')[:10]} and ask them to renew it."])
                    inc["diagnosis"] = {"cause": "cert_expiring", "text": inc["detail"], "facts": cert}
                    inc["id"] = await self.store.save_incident(inc)
                    await self._notify(inc, "open", now)
            elif existing is not None and days is not None:
                existing.update(state="resolved", resolved_at=now, updated_at=now, certificate=cert)
                await self.store.save_incident(existing)
                await self._notify(existing, "resolve", now)

    async def _check_invalid_quota(self, config: Config, now: float) -> None:
        quota = config.alerts.invalid_recipient_quota
        if not quota:
            return
        rows = await self.store.invalid_recipients_since(now - 86400)
        total = sum(r[3] for r in rows)
        level = 100 if total >= quota else 80 if total >= 0.8 * quota else 0
        existing = next((i for i in await self.store.open_incidents()
                         if i["code"] == "watch:invalid_recipients"), None)
        top = [{"domain": d, "connector": c, "source": s, "count": n} for d, c, s, n in rows[:10]]
        if level and existing is None:
            inc = _watch_incident("*", "-", "watch:invalid_recipients", "Invalid recipients near the quota", now)
            inc.update(level=level, count=total, quota=quota, top=top, detail=_quota_text(total, quota, top))
            inc["fixes"] = ["If an on-premises server was retired, use the decommission action on its 4.4.316 "
                            "incident so unknown recipients are rejected at once.",
                            "Check the domains listed for mistyped or abandoned addresses."]
            inc["id"] = await self.store.save_incident(inc)
            await self._notify(inc, "open", now)
        elif existing is not None and level > existing.get("level", 0):
            existing.update(level=level, count=total, top=top, severity="critical", updated_at=now,
                            detail=_quota_text(total, quota, top))
            await self.store.save_incident(existing)
            await self._notify(existing, f"escalate:{level}%", now)
        elif existing is not None and not level:
            existing.update(state="resolved", resolved_at=now, updated_at=now, count=total)
            await self.store.save_incident(existing)
            await self._notify(existing, "resolve", now)

    async def _check_notices(self, now: float) -> None:
        """One incident while any NDR cannot be built (the relay's own fault:
        the delivered recipients are recorded, the senders are not told yet)."""
        failing = await self.store.held_notices()
        existing = next((i for i in await self.store.open_incidents()
                         if i["code"] == "watch:notice_failed"), None)
        if failing and existing is None:
            inc = _watch_incident("*", "-", "watch:notice_failed", "Non-delivery reports cannot be built", now)
            latest = failing[0]
            inc.update(severity="critical", count=len(failing),
                       detail=f"{len(failing)} NDR(s) could not be built, latest for {latest['id']} "
                              f"to {latest['sender']}: {latest.get('error')}. Their messages are not "
                              "delivered again; each NDR is retried on the queue's retry intervals.")
            inc["fixes"] = ["Look for 'could not be built' in the log and report it as a relaywatch bug.",
                            "relaywatch queue list shows the messages whose NDR is held back."]
            inc["id"] = await self.store.save_incident(inc)
            await self._notify(inc, "open", now)
        elif existing is not None and not failing:
            existing.update(state="resolved", resolved_at=now, updated_at=now, count=0)
            await self.store.save_incident(existing)
            await self._notify(existing, "resolve", now)

    async def send_due(self) -> None:
        config, now = self.config_ref(), self.clock()
        for note in await self.store.due_notifications(now):
            try:
                await alerts.deliver_notification(config, self.routes, note)
            except Exception as exc:
                retry = alerts.retry_at(note["attempts"], now)
                await self.store.notification_result(note["id"], False, str(exc)[:300], now, retry)
                log.warning("%s notification for incident %s (%s) failed%s: %s", note["channel"],
                            note["incident_id"], note["transition"],
                            "; will retry" if retry else "; giving up", exc)
            else:
                await self.store.notification_result(note["id"], True, None, self.clock(), None)


def _tls_summary(tls: dict | None) -> dict | None:
    if not tls:
        return None
    return {k: tls.get(k) for k in ("version", "subject", "sans", "issuer", "not_after")}


def _watch_incident(connector: str, ctype: str, code: str, title: str, now: float) -> dict:
    return {"id": None, "connector": connector, "connector_type": ctype, "code": code, "title": title,
            "kind": code, "subtype": None, "state": "open", "severity": "warning", "opened_at": now,
            "updated_at": now, "resolved_at": None, "first_seen": now, "last_seen": now, "messages": 0,
            "recipients": 0, "peak_messages": 0, "oldest_received_at": now, "first_expires_at": now,
            "destinations": [], "latest_error": None, "causes": [], "fixes": [], "actions": [],
            "escalations": [], "delivered_late": 0, "expired": 0, "probe": None}


def _quota_text(total: int, quota: int, top: list[dict]) -> str:
    worst = ", ".join(f"{t['domain']} via {t['connector']} ({t['count']}, {t['source']})" for t in top[:3])
    return (f"{total} invalid recipients in the last 24 hours, {total * 100 // quota}% of the quota of {quota}. "
            f"Most from: {worst or '-'}.")
