"""The watch's records beside its incidents (incident.py): the notifications of an
incident's transitions, the NDRs held back, the Fix-now overrides and their audit
trail, the last good delivery of each connector.

Frozen and typed, as the WatchStore protocol (store/base.py) takes and returns them;
the stores map them to rows in one place (store/watch_rows.py).  ``to_dict`` is the
documented shape where one is shown (docs/json.md); what is read from stored JSON
tolerates missing fields, as ``Incident.from_dict`` does.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Mapping


class NotificationState(enum.StrEnum):
    """One notification of an incident's transition (watch/alerts.py); ``notifications.state``."""
    PENDING = "pending"      # to be sent at next_try
    SENT = "sent"
    FAILED = "failed"        # gave up


@dataclass(frozen=True)
class Notification:
    """One notification of an incident, as ``incidents show`` lists it."""
    transition: str          # the alert's name: "open", "escalate:expiry", ... (incident.py Alert.name)
    channel: str             # "email" or "webhook" (watch/alerts.py channels)
    state: NotificationState
    attempts: int = 0
    last_error: str | None = None
    sent_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"transition": self.transition, "channel": self.channel, "state": self.state.value,
                "attempts": self.attempts, "last_error": self.last_error, "sent_at": self.sent_at}


@dataclass(frozen=True)
class DueNotification:
    """A notification to send now (store.due_notifications)."""
    id: int
    incident_id: int
    transition: str
    channel: str
    attempts: int
    payload: Mapping[str, Any]    # what is sent: the webhook's JSON body, the mail's facts (alerts.payload)


@dataclass(frozen=True)
class HeldNotice:
    """An entry whose NDR could not be built yet (store.held_notices): its ``notice_pending``
    (deliver/record.py), latest retry first."""
    entry_id: str
    sender: str
    connector: str
    error: str | None = None
    since: float | None = None
    tries: int = 0
    retry_at: float | None = None

    @classmethod
    def of(cls, entry_id: str, sender: str, connector: str, pending: Mapping[str, Any]) -> "HeldNotice":
        def num(key: str) -> float | None:
            value = pending.get(key)
            return float(value) if isinstance(value, (int, float)) else None
        error = pending.get("error")
        tries = pending.get("tries")
        return cls(entry_id, sender, connector, str(error) if error is not None else None, num("since"),
                   int(tries) if isinstance(tries, (int, float)) else 0, num("retry_at"))


class Setting(enum.Enum):
    """What a Fix-now override changes in the running config (config/overrides.py)."""
    CONNECTOR_ENABLED = ("connector", "enabled")
    CONNECTOR_PAUSED = ("connector", "paused")
    DOMAIN_TYPE = ("domain", "type")

    def of(self, name: str) -> "OverrideKey":
        return OverrideKey(self, name)


_SETTINGS = {s.value: s for s in Setting}


@dataclass(frozen=True)
class OverrideKey:
    """Which setting of which connector or domain; stored (and shown) as ``str(key)``,
    ``connector:<name>:paused``, the key ``config show --json`` and the audit's ``undo`` use."""
    setting: Setting
    name: str

    def __str__(self) -> str:
        scope, name = self.setting.value
        return f"{scope}:{self.name}:{name}"

    @classmethod
    def parse(cls, text: str) -> "OverrideKey | None":
        """The key stored as ``text``; None for one this version does not know."""
        scope, sep, rest = text.partition(":")
        name, sep2, setting = rest.rpartition(":")
        found = _SETTINGS.get((scope, setting)) if sep and sep2 and name else None
        return cls(found, name) if found else None


@dataclass(frozen=True)
class Override:
    """One Fix-now override in force (store.overrides)."""
    key: OverrideKey
    value: Any                  # bool for a connector's enabled/paused, the domain type's str
    set_at: float
    incident_id: int | None = None


@dataclass(frozen=True)
class AuditRecord:
    """One Fix-now or queue action, as the audit log keeps it."""
    id: int
    at: float
    who: str
    action: str                 # "pause", "undo pause", "queue hold", "queue bulk retry", ...
    detail: Mapping[str, Any]   # the action's own JSON: steps, undo, reason (watch/fixes.py), an entry's id
    incident_id: int | None = None
    undone_at: float | None = None

    @property
    def is_undo(self) -> bool:
        return self.action.startswith("undo ")

    def to_dict(self, with_incident: bool = False) -> dict[str, Any]:
        """An incident's own (``incidents show``), or ``with_incident`` the audit log's."""
        out: dict[str, Any] = {"id": self.id, "at": self.at, "who": self.who, "action": self.action}
        if with_incident:
            out["incident_id"] = self.incident_id
        out.update(detail=dict(self.detail), undone_at=self.undone_at)
        return out


@dataclass(frozen=True)
class LastGood:
    """The last delivery a connector's destination took (watch/monitor.py on_attempt), the
    diagnosis's evidence that it worked until then."""
    connector: str
    at: float
    host: str | None = None
    ip: str | None = None
    port: int | None = None
    tls: Mapping[str, Any] | None = None     # version, subject, sans, issuer, not_after

    def to_dict(self) -> dict[str, Any]:
        """As it is stored and as the diagnosis's facts show it (``facts.last_good``)."""
        return {"host": self.host, "ip": self.ip, "port": self.port, "at": self.at,
                "tls": dict(self.tls) if self.tls is not None else None}

    @classmethod
    def from_dict(cls, connector: str, at: float, data: Mapping[str, Any]) -> "LastGood":
        port, tls = data.get("port"), data.get("tls")
        return cls(connector, float(at), data.get("host"), data.get("ip"), port if isinstance(port, int) else None,
                   dict(tls) if isinstance(tls, dict) else None)
