"""What only some kinds of incident have: the facts an incident of that kind
carries (``Incident.facts``), each with the JSON it is stored as (docs/json.md).

Like the rest of the watch's model (incident.py) they read what any
version wrote: a missing or odd field takes a neutral value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class CertificateFacts:
    certificate: Mapping[str, Any]       # as the probe saw it (ProbeResult.certificate)

    def to_dict(self) -> dict[str, Any]:
        return {"certificate": dict(self.certificate)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CertificateFacts":
        cert = data.get("certificate")
        return cls(dict(cert) if isinstance(cert, dict) else {})


@dataclass(frozen=True)
class InvalidSource:
    """Invalid recipients in the last day from one (domain, connector, source)."""
    domain: str
    connector: str
    source: str          # "destination" (a 5.1.x answer) or "expired"
    count: int

    def to_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "connector": self.connector, "source": self.source, "count": self.count}


@dataclass(frozen=True)
class QuotaFacts:
    level: int           # 80 or 100 (% of the quota reached)
    count: int
    quota: int
    top: tuple[InvalidSource, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "count": self.count, "quota": self.quota, "top": [t.to_dict() for t in self.top]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuotaFacts":
        top = tuple(InvalidSource(str(t.get("domain", "?")), str(t.get("connector", "?")), str(t.get("source", "?")),
                                  int(t.get("count") or 0)) for t in data.get("top") or () if isinstance(t, dict))
        return cls(int(data.get("level") or 0), int(data.get("count") or 0), int(data.get("quota") or 0), top)


@dataclass(frozen=True)
class NoticeFacts:
    count: int           # NDRs held back

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "NoticeFacts":
        return cls(int(data.get("count") or 0))


@dataclass(frozen=True)
class StoreFacts:
    reply: str                                   # what mail is refused with, "452 4.3.1"
    refused: int                                 # messages refused meanwhile
    problems: tuple[Mapping[str, Any], ...] = ()  # the places failing now: place, path, code, detail, full, refusing
    seen: tuple[Mapping[str, Any], ...] = ()      # every place and code that failed during the incident

    def to_dict(self) -> dict[str, Any]:
        return {"reply": self.reply, "refused": self.refused, "problems": [dict(p) for p in self.problems],
                "seen": [dict(s) for s in self.seen]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StoreFacts":
        def places(key: str) -> tuple[dict, ...]:
            return tuple(dict(p) for p in data.get(key) or () if isinstance(p, dict))
        return cls(str(data.get("reply") or ""), int(data.get("refused") or 0), places("problems"), places("seen"))


@dataclass(frozen=True)
class NodeFacts:
    node: str                    # server.node_name of the node that stopped beating
    node_address: str
    last_heartbeat_at: float

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "node_address": self.node_address, "last_heartbeat_at": self.last_heartbeat_at}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "NodeFacts":
        at = data.get("last_heartbeat_at")
        return cls(str(data.get("node") or "?"), str(data.get("node_address") or ""),
                   float(at) if isinstance(at, (int, float)) else 0.0)


KindFacts = CertificateFacts | QuotaFacts | NoticeFacts | StoreFacts | NodeFacts
