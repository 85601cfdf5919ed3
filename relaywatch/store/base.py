"""The store seams: queue operations and watch state, not SQL.

Everything above these interfaces (receiver, scheduler, watch, CLI) is the
same for every backend: SQLite is the embedded default (store/sqlite.py),
PostgreSQL is for several nodes (store/postgres.py), and store/memory.py keeps
everything in dicts (tests, tools).  tests/contract/test_store_contract.py holds all
three to one contract.

Durability contract: when ``enqueue`` returns, the message is on disk and
survives a crash; when ``record`` returns, the outcome (and any NDR it queued)
is on disk.  A message is removed only inside the same transaction that records
its last recipient as delivered, or queues the NDR that tells the sender.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

from relaywatch.cluster.model import LeaderLease, NodeBeat
from relaywatch.incident import BacklogSummary, Incident, IncidentRecord
from relaywatch.model import Attempt, Entry, NewMessage, RecipientOutcome, Route, StoredBody
from relaywatch.tls_results import TlsCount
from relaywatch.watch_records import AuditRecord, DueNotification, HeldNotice, LastGood, Override, OverrideKey


@dataclass(frozen=True)
class QueueQuery:
    connector: str | None = None
    status: str | None = None        # an EntryStatus value ("active": leased now)
    limit: int = 1000


@dataclass(frozen=True)
class QueryPage:
    """A page of the queue for the HTTP API (store.queue_page): filters, then
    ``limit`` entries in id order after the id ``after``."""
    status: str | None = None
    connector: str | None = None
    sender: str | None = None          # "" is the null sender
    recipient: str | None = None
    domain: str | None = None          # a recipient's domain
    code: str | None = None            # the latest deferral's code: exact, or a class "4.*" / "4.4.*"
    older_than: float | None = None    # seconds since received
    route: str | None = None           # a RouteKind value: local, connector or internet
    text: str | None = None            # a substring of the sender, a recipient or a last reply (any case)
    after: str | None = None
    limit: int = 100


@dataclass(frozen=True)
class Selector:
    """Which entries an operator command applies to."""
    ids: tuple[str, ...] = ()
    connector: str | None = None
    all: bool = False


class QueueStore(Protocol):
    """The queue: what the receiver, the scheduler and the operator's commands use."""

    # Called (on the event loop) after a commit that made work due; the app
    # points it at the scheduler, or at the delivery process's wake-up.
    on_work: Callable[[], None] | None

    @property
    def where(self) -> str:
        """The queue's location for messages (a path, a DSN without its password)."""

    @property
    def single_node(self) -> bool:
        """One delivering process owns the queue: leases left by a dead run are stale
        and are returned at start-up."""

    @property
    def inline_bodies(self) -> bool:
        """Bodies always go into the store (other nodes deliver them), never a spool file."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...

    async def enqueue(self, msg: NewMessage) -> list[str]:
        """Commit a received message; the ids of its entries, one per
        ``msg.by_route()`` group and in that order."""

    async def lease(self, owner: str, limit: int, ttl: float, now: float) -> list[Entry]:
        """Take up to ``limit`` due entries, oldest due first, with their waiting
        recipients and body.  A lease that is not recorded within ``ttl`` seconds
        lapses and the entry is due again."""

    async def read_body(self, body_id: str) -> StoredBody: ...

    async def record(self, entry_id: str, owner: str | None, attempt: Attempt | None,
                     outcomes: Sequence[RecipientOutcome], next_attempt_at: float | None,
                     notices: Sequence[NewMessage] = (), delay_notified: bool = False,
                     notice_pending: dict | None = None, attempts_before: int | None = None,
                     leased: Entry | None = None) -> bool:
        """Apply one attempt's outcomes; queue ``notices`` (NDRs) in the same
        transaction; remove the entry once no recipient is pending and no
        ``notice_pending`` (an NDR that could not be built) is left; such an
        entry stays, due again at ``next_attempt_at``, for that NDR alone.
        ``notice_pending`` is the entry's state after this record: pass the
        entry's own to keep it.  ``delay_notified``: the sender was told of
        the delay (never unset once set).
        ``owner=None`` is an operator action and requires the entry unleased.

        ``attempts_before`` (the entry's attempts when it was leased) marks a
        record tried again after it failed: it is applied while ``owner``
        still holds the lease, lapsed or not, or nobody does and no attempt
        was recorded since; it returns False when that shows it was applied
        already, and raises LeaseLost if another worker holds the entry.

        ``leased``: the entry as the caller leased it, unchanged.  A store may take what it
        keeps of a first try from it (the trace) rather than build that while it holds the
        write lock; it checks the entry's rows still match."""

    async def release_leases(self, owner: str | None, now: float, keep: Sequence[str] = ()) -> int:
        """Make leased entries due again (all of them when owner is None), but
        those in ``keep`` (their outcome is still to be recorded)."""

    async def renew_leases(self, owner: str, ids: Sequence[str], until: float) -> set[str]:
        """Extend ``owner``'s leases on ``ids`` to ``until``; the ids it still held."""

    async def get(self, entry_id: str) -> Entry | None:
        """One entry with every recipient and its attempt history (``queue show``)."""

    async def list(self, query: QueueQuery) -> list[Entry]: ...
    async def retry(self, selector: Selector, now: float) -> int:
        """Make unheld, unleased entries due now, the oldest first; how many."""

    async def hold(self, entry_id: str) -> bool: ...
    async def release(self, entry_id: str, now: float) -> bool: ...
    async def delete(self, entry_id: str) -> bool:
        """Remove an unleased entry (StoreError while it is being delivered)."""

    async def move_recipients(self, entry_id: str, addresses: Sequence[str], route: Route,
                              now: float) -> str | None:
        """Give some waiting recipients of an unleased entry a new route, as a new
        entry sharing the body; its id (None if nothing moved)."""

    async def counts(self) -> dict[str, int]:
        """Entries by stored status (leased ones count as their stored status)."""

    async def spool_paths(self) -> set[str]:
        """Every body file a queue row points at (the rest are crash leftovers)."""


class WatchStore(Protocol):
    """The mail-flow watch's state: deferred mail by cause, incidents and their
    notifications, Fix-now overrides with their audit trail.  All of it goes in and out
    as the kernel's frozen dataclasses (incident.py, watch_records.py); the stores map
    them to rows in one place (store/watch_rows.py).  What stays JSON is a document:
    a notification's payload, an audit record's detail."""

    async def deferred_summary(self) -> list[BacklogSummary]:
        """Deferred mail grouped by (connector, last code): messages, recipients
        still waiting, oldest received, first expiry, first failure, latest error
        and the destinations tried."""

    async def held_notices(self, limit: int = 20) -> list[HeldNotice]:
        """Entries whose NDR could not be built yet, latest retry first."""

    async def entry_ids(self, connector: str, code: str | None = None, status: str = "deferred") -> list[str]:
        """Ids of a connector's entries in ``status`` (and with last code ``code``), oldest first."""

    async def open_incidents(self) -> list[Incident]: ...
    async def incidents(self, include_resolved: bool = False, limit: int = 200) -> list[Incident]:
        """The latest incidents first."""

    async def incident(self, incident_id: int) -> IncidentRecord | None:
        """One incident, with its notifications and audit records."""

    async def save_incident(self, incident: Incident, term: int | None = None) -> int:
        """Insert (``id`` None) or update an incident; its id.  ``term``: the
        writer's leader term (ClusterStore); StaleTerm, and nothing written, once
        another node leads."""

    async def add_notification(self, incident_id: int, transition: str, channel: str, payload: dict,
                               now: float, term: int | None = None) -> bool:
        """Queue one notification; False if this transition was already notified on this channel.
        ``transition`` is incident.py's ``Alert.name``, kept as text: the key of the notifications
        (never twice per name and channel) and what ``incidents show`` prints; nothing branches on
        it once stored.  ``term``: as for save_incident."""

    async def add_notification_outcome(self, incident_id: int, transition: str, channel: str, payload: dict,
                                       attempts: int, sent_at: float | None, last_error: str | None) -> None:
        """Record a notification tried before the store could be written (sent when ``sent_at``)."""

    async def due_notifications(self, now: float) -> list[DueNotification]: ...
    async def notification_result(self, notification_id: int, ok: bool, error: str | None, now: float,
                                  retry_at: float | None) -> None:
        """Sent; or failed, to be tried again at ``retry_at`` (None: given up)."""

    async def set_last_good(self, good: LastGood) -> None: ...
    async def last_good(self) -> dict[str, LastGood]:
        """Each connector's last good delivery, by connector."""

    async def overrides(self) -> dict[OverrideKey, Override]:
        """The overrides in force (keys this version does not know are left out)."""

    async def overrides_version(self) -> tuple:
        """Changes whenever the overrides change (cheap to poll)."""

    async def apply_fix(self, who: str, action: str, incident_id: int | None, detail: dict,
                        set_overrides: Mapping[OverrideKey, Any], clear_overrides: Sequence[OverrideKey],
                        now: float) -> int:
        """Change overrides and write the audit record in one transaction; the audit id."""

    async def last_undoable(self, incident_id: int) -> AuditRecord | None:
        """The incident's latest action not undone and not itself an undo."""

    async def mark_undone(self, audit_id: int, now: float) -> None: ...
    async def add_invalid_recipients(self, rows: Sequence[tuple[float, str, str, str]]) -> None:
        """Count refused recipients: (at, domain, connector, source) rows."""

    async def invalid_recipients_since(self, since: float) -> list[tuple[str, str, str, int]]:
        """(domain, connector, source, count) since ``since``, the most first."""


class ConsoleStore(Protocol):
    """The reads of the HTTP console (relaywatch/console/), beside the queue's and the watch's."""

    async def queue_gauges(self, now: float) -> list[tuple[str, str, str | None, int, int, float]]:
        """/metrics in one cheap read: (connector, status, code of the latest deferral, entries,
        of them leased at ``now``, the oldest received_at) per group."""

    async def count_deferred_before(self, connector: str, received_before: float, now: float, cap: int) -> int:
        """How many deferred entries of ``connector``, not leased at ``now``, were received before
        ``received_before`` (the overview's expiry forecast), counted up to ``cap``: without
        walking them in id order, as a queue page of them would."""

    async def queue_page(self, page: QueryPage, now: float) -> list[Entry]:
        """Entries matching ``page``'s filters in id order after ``page.after``, every recipient
        with them (keyset pagination: stable while messages come and go)."""

    async def queue_page_ids(self, page: QueryPage, now: float) -> list[str]:
        """Only the ids of queue_page (bulk actions page through them)."""

    async def audit_log(self, limit: int = 100) -> list[AuditRecord]:
        """The newest audit records first: Fix now and queue actions, with their incident (or None)."""

    async def trace(self, entry_id: str) -> dict[str, Any] | None:
        """The message trace of one entry (store/trace.py trace_record, times as epoch seconds)
        with ``audit``, the actions taken on it: from its rows while it is queued, from what
        was kept when it left (delivered, bounced, expired, deleted, moved) for
        ``queue.trace_retention``; None if neither."""

    async def trace_ids(self, message_id: str) -> list[str]:
        """The entries (queued, or kept as traces) of a Message-ID, with or without its <>."""


class ClusterStore(Protocol):
    """The nodes sharing the queue and the leader lease (relaywatch/cluster/).  Each
    operation is atomic on every store: PostgreSQL from several nodes at once,
    SQLite from the processes of one box."""

    async def heartbeat(self, beat: NodeBeat, first: bool = False) -> int:
        """Register or refresh the node ``beat.name``.  ``first`` (the node's start):
        entries still leased by earlier starts of the same node are due again at
        once, never adopted; how many."""

    async def nodes(self) -> list[NodeBeat]:
        """Every node that ever beat on this queue, by name."""

    async def release_dead_leases(self, beat_before: float, now: float) -> int:
        """Make due again, at once, what nodes whose last heartbeat is older than
        ``beat_before`` had leased; how many entries."""

    async def acquire_leader(self, instance: str, now: float, until: float) -> int | None:
        """Take the leader lease until ``until`` if nobody holds it or its holder's
        lapsed before ``now``, or renew ours; the term held (it grows each time the
        holder changes), None if another instance holds it."""

    async def resign_leader(self, instance: str) -> None:
        """Let our lease lapse now (a clean stop): another node takes it at once."""

    async def leader(self) -> LeaderLease: ...


class TlsReportStore(Protocol):
    """TLS reporting (RFC 8460): session counts per UTC day and report key, added by the
    watch's tick, and the daily reports, each claimed once."""

    async def add_tls_counts(self, rows: Sequence[TlsCount]) -> None:
        """Add each row's count to its key's (day, domain, policy, result, MX, addresses)."""
    async def tls_counts(self, day: str) -> list[TlsCount]: ...
    async def claim_tls_report(self, day: str, domain: str, report_id: str, now: float) -> bool:
        """True once per (day, domain): for whoever is to send that report."""
    async def finish_tls_report(self, day: str, domain: str, outcome: dict) -> None: ...
    async def tls_reports(self, day: str) -> list[dict[str, Any]]: ...
    async def add_tls_report_post(self, day: str, domain: str, uri: str, body: bytes, next_try: float) -> None:
        """Keep a report's failed first POST to ``uri``, to try again at ``next_try``."""
    async def due_tls_report_posts(self, now: float) -> list[dict[str, Any]]:
        """The kept POSTs due by ``now``: day, policy_domain, uri, body, attempts."""
    async def claim_tls_report_post(self, post: dict[str, Any], next_try: float) -> bool:
        """True for the one caller that makes the next try of ``post`` (as read); the one after is at ``next_try``."""
    async def drop_tls_report_post(self, post: dict[str, Any]) -> None:
        """Sent, or given up: no more tries."""


class Store(QueueStore, WatchStore, ConsoleStore, ClusterStore, TlsReportStore, Protocol):
    """All of them: one database holds the queue, the watch's, the console's, the
    cluster's and TLS reporting's state (what open_store returns)."""
