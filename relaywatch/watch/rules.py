"""The incident rules: when an incident opens, escalates and resolves, for every kind.

Pure: ``evaluate()`` takes what the watch saw (``WatchFacts``), the open
incidents, the config and the time, and returns what changed as
``Transition``s.  The monitor (watch/monitor.py) does the I/O: it reads the
facts, saves what changed, probes and notifies.

A connector's backlog (one incident per (connector, code)):
    (deferred mail with code C on connector X past open_after and min_messages)
        -> OPEN (warning)                alert "open"
        -> escalations                   alert "escalate:expiry", "escalate:count-<n>" (critical)
        -> RESOLVED when no mail for X is deferred with C any more
                                         alert "resolve", with what happened (the all-clear)
    A change of cause on the same connector is a resolve of the old code and
    an open of the new one.

The watch's own warnings, one at a time each (their code is ``IncidentKind.code``):
    certificate  a probe sees a certificate with fewer than cert_warning_days left
                 -> OPEN; RESOLVED when a probe sees one valid for longer
    quota        80% of invalid_recipient_quota invalid recipients in 24 h -> OPEN,
                 100% -> ESCALATE, alert "escalate:100%"; RESOLVED under 80%
    notices      an NDR cannot be built -> OPEN (critical); RESOLVED when none is held back
    nodes        a node's heartbeat is older than server.node_lapse -> OPEN (critical), one
                 per node; RESOLVED when it beats again, stops cleanly or is gone
    A fact the watch did not read this time (None: the certificates are probed
    every cert_probe_interval only, the quota may be off) changes nothing.
    Their texts come from the catalog's ``watch.*`` entries.

The store's incident (the relay cannot queue mail) is not kept here: the
receiving process opens and resolves it (watch/store_incident.py), and no
rule touches an incident of a kind it does not own.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from relaywatch.classify.catalog import CATALOG, lookup
from relaywatch.config import Config
from relaywatch.watch.diagnosis import diagnose
from relaywatch.incident_facts import CertificateFacts, InvalidSource, NodeFacts, NoticeFacts, QuotaFacts
from relaywatch.incident import (Alert, BacklogSummary, Incident, IncidentKind, IncidentState, Severity, Transition,
                                    TransitionKind)
from relaywatch.watch_records import HeldNotice


@dataclass(frozen=True)
class CertificateSeen:
    """A connector's certificate as a probe saw it."""
    connector: str
    connector_type: str
    host: str | None
    certificate: Mapping[str, Any]     # ProbeResult.certificate: subject, issuer, not_after, days_left, ...

    @property
    def days_left(self) -> float | None:
        return self.certificate.get("days_left")


@dataclass(frozen=True)
class NodeSeen:
    """A node of the cluster as its heartbeat shows it (cluster/decisions.py decides ``down``)."""
    name: str
    address: str
    heartbeat_at: float
    down: bool           # beating no more, without a clean stop


@dataclass(frozen=True)
class WatchFacts:
    """What the watch saw since it last evaluated."""
    backlog: tuple[BacklogSummary, ...] = ()
    delivered_late: Mapping[str, int] = field(default_factory=dict)            # connector -> late deliveries
    expired: Mapping[tuple[str, str], int] = field(default_factory=dict)       # (connector, code) -> expiries
    certificates: tuple[CertificateSeen, ...] | None = None    # None: not probed this time
    invalid_recipients: tuple[InvalidSource, ...] | None = None  # the last 24 h, most first; None: not read
    held_notices: tuple[HeldNotice, ...] | None = None      # store.held_notices, latest first
    nodes: tuple[NodeSeen, ...] | None = None                  # every node of the queue; None: not read


def evaluate(facts: WatchFacts, open_incidents: Sequence[Incident], config: Config, now: float) -> list[Transition]:
    def of(kind: IncidentKind) -> list[Incident]:
        return [i for i in open_incidents if i.is_open and i.kind is kind]
    return (_backlog(facts, of(IncidentKind.BACKLOG), config, now)
            + _certificates(facts.certificates, of(IncidentKind.CERT_EXPIRING), config, now)
            + _quota(facts.invalid_recipients, of(IncidentKind.INVALID_QUOTA), config, now)
            + _notices(facts.held_notices, of(IncidentKind.NOTICE_FAILED), now)
            + _nodes(facts.nodes, of(IncidentKind.NODE_DOWN), now))


def _resolve(inc: Incident, now: float, **changes) -> Transition:
    return Transition(TransitionKind.RESOLVE, replace(inc, state=IncidentState.RESOLVED, resolved_at=now,
                                                      updated_at=now, **changes), Alert.resolved())


