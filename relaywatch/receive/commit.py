"""The durable commit of a message: spool, sign, store, and only then 250.

``Committer.commit`` runs once per message after the final dot: the body is
DKIM-signed when the client is trusted (receive/dkim_sign.py), finished in the
spool (receive/spool.py: inline, or fsync'd and renamed), and enqueued; the
``250 2.0.0 Queued as`` comes back only once the store has committed.  What
the disk or the store raised becomes a ``StoreProblem`` (receive/
store_condition.py, the one place those errors become replies: ``452 4.3.1``
for a full disk, else ``451 4.3.0``, never a 5xx), and the ``StoreCondition``
hears of every refusal and every write, so an outage is one condition, not one
log line per message.  Who else hears of it (the relay's own store incident,
watch/store_incident.py) is the runtime's choice: a ``ConditionListener``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from relaywatch import events
from relaywatch.config import Config
from relaywatch.errors import StoreError
from relaywatch.model import NewMessage
from relaywatch.receive.conversation import Conversation
from relaywatch.receive.conversation_events import MessageEnd
from relaywatch.receive.message import message_id, received_header
from relaywatch.receive.spool import BodySpool
from relaywatch.receive.store_condition import (ConditionEnded, ConditionListener, Place, PlaceRecovered,
                                                StoreCondition, StoreProblem, describe,
                                                problem_from_os_error, problem_from_store_error)
from relaywatch.route import normalize_sender
from relaywatch.store.base import Store

log = logging.getLogger("relaywatch.receive")


class Committer:
    """Commits what arrives, and answers for the disk and the store."""

    def __init__(self, config_ref: Callable[[], Config], store: Store, is_trusted: Callable[[str, str | None], bool],
                 condition_listener: ConditionListener, clock=time.time):
        self.config_ref = config_ref
        self.store = store
        self.is_trusted = is_trusted
        self.clock = clock
        self.store_condition = StoreCondition()
        self.condition_listener = condition_listener

    def received_header(self, conv: Conversation, client_ip: str) -> bytes:
        return received_header(conv, client_ip, self.config_ref().server.hostname, self.clock())

    async def commit(self, end: MessageEnd, client_ip: str, spool: BodySpool, header_block: bytes) -> str:
        config = self.config_ref()
        now = self.clock()
        msgid = message_id(header_block)
        signed_by: list[str] = []
        try:
            # Never sign what an outsider sent; an authenticated user's senders were checked at MAIL.
            if config.dkim and self.is_trusted(client_ip, end.user):
                from relaywatch.receive.dkim_sign import sign_spool
                spool, signed_by = await sign_spool(config.dkim, spool)
            body = await spool.finish(inline=self.store.inline_bodies)
        except OSError as exc:
            return self.refuse(end, client_ip, problem_from_os_error(exc, Place.SPOOL, str(spool.spool_dir)))
        sender = normalize_sender(end.sender)
        msg = NewMessage(
            sender=sender, recipients=end.recipients, body=body, received_at=now,
            expires_at=now + config.queue.message_expiration, message_id=msgid, client=client_ip,
            helo=end.helo or "", auth_user=end.user or "", dsn=end.dsn,
            recipient_dsn={a: d for (a, _), d in zip(end.recipients, end.recipient_dsn)},
            # Raw UTF-8 headers are RFC 6532 content only under SMTPUTF8; without it they
            # are 8-bit header bytes (mime.py), passed on as they came.
            utf8_headers=end.smtputf8 and not header_block.isascii())
        try:
            ids = await self.store.enqueue(msg)
        except StoreError as exc:
            if body.path:
                Path(body.path).unlink(missing_ok=True)
            return self.refuse(end, client_ip, problem_from_store_error(exc, self.store.where))
        if spool.spilled:
            self._written(Place.SPOOL)
        self._written(Place.QUEUE)
        self.condition_listener.wrote()
        for entry_id, (route, rcpts) in zip(ids, msg.by_route()):
            events.emit("received", **{"id": entry_id, "msgid": msgid or None, "from": sender or "<>",
                                       "to": rcpts, "connector": route.name, "size": body.size,
                                       "client": msg.client, "auth": end.user,
                                       **({"dkim": signed_by} if signed_by else {})})
        return f"250 2.0.0 Queued as {' '.join(ids)}"

    def refuse(self, end: MessageEnd, client_ip: str, problem: StoreProblem) -> str:
        """The reply to a message the disk or the store would not take."""
        self._changed(self.store_condition.refused_message(problem, self.clock()))
        events.emit("rejected", **{"from": end.sender or "<>", "to": [a for a, _ in end.recipients],
                                   "client": client_ip, "code": problem.reply[4:9], "detail": problem.reply})
        return problem.reply

    def _written(self, place: Place) -> None:
        if self.store_condition.active:
            self._changed(self.store_condition.written(place, self.clock()))

    def _changed(self, change) -> None:
        if change is None:
            return
        level = (logging.INFO if type(change) is ConditionEnded else
                 logging.WARNING if type(change) is PlaceRecovered else logging.ERROR)
        log.log(level, "%s", describe(change))
        self.condition_listener.on_change(change, list(self.store_condition.failing.values()),
                                         self.store_condition.refused)

