"""Recipient verification at RCPT for internal-relay domains.

An internal-relay domain's mailboxes live on the on-premises server, so the
relay cannot know whether ``bob@contoso.test`` exists.  Accepting every
address from the internet and learning the truth only when the connector's
server answers 550 means sending an NDR to whoever the (often forged) sender
was: backscatter.  With ``verify_recipients = true`` on such a domain, the
relay asks the connector's server at RCPT time (MAIL FROM:<>, RCPT TO, RSET
on a kept connection) and answers the client with what it learnt.  This is
Postfix's ``reject_unverified_recipient`` and what Exchange's directory-based
edge blocking gives an authoritative domain.

Only clients outside ``trusted_networks`` are verified: trusted senders are the
organisation's own servers, whose mail is queued as always.

This module owns the cache and the replies; the question itself is asked by a
``Callout`` (deliver/callout.py) injected by the app, so receiving never
imports delivery.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Protocol

from relaywatch.config import VerifyConfig
from relaywatch.model import RecipientAnswer, RecipientVerdict, Route

# While a destination cannot be asked, further questions for it are answered
# from this memory instead of each client waiting for its own connect timeout.
UNAVAILABLE_MEMORY = 10.0
MAX_CACHED = 100_000


class Callout(Protocol):
    async def ask(self, route: Route, address: str) -> RecipientVerdict: ...


class RecipientVerifier:
    """Answers "does this address exist?" from a cache, or by asking once.

    Concurrent questions for the same address share one callout; positive and
    negative answers are kept for their TTLs; an unavailable destination is
    remembered for ``UNAVAILABLE_MEMORY`` seconds per route.
    """

    def __init__(self, callout: Callout, clock: Callable[[], float] = time.monotonic):
        self.callout = callout
        self.clock = clock
        self._cache: dict[str, tuple[float, RecipientVerdict]] = {}
        self._unavailable: dict[str, tuple[float, RecipientVerdict]] = {}
        self._asking: dict[str, asyncio.Future[RecipientVerdict]] = {}

    async def check(self, route: Route, address: str, settings: VerifyConfig) -> RecipientVerdict:
        key = f"{route.key}|{address.lower()}"
        now = self.clock()
        cached = self._cache.get(key)
        if cached is not None:
            if cached[0] > now:
                return cached[1]
            del self._cache[key]
        down = self._unavailable.get(route.key)
        if down is not None and down[0] > now:
            return down[1]
        pending = self._asking.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[RecipientVerdict] = asyncio.get_running_loop().create_future()
        self._asking[key] = future
        try:
            verdict = await self._ask(route, address, settings)
            future.set_result(verdict)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()   # retrieved: a waiter-less future must not warn
            raise
        finally:
            del self._asking[key]
        self._remember(key, route, verdict, settings)
        return verdict

    async def _ask(self, route: Route, address: str, settings: VerifyConfig) -> RecipientVerdict:
        try:
            async with asyncio.timeout(settings.timeout):
                return await self.callout.ask(route, address)
        except TimeoutError:
            return RecipientVerdict(RecipientAnswer.UNAVAILABLE, f"no answer from the {route.name} server within "
                           f"{settings.timeout:g} s", code="4.4.315",
                           reason="the mail server did not answer in time")

    def _remember(self, key: str, route: Route, verdict: RecipientVerdict, settings: VerifyConfig) -> None:
        now = self.clock()
        if verdict.answer is RecipientAnswer.UNAVAILABLE:
            self._unavailable[route.key] = (now + UNAVAILABLE_MEMORY, verdict)
            return
        self._unavailable.pop(route.key, None)
        ttl = settings.positive_ttl if verdict.answer is RecipientAnswer.EXISTS else settings.negative_ttl
        if ttl <= 0:
            return
        if len(self._cache) >= MAX_CACHED:
            self._cache.pop(next(iter(self._cache)))   # the oldest answer
        self._cache[key] = (now + ttl, verdict)


def rcpt_reply(verdict: RecipientVerdict, address: str) -> str:
    """The reply to RCPT TO for a verified address.

    Replies to outside clients name no internal host or address: the mail
    log has the details (``RecipientVerdict.detail``)."""
    if verdict.answer is RecipientAnswer.EXISTS:
        return "250 2.1.5 Recipient OK (verified)"
    if verdict.answer is RecipientAnswer.UNKNOWN and verdict.code == "5.6.7":
        return (f"553 5.6.7 <{address}>: Non-ASCII addresses not permitted for that recipient "
                "(its mail server does not offer SMTPUTF8)")
    if verdict.answer is RecipientAnswer.UNKNOWN:
        return f"550 5.1.1 <{address}>: Recipient address rejected: no such user here"
    code = verdict.code or "4.4.0"
    code = "4" + code[1:] if code[0] != "4" else code
    reason = verdict.reason or "the mail server could not be asked"
    return f"450 {code} <{address}>: Cannot verify the recipient now ({reason}); try again later"

