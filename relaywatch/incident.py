"""The watch's nouns: incidents and their transitions, probe results, backlog summaries
(what only some kinds of incident carry: incident_facts.py).

Frozen and typed.  The store keeps an incident as a few columns and a JSON
blob of the shape docs/json.md documents (``incidents list/show --json``, the
webhook's ``incident``), and the CLI and the console read that shape, so
``Incident.to_dict`` / ``Incident.from_dict`` are the one place it is made and
read.  Like ``Failure.from_dict`` they read what any version wrote: missing
fields take a neutral value, and fields this version does not know are kept
as they are (``other``) so that saving an incident back loses nothing.

Incidents written before the kinds existed are told apart the way those
versions did: the store's by ``kind = "store"``, the watch's own warnings by a
``watch:`` code, every other one is a connector's backlog.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from relaywatch.model import FAILURE_FORMAT, Failure
from relaywatch.incident_facts import (CertificateFacts, KindFacts, NodeFacts, NoticeFacts, QuotaFacts,
                                           StoreFacts)
from relaywatch.watch_records import AuditRecord, Notification


class IncidentKind(enum.StrEnum):
    BACKLOG = "backlog"                      # mail deferred on a connector with one code
    CERT_EXPIRING = "cert_expiring"          # a destination's certificate expires soon
    INVALID_QUOTA = "invalid_recipients"     # invalid recipients near the daily quota
    NOTICE_FAILED = "notice_failed"          # NDRs that cannot be built
    NODE_DOWN = "node_down"                  # a node of the cluster stopped beating (cluster/)
    STORE = "store"                          # the relay cannot queue mail (store_incident.py)
    OTHER = "other"                          # written by a version that knows more kinds

    @property
    def code(self) -> str | None:
        """The code the watch's own warnings show in place of a status code."""
        return f"watch:{self.value}" if self in _WATCH_KINDS else None


_WATCH_KINDS = frozenset({IncidentKind.CERT_EXPIRING, IncidentKind.INVALID_QUOTA, IncidentKind.NOTICE_FAILED,
                          IncidentKind.NODE_DOWN})
_BY_WATCH_CODE = {k.code: k for k in _WATCH_KINDS}


class IncidentState(enum.StrEnum):
    """An incident is open until its condition ends (the store's ``incidents.state``)."""
    OPEN = "open"
    RESOLVED = "resolved"


class Severity(enum.StrEnum):
    WARNING = "warning"
    CRITICAL = "critical"


class TransitionKind(enum.StrEnum):
    OPEN = "open"
    UPDATE = "update"          # saved, nobody told
    ESCALATE = "escalate"
    RESOLVE = "resolve"


def _failure(data: Any) -> Failure | None:
    return Failure.from_dict(data) if isinstance(data, dict) else None


def _failure_dict(f: Failure | None) -> dict | None:
    """As a Failure is stored (Failure.to_json): with its format version."""
    return None if f is None else {"v": FAILURE_FORMAT, **f.to_dict()}


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(value) if isinstance(value, (list, tuple)) else ()


@dataclass(frozen=True)
class ProbeStep:
    step: str            # dns, tcp, greeting, ehlo, starttls, certificate, mail, rcpt, rset
    ok: bool
    ms: float
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ok": self.ok, "ms": self.ms, "detail": self.detail}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ProbeStep":
        return cls(str(data.get("step", "?")), bool(data.get("ok")), float(data.get("ms") or 0.0),
                   str(data.get("detail") or ""))


