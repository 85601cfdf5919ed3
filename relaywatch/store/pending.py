"""Outcomes this node could not record yet: kept, journaled, recorded later.

A message the destination accepted while the queue store was unreachable has
been delivered; only its record is missing.  Letting its lease lapse would
deliver it again (the duplicates of issue 9, item 7), so the scheduler hands
such a record here instead: it is kept in memory and appended, fsync'd, to a
small journal (``data_dir/pending-outcomes.jsonl``) in case the process dies,
and the *record* is tried again with backoff until it succeeds; the delivery
never is.  While an outcome is pending its entry stays leased to this node:
the scheduler does not deliver it again, and the lease is renewed as soon as
the store answers.  At start-up the journal is replayed before anything is
leased.

A record tried again carries the entry's attempt count from its lease
(``attempts_before``, see QueueStore.record), which makes replaying it safe
when the first try did commit after all.  If the lease lapsed and another
node took the entry, nothing can be done any more but say so: the log line
"possible duplicate" names the queue id.

The journal holds one JSON object per line (``encode``); it is rewritten
without the recorded ones, and removed once none is left.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from relaywatch import events
from relaywatch.errors import LeaseLost, StoreError, UnknownEntry
from relaywatch.model import (
    Attempt, Destination, Entry, Failure, NewMessage, RecipientOutcome, RecipientStatus, Route, RouteKind, StoredBody,
)
from relaywatch.store.backoff import Backoff
from relaywatch.store.driver_errors import first_line

log = logging.getLogger("relaywatch.scheduler")

JOURNAL_NAME = "pending-outcomes.jsonl"
RETRY_FIRST = 0.1
RETRY_CAP = 1.0


@dataclass(frozen=True)
class PendingRecord:
    """One ``QueueStore.record`` call, as the scheduler made it."""
    entry_id: str
    owner: str
    attempts_before: int                # the entry's attempts when it was leased
    attempt: Attempt | None
    outcomes: tuple[RecipientOutcome, ...]
    next_attempt_at: float | None
    notices: tuple[NewMessage, ...] = ()
    delay_notified: bool = False
    notice_pending: dict | None = None   # an NDR that could not be built (deliver/record.py)
    # The entry as leased (QueueStore.record's ``leased``); not journaled: a record tried again reads the rows.
    leased: Entry | None = field(default=None, compare=False, repr=False)

    @property
    def delivered(self) -> int:
        return sum(1 for o in self.outcomes if o.status is RecipientStatus.DELIVERED)


# -- the journal's lines ---------------------------------------------------------------

def encode(r: PendingRecord) -> dict[str, Any]:
    return {
        "entry_id": r.entry_id, "owner": r.owner, "attempts_before": r.attempts_before,
        "attempt": None if r.attempt is None else {
            "at": r.attempt.at, "duration": r.attempt.duration,
            "destination": asdict(r.attempt.destination) if r.attempt.destination else None,
            "outcomes": [_outcome(o) for o in r.attempt.outcomes],
            "tried": [f.to_dict() for f in r.attempt.tried]},
        "outcomes": [_outcome(o) for o in r.outcomes],
        "next_attempt_at": r.next_attempt_at,
        "notices": [_message(m) for m in r.notices],
        "delay_notified": r.delay_notified,
        "notice_pending": r.notice_pending,
    }


def decode(d: dict[str, Any]) -> PendingRecord:
    a = d["attempt"]
    attempt = None if a is None else Attempt(
        at=a["at"], duration=a["duration"],
        destination=Destination(**a["destination"]) if a["destination"] else None,
        outcomes=tuple(_outcome_from(o) for o in a["outcomes"]),
        tried=tuple(Failure.from_dict(f) for f in a["tried"]))
    return PendingRecord(
        entry_id=d["entry_id"], owner=d["owner"], attempts_before=d["attempts_before"], attempt=attempt,
        outcomes=tuple(_outcome_from(o) for o in d["outcomes"]), next_attempt_at=d["next_attempt_at"],
        notices=tuple(_message_from(m) for m in d["notices"]), delay_notified=d["delay_notified"],
        notice_pending=d.get("notice_pending"))


def _outcome(o: RecipientOutcome) -> dict[str, Any]:
    return {"address": o.address, "status": o.status.value,
            "failure": o.failure.to_dict() if o.failure else None, "reply": o.reply}


def _outcome_from(d: dict[str, Any]) -> RecipientOutcome:
    return RecipientOutcome(d["address"], RecipientStatus(d["status"]),
                            Failure.from_dict(d["failure"]) if d["failure"] else None, d["reply"])


def _message(m: NewMessage) -> dict[str, Any]:
    return {"sender": m.sender,
            "recipients": [[a, {"kind": r.kind.value, "name": r.name, "domain": r.domain}] for a, r in m.recipients],
            "body": {"size": m.body.size, "path": m.body.path,
                     "data": None if m.body.data is None else base64.b64encode(m.body.data).decode("ascii")},
            "received_at": m.received_at, "expires_at": m.expires_at, "message_id": m.message_id,
            "client": m.client, "is_dsn": m.is_dsn, "is_tls_report": m.is_tls_report,
            "utf8_headers": m.utf8_headers}


def _message_from(d: dict[str, Any]) -> NewMessage:
    b = d["body"]
    return NewMessage(
        sender=d["sender"],
        recipients=tuple((a, Route(RouteKind(r["kind"]), r["name"], r["domain"])) for a, r in d["recipients"]),
        body=StoredBody(size=b["size"], path=b["path"],
                        data=None if b["data"] is None else base64.b64decode(b["data"])),
        received_at=d["received_at"], expires_at=d["expires_at"], message_id=d["message_id"],
        client=d["client"], is_dsn=d["is_dsn"], is_tls_report=d.get("is_tls_report", False),
        utf8_headers=d.get("utf8_headers", False))


class Journal:
    """The append-only file: a record is kept once its line is fsync'd."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, record: PendingRecord) -> None:
        line = (json.dumps(encode(record), separators=(",", ":")) + "\n").encode()
        with self._lock:
            new = not self.path.exists()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            if new:
                _fsync_dir(self.path.parent)

    def rewrite(self, records: list[PendingRecord]) -> None:
        """Keep only ``records`` (none: remove the file)."""
        with self._lock:
            if not records:
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    return
            else:
                tmp = self.path.with_name(self.path.name + ".tmp")
                with open(tmp, "wb") as f:
                    for r in records:
                        f.write((json.dumps(encode(r), separators=(",", ":")) + "\n").encode())
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)

    def load(self) -> list[PendingRecord]:
        """What a previous run kept.  A line cut short by a crash was never
        kept (its outcome's lease simply lapses): it is skipped."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        records: dict[str, PendingRecord] = {}
        for line in data.splitlines():
            try:
                r = decode(json.loads(line))
            except (ValueError, KeyError, TypeError):
                log.warning("skipping an incomplete line in %s", self.path)
                continue
            records[r.entry_id] = r
        return list(records.values())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- keeping and retrying ---------------------------------------------------------------

class PendingOutcomes:
    """The scheduler's outcomes not yet in the store, and the loop that records them."""

    def __init__(self, store, journal_path: Path, lease_time: Callable[[], float],
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.journal = Journal(journal_path)
        self.lease_time = lease_time
        self.clock = clock
        self._pending: dict[str, PendingRecord] = {}
        self._since: float | None = None            # when the first of the current ones was kept
        self._task: asyncio.Task | None = None
        self._nudged = asyncio.Event()
        self._reported: set[str] = set()            # unexpected errors already logged, per entry

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._pending

    def __len__(self) -> int:
        return len(self._pending)

    def ids(self) -> list[str]:
        return list(self._pending)

    async def record(self, r: PendingRecord) -> None:
        """Record now; if the store cannot, keep the outcome and record it later."""
        try:
            await self.store.record(r.entry_id, r.owner, r.attempt, list(r.outcomes), r.next_attempt_at,
                                    list(r.notices), delay_notified=r.delay_notified,
                                    notice_pending=r.notice_pending, leased=r.leased)
            if self._pending:
                self.nudge()    # the store answers again: no need to wait for the next try
        except LeaseLost as exc:
            _possible_duplicate(r, exc)
        except UnknownEntry as exc:
            if r.delivered:
                # Gone, though we hold its lease: this node was taken for dead (its heartbeat
                # late by more than server.node_lapse), another node delivered it and recorded
                # first; or an operator deleted it meanwhile.
                _possible_duplicate(r, exc)
            else:
                log.warning("message %s left the queue while it was being delivered; its outcome is not "
                            "recorded", r.entry_id)
        except Exception as exc:   # StoreError above all, but nothing may turn into a redelivery
            await self._keep(r, exc)

    async def _keep(self, r: PendingRecord, exc: BaseException) -> None:
        first = not self._pending
        self._pending[r.entry_id] = r     # from now on the scheduler does not deliver it again
        try:
            await asyncio.to_thread(self.journal.append, r)
            where = str(self.journal.path)
        except (OSError, TypeError, ValueError) as journal_error:
            where = f"memory only ({self.journal.path}: {journal_error})"
        if first:
            self._since = time.monotonic()
            log.error("the outcome of a delivery could not be recorded (%s); keeping outcomes in %s and "
                      "recording them when the store answers (they are not delivered again)",
                      first_line(exc), where)
        if not isinstance(exc, StoreError):
            log.error("recording the outcome of %s failed unexpectedly: %r", r.entry_id, exc)
            self._reported.add(r.entry_id)
        self._start()

    def adopt(self, entry_id: str, owner: str) -> None:
        """The scheduler leased a kept entry again (its lease had lapsed): the
        record goes in under the new lease; the entry is not delivered."""
        r = self._pending.get(entry_id)
        if r is not None and r.owner != owner:
            self._pending[entry_id] = replace(r, owner=owner)

    async def replay(self) -> None:
        """Take up what a previous run kept, and try to record it now."""
        kept = await asyncio.to_thread(self.journal.load)
        if not kept:
            return
        log.warning("recording %d outcome(s) a previous run could not record (%s)", len(kept), self.journal.path)
        self._since = time.monotonic()
        for r in kept:
            self._pending.setdefault(r.entry_id, r)
        await self.flush()
        if self._pending:
            self._start()

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._retry_loop(), name="record-pending")

    def nudge(self) -> None:
        """The store works again (a record or a lease went through): try now."""
        self._nudged.set()

    async def _retry_loop(self) -> None:
        backoff = Backoff(first=RETRY_FIRST, cap=RETRY_CAP)
        backoff.failed(time.monotonic(), "")
        while self._pending:
            self._nudged.clear()
            try:
                await asyncio.wait_for(self._nudged.wait(), max(0.0, backoff.next_try - time.monotonic()))
            except TimeoutError:
                pass
            if not await self.flush():
                backoff.failed(time.monotonic(), "")

    async def flush(self) -> bool:
        """One try at every kept outcome; True when none is left."""
        batch = list(self._pending.values())
        if not batch:
            return True
        until = self.clock() + self.lease_time()
        try:
            # First hold on to the entries, so that none lapses while we record.
            for owner in {r.owner for r in batch}:
                await self.store.renew_leases(owner, [r.entry_id for r in batch if r.owner == owner], until)
        except StoreError:
            return False
        results = await asyncio.gather(*(self._record_again(r) for r in batch))
        done = [r for r, finished in zip(batch, results) if finished]
        for r in done:
            if self._pending.get(r.entry_id) is r:
                del self._pending[r.entry_id]
                self._reported.discard(r.entry_id)
        if done:
            try:
                await asyncio.to_thread(self.journal.rewrite, list(self._pending.values()))
            except OSError as exc:
                log.error("cannot rewrite %s: %s (a replay records what is already recorded, harmlessly)",
                          self.journal.path, exc.strerror)
        if not self._pending and self._since is not None:
            log.warning("recorded the kept outcomes, %.1f s after the first could not be",
                        time.monotonic() - self._since)
            self._since = None
        return not self._pending

    async def _record_again(self, r: PendingRecord) -> bool:
        """True when the outcome needs no more tries."""
        try:
            await self.store.record(r.entry_id, r.owner, r.attempt, list(r.outcomes), r.next_attempt_at,
                                    list(r.notices), delay_notified=r.delay_notified,
                                    notice_pending=r.notice_pending, attempts_before=r.attempts_before)
            return True
        except LeaseLost as exc:
            _possible_duplicate(r, exc)
            return True
        except StoreError:
            return False
        except Exception as exc:
            if r.entry_id not in self._reported:
                self._reported.add(r.entry_id)
                log.error("recording the outcome of %s failed unexpectedly (kept; retrying): %r", r.entry_id, exc)
            return False

    async def close(self) -> None:
        """Stop retrying; what is still kept stays in the journal for the next run."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


def _possible_duplicate(r: PendingRecord, exc: BaseException) -> None:
    node = r.owner.split(":", 1)[0]
    events.emit("possible_duplicate", id=r.entry_id, node=node)
    log.warning("possible duplicate: message %s was delivered to %d recipient(s) by node %s, but its lease was "
                "lost before the outcome could be recorded (%s); another delivery may follow or have been made",
                r.entry_id, r.delivered, node, exc)
