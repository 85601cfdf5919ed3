"""The nouns every stage shares: queue entries, recipients, routes, failures.

A *message* as received may fan out to several routes (a connector, the local
mailboxes, the internet by MX).  The queue keeps one **entry** per (message,
route): each entry has its own id, retry timer and status, and one status per
recipient.  The entries of one message share the stored body.

Entry status graph (only the scheduler and the operator commands move it):

    QUEUED ──lease──▶ ACTIVE ──all recipients done──▶ (removed; NDR queued if any failed)
       ▲                 │
       │                 └──some deferred──▶ DEFERRED ──next_attempt_at──▶ (leasable again)
    release ◀── HELD ◀── hold (from QUEUED or DEFERRED)

ACTIVE is not stored: an entry is active while it holds an unexpired lease.
"""

from __future__ import annotations

import copy
import enum
import io
import json
from datetime import datetime, timezone
from dataclasses import dataclass, field, fields
from typing import Any, BinaryIO, Mapping

from relaywatch.dsn_params import NO_MESSAGE_DSN, NO_RECIPIENT_DSN, MessageDsn, RecipientDsn


class EntryStatus(str, enum.Enum):
    QUEUED = "queued"        # due now, never failed
    DEFERRED = "deferred"    # failed before; waits for next_attempt_at
    HELD = "held"            # an operator stopped delivery
    ACTIVE = "active"        # leased by a delivery worker (derived)


class RecipientStatus(str, enum.Enum):
    PENDING = "pending"      # not tried yet
    DEFERRED = "deferred"    # a transient failure; will be retried
    DELIVERED = "delivered"
    FAILED = "failed"        # permanent failure; an NDR was queued
    EXPIRED = "expired"      # gave up after message_expiration; an NDR was queued

    @property
    def is_final(self) -> bool:
        return self in (RecipientStatus.DELIVERED, RecipientStatus.FAILED, RecipientStatus.EXPIRED)


class RouteKind(str, enum.Enum):
    CONNECTOR = "connector"  # a configured [[connectors]] entry
    LOCAL = "local"          # a Maildir under data_dir
    INTERNET = "internet"    # MX lookup of the recipient domain


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    name: str                # connector name, "local" or "internet"
    domain: str = ""         # set when delivery looks up this domain's MX (no smart hosts)

    @property
    def key(self) -> str:
        """Recipients with the same key travel in one queue entry."""
        return f"{self.name}:{self.domain}" if self.domain else self.name


@dataclass(frozen=True)
class Destination:
    host: str
    ip: str | None = None
    port: int | None = None
    index: int | None = None     # 1-based: which smart host / MX was this
    count: int | None = None     # of how many

    @property
    def label(self) -> str:
        """``host[ip]:port``: how messages, incidents and the CLI name a destination."""
        label = self.host
        if self.ip and self.ip != self.host:
            label += f"[{self.ip}]"
        if self.port:
            label += f":{self.port}"
        return label


@dataclass(frozen=True)
class Failure:
    """Why one attempt did not deliver: the ``last_error`` of the JSON output.

    Built by classify.classify() from observations, and by Fix now's decommission
    (watch/fixes.py, from the catalog's entry: no attempt was made); the fields are
    documented in docs/json.md and are a stable interface.
    """
    code: str                    # enhanced status code, e.g. "4.4.316"
    smtp_code: int               # basic reply code, e.g. 450
    title: str
    subtype: str | None
    detail: str                  # one sentence naming the host and what happened
    phase: str
    permanent: bool
    at: float
    kind: str                    # catalog id, e.g. "connect.refused"
    destination: Destination | None = None
    reply: str | None = None     # the server's last reply, verbatim
    errno: str | None = None
    dns: dict[str, Any] | None = None
    tls: dict[str, Any] | None = None
    sts: dict[str, Any] | None = None   # the MTA-STS policy broken (4.7.320 sts_*), as in docs/json.md
    dane: dict[str, Any] | None = None  # the TLSA records not met (4.7.320 dane_*), as in docs/json.md

    def to_dict(self) -> dict[str, Any]:
        # What asdict() gives, without its recursion through every value: a queue page
        # converts a failure per recipient, and asdict() was most of the page's time.
        data = {name: getattr(self, name) for name in _FAILURE_ORDER}
        data["destination"] = dict(vars(self.destination)) if self.destination is not None else None
        for name in ("dns", "tls", "sts", "dane"):
            if data[name] is not None:
                data[name] = copy.deepcopy(data[name])
        for policy in ("sts", "dane"):
            if data[policy] is None:
                # Only MTA-STS / DANE failures have it: every other failure keeps the form it was stored in.
                del data[policy]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Failure":
        """Read a stored failure, of this version or any other.

        Failures are kept as JSON in queued messages for up to the message
        expiration, so a relay must read what an older or newer relay wrote:
        unknown fields are dropped, missing ones take a neutral value."""
        data = {k: v for k, v in data.items() if k in _FAILURE_FIELDS}
        for name, neutral in _FAILURE_NEUTRAL.items():
            data.setdefault(name, neutral)
        dest = data.get("destination")
        data["destination"] = (Destination(**{k: v for k, v in dest.items() if k in _DESTINATION_FIELDS})
                               if isinstance(dest, dict) and "host" in dest else None)
        return cls(**data)

    def to_json(self) -> str:
        """The stored form: to_dict() and the format version (``v``)."""
        return json.dumps({"v": FAILURE_FORMAT, **self.to_dict()}, separators=(",", ":"))


