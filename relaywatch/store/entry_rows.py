"""Queue rows read into ``Entry``s: the one place an ``entries`` row (``entry_columns`` of
queue.sql), its recipients, attempts and body become the model's nouns.

The queue (store/queue.py) and the console's reads (store/console.py) both read entries
through it.
"""

from __future__ import annotations

import json
from typing import Any

from relaywatch.dsn_params import NO_MESSAGE_DSN, MessageDsn, RecipientDsn
from relaywatch.model import Entry, EntryStatus, Recipient, RecipientStatus, Route, RouteKind, StoredBody
from relaywatch.store import queries

Q = queries.load("queue.sql")


def read_entry(conn: Any, entry_id: str, now: float) -> Entry | None:
    """One entry with every recipient and its attempt history (leased if its lease runs past ``now``)."""
    row = conn.execute(Q["entry"], (entry_id,)).fetchone()
    if row is None:
        return None
    entry = entry_from_row(row, now)
    attach_recipients(conn, [entry], include_final=True)
    entry.history = [json.loads(data) for (data,) in conn.execute(Q["attempts_of"], (entry.id,))]
    return entry


def entry_from_row(row: tuple, now: float) -> Entry:
    (id_, body_id, sender, received_at, expires_at, status, attempts, next_attempt_at, route_kind,
     route_name, route_domain, size, message_id, client, is_dsn, first_failure_at, lease_owner,
     lease_until, delay_notified, notice_pending, helo, auth_user, dsn_ret, dsn_envid,
     is_tls_report, utf8_headers) = row
    leased = lease_owner is not None and (lease_until or 0) > now
    return Entry(
        id=id_, sender=sender, received_at=received_at, expires_at=expires_at,
        status=EntryStatus.ACTIVE if leased else EntryStatus(status),
        attempts=attempts, next_attempt_at=next_attempt_at,
        route=Route(RouteKind(route_kind), route_name, route_domain), size=size,
        message_id=message_id, body_id=body_id, client=client, is_dsn=bool(is_dsn),
        dsn=MessageDsn(dsn_ret, dsn_envid) if dsn_ret or dsn_envid else NO_MESSAGE_DSN,
        first_failure_at=first_failure_at, lease_owner=lease_owner if leased else None,
        delay_notified=bool(delay_notified),
        notice_pending=json.loads(notice_pending) if notice_pending else None, helo=helo, auth_user=auth_user,
        is_tls_report=bool(is_tls_report), utf8_headers=bool(utf8_headers))


def attach_recipients(conn: Any, entries: list[Entry], include_final: bool = False) -> None:
    if not entries:
        return
    by_id = {e.id: e for e in entries}
    sql = queries.in_list(Q["recipients_of" if include_final else "waiting_recipients_of"], len(by_id))
    for entry_id, *recipient in conn.execute(sql, tuple(by_id)):
        by_id[entry_id].recipients.append(recipient_from_row(*recipient))


def recipient_from_row(position: int, address: str, status: str, last_error: str | None, notify: str | None,
                       orcpt: str | None) -> Recipient:
    """A ``recipients`` row (``recipient_columns`` of queue.sql, without its entry_id); its last
    error is parsed when first read (model.py _StoredFailure)."""
    return Recipient(address=address, status=RecipientStatus(status), position=position,
                     last_error=last_error or None, dsn=RecipientDsn.from_stored(notify, orcpt))


def attach_bodies(conn: Any, entries: list[Entry]) -> None:
    if not entries:
        return
    ids = list({e.body_id for e in entries})
    bodies = {id_: StoredBody(size=size, data=as_bytes(data), path=path) for id_, data, path, size in conn.execute(
        queries.in_list(Q["bodies_of"], len(ids)), ids)}
    for e in entries:
        e.body = bodies.get(e.body_id)


def as_bytes(data) -> bytes | None:
    """BLOB (sqlite3: bytes) or BYTEA (psycopg: memoryview) as bytes."""
    return None if data is None else bytes(data)
