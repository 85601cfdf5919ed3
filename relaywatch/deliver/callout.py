"""Asking a connector's server whether an address exists (recipient verification).

MAIL FROM:<>, RCPT TO:<address>, RSET, on a connection kept per route and
opened exactly as a delivery would open it (smart hosts in order, STARTTLS and
certificate checks per the connector's policy), so an address is never sent
in the clear where mail would not be.  Failures are classified by the same
classifier as deliveries; receive/verify.py turns the answer into the reply
to the client and caches it.
"""

from __future__ import annotations

import time
from relaywatch.classify.classify import classify
from relaywatch.deliver.smtp import AllTargetsFailed, SmtpRoutes
from relaywatch.deliver.transport import SessionFailure, SmtpConnection
from relaywatch.model import RecipientAnswer, RecipientVerdict, Route
from relaywatch.smtpclient.events import RSET, Mail, Rcpt

# Connections kept per route; more questions at once open more and close the surplus.
MAX_IDLE_PER_ROUTE = 4
# A kept connection older than this is not trusted to be open still (servers
# time idle clients out); it is closed and a new one opened.
KEEP_IDLE = 30.0


class SmtpCallout:
    def __init__(self, routes: SmtpRoutes, clock=time.monotonic):
        self.routes = routes
        self.clock = clock
        self._idle: dict[str, list[SmtpConnection]] = {}

    async def ask(self, route: Route, address: str) -> RecipientVerdict:
        domain = address.rpartition("@")[2]
        reused = self._take(route)
        if reused is not None:
            try:
                return await self._transaction(route, reused, address)
            except SessionFailure:
                pass   # the server closed the kept connection: ask again on a new one
        try:
            conn = await self.routes.connect(route, domain)
        except AllTargetsFailed as exc:
            return _unavailable(classify(exc.primary, time.time()))
        try:
            return await self._transaction(route, conn, address)
        except SessionFailure as exc:
            return _unavailable(classify(exc.observation, time.time()))

    async def _transaction(self, route: Route, conn: SmtpConnection, address: str) -> RecipientVerdict:
        utf8 = not address.isascii()
        if utf8 and "SMTPUTF8" not in conn.capabilities:
            # RFC 6531: the address has no ASCII form; delivery there would fail with 5.6.7 too.
            self._give_back(route, conn)
            return RecipientVerdict(RecipientAnswer.UNKNOWN, f"the {route.name} server does not offer SMTPUTF8", code="5.6.7")
        try:
            mail = await conn.ask(Mail("", utf8))
            if not mail.is_success:
                conn.close()
                return RecipientVerdict(RecipientAnswer.UNAVAILABLE, f"the {route.name} server refused MAIL FROM:<>: {mail}",
                               code=f"4{(mail.enhanced or '4.0.0')[1:]}",
                               reason="the mail server refused the verification")
            rcpt = await conn.ask(Rcpt(address, utf8))
            reset = await conn.ask(RSET)
        except BaseException:
            conn.close()
            raise
        if reset.code == 250:
            self._give_back(route, conn)
        else:
            await conn.quit()
        if rcpt.is_success:
            return RecipientVerdict(RecipientAnswer.EXISTS, f"{route.name} server: {rcpt}")
        if rcpt.code >= 500:
            return RecipientVerdict(RecipientAnswer.UNKNOWN, f"{route.name} server: {rcpt}")
        return RecipientVerdict(RecipientAnswer.UNAVAILABLE, f"{route.name} server: {rcpt}", code=rcpt.enhanced or "4.0.0",
                       reason="the mail server answered with a temporary error")

    def _take(self, route: Route) -> SmtpConnection | None:
        idle = self._idle.get(route.key)
        while idle:
            conn = idle.pop()
            if not conn.broken and self.clock() - conn.last_used <= KEEP_IDLE:
                return conn
            conn.close()
        return None

    def _give_back(self, route: Route, conn: SmtpConnection) -> None:
        conn.last_used = self.clock()
        idle = self._idle.setdefault(route.key, [])
        if len(idle) < MAX_IDLE_PER_ROUTE:
            idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


def _unavailable(failure) -> RecipientVerdict:
    return RecipientVerdict(RecipientAnswer.UNAVAILABLE, failure.detail, code=failure.code,
                   reason=failure.title[0].lower() + failure.title[1:])
