"""The message trace, store side: what is kept of a message once it has left the queue.

A queue entry is deleted when it is delivered, bounced, expired, deleted or
moved, and its attempts go with it.  So that such a message can still be
traced, the transaction that removes it writes one compact row to ``traces``
(``trace_record``: the envelope, how it came in, each recipient's final
status, its last TRACE_ATTEMPTS attempts, how it ended).  Rows are kept for
``queue.trace_retention`` and pruned by the writer that adds one, at most once
a minute; a retention of 0 keeps nothing and costs the delivery path nothing.
A message still queued is traced from its own rows (store/queue.py keeps them,
store/console.py reads both).  Both are found by Message-ID through ``message_ids``
(store/schema.py: a row per entry, by ``message_id_key``, kept by triggers: written when
the entry is inserted, gone with the trace's prune, or with the entry if no trace is kept).  The events themselves are shaped in relaywatch/views.py (``trace_json``).
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

from relaywatch.model import Entry, RecipientOutcome
from relaywatch.store import queries

Q = queries.load("trace.sql")
TRACE_ATTEMPTS = 50       # a message retried for days keeps its last 50 attempts (and their count)
REPLY_CHARS = 500         # a server's reply is kept to this length
PRUNE_EVERY = 60.0        # seconds between two prunes by one writer

# One encoder for every trace row (json.dumps with separators= builds one per call); the
# records are plain dicts and lists made here, so no reference cycle to check for.
to_json = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode


def trace_record(entry: Entry, attempts: Sequence[dict], end: dict | None,
                 outcomes: Sequence[RecipientOutcome] = ()) -> dict[str, Any]:
    """The trace of ``entry`` (times as epoch seconds): ``end`` None while it is queued,
    else {"at", "event", ...} saying how it left.  ``outcomes``: statuses recorded in
    the same transaction that the entry's rows do not show yet."""
    head, end = _head(entry, len(attempts), end, outcomes)
    return {**head, "attempts": [_compact(a) for a in attempts[-TRACE_ATTEMPTS:]], "end": end}


def trace_json(entry: Entry, stored: Sequence[str], attempt: dict | None, end: dict | None,
               outcomes: Sequence[RecipientOutcome] = ()) -> str:
    """``to_json(trace_record(...))`` of ``entry`` whose earlier attempts are ``stored``, as the
    attempts table keeps them (JSON text, oldest first), and ``attempt`` the one not stored yet.

    A stored attempt whose replies are all within REPLY_CHARS goes into the trace as it is,
    not decoded and encoded again: a backlog delivered once its destination is back records
    thousands of these at once, each with the failures it had.  The test is on the JSON
    text, whose characters are never fewer than a string's own (escapes are longer)."""
    count = len(stored) + (attempt is not None)
    parts = [text if _LONG_REPLY.search(text) is None else to_json(_compact(json.loads(text)))
             for text in stored[max(0, count - TRACE_ATTEMPTS):]]
    if attempt is not None:
        parts.append(to_json(_compact(attempt)))
    head, end = _head(entry, count, end, outcomes)
    return f'{to_json(head)[:-1]},"attempts":[{",".join(parts)}],"end":{to_json(end)}}}'


# A "reply" string longer than REPLY_CHARS in an attempt's JSON text (each escape counts as one).
_LONG_REPLY = re.compile(r'"reply"\s*:\s*"(?:[^"\\]|\\.){%d}' % (REPLY_CHARS + 1))


def _head(entry: Entry, attempts: int, end: dict | None,
          outcomes: Sequence[RecipientOutcome]) -> tuple[dict[str, Any], dict | None]:
    """The trace's entry and recipients, and its end with the event the statuses give."""
    now_status = {o.address: o.status.value for o in outcomes}
    recipients = [{"address": r.address, "status": now_status.get(r.address, r.status.value)}
                  for r in entry.recipients]
    if end is not None and end.get("event") is None:
        end = dict(end, event=final_event([r["status"] for r in recipients]))
    return {
        "entry": {"id": entry.id, "message_id": entry.message_id, "sender": entry.sender,
                  "received_at": entry.received_at, "expires_at": entry.expires_at, "size": entry.size,
                  "route": entry.route.kind.value, "connector": entry.route.name, "domain": entry.route.domain,
                  "client": entry.client, "helo": entry.helo, "auth_user": entry.auth_user, "is_dsn": entry.is_dsn,
                  "status": entry.status.value, "attempts": attempts},
        "recipients": recipients,
    }, end


def _compact(attempt: dict) -> dict:
    """An attempt as the trace keeps it: replies cut to REPLY_CHARS."""
    def cut(text):
        return text[:REPLY_CHARS] if isinstance(text, str) else text
    out = dict(attempt)
    out["recipients"] = [dict(r, reply=cut(r.get("reply")),
                              error=dict(r["error"], reply=cut(r["error"].get("reply"))) if r.get("error") else None)
                         for r in attempt.get("recipients", ())]
    out["hosts_tried"] = [dict(f, reply=cut(f.get("reply"))) for f in attempt.get("hosts_tried", ())]
    return out


def end_of(notices: Sequence[str], at: float) -> dict:
    """The end of an entry a record removes: its event (delivered, bounced, expired) is
    read off the recipients' final statuses by trace_record."""
    return {"at": at, "event": None, "notices": list(notices)}


def final_event(statuses: Sequence[str]) -> str:
    """bounced if any recipient failed, else expired if any expired, else delivered."""
    return "bounced" if "failed" in statuses else "expired" if "expired" in statuses else "delivered"


def message_id_key(message_id: str) -> str:
    """What message_ids keeps a Message-ID by: without spaces around it, then without its angle
    brackets (the header keeps them; people often do not), as schema.py's triggers compute it
    (SQL's trim: spaces only).  "" (no Message-ID) is kept by none."""
    return message_id.strip(" ").strip("<>")


def lookup_key(message_id: str) -> str:
    """message_id_key of what someone typed (any whitespace around it)."""
    return message_id_key(message_id.strip())


def message_id_of(text: str) -> str | None:
    """The lookup_key of ``text`` when it is written as a Message-ID is in the header,
    ``<left@right>`` without spaces, else None: the queue's text filter then looks for that
    Message-ID (a seek of message_ids), not for a substring of every sender, recipient and reply."""
    text = text.strip()
    if len(text) > 3 and text[0] == "<" and text[-1] == ">" and "@" in text and not any(c.isspace() for c in text):
        return lookup_key(text)
    return None
