"""The JSON shapes of docs/json.md, built in one place for every surface.

``relaywatch ... --json`` (cli/) and the HTTP API (console/api.py) both
call these, so the two cannot drift apart: a test compares them field for
field.  No command or endpoint builds its own dict.  Pure functions of what
the store (or a probe) returned; no I/O here.
"""

from __future__ import annotations

from typing import Any, Mapping

from relaywatch.classify import catalog
from relaywatch.cluster.decisions import Timing, alive, leader_now
from relaywatch.cluster.model import LeaderLease, NodeBeat, NodeState
from relaywatch.config import Config
from relaywatch.model import Entry, iso
from relaywatch.tls_results import TlsCount
from relaywatch.notify.tls_report import policies
from relaywatch.incident import Incident, IncidentKind, IncidentRecord, ProbeResult
from relaywatch.watch_records import AuditRecord, LastGood, Override, OverrideKey

INCIDENT_TIMES = ("opened_at", "resolved_at", "updated_at", "first_seen", "last_seen", "oldest_received_at",
                  "first_expires_at")


def message_json(entry: Entry) -> dict[str, Any]:
    """MESSAGE: one queue entry (``queue list --json``)."""
    return entry.to_dict()


def message_list_json(entries: list[Entry]) -> dict[str, Any]:
    """``queue list --json``; the API adds ``next_after``."""
    return {"messages": [message_json(e) for e in entries]}


def message_detail_json(entry: Entry) -> dict[str, Any]:
    """MESSAGE plus ``attempt_history`` (``queue show --json``)."""
    data = entry.to_dict()
    data["attempt_history"] = [history_json(a) for a in entry.history]
    return data


def history_json(a: dict) -> dict[str, Any]:
    """One stored attempt with its times as ISO 8601."""
    out = dict(a)
    out["at"] = iso(a["at"])
    out["recipients"] = [dict(r, error=dict(r["error"], at=iso(r["error"]["at"])) if r.get("error") else r.get("error"))
                         for r in a["recipients"]]
    out["hosts_tried"] = [dict(f, at=iso(f["at"])) for f in a.get("hosts_tried", [])]
    return out


def incident_json(inc: Incident | IncidentRecord) -> dict[str, Any]:
    """INCIDENT (``incidents list/show --json``; show's with its notifications and audit)."""
    out = inc.to_dict()
    for key in INCIDENT_TIMES:
        if isinstance(out.get(key), (int, float)):
            out[key] = iso(out[key])
    return out


def incident_list_json(incidents: list[Incident]) -> dict[str, Any]:
    """``incidents list --json`` and ``GET /api/v1/incidents``."""
    return {"incidents": [incident_json(i) for i in incidents]}


def config_json(config: Config, effective: Config, overrides: Mapping[OverrideKey, Override]) -> dict[str, Any]:
    """The running configuration, overrides marked (``config show --json``)."""
    return {
        "source": str(config.source),
        "overrides": {str(k): {"value": o.value, "set_at": iso(o.set_at), "incident_id": o.incident_id}
                      for k, o in overrides.items()},
        "domains": [{"name": d.name, "type": d.type, "mailboxes": sorted(d.mailboxes)} for d in effective.domains],
        "connectors": [{"name": c.name, "type": c.type, "domains": list(c.domains), "enabled": c.enabled,
                        "paused": c.paused, "smart_hosts": [f"{h}:{p}" for h, p in c.smart_hosts],
                        "tls": c.tls, "tls_verify": c.tls_verify} for c in effective.connectors]}


def connector_state(enabled: bool, paused: bool, open_incidents: list[Incident]) -> str:
    """disabled > paused > incident open > certificate expiring > healthy: the first that holds
    says what an admin must know.  A certificate warning alone is not "incident open": mail still flows."""
    if not enabled:
        return "disabled"
    if paused:
        return "paused"
    if any(i.kind is not IncidentKind.CERT_EXPIRING for i in open_incidents):
        return "incident open"
    return "certificate expiring" if open_incidents else "healthy"


def connectors_json(effective: Config, open_incidents: list[Incident],
                    last_good: Mapping[str, LastGood]) -> dict[str, Any]:
    """CONNECTOR list (``GET /api/v1/connectors``): state and the last good delivery."""
    out = []
    for c in effective.connectors:
        mine = [i for i in open_incidents if i.connector == c.name]
        good = last_good.get(c.name)
        out.append({"name": c.name, "type": c.type, "domains": list(c.domains),
                    "state": connector_state(c.enabled, c.paused, mine),
                    "enabled": c.enabled, "paused": c.paused,
                    "open_incidents": [i.id for i in mine],
                    "last_good_delivery": iso(good.at) if good else None})
    return {"connectors": out}


def audit_json(a: AuditRecord) -> dict[str, Any]:
    """One audit record (``GET /api/v1/audit``; ``incidents show`` has an incident's own)."""
    return dict(a.to_dict(with_incident=True), at=iso(a.at), undone_at=iso(a.undone_at) if a.undone_at else None)


def tls_report_json(day: str, counts: list[TlsCount], reports: list[dict]) -> dict[str, Any]:
    """TLS_REPORT: one UTC day's TLS sessions per policy domain (``tls-report show --json``,
    ``/api/v1/tls-reports``): the ``policies`` as the domain's RFC 8460 report has them,
    and what became of that report (null until it is sent, the day after)."""
    sent = {r["policy_domain"]: r for r in reports}
    domains = sorted({c.policy_domain for c in counts} | set(sent))
    return {"day": day, "domains": [
        {"policy_domain": d, "policies": policies([c for c in counts if c.policy_domain == d]),
         "report": ({"report_id": sent[d]["report_id"], "sent_at": iso(sent[d]["claimed_at"]),
                     "outcome": sent[d]["outcome"]} if d in sent else None)}
        for d in domains]}