# The stored failure format (Failure.to_json); from_dict reads every version.
FAILURE_FORMAT = 1
_FAILURE_ORDER = tuple(f.name for f in fields(Failure))
_FAILURE_FIELDS = set(_FAILURE_ORDER)
_DESTINATION_FIELDS = {f.name for f in fields(Destination)}
# What a field missing from a stored failure reads as (fields without a default).
_FAILURE_NEUTRAL: dict[str, Any] = {"code": "4.0.0", "smtp_code": 451, "title": "Unknown failure",
                                    "subtype": None, "detail": "", "phase": "", "permanent": False,
                                    "at": 0.0, "kind": "unknown"}


class _StoredFailure:
    """Recipient.last_error: a Failure, or its stored JSON text (Failure.to_json), read into a
    Failure when first asked for.  The queue's reads (store/entry_rows.py) hand it the text: a
    lease of a backlog took 13 µs per recipient to parse failures the delivery never reads (only
    an expiry's DSN, the queue's views and the trace do)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj: Any, owner: type | None = None) -> Failure | None:
        if obj is None:
            return None          # the dataclass field's default
        value = obj.__dict__[self.slot]
        if isinstance(value, str):
            value = Failure.from_dict(json.loads(value))
            obj.__dict__[self.slot] = value
        return value

    def __set__(self, obj: Any, value: Failure | str | None) -> None:
        obj.__dict__[self.slot] = value


@dataclass(frozen=True)
class Recipient:
    address: str
    status: RecipientStatus = RecipientStatus.PENDING
    last_error: Failure | None = _StoredFailure()   # type: ignore[assignment]  # also its stored text
    position: int = 0
    dsn: RecipientDsn = NO_RECIPIENT_DSN     # NOTIFY and ORCPT as the client gave them (RFC 3461)


@dataclass(frozen=True)
class RecipientOutcome:
    """What one delivery attempt did for one recipient."""
    address: str
    status: RecipientStatus          # DELIVERED, DEFERRED, FAILED or EXPIRED
    failure: Failure | None = None
    reply: str | None = None         # the destination's reply on success (its queue id)
    # DELIVERED to a server that offers DSN and was given the NOTIFY: a success notice is its job.
    dsn_passed_on: bool = False


@dataclass(frozen=True)
class Attempt:
    at: float
    duration: float
    destination: Destination | None
    outcomes: tuple[RecipientOutcome, ...]
    tried: tuple[Failure, ...] = ()   # earlier hosts of the same attempt that failed

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "duration": round(self.duration, 4),
            # vars(), not asdict(): asdict's recursion was a third of this on every delivery.
            "destination": dict(vars(self.destination)) if self.destination else None,
            "recipients": [
                {"address": o.address, "status": o.status.value,
                 "error": o.failure.to_dict() if o.failure else None, "reply": o.reply}
                for o in self.outcomes
            ],
            "hosts_tried": [f.to_dict() for f in self.tried],
        }


@dataclass(frozen=True)
class NewMessage:
    """A received message, ready to be committed to the queue."""
    sender: str                                    # "" for the null sender <>
    recipients: tuple[tuple[str, Route], ...]
    body: "StoredBody"
    received_at: float
    expires_at: float
    message_id: str = ""
    client: str = ""
    is_dsn: bool = False
    helo: str = ""                                 # the name the client gave in HELO/EHLO
    auth_user: str = ""                            # who logged in with SMTP AUTH ("" if nobody)
    dsn: MessageDsn = NO_MESSAGE_DSN                       # RET, ENVID
    recipient_dsn: Mapping[str, RecipientDsn] = field(default_factory=dict)   # by address: NOTIFY, ORCPT
    # A TLS report of ours (RFC 8460 5.3): delivered with opportunistic TLS whatever
    # the rua domain's MTA-STS or DANE say, and its sessions are not counted.
    is_tls_report: bool = False
    # Sent with SMTPUTF8 and its header section holds UTF-8 (RFC 6532 content): like a
    # UTF-8 address, it can only go on with SMTPUTF8 (RFC 6531 3.4), even with an ASCII envelope.
    utf8_headers: bool = False

    def by_route(self) -> list[tuple[Route, list[str]]]:
        """The queue entries this message makes: one per route key, in the order of
        each route's first recipient, with its addresses (``enqueue`` returns the
        entries' ids in this order)."""
        groups: dict[str, tuple[Route, list[str]]] = {}
        for address, route in self.recipients:
            groups.setdefault(route.key, (route, []))[1].append(address)
        return list(groups.values())