def _warning(kind: IncidentKind, now: float, connector: str = "*", connector_type: str = "-", **fields) -> Incident:
    """A new warning of the watch's own, with the catalog's texts for it."""
    entry = CATALOG[f"watch.{kind.value}"]
    return Incident(kind=kind, connector=connector, connector_type=connector_type, code=kind.code, title=entry.title,
                    opened_at=now, updated_at=now, first_seen=now, last_seen=now, oldest_received_at=now,
                    first_expires_at=now, causes=entry.causes_for(connector_type),
                    fixes=entry.fixes_for(connector_type), **fields)


# -- a connector's backlog ------------------------------------------------------------------

def _actions(connector_type: str | None, catalog_id: str | None, has_connector: bool) -> tuple[str, ...]:
    actions = ["retry-now", "pause", "expire"] if has_connector else ["retry-now", "expire"]
    if catalog_id == "connect.refused" and connector_type == "on_premises":   # the server may be retired
        actions.insert(0, "decommission")
    return tuple(actions)


def new_backlog_incident(summary: BacklogSummary, config: Config, now: float) -> Incident:
    connector = config.connector(summary.connector)
    error = summary.latest_error
    entry = (CATALOG.get(error.kind) if error else None) or lookup(summary.code)
    ctype = connector.type if connector else None
    return Incident(
        kind=IncidentKind.BACKLOG, connector=summary.connector, connector_type=ctype or "internet",
        code=summary.code, title=entry.title if entry else (error.title if error else summary.code),
        catalog_id=entry.id if entry else None, subtype=error.subtype if error else None,
        opened_at=now, updated_at=now, first_seen=summary.first_failure_at or now,
        last_seen=(error.at if error else None) or now, messages=summary.messages, recipients=summary.recipients,
        peak_messages=summary.messages, oldest_received_at=summary.oldest_received_at,
        first_expires_at=summary.first_expires_at, destinations=summary.destinations, latest_error=error,
        causes=entry.causes_for(ctype) if entry else (), fixes=entry.fixes_for(ctype) if entry else (),
        actions=_actions(ctype, entry.id if entry else None, connector is not None))


def _backlog(facts: WatchFacts, open_incidents: list[Incident], config: Config, now: float) -> list[Transition]:
    alerts = config.alerts
    by_key = {s.key: s for s in facts.backlog}
    out: list[Transition] = []

    def counted(inc: Incident, **changes) -> Incident:
        """With what happened to the incident's mail since the last evaluation."""
        return replace(inc, delivered_late=inc.delivered_late + facts.delivered_late.get(inc.connector, 0),
                       expired=inc.expired + facts.expired.get(inc.key, 0), **changes)

    for inc in open_incidents:
        summary = by_key.get(inc.key)
        if summary is None:
            done = counted(inc, state=IncidentState.RESOLVED, resolved_at=now, updated_at=now, messages=0,
                           recipients=0)
            out.append(Transition(TransitionKind.RESOLVE, done, Alert.resolved()))
            continue
        error = summary.latest_error or inc.latest_error
        reasons = []
        if summary.first_expires_at - now <= alerts.escalate_before_expiry and "expiry" not in inc.escalations:
            reasons.append("expiry")
        reasons += [f"count-{step}" for step in alerts.escalate_steps
                    if summary.messages >= step and f"count-{step}" not in inc.escalations]
        updated = counted(inc, messages=summary.messages, recipients=summary.recipients,
                          peak_messages=max(inc.peak_messages, summary.messages),
                          oldest_received_at=summary.oldest_received_at, first_expires_at=summary.first_expires_at,
                          destinations=summary.destinations, latest_error=error,
                          last_seen=(summary.latest_error.at if summary.latest_error else None) or inc.last_seen,
                          updated_at=now, escalations=inc.escalations + tuple(reasons),
                          severity=Severity.CRITICAL if reasons else inc.severity)
        if reasons:
            out += [Transition(TransitionKind.ESCALATE, updated, Alert.escalated(reason)) for reason in reasons]
        else:
            out.append(Transition(TransitionKind.UPDATE, updated))
    open_keys = {inc.key for inc in open_incidents}
    for key, summary in by_key.items():
        if key in open_keys:
            continue
        if now - summary.oldest_received_at >= alerts.open_after and summary.messages >= alerts.min_messages:
            out.append(Transition(TransitionKind.OPEN, counted(new_backlog_incident(summary, config, now)),
                                  Alert.opened()))
    return out


# -- the watch's own warnings ---------------------------------------------------------------