@dataclass(frozen=True)
class ProbeResult:
    """A connector walked step by step (watch/probe.py); ``connector test --json``."""
    connector: str
    connector_type: str
    test_address: str
    at: float
    steps: tuple[ProbeStep, ...] = ()
    ok: bool = False
    error: Failure | None = None          # the first failing step, classified
    greeting: str | None = None
    certificate: Mapping[str, Any] | None = None   # subject, sans, issuer, dates, days_left

    @property
    def host(self) -> str | None:
        """The host the probe resolved and connected to (its last DNS step)."""
        dns = [s for s in self.steps if s.step == "dns" and " -> " in s.detail]
        return dns[-1].detail.split(" ->")[0] if dns else None

    def to_dict(self) -> dict[str, Any]:
        return {"connector": self.connector, "type": self.connector_type, "test_address": self.test_address,
                "at": self.at, "steps": [s.to_dict() for s in self.steps], "ok": self.ok,
                "error": self.error.to_dict() if self.error else None, "greeting": self.greeting,
                "certificate": dict(self.certificate) if self.certificate is not None else None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ProbeResult":
        cert = data.get("certificate")
        return cls(connector=str(data.get("connector", "?")), connector_type=str(data.get("type", "?")),
                   test_address=str(data.get("test_address", "")), at=float(data.get("at") or 0.0),
                   steps=tuple(ProbeStep.from_dict(s) for s in data.get("steps") or () if isinstance(s, dict)),
                   ok=bool(data.get("ok")), error=_failure(data.get("error")), greeting=data.get("greeting"),
                   certificate=dict(cert) if isinstance(cert, dict) else None)


@dataclass(frozen=True)
class Diagnosis:
    """The likely cause picked from the evidence (watch/diagnosis.py)."""
    cause: str
    text: str
    facts: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"cause": self.cause, "text": self.text, "facts": dict(self.facts)}

    @classmethod
    def from_dict(cls, data: Any) -> "Diagnosis | None":
        if not isinstance(data, dict):
            return None
        facts = data.get("facts")
        return cls(str(data.get("cause", "")), str(data.get("text", "")), dict(facts) if isinstance(facts, dict) else {})


@dataclass(frozen=True)
class BacklogSummary:
    """Deferred mail of one (connector, code), as the store summarises it."""
    connector: str
    code: str
    messages: int
    recipients: int
    oldest_received_at: float
    first_expires_at: float
    first_failure_at: float | None = None
    latest_error: Failure | None = None
    destinations: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return self.connector, self.code

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BacklogSummary":
        return cls(connector=data["connector"], code=data["code"], messages=int(data["messages"]),
                   recipients=int(data["recipients"] or 0), oldest_received_at=float(data["oldest_received_at"]),
                   first_expires_at=float(data["first_expires_at"]), first_failure_at=data.get("first_failure_at"),
                   latest_error=_failure(data.get("latest_error")),
                   destinations=tuple(data.get("destinations") or ()))


# The facts of each kind that has some (incident_facts.py).
_FACTS: dict[IncidentKind, type] = {IncidentKind.CERT_EXPIRING: CertificateFacts, IncidentKind.INVALID_QUOTA: QuotaFacts,
                                    IncidentKind.NOTICE_FAILED: NoticeFacts, IncidentKind.STORE: StoreFacts,
                                    IncidentKind.NODE_DOWN: NodeFacts}