@dataclass(frozen=True)
class StoredBody:
    """The message content: small bodies inline (committed with the row), big
    ones as a spool file already fsync'd (the row only points at it)."""
    size: int
    data: bytes | None = None
    path: str | None = None

    def open(self) -> BinaryIO:
        """A binary file object over the body, wherever it is kept."""
        if self.data is not None:
            return io.BytesIO(self.data)
        return open(self.path, "rb")


@dataclass
class Entry:
    id: str
    sender: str
    received_at: float
    expires_at: float
    status: EntryStatus
    attempts: int
    next_attempt_at: float | None
    route: Route
    size: int
    message_id: str
    body_id: str
    client: str = ""
    is_dsn: bool = False
    dsn: MessageDsn = NO_MESSAGE_DSN    # RET, ENVID (RFC 3461)
    first_failure_at: float | None = None
    helo: str = ""
    auth_user: str = ""
    is_tls_report: bool = False         # NewMessage.is_tls_report
    utf8_headers: bool = False          # NewMessage.utf8_headers
    recipients: list[Recipient] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    lease_owner: str | None = None
    body: StoredBody | None = None      # filled in by lease(), so delivery needs no extra read
    delay_notified: bool = False        # the sender already got a "delayed" DSN
    # An NDR owed to the sender that could not be built yet (JSON-able: recipients,
    # error, since, tries).  Its recipients are final; only the notice is retried.
    notice_pending: dict[str, Any] | None = None

    @property
    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if not r.status.is_final]

    @property
    def needs_smtputf8(self) -> bool:
        """The message can only go on with SMTPUTF8 (RFC 6531): derived from the envelope,
        not stored.  Domains are kept as A-labels, so only a UTF-8 local part counts, and
        the store keeps addresses exactly as given (tests/contract/test_store_contract.py)."""
        return not self.sender.isascii() or not all(r.address.isascii() for r in self.recipients)

    @property
    def last_error(self) -> Failure | None:
        errors = [r.last_error for r in self.recipients if r.last_error]
        return max(errors, key=lambda f: f.at) if errors else None

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON shape of ``queue list/show --json`` (docs/json.md)."""
        return {
            "id": self.id,
            "sender": self.sender,
            "message_id": self.message_id,
            "received_at": iso(self.received_at),
            "expires_at": iso(self.expires_at),
            "status": self.status.value,
            "attempts": self.attempts,
            "next_attempt_at": iso(self.next_attempt_at) if self.status is not EntryStatus.HELD else None,
            "connector": self.route.name,
            "route": self.route.kind.value,
            "domain": self.route.domain or None,
            "size": self.size,
            "ret": self.dsn.ret,
            "envid": self.dsn.envid,
            "is_dsn": self.is_dsn,
            "is_tls_report": self.is_tls_report,
            "utf8_headers": self.utf8_headers,
            "smtputf8": self.needs_smtputf8 or self.utf8_headers,
            "recipients": [
                {"address": r.address, "status": r.status.value,
                 "last_error": failure_json(r.last_error),
                 "notify": r.dsn.stored_notify, "orcpt": r.dsn.orcpt}
                for r in self.recipients
            ],
            "notice_pending": _notice_json(self.notice_pending),
        }


def dest_label(dest: dict | None) -> str:
    """``host[ip]:port`` from a destination as stored in JSON."""
    dest = dest or {}
    return Destination(dest.get("host") or "-", dest.get("ip"), dest.get("port")).label


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def utc_minute(ts: float | None, missing: str = "-") -> str:
    """``2026-12-01 17:30 UTC``: a time in the admins' texts (alert mail, diagnoses)."""
    if not ts:
        return missing
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _notice_json(held: dict[str, Any] | None) -> dict[str, Any] | None:
    """An NDR held back because it could not be built (deliver/record.py)."""
    if not held:
        return None
    return {"recipients": [r["address"] for r in held.get("recipients", ())], "error": held.get("error"),
            "since": iso(held.get("since")), "tries": held.get("tries"), "retry_at": iso(held.get("retry_at"))}


def failure_json(f: Failure | None) -> dict[str, Any] | None:
    if f is None:
        return None
    d = f.to_dict()
    d["at"] = iso(f.at)
    return d


class RecipientAnswer(str, enum.Enum):
    """What a connector's server said about an address (recipient verification)."""
    EXISTS = "exists"              # the server accepted RCPT TO
    UNKNOWN = "unknown"            # the server refused it permanently (5xx)
    UNAVAILABLE = "unavailable"    # the server could not be asked, or answered 4xx


@dataclass(frozen=True)
class RecipientVerdict:
    """One recipient-verification answer: asked by deliver/callout.py, cached and turned
    into the RCPT reply by receive/verify.py."""
    answer: RecipientAnswer
    detail: str                     # for the mail log: the server's reply, or why it could not be asked
    code: str | None = None         # UNAVAILABLE: the catalog code of the failure (e.g. "4.4.316")
    reason: str | None = None       # UNAVAILABLE: a short phrase safe to show an outside client
