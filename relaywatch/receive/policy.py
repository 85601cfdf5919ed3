"""Who may send to whom: the answer to RCPT TO.

``ReceivePolicy`` decides each recipient (route.py's ``normalize`` and
``decide``, relaying only for trusted clients), asks the connector's server
when the domain verifies recipients (receive/verify.py) and counts the
invalid ones for the watch's quota.  The session (receive/session.py) acts on
what it answers; committing the message is receive/commit.py's job.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from typing import Callable

from relaywatch import events
from relaywatch.config import Config
from relaywatch.errors import StoreError
from relaywatch.model import RecipientAnswer, Route, RouteKind
from relaywatch.receive.conversation import Conversation
from relaywatch.receive.verify import Callout, RecipientVerifier, rcpt_reply
from relaywatch.route import Refusal, decide, normalize, sender_routing, split_address
from relaywatch.store.base import Store

MAX_RECIPIENTS = 1000
_TRUSTED_CACHE = 4096      # client addresses whose is_trusted answer is kept


class ReceivePolicy:
    """Who may send to whom."""

    def __init__(self, config_ref: Callable[[], Config], store: Store, clock=time.time,
                 callout: Callout | None = None):
        self.config_ref = config_ref
        self.store = store
        self.clock = clock
        self.verifier = RecipientVerifier(callout) if callout is not None else None
        self._background: set[asyncio.Task] = set()
        # is_trusted's answers for the trusted_networks they were found in: asked at admission,
        # for every recipient and at the commit, each time a parse of the address and a walk of
        # the networks (~4 µs) for what stays the same until the config changes.
        self._trusted_networks: tuple = ()
        self._trusted: dict[str, bool] = {}

    def is_trusted(self, ip: str, user: str | None = None) -> bool:
        """May relay and gets signed: an authenticated ``user``, or a client in trusted_networks."""
        if user is not None:
            return True
        networks = self.config_ref().server.trusted_networks
        if networks is not self._trusted_networks:
            self._trusted_networks, self._trusted = networks, {}
        trusted = self._trusted.get(ip)
        if trusted is None:
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                trusted = False
            else:
                trusted = any(addr in net for net in networks)
            if len(self._trusted) >= _TRUSTED_CACHE:
                self._trusted.clear()     # many clients (a botnet's): bounded, not a leak
            self._trusted[ip] = trusted
        return trusted

    def recipient(self, conv: Conversation, client_ip: str, address: str,
                  source_route: str = "") -> tuple[str, str, Route | None]:
        """The reply to RCPT TO and, when accepted, the address to keep and its route.

        The address kept is normalised (route.normalize) and, for postmaster,
        the address that stands for it (``server.postmaster``)."""
        config = self.config_ref()
        sender = conv.sender or "<>"

        def refuse(reply: str, code: str, detail: str) -> tuple[str, str, None]:
            events.emit("rejected", **{"to": address, "from": sender, "client": client_ip,
                                      "code": code, "detail": detail})
            return reply, address, None
        if len(conv.recipients) >= MAX_RECIPIENTS:
            return f"452 4.5.3 Too many recipients (at most {MAX_RECIPIENTS} per message)", address, None
        normalized = normalize(address)
        if isinstance(normalized, Refusal):
            return refuse(normalized.reply, normalized.reply[4:9], normalized.detail)
        trusted = self.is_trusted(client_ip, conv.user)
        if not trusted:
            routing = sender_routing(normalized, source_route)
            if routing is not None:
                return refuse(f"554 5.7.1 Relaying denied: sender-specified routing ({routing}) is not "
                              f"accepted from this client", "5.7.1", f"relaying denied: {routing}")
        decision = decide(config, normalized)
        if any(decision.address.lower() == a.lower() for a, _ in conv.recipients):
            return "250 2.1.5 Recipient OK (duplicate ignored)", decision.address, None
        if decision.route is None:
            if config.alerts.invalid_recipient_quota:
                self._count_invalid(split_address(normalized)[1])
            return refuse("550 5.1.10 Recipient not found", "5.1.10", "recipient not found")
        if not decision.accepted_domain and not trusted:
            return refuse("554 5.7.1 Relaying denied", "5.7.1", "relaying denied")
        return "250 2.1.5 Recipient OK", decision.address, decision.route

    def must_verify(self, client_ip: str, address: str, route: Route, user: str | None = None) -> bool:
        """An accepted recipient whose existence only the connector's server knows."""
        if self.verifier is None or route.kind is not RouteKind.CONNECTOR:
            return False
        domain = self.config_ref().domain(split_address(address)[1])
        return domain is not None and domain.verify_recipients and not self.is_trusted(client_ip, user)

    async def verify(self, conv: Conversation, client_ip: str, address: str, route: Route) -> tuple[str, Route | None]:
        """The reply to RCPT TO once the connector's server was asked (or the cache answered)."""
        config = self.config_ref()
        verdict = await self.verifier.check(route, address, config.verify)
        reply = rcpt_reply(verdict, address)
        if verdict.answer is RecipientAnswer.EXISTS:
            return reply, route
        events.emit("rejected", **{"to": address, "from": conv.sender or "<>", "client": client_ip,
                                  "connector": route.name, "code": reply.split(" ", 2)[1],
                                  "detail": verdict.detail})
        if verdict.answer is RecipientAnswer.UNKNOWN and config.alerts.invalid_recipient_quota:
            self._count_invalid(split_address(address)[1], route.name, "verify")
        return reply, None

    def _count_invalid(self, domain: str, connector: str = "rcpt", source: str = "rcpt") -> None:
        async def count() -> None:
            try:
                await self.store.add_invalid_recipients([(self.clock(), domain, connector, source)])
            except StoreError:
                pass   # counting must never affect the SMTP answer
        task = asyncio.get_running_loop().create_task(count())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

