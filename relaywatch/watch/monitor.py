"""The watch loop: the I/O around the incident rules.

Runs beside the scheduler (in the delivering process), and with several
nodes on one queue only on the leader (cluster/node.py).  Every
``alerts.evaluate_interval`` it reads the facts (the deferred backlog per
(connector, code), the certificates of TLS connectors every
``cert_probe_interval``, the invalid-recipient counts, the NDRs held back),
hands them with the open incidents to watch/rules.py, saves what changed,
probes a connector whose incident opens, sends the notifications due, and
tells the backlog prober (watch/backlog_probe.py, a loop of its own beside
this one) which connectors have deferred mail: it probes them on their
schedule and releases a backlog the moment a probe passes.  Each tick also
adds the TLS results counted since the last to the store, and the leader
sends yesterday's TLS reports once after UTC midnight (watch/tls_report.py).  What it
reads and saves is typed (incident.py, watch_records.py), at the store's edge too.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Callable

from relaywatch import events
from relaywatch.clock import SYSTEM_CLOCK, Clock
from relaywatch.config import Config, Connector
from relaywatch.deliver.queue_actions import QueueActions
from relaywatch.deliver.smtp import SmtpRoutes
from relaywatch.deliver.tls_report import TlsTally
from relaywatch.cluster.decisions import Timing, down
from relaywatch.errors import StaleTerm, StoreError
from relaywatch.model import Destination, Entry, RecipientOutcome, RecipientStatus
from relaywatch.store.base import Selector, Store
from relaywatch.watch import alerts
from relaywatch.watch.backlog_probe import BacklogProber
from relaywatch.watch.diagnosis import diagnose
from relaywatch.incident_facts import InvalidSource
from relaywatch.incident import (Alert, Diagnosis, Incident, IncidentKind, ProbeResult, Transition,
                                    TransitionKind, with_probe)
from relaywatch.watch.rules import CertificateSeen, NodeSeen, WatchFacts, evaluate
from relaywatch.watch_records import LastGood
from relaywatch.watch.probe import probe_connector
from relaywatch.watch.tls_report import TlsReporter

log = logging.getLogger("relaywatch.watch")
_WATCH_DUTY = 20   # wait at least this many times as long as a tick took


class Monitor:
    def __init__(self, config_ref: Callable[[], Config], store: Store, routes: SmtpRoutes,
                 wake_scheduler: Callable[[], None], clock: Clock = SYSTEM_CLOCK,
                 leader_term: Callable[[], int | None] | None = None):
        self.config_ref = config_ref
        # With several nodes (cluster/node.py) the watch evaluates only on the leader,
        # and its writes carry the leader's term; None: it always runs, unfenced.
        self.leader_term = leader_term
        self._term: int | None = None
        self.store = store
        self.routes = routes
        self.clock = clock
        self.queue = QueueActions(store, config_ref, wake=wake_scheduler, clock=clock.now)
        self._late: dict[str, int] = {}                  # connector -> late deliveries since last tick
        self._expired: dict[tuple[str, str], int] = {}   # (connector, code) -> expiries since last tick
        self._good: dict[str, LastGood] = {}             # connector -> last good delivery, not yet saved
        self._invalid: list[tuple[float, str, str, str]] = []
        self._last_cert_probe = 0.0
        self._summary_cost = 0.0                         # seconds the last deferred summary took
        self._stopping = False
        # TLS results are counted in memory and added to the store once a tick (deliver/tls_report.py).
        self.tls_tally = TlsTally()
        if routes is not None:   # (a watch without delivery routes, in tests, has no TLS results)
            routes.tls_results.listeners.append(self.tls_tally.add)
        self.tls_reports = TlsReporter(config_ref, store, routes.resolver if routes else None, clock.now)
        self.prober = BacklogProber(config_ref, self._run_probe, self._keep_backlog_probe, self._release,
                                    self._leading, clock)
        # The prober's loop and the tick both read an incident and save it back: one at a
        # time, or a probe's save would undo an escalation the tick made meanwhile.
        self._incident_writes = asyncio.Lock()

    # -- fed by the scheduler after each recorded attempt ----------------------------

    def on_attempt(self, entry: Entry, outcomes: list[RecipientOutcome], dest: Destination | None,
                   tls: dict | None) -> None:
        connector, now = entry.route.name, self.clock.now()
        for o in outcomes:
            if o.status is RecipientStatus.DELIVERED:
                if entry.attempts > 0:
                    self._late[connector] = self._late.get(connector, 0) + 1
                if dest is not None and dest.host != "local":
                    self._good[connector] = LastGood(connector, now, dest.host, dest.ip, dest.port,
                                                     _tls_summary(tls))
            elif o.status is RecipientStatus.EXPIRED and o.failure is not None:
                key = (connector, o.failure.code)
                self._expired[key] = self._expired.get(key, 0) + 1
            if o.status in (RecipientStatus.FAILED, RecipientStatus.EXPIRED) and o.failure is not None \
                    and (o.failure.code.startswith("5.1.") or o.status is RecipientStatus.EXPIRED):
                source = "expired" if o.status is RecipientStatus.EXPIRED else "destination"
                self._invalid.append((now, o.address.rsplit("@", 1)[-1].lower(), connector, source))

    # -- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self.prober.run(), name="backlog probes")
            await self._evaluate_loop()

    async def _evaluate_loop(self) -> None:
        while not self._stopping:
            try:
                await self.tick()
            except StaleTerm as exc:
                log.warning("watch: another node leads now; this one stops evaluating (%s)", exc)
            except StoreError as exc:
                log.error("watch: store unavailable: %s", exc)
            except Exception:
                log.exception("watch: evaluation failed; trying again at the next interval")
            # The summary reads a few rows and seeks per (connector, code), whatever
            # the queue holds (store/watch.sql deferred_by_cause).  Should it ever
            # be slow (a store under load), the watch spends at most a twentieth of
            # its time on it, so that delivery never waits for it.  (Only the query
            # counts: sending alerts may wait on the network without costing anything.)
            await self.clock.sleep(max(self.config_ref().alerts.evaluate_interval, self._summary_cost * _WATCH_DUTY))

    def stop(self) -> None:
        self._stopping = True
        self.prober.stop()

    async def tick(self) -> None:
        config, now = self.config_ref(), self.clock.now()
        await self._flush_facts()
        if self.leader_term is not None:
            self._term = self.leader_term()
            if self._term is None:
                # Another node evaluates; what this one saw counts only there (last
                # good deliveries and invalid recipients are in the store already).
                self._late, self._expired = {}, {}
                self.prober.follow((), now)
                return
        facts = await self._read_facts(config, now)
        self.prober.follow(facts.backlog, now)
        last_good = await self.store.last_good()
        async with self._incident_writes:
            open_incidents = await self.store.open_incidents()
            for t in evaluate(facts, open_incidents, config, now):
                await self._record(t, last_good, now)
        await self.send_due()
        await self.tls_reports.send_due()

    async def flush_tls_counts(self) -> None:
        """Add the TLS results counted since the last tick to the store (also at a clean stop)."""
        counts = self.tls_tally.take()
        try:
            await self.store.add_tls_counts(counts)
        except StoreError:
            self.tls_tally.put_back(counts)   # counted again at the next tick
            raise

    async def _flush_facts(self) -> None:
        await self.flush_tls_counts()
        good, self._good = self._good, {}
        for last in good.values():
            await self.store.set_last_good(last)
        invalid, self._invalid = self._invalid, []
        await self.store.add_invalid_recipients(invalid)

    async def _read_facts(self, config: Config, now: float) -> WatchFacts:
        started = self.clock.monotonic()
        backlog = tuple(await self.store.deferred_summary())
        self._summary_cost = self.clock.monotonic() - started
        late, expired = self._late, self._expired
        self._late, self._expired = {}, {}
        invalid = None
        if config.alerts.invalid_recipient_quota:
            invalid = tuple(InvalidSource(domain, connector, source, count) for domain, connector, source, count
                            in await self.store.invalid_recipients_since(now - 86400))
        held = tuple(await self.store.held_notices())
        timing = Timing(config.server.heartbeat_interval, config.server.node_lapse)
        nodes = tuple(NodeSeen(b.name, b.address, b.at, down(b, timing, now)) for b in await self.store.nodes())
        return WatchFacts(backlog, late, expired, await self._certificates(config, now), invalid, held, nodes)

    async def _certificates(self, config: Config, now: float) -> tuple[CertificateSeen, ...] | None:
        """Every cert_probe_interval, the certificate of each connector that uses TLS."""
        if now - self._last_cert_probe < config.alerts.cert_probe_interval:
            return None
        self._last_cert_probe = now
        seen = []
        for connector in config.connectors:
            if not connector.enabled or connector.tls == "none":
                continue
            probe = await self._run_probe(connector)
            if probe is not None and probe.certificate is not None:
                seen.append(CertificateSeen(connector.name, connector.type, probe.host, probe.certificate))
        return tuple(seen)

    async def _record(self, t: Transition, last_good: dict[str, LastGood], now: float) -> None:
        inc = t.incident
        if t.kind is TransitionKind.OPEN and inc.kind is IncidentKind.BACKLOG:
            probe = await self._probe(inc.connector)
            inc = replace(with_probe(inc, probe) if probe else inc, diagnosis=await self._with_tls_report(
                diagnose(inc, last_good.get(inc.connector), probe)))
        inc = replace(inc, id=await self.store.save_incident(inc, term=self._term))
        if t.alert is not None:
            await self._notify(inc, t.alert, now)

    async def _with_tls_report(self, diagnosis: Diagnosis | None) -> Diagnosis | None:
        """An MTA-STS (or DANE) failure's diagnosis, with the day's TLS results of its domain."""
        policy = (diagnosis.facts.get("sts") or diagnosis.facts.get("dane")) if diagnosis is not None else None
        if not policy or not policy.get("policy_domain") or self.tls_reports.resolver is None:
            return diagnosis
        facts = await self.tls_reports.incident_facts(policy["policy_domain"])
        return replace(diagnosis, facts={**diagnosis.facts, "tls_report": facts})

    async def _notify(self, inc: Incident, alert: Alert, now: float) -> None:
        config = self.config_ref()
        events.emit("incident", id=inc.id, connector=inc.connector, code=inc.code, status=alert.name,
                    detail=alerts.headline(inc))
        payload = alerts.payload(inc, alert, now)
        for channel in alerts.channels(config):
            await self.store.add_notification(inc.id, alert.name, channel, payload, now, term=self._term)

    async def _probe(self, connector_name: str) -> ProbeResult | None:
        """Probe a connector whose incident opens; it counts as its backlog probe."""
        connector = self.config_ref().connector(connector_name)
        if connector is None or not connector.enabled:
            return None
        probe = await self._run_probe(connector)
        if probe is not None:
            await self.prober.probed(connector_name, probe)
        return probe

    async def _run_probe(self, connector: Connector) -> ProbeResult | None:
        try:
            return await probe_connector(self.config_ref(), self.routes, connector)
        except Exception as exc:   # a probe must never take the watch down
            log.warning("probe of %s failed to run: %s", connector.name, exc)
            return None

    def _leading(self) -> bool:
        return self.leader_term is None or self.leader_term() is not None

    async def _keep_backlog_probe(self, connector_name: str, probe: ProbeResult) -> None:
        """A backlog probe's result, on the connector's open backlog incidents (incidents show)."""
        term = self.leader_term() if self.leader_term is not None else None
        async with self._incident_writes:
            for inc in await self.store.open_incidents():
                if inc.kind is IncidentKind.BACKLOG and inc.connector == connector_name:
                    await self.store.save_incident(with_probe(inc, probe), term=term)

    async def _release(self, connector_name: str) -> int:
        return await self.queue.retry_now(Selector(connector=connector_name))   # wakes the scheduler

    async def send_due(self) -> None:
        config, now = self.config_ref(), self.clock.now()
        for note in await self.store.due_notifications(now):
            try:
                await alerts.deliver_notification(config, self.routes, note.channel, dict(note.payload))
            except Exception as exc:
                retry = alerts.retry_at(note.attempts, now)
                await self.store.notification_result(note.id, False, str(exc)[:300], now, retry)
                log.warning("%s notification for incident %s (%s) failed%s: %s", note.channel,
                            note.incident_id, note.transition, "; will retry" if retry else "; giving up", exc)
            else:
                await self.store.notification_result(note.id, True, None, self.clock.now(), None)


def _tls_summary(tls: dict | None) -> dict | None:
    if not tls:
        return None
    return {k: tls.get(k) for k in ("version", "subject", "sans", "issuer", "not_after")}