def _certificates(seen: tuple[CertificateSeen, ...] | None, open_incidents: list[Incident], config: Config,
                  now: float) -> list[Transition]:
    if seen is None:
        return []
    open_by_connector = {i.connector: i for i in open_incidents}
    out = []
    for cert in seen:
        days, existing = cert.days_left, open_by_connector.get(cert.connector)
        if days is None:
            continue
        if days < config.alerts.cert_warning_days:
            if existing is None:
                c = cert.certificate
                expires = (c.get("not_after") or "?")[:10]
                detail = (f"The certificate of {cert.host or cert.connector} ({c.get('subject')}, issued by "
                          f"{c.get('issuer')}) expires on {expires}, in {days} days. Mail will stop with 4.7.320 "
                          "then unless it is renewed.")
                inc = _warning(IncidentKind.CERT_EXPIRING, now, cert.connector, cert.connector_type, detail=detail,
                               facts=CertificateFacts(dict(c)))
                out.append(Transition(TransitionKind.OPEN, replace(inc, diagnosis=diagnose(inc, None)),
                                      Alert.opened()))
        elif existing is not None:
            out.append(_resolve(existing, now, facts=CertificateFacts(dict(cert.certificate))))
    return out


def _quota_text(total: int, quota: int, top: tuple[InvalidSource, ...]) -> str:
    worst = ", ".join(f"{t.domain} via {t.connector} ({t.count}, {t.source})" for t in top[:3])
    return (f"{total} invalid recipients in the last 24 hours, {total * 100 // quota}% of the quota of {quota}. "
            f"Most from: {worst or '-'}.")


def _quota(sources: tuple[InvalidSource, ...] | None, open_incidents: list[Incident], config: Config,
           now: float) -> list[Transition]:
    quota = config.alerts.invalid_recipient_quota
    if not quota or sources is None:
        return []
    total = sum(s.count for s in sources)
    level = 100 if total >= quota else 80 if total >= 0.8 * quota else 0
    top = sources[:10]
    existing = open_incidents[0] if open_incidents else None
    if existing is None:
        if not level:
            return []
        inc = _warning(IncidentKind.INVALID_QUOTA, now, facts=QuotaFacts(level, total, quota, top),
                       detail=_quota_text(total, quota, top))
        return [Transition(TransitionKind.OPEN, inc, Alert.opened())]
    was = existing.facts if isinstance(existing.facts, QuotaFacts) else QuotaFacts(0, 0, quota)
    if not level:
        return [_resolve(existing, now, facts=replace(was, count=total))]
    if level > was.level:
        escalated = replace(existing, severity=Severity.CRITICAL, updated_at=now,
                            facts=replace(was, level=level, count=total, top=top),
                            detail=_quota_text(total, quota, top))
        return [Transition(TransitionKind.ESCALATE, escalated, Alert.escalated(f"{level}%"))]
    return []


def _notices(held: tuple[HeldNotice, ...] | None, open_incidents: list[Incident], now: float) -> list[Transition]:
    """The relay's own fault: the delivered recipients are recorded, the senders not told yet."""
    if held is None:
        return []
    existing = open_incidents[0] if open_incidents else None
    if held and existing is None:
        latest = held[0]
        detail = (f"{len(held)} NDR(s) could not be built, latest for {latest.entry_id} to {latest.sender}: "
                  f"{latest.error}. Their messages are not delivered again; each NDR is retried on the queue's "
                  "retry intervals.")
        inc = _warning(IncidentKind.NOTICE_FAILED, now, severity=Severity.CRITICAL, facts=NoticeFacts(len(held)),
                       detail=detail)
        return [Transition(TransitionKind.OPEN, inc, Alert.opened())]
    if existing is not None and not held:
        return [_resolve(existing, now, facts=NoticeFacts(0))]
    return []


def _nodes(seen: tuple[NodeSeen, ...] | None, open_incidents: list[Incident], now: float) -> list[Transition]:
    """A node that died: its leases went back to the queue (cluster/node.py), the rest is the admin's."""
    if seen is None:
        return []
    open_by_node = {i.facts.node: i for i in open_incidents if isinstance(i.facts, NodeFacts)}
    down = {n.name: n for n in seen if n.down}
    out = []
    for name, node in sorted(down.items()):
        if name not in open_by_node:
            detail = (f"Node {name} ({node.address}) has not written a heartbeat since {_when(node.heartbeat_at)}; "
                      "what it had leased is delivered by the other nodes.")
            inc = _warning(IncidentKind.NODE_DOWN, now, severity=Severity.CRITICAL, detail=detail,
                           facts=NodeFacts(name, node.address, node.heartbeat_at))
            out.append(Transition(TransitionKind.OPEN, inc, Alert.opened()))
    for name, inc in sorted(open_by_node.items()):
        if name not in down:
            out.append(_resolve(inc, now))
    return out


def _when(at: float) -> str:
    import datetime
    return datetime.datetime.fromtimestamp(at, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