def trace_json(record: dict) -> dict[str, Any]:
    """TRACE: every event of one queue entry, oldest first (``queue trace --json``,
    ``GET /api/v1/messages/{id}/trace``), from store.trace's record (store/trace.py)."""
    e, end = record["entry"], record["end"]
    events: list[dict[str, Any]] = [{
        "at": e["received_at"], "event": "received", "client": e["client"] or None, "helo": e["helo"] or None,
        "auth_user": e["auth_user"] or None, "sender": e["sender"],
        "recipients": [r["address"] for r in record["recipients"]], "size": e["size"]}]
    first_n = e["attempts"] - len(record["attempts"]) + 1     # the oldest attempts may have been dropped
    for n, a in enumerate(record["attempts"], first_n):
        dest = a.get("destination") or {}
        rcpts = [{"address": r["address"], "status": r["status"],
                  "code": (r.get("error") or {}).get("code"), "smtp_code": (r.get("error") or {}).get("smtp_code"),
                  "reply": (r.get("error") or {}).get("reply") or r.get("reply")} for r in a["recipients"]]
        events.append({"at": a["at"], "event": "attempt", "n": n, "connector": e["connector"],
                       "host": dest.get("host"), "ip": dest.get("ip"), "port": dest.get("port"),
                       "duration": a["duration"], "recipients": rcpts,
                       "hosts_tried": [{"host": (f.get("destination") or {}).get("host"),
                                        "ip": (f.get("destination") or {}).get("ip"), "code": f.get("code"),
                                        "reply": f.get("reply")} for f in a.get("hosts_tried", ())]})
        if a.get("notices"):
            bounced = any(r["status"] in ("failed", "expired") for r in rcpts)
            events.append({"at": a["at"], "event": "ndr_sent" if bounced else "delay_notice_sent",
                           "ids": a["notices"]})
    for act in record["audit"]:
        events.append({"at": act["at"], "event": "action", "action": act["action"].removeprefix("queue "),
                       "who": act["who"], "reason": act["detail"].get("reason"), "incident_id": act["incident_id"],
                       "job": act["detail"].get("job")})
    if end is not None:
        if end.get("notices"):
            events.append({"at": end["at"], "event": "ndr_sent", "ids": end["notices"]})
        events.append({"at": end["at"], "event": end["event"],
                       **({"moved_to": end["moved_to"]} if end.get("moved_to") else {})})
    events.sort(key=lambda ev: ev["at"])      # stable: an attempt's notice stays after it
    return {"id": e["id"], "message_id": e["message_id"], "sender": e["sender"], "connector": e["connector"],
            "route": e["route"], "domain": e["domain"] or None, "size": e["size"], "is_dsn": e["is_dsn"],
            "in_queue": end is None, "status": end["event"] if end is not None else e["status"],
            "attempts": e["attempts"], "recipients": record["recipients"],
            "events": [dict(ev, at=iso(ev["at"])) for ev in events]}


def probe_json(probe: ProbeResult) -> dict[str, Any]:
    """``connector test --json`` and ``POST /api/v1/connectors/{name}/test`` ."""
    return probe.to_dict()


def catalog_json(entries: list[catalog.CatalogEntry]) -> list[dict[str, Any]]:
    """``relaywatch errors --json``: each code with its causes and fixes per audience."""
    return [{"id": e.id, "family": "delivery", "code": e.code, "smtp_code": e.smtp_code, "title": e.title,
             "permanent": e.permanent, "explanation": e.explanation,
             "causes": {a: list(e.causes[a]) for a in catalog.AUDIENCES},
             "fixes": {a: list(e.fixes[a]) for a in catalog.AUDIENCES}} for e in entries]


def client_catalog_json(entries: list[catalog.ClientReply]) -> list[dict[str, Any]]:
    """``relaywatch errors --json``: each refusal relaywatch's SMTP server sends to clients."""
    return [{"id": e.id, "family": "client", "code": e.code, "smtp_code": e.smtp_code, "title": e.title,
             "permanent": e.permanent, "replies": list(e.replies), "when": e.when,
             "client": list(e.client), "relay": list(e.relay)} for e in entries]


def node_json(beat: NodeBeat, alive: bool, leader: bool, now: float) -> dict[str, Any]:
    """NODE: one node of the cluster, by its last heartbeat."""
    return {"name": beat.name, "instance": beat.instance, "address": beat.address, "role": beat.role,
            "version": beat.version,
            "state": ("draining" if beat.state is NodeState.DRAINING else "alive") if alive else
            ("stopped" if beat.state is NodeState.STOPPED else "dead"),
            "leader": leader, "started_at": beat.started_at, "heartbeat_at": beat.at,
            "heartbeat_age": round(now - beat.at, 1), "leases": beat.leases, "received": beat.received,
            "delivered": beat.delivered}


def nodes_json(beats: list[NodeBeat], lease: LeaderLease, timing: Timing, now: float) -> dict[str, Any]:
    """NODES (``relaywatch nodes --json``, ``GET /api/v1/nodes``): every node, alive or not, and the leader."""
    leading = leader_now(lease, now)
    return {"nodes": [node_json(b, alive(b, timing, now), b.instance == leading, now) for b in beats],
            "leader_term": lease.term, "lapse": timing.lapse}