@dataclass(frozen=True)
class Incident:
    kind: IncidentKind
    connector: str                   # "*" or "-" when not about one connector
    code: str                        # the catalog code; the watch's warnings: IncidentKind.code
    title: str
    opened_at: float
    state: IncidentState = IncidentState.OPEN
    severity: Severity = Severity.WARNING
    id: int | None = None            # None until the store numbers it
    connector_type: str = "-"
    catalog_id: str | None = None    # the catalog entry (a backlog's failure kind)
    subtype: str | None = None
    updated_at: float = 0.0
    resolved_at: float | None = None
    first_seen: float = 0.0
    last_seen: float = 0.0
    messages: int = 0
    recipients: int = 0
    peak_messages: int = 0
    oldest_received_at: float = 0.0
    first_expires_at: float = 0.0
    destinations: tuple[str, ...] = ()
    latest_error: Failure | None = None
    diagnosis: Diagnosis | None = None
    causes: tuple[str, ...] = ()
    fixes: tuple[str, ...] = ()
    actions: tuple[str, ...] = ()    # Fix now actions offered (watch/fixes.py ACTIONS)
    escalations: tuple[str, ...] = ()
    delivered_late: int = 0
    expired: int = 0
    probe: ProbeResult | None = None
    probe_history: tuple[Mapping[str, Any], ...] = ()   # every probe in short, oldest first (with_probe)
    detail: str | None = None        # the watch's warnings and the store's: what is wrong, in a sentence
    facts: KindFacts | None = None   # what only this kind has
    other: Mapping[str, Any] = field(default_factory=dict)   # fields of other versions, kept as read

    @property
    def is_open(self) -> bool:
        return self.state is IncidentState.OPEN

    @property
    def key(self) -> tuple[str, str]:
        return self.connector, self.code

    def to_dict(self) -> dict[str, Any]:
        """The stored and documented JSON shape (docs/json.md)."""
        out: dict[str, Any] = dict(self.other)
        out.update({
            "id": self.id, "connector": self.connector, "connector_type": self.connector_type, "code": self.code,
            "title": self.title, "kind": self._stored_kind(), "subtype": self.subtype, "state": self.state.value,
            "severity": self.severity.value, "opened_at": self.opened_at, "updated_at": self.updated_at,
            "resolved_at": self.resolved_at, "first_seen": self.first_seen, "last_seen": self.last_seen,
            "messages": self.messages, "recipients": self.recipients, "peak_messages": self.peak_messages,
            "oldest_received_at": self.oldest_received_at, "first_expires_at": self.first_expires_at,
            "destinations": list(self.destinations), "latest_error": _failure_dict(self.latest_error),
            "diagnosis": self.diagnosis.to_dict() if self.diagnosis else None, "causes": list(self.causes),
            "fixes": list(self.fixes), "actions": list(self.actions), "escalations": list(self.escalations),
            "delivered_late": self.delivered_late, "expired": self.expired,
            "probe": self.probe.to_dict() if self.probe else None})
        if self.probe_history:    # absent until a probe ran: the shape of incidents that never probe stays as it was
            out["probe_history"] = [dict(p) for p in self.probe_history]
        if self.detail is not None:
            out["detail"] = self.detail
        if self.facts is not None:
            out.update(self.facts.to_dict())
        return out

    def _stored_kind(self) -> str | None:
        if self.kind is IncidentKind.BACKLOG:
            return self.catalog_id
        if self.kind is IncidentKind.OTHER:
            return self.other.get("kind")
        return self.kind.code or self.kind.value

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Incident":
        """Read an incident as stored (or as the CLI shows it), of any version."""
        kind = kind_of(data)
        known = _KNOWN_KEYS | (_FACT_KEYS[kind] if kind in _FACT_KEYS else set())
        other = {k: v for k, v in data.items() if k not in known}
        if kind is IncidentKind.OTHER:
            other["kind"] = data.get("kind")

        def num(key: str, default: float = 0.0) -> float:
            value = data.get(key)
            return float(value) if isinstance(value, (int, float)) else default

        def count(key: str) -> int:
            value = data.get(key)
            return int(value) if isinstance(value, (int, float)) else 0

        probe = data.get("probe")
        facts_cls = _FACTS.get(kind)
        opened = num("opened_at")
        return cls(
            kind=kind, connector=str(data.get("connector", "-")), code=str(data.get("code", "?")),
            title=str(data.get("title") or data.get("code") or "?"), opened_at=opened,
            state=IncidentState.RESOLVED if data.get("state") == "resolved" else IncidentState.OPEN,
            severity=Severity.CRITICAL if data.get("severity") == "critical" else Severity.WARNING,
            id=data.get("id"), connector_type=str(data.get("connector_type") or "-"),
            catalog_id=data.get("kind") if kind is IncidentKind.BACKLOG else None, subtype=data.get("subtype"),
            updated_at=num("updated_at", opened),
            resolved_at=data["resolved_at"] if isinstance(data.get("resolved_at"), (int, float)) else None,
            first_seen=num("first_seen", opened), last_seen=num("last_seen", opened), messages=count("messages"),
            recipients=count("recipients"), peak_messages=count("peak_messages"),
            oldest_received_at=num("oldest_received_at", opened), first_expires_at=num("first_expires_at", opened),
            destinations=_strings(data.get("destinations")), latest_error=_failure(data.get("latest_error")),
            diagnosis=Diagnosis.from_dict(data.get("diagnosis")), causes=_strings(data.get("causes")),
            fixes=_strings(data.get("fixes")), actions=_strings(data.get("actions")),
            escalations=_strings(data.get("escalations")), delivered_late=count("delivered_late"),
            expired=count("expired"), probe=ProbeResult.from_dict(probe) if isinstance(probe, dict) else None,
            probe_history=tuple(dict(p) for p in data.get("probe_history") or () if isinstance(p, dict)),
            detail=data.get("detail"), facts=facts_cls.from_dict(data) if facts_cls else None, other=other)


