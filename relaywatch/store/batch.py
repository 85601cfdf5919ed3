"""One batch of the engine's writes: one transaction, one commit, then the callers' futures.

The writer thread (store/writer.py) hands ``BatchRunner.run`` a connection and a batch of
operations, each ``(fn, announce, loop, future, first)`` as ``GroupCommitEngine.write``
queued it.  The ops run in one transaction without a savepoint each; one that fails
fails alone (the others run again, each in a SAVEPOINT); one that lost a lock conflict
runs the whole batch again (``_run_ops``).  The batch commits once (durably), and only
then are the spool files it released removed and the callers' futures resolved.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from typing import TYPE_CHECKING, Any

from relaywatch import meters
from relaywatch.store.driver_errors import driver_error, first_line, is_conflict

if TYPE_CHECKING:
    from relaywatch.store.engine import Dialect

CONFLICT_RETRIES = 5       # a batch that lost a lock conflict runs again this often before its ops fail
CONFLICT_PAUSE = 0.02      # seconds before the first run again (jittered, growing with each)

log = logging.getLogger("relaywatch.store")


class _Conflict(Exception):
    """An op lost a lock conflict (a deadlock): its batch runs again."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


class _RunAgain(Exception):
    """An op failed alone: the rest of its batch runs again without it."""


class Unstarted(Exception):
    """A batch that never began: its connection was found broken first."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


class BatchRunner:
    def __init__(self, dialect: Dialect):
        self.dialect = dialect
        self.conflicts_retried = 0              # batches run again after a lost lock conflict (_run_ops)

    def run(self, conn: Any, batch: list, may_defer: bool = False) -> BaseException | None:
        """Run and commit one batch; the driver error if it failed as a whole.

        ``may_defer``: if the connection turns out broken before anything ran,
        settle nothing and return Unstarted, so the batch can run elsewhere."""
        results: list[tuple[bool, Any]] = []
        cleanup: list[str] = []
        failure = None
        started = time.perf_counter()   # /metrics: one pair per batch, not per op
        try:
            self.dialect.begin(conn)
        except (*self.dialect.errors, OSError) as exc:
            self.dialect.end(conn)
            if may_defer and self.dialect.broken(conn):
                return Unstarted(exc)
            settle_all(batch, driver_error("queue store write failed", exc))
            return exc
        try:
            results = self._run_ops(conn, batch, cleanup)
            if self.dialect.announce is not None and any(
                    ok and announce and value for (_fn, announce, _l, _f, _first), (ok, value) in zip(batch, results)):
                # In the batch's own transaction (and round-trip): other nodes hear of it when it
                # commits, and never of work that did not (a NOTIFY of its own took a commit, an fsync).
                conn.execute(f"{self.dialect.announce}; COMMIT")
            else:
                conn.execute("COMMIT")
            meters.commit_seconds.observe(time.perf_counter() - started)
        except (*self.dialect.errors, OSError) as exc:
            try:
                conn.execute("ROLLBACK")
            except (*self.dialect.errors, OSError):
                pass
            err = driver_error("queue store write failed", exc)
            results = [(False, err)] * len(batch)
            cleanup = []
            failure = exc
        finally:
            self.dialect.end(conn)
        for path in cleanup:  # only after the commit that dropped the last reference
            try:
                os.unlink(path)
            except OSError:
                pass
        _settle_on_their_loops(batch, results)
        return failure

    def _run_ops(self, conn: Any, batch: list, cleanup: list) -> list[tuple[bool, Any]]:
        """Each op's (ok, result or error); an op that failed left nothing behind.

        The ops run without a savepoint each at first: ops seldom fail, and on
        PostgreSQL every SAVEPOINT and RELEASE is a round-trip (two of an op's
        five on the receiving path), and every subtransaction that writes draws
        an XID of its own (past 64 in one transaction, other sessions' snapshots
        overflow to pg_subtrans).  When one fails, the transaction is rolled
        back and the others run again, each in its own savepoint; the failed
        one keeps its error and does not run again.

        An op that lost a lock conflict (driver_errors.is_conflict: PostgreSQL
        chose this transaction to end a deadlock) did nothing wrong: the whole
        batch runs again in a new transaction, up to CONFLICT_RETRIES times,
        after a short pause in which the other transaction finishes.  This is
        the one place a deadlock is retried; its callers (a client's DATA, a
        delivery's record, a lease) never see it."""
        failed: dict[int, Exception] = {}     # ops that failed alone: they keep their error
        conflicts = 0
        while True:
            apart = bool(failed)
            results: list[tuple[bool, Any]] = []
            try:
                for i, (fn, _announce, _loop, _fut, _first) in enumerate(batch):
                    if i in failed:
                        results.append((False, failed[i]))
                        continue
                    if apart:
                        conn.execute("SAVEPOINT op")
                    try:
                        result = fn(conn, cleanup)
                    except Exception as exc:
                        if is_conflict(exc) and conflicts < CONFLICT_RETRIES:
                            raise _Conflict(exc) from exc
                        if not apart:      # the op fails alone: the others again, in savepoints
                            failed[i] = self._op_error(exc)
                            raise _RunAgain() from exc
                        conn.execute("ROLLBACK TO op")
                        conn.execute("RELEASE op")
                        results.append((False, self._op_error(exc)))
                        continue
                    if apart:
                        conn.execute("RELEASE op")
                    results.append((True, result))
                return results
            except (_Conflict, _RunAgain) as again:
                conn.execute("ROLLBACK")
                cleanup.clear()
                if isinstance(again, _Conflict):
                    conflicts += 1
                    self.conflicts_retried += 1
                    log.info("queue store: %s; the batch of %d operation(s) runs again (%d of %d)",
                             first_line(again.cause), len(batch), conflicts, CONFLICT_RETRIES)
                    time.sleep(random.uniform(0.5, 1.5) * CONFLICT_PAUSE * conflicts)
                self.dialect.begin(conn)

    def _op_error(self, exc: Exception) -> Exception:
        # Driver errors stay inside the store (errors.py): callers see StoreError.
        if isinstance(exc, self.dialect.errors):
            return driver_error("queue store operation failed", exc)
        return exc


def settle_all(batch: list, exc: BaseException) -> None:
    """Fail every op of ``batch`` with ``exc`` (on each caller's loop)."""
    _settle_on_their_loops(batch, [(False, exc)] * len(batch))


def _settle_on_their_loops(batch: list, results: list[tuple[bool, Any]]) -> None:
    """Each op's future set to its result, in batch order: one call_soon_threadsafe per loop, not
    per op (each is a write to the loop's self-pipe and a wake-up of it: 250 of them for a batch of
    a drain's outcomes)."""
    by_loop: dict[Any, list] = {}
    for (_fn, _announce, loop, fut, _first), (ok, value) in zip(batch, results):
        by_loop.setdefault(loop, []).append((fut, ok, value))
    for loop, settled in by_loop.items():
        loop.call_soon_threadsafe(_settle, settled)


def _settle(settled: list[tuple[asyncio.Future, bool, Any]]) -> None:
    for fut, ok, value in settled:
        if fut.done():        # cancelled by its caller meanwhile
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
