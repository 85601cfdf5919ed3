"""A database driver's errors as the store's (StoreError, StoreFull), in one line.

Driver errors are wrapped here only: callers of the store see StoreError (errors.py);
and a connection that broke is closed without raising (close_quietly).
"""

from __future__ import annotations

from typing import Any

from relaywatch.errors import StoreError, StoreFull

# SQLite's "database or disk is full" and PostgreSQL's disk_full: the receiver says 452 4.3.1.
FULL_CODES = {"SQLITE_FULL", "53100"}
# PostgreSQL ended the transaction to break a cycle of lock waits (40P01 deadlock_detected), a
# serializable one lost (40001), or a lock wait ran out (55P03, lock_timeout): nothing was done,
# and the same work in a new transaction succeeds.  Retried by the engine (store/batch.py _run_ops).
CONFLICT_CODES = {"40P01", "40001", "55P03"}


def error_code(exc: BaseException) -> str | None:
    """The driver's code for an error: sqlite3's name (SQLITE_FULL) or PostgreSQL's SQLSTATE."""
    return getattr(exc, "sqlite_errorname", None) or getattr(exc, "sqlstate", None)


def is_conflict(exc: BaseException) -> bool:
    """Did the transaction lose a lock conflict (CONFLICT_CODES), rather than fail?"""
    return error_code(exc) in CONFLICT_CODES


def driver_error(what: str, exc: Exception) -> StoreError:
    """The StoreError for a driver's exception (StoreFull when the disk under it is full)."""
    code = error_code(exc)
    err = (StoreFull if code in FULL_CODES else StoreError)(f"{what}: {first_line(exc)}", code=code)
    err.__cause__ = exc
    return err


def first_line(exc: BaseException) -> str:
    """A driver error in one line (psycopg's run over several, with hints)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def close_quietly(conn: Any) -> None:
    """Close a connection (None: there is none) whatever its driver raises."""
    if conn is None:
        return
    try:
        conn.close()
    except Exception:   # closing a connection that already broke may fail too
        pass