PROBE_HISTORY = 20     # probes an incident remembers (the latest is also kept whole, in ``probe``)


def with_probe(inc: Incident, probe: ProbeResult) -> Incident:
    """``inc`` with ``probe`` as its latest, and the probe in short at the end of its history."""
    failed = next((s for s in probe.steps if not s.ok), None)
    brief = {"at": probe.at, "ok": probe.ok, "code": probe.error.code if probe.error else None,
             "step": failed.step if failed else None}
    return replace(inc, probe=probe, probe_history=(*inc.probe_history, brief)[-PROBE_HISTORY:])


def kind_of(data: Mapping[str, Any]) -> IncidentKind:
    """The kind of a stored incident, also one written before kinds were stored."""
    if data.get("kind") == IncidentKind.STORE.value:
        return IncidentKind.STORE
    code = str(data.get("code") or "")
    if code.startswith("watch:"):
        return _BY_WATCH_CODE.get(code, IncidentKind.OTHER)
    return IncidentKind.BACKLOG


_KNOWN_KEYS = {f.name for f in fields(Incident)} - {"catalog_id", "facts", "other"} | {"kind"}
_FACT_KEYS = {kind: {f.name for f in fields(cls)} for kind, cls in _FACTS.items()}


@dataclass(frozen=True)
class Alert:
    """What admins are told of one transition (watch/alerts.py sends it).  Its ``name`` is the
    text stored and sent: the notifications' ``transition`` column (one per incident, name and
    channel), the webhook's ``transition`` and ``X-Relaywatch-Delivery`` (docs/json.md)."""
    kind: TransitionKind          # OPEN, ESCALATE or RESOLVE: an UPDATE tells nobody
    reason: str | None = None     # an escalation's, as the incident's ``escalations`` keeps it:
                                  # "expiry", "count-<n>" (a backlog), "<level>%" (the quota)

    def __post_init__(self) -> None:
        if self.kind is TransitionKind.UPDATE or (self.kind is TransitionKind.ESCALATE) != bool(self.reason):
            raise ValueError(f"no alert is {self.kind.value} with reason {self.reason!r}")

    @classmethod
    def opened(cls) -> "Alert":
        return cls(TransitionKind.OPEN)

    @classmethod
    def escalated(cls, reason: str) -> "Alert":
        return cls(TransitionKind.ESCALATE, reason)

    @classmethod
    def resolved(cls) -> "Alert":
        return cls(TransitionKind.RESOLVE)

    @classmethod
    def from_name(cls, name: str) -> "Alert":
        """The alert a stored ``name`` says: "open", "escalate:<reason>", "resolve"."""
        kind, _, reason = name.partition(":")
        return cls(TransitionKind(kind), reason or None)

    @property
    def name(self) -> str:
        return f"{self.kind.value}:{self.reason}" if self.reason else self.kind.value

    @property
    def event(self) -> str:
        """The webhook's ``event`` (and ``X-Relaywatch-Event``)."""
        return {TransitionKind.OPEN: "incident.opened", TransitionKind.RESOLVE: "incident.resolved"}.get(
            self.kind, "incident.escalated")


@dataclass(frozen=True)
class Transition:
    """What one evaluation changed about one incident."""
    kind: TransitionKind
    incident: Incident
    alert: Alert | None = None    # what admins are told of it, if anything

    def __post_init__(self) -> None:
        if self.alert is not None and self.alert.kind is not self.kind:
            raise ValueError(f"a {self.kind.value} transition cannot alert {self.alert.name!r}")


@dataclass(frozen=True)
class IncidentRecord:
    """One incident as ``store.incident`` reads it: with the notifications sent of it and the
    Fix-now audit records made on it (``incidents show --json``, the API's incident)."""
    incident: Incident
    notifications: tuple[Notification, ...] = ()
    audit: tuple[AuditRecord, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The documented shape (docs/json.md): the incident's, with ``notifications`` and ``audit``."""
        return {**self.incident.to_dict(), "notifications": [n.to_dict() for n in self.notifications],
                "audit": [a.to_dict() for a in self.audit]}
