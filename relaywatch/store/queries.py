"""Named SQL, read from the annotated .sql files beside this module (procrastinate's shape).

A file holds queries one after another, each under a ``-- name --`` line and
the comment lines saying what it does::

    -- lease --
    -- The oldest due entries, stamped with our lease in one statement.
    UPDATE entries SET ... WHERE status IN ({EntryStatus.QUEUED}, {EntryStatus.DEFERRED}) ...

When a file is read, ``{EnumClass.MEMBER}`` becomes that member's value as an
SQL literal, so the statuses are the enums of model.py and nowhere else
spelled out.  They are rendered into the text, not bound as parameters: a
partial index (``entries_due ... WHERE status IN (...)``) is only used by
SQLite's planner when the query names the same literals, and the lease would
otherwise scan the table.  ``{other_query}`` is replaced by that query's text
(a shared column list).  What is left in braces, such as ``{where}`` or
``{row_lock}``, is filled in by the code that runs the query; ``(?*)`` marks
an ``IN`` list whose length is known only then (``in_list``).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, ContextManager

from relaywatch.incident import IncidentState
from relaywatch.model import EntryStatus, RecipientStatus
from relaywatch.watch_records import NotificationState

ENUMS = {e.__name__: e for e in (EntryStatus, RecipientStatus, IncidentState, NotificationState)}

_NAME = re.compile(r"^-- ([a-z_]+) --$")
_CONSTANT = re.compile(r"\{([A-Za-z]+)\.([A-Z_]+)\}")
_FRAGMENT = re.compile(r"\{([a-z_]+)\}")
_LITERAL = re.compile(r"^[a-z_]+$")


def literal(value: str) -> str:
    if not _LITERAL.match(value):    # enum values are plain words; never quote anything else here
        raise ValueError(f"not an SQL constant: {value!r}")
    return f"'{value}'"


def constants(sql: str) -> str:
    """``{EntryStatus.QUEUED}`` -> ``'queued'``."""
    return _CONSTANT.sub(lambda m: literal(ENUMS[m.group(1)][m.group(2)].value), sql)


def parse(text: str) -> dict[str, str]:
    """The queries of one file by name, constants and shared fragments filled in."""
    queries: dict[str, list[str]] = {}
    name = None
    for line in text.splitlines():
        match = _NAME.match(line.strip())
        if match:
            name = match.group(1)
            if name in queries:
                raise ValueError(f"query {name} is defined twice")
            queries[name] = []
        elif name is not None and line.strip() and not line.lstrip().startswith("--"):
            queries[name].append(line.strip())
    sql = {n: constants(" ".join(lines)) for n, lines in queries.items()}
    return {n: _FRAGMENT.sub(lambda m: sql.get(m.group(1), m.group(0)), q) for n, q in sql.items()}


def load(filename: str) -> dict[str, str]:
    return parse((Path(__file__).parent / filename).read_text())


def in_list(sql: str, n: int) -> str:
    """Expand the ``(?*)`` of ``sql`` to ``n`` placeholders."""
    return sql.replace("(?*)", "(" + ",".join("?" * n) + ")")


def together(conn: Any) -> ContextManager:
    """The statements inside sent without waiting for each one's answer where the connection
    can (PostgreSQL's pipeline mode: one wait at each fetch and one at the end, however many
    statements); SQLite has no round-trips."""
    pipeline = getattr(conn, "pipeline", None)
    return pipeline() if pipeline is not None else contextlib.nullcontext()
