"""Queue actions by filter, run in the background with their progress (``GET /api/v1/jobs/{id}``).

A bulk action takes the ids matching the filter when it starts (so mail
arriving meanwhile is not swept up), writes one audit record (who, why, the
filter, how many matched) before it touches anything, then applies the same
per-message code as the CLI (actions.queue_action) in batches of BATCH, so
the store's group commit takes each batch in a few transactions.  After each
batch one more audit record names the ids it changed (``queue <action>``,
detail ``{ids, job, reason}``): the message trace of each (store/trace.py
finds an entry's actions by its id in the detail) says what was done to it,
by whom, in which job and why, and the audit log says which messages a job
touched, at a hundredth of the rows one record per message would take.  A
job's id is its first audit record's, so it stays unique across restarts.
Jobs live in memory: the last KEEP are listed; a restart forgets them (the
audit log keeps what was started and what it did).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field

from relaywatch.actions import queue_action
from relaywatch.errors import RelaywatchError
from relaywatch.model import iso
from relaywatch.store.base import QueryPage

log = logging.getLogger("relaywatch.console")

BATCH = 100
PAGE = 1000
KEEP = 50
MAX_MATCH = 1_000_000


@dataclass
class Job:
    id: int
    action: str
    filter: dict
    who: str
    reason: str
    matched: int
    state: str = "running"               # running | done | failed
    done: int = 0                        # the action applied
    skipped: int = 0                     # no longer applicable (delivered meanwhile, already held...)
    failed: int = 0                      # the store refused (e.g. being delivered right now)
    errors: list[str] = field(default_factory=list)   # the first few refusals
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["started_at"], out["finished_at"] = iso(self.started_at), iso(self.finished_at)
        return out


async def matching_ids(store, page: QueryPage, now: float, cap: int = MAX_MATCH) -> list[str]:
    """Every id the filter matches now, paged by id (the filter's own limit/after are not used)."""
    ids: list[str] = []
    after = None
    while len(ids) < cap:
        batch = await store.queue_page_ids(QueryPage(**{**asdict(page), "after": after, "limit": PAGE}), now)
        ids += batch
        if len(batch) < PAGE:
            break
        after = batch[-1]
    return ids[:cap]


async def begin_bulk(store, who: str, action: str, filter_: dict, matched: int, reason: str, now: float) -> int:
    """The audit record that starts a bulk action, written before anything is touched: what,
    by whom, why, how many.  Its id is the job's.  The API's jobs and ``relaywatch queue
    ACTION --FILTER`` both start here."""
    return await store.apply_fix(who, f"queue bulk {action}", None,
                                 {"filter": filter_, "matched": matched, "reason": reason}, {}, (), now)


async def run_bulk(job: Job, store, config, ids: list[str], progress=None) -> None:
    """Apply ``job.action`` to ``ids`` in batches, counting into ``job``; ``progress(job)``
    after each batch (the CLI prints it on stderr)."""
    async def one(entry_id: str) -> bool:
        try:
            result = await queue_action(store, config, job.action, entry_id, job.who, job.reason, audit=False)
        except RelaywatchError as exc:
            job.failed += 1
            if len(job.errors) < 10:
                job.errors.append(f"{entry_id}: {exc}")
            return False
        if result.done:
            job.done += 1
        else:
            job.skipped += 1
        return result.done
    try:
        for start in range(0, len(ids), BATCH):
            batch = ids[start:start + BATCH]
            done = [i for i, ok in zip(batch, await asyncio.gather(*(one(i) for i in batch))) if ok]
            if done:
                await store.apply_fix(job.who, f"queue {job.action}", None,
                                      {"ids": done, "job": job.id, "reason": job.reason}, {}, (), time.time())
            if progress is not None:
                progress(job)
        job.state = "done"
    except Exception as exc:   # the job fails, never the console
        log.exception("bulk %s (job %d) failed", job.action, job.id)
        job.state = "failed"
        job.errors.append(f"stopped: {exc}")
    finally:
        job.finished_at = time.time()


class Jobs:
    def __init__(self):
        self.jobs: dict[int, Job] = {}
        self._tasks: set[asyncio.Task] = set()

    def start(self, store, config, job_id: int, action: str, filter_: dict, ids: list[str], who: str,
              reason: str) -> Job:
        """Run ``action`` on ``ids``; ``job_id`` is the id of the audit record that started it."""
        job = Job(job_id, action, filter_, who, reason, matched=len(ids))
        self.jobs[job.id] = job
        for old in sorted(self.jobs)[:-KEEP]:
            if self.jobs[old].state != "running":
                del self.jobs[old]
        task = asyncio.get_running_loop().create_task(run_bulk(job, store, config, ids), name=f"job {job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
