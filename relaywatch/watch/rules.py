"""The incident rules: when an incident opens, escalates and resolves, for every kind.

Pure: ``evaluate()`` takes what the watch saw (``WatchFacts``), the open
incidents, the config and the time, and returns what changed as
``Transition``s.  The monitor (watch/monitor.py) does the I/O: it reads the
facts, saves what changed, probes and notifies.

A connector's backlog (one incident per (connector, code)):
    (deferred mail with code C on connector X past open_after and min_messages)
        -> OPEN (warning)                notify "open"
        -> escalations                   notify "escalate:expiry", "escalate:count-<n>" (critical)
        -> RESOLVED when no mail for X is deferred with C any more
                                         notify "resolve", with what happened (the all-clear)
    A change of cause on the same connector is a resolve of the old code and
    an open of the new one.

The store's incident (the relay cannot queue mail) is not kept here: the
receiving process opens and resolves it (watch/store_incident.py), and no
rule touches an incident of a kind it does not own.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

from relaywatch.classify.catalog import CATALOG, lookup
from relaywatch.config import Config
from relaywatch.watch.model import (BacklogSummary, Incident, IncidentKind, IncidentState, Severity, Transition,
                                    TransitionKind)


@dataclass(frozen=True)
class WatchFacts:
    """What the watch saw since it last evaluated."""
    backlog: tuple[BacklogSummary, ...] = ()
    delivered_late: Mapping[str, int] = field(default_factory=dict)            # connector -> late deliveries
    expired: Mapping[tuple[str, str], int] = field(default_factory=dict)       # (connector, code) -> expiries


def evaluate(facts: WatchFacts, open_incidents: Sequence[Incident], config: Config, now: float) -> list[Transition]:
    mine = [i for i in open_incidents if i.is_open]
    return _backlog(facts, [i for i in mine if i.kind is IncidentKind.BACKLOG], config, now)


# -- a connector's backlog ------------------------------------------------------------------

def _actions(connector_type: str | None, code: str, has_connector: bool) -> tuple[str, ...]:
    actions = ["retry-now", "pause", "expire"] if has_connector else ["retry-now", "expire"]
    if code == "4.4.316" and connector_type == "on_premises":
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
        actions=_actions(ctype, summary.code, connector is not None))


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
            out.append(Transition(TransitionKind.RESOLVE, done, "resolve"))
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
            out += [Transition(TransitionKind.ESCALATE, updated, f"escalate:{reason}") for reason in reasons]
        else:
            out.append(Transition(TransitionKind.UPDATE, updated))
    open_keys = {inc.key for inc in open_incidents}
    for key, summary in by_key.items():
        if key in open_keys:
            continue
        if now - summary.oldest_received_at >= alerts.open_after and summary.messages >= alerts.min_messages:
            out.append(Transition(TransitionKind.OPEN, counted(new_backlog_incident(summary, config, now)), "open"))
    return out
