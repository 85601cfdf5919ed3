"""Recipient verification at RCPT for internal-relay domains (receive/verify.py, deliver/callout.py).

The end-to-end tests speak SMTP from an untrusted address (127.0.0.2) to a real
relay, which asks a real aiosmtpd "on-premises server" on loopback.
"""

import asyncio
import smtplib

import pytest

from helpers import LOOPBACK, Sink, SinkHandler, eventually, free_port, message
from relaywatch.config import ConfigError, VerifyConfig, parse_config
from relaywatch.model import RecipientAnswer, RecipientVerdict, Route, RouteKind
from relaywatch.receive.verify import RecipientVerifier, rcpt_reply

pytestmark = pytest.mark.both_loops   # delivery end to end: asyncio and uvloop (serve runs uvloop)


UNTRUSTED = "127.0.0.2"
ROUTE = Route(RouteKind.CONNECTOR, "onprem")
SETTINGS = VerifyConfig(positive_ttl=60, negative_ttl=10, timeout=1)


class CountingCallout:
    """A callout that answers from a table and counts how often it was asked."""

    def __init__(self, answers: dict[str, RecipientAnswer], delay: float = 0.0):
        self.answers = answers
        self.delay = delay
        self.asked: list[str] = []

    async def ask(self, route, address):
        self.asked.append(address)
        await asyncio.sleep(self.delay)
        answer = self.answers[address.lower()]
        return RecipientVerdict(answer, f"said {answer.value}",
                       code="4.4.316" if answer is RecipientAnswer.UNAVAILABLE else None,
                       reason="connection refused" if answer is RecipientAnswer.UNAVAILABLE else None)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


async def test_answers_are_cached_for_their_ttl():
    callout, clock = CountingCallout({"bob@c.test": RecipientAnswer.EXISTS, "ghost@c.test": RecipientAnswer.UNKNOWN}), Clock()
    verifier = RecipientVerifier(callout, clock)
    for _ in range(3):
        assert (await verifier.check(ROUTE, "bob@c.test", SETTINGS)).answer is RecipientAnswer.EXISTS
        assert (await verifier.check(ROUTE, "GHOST@c.test", SETTINGS)).answer is RecipientAnswer.UNKNOWN
    assert callout.asked == ["bob@c.test", "GHOST@c.test"]
    clock.now += 11          # past the negative TTL, within the positive one
    await verifier.check(ROUTE, "bob@c.test", SETTINGS)
    await verifier.check(ROUTE, "ghost@c.test", SETTINGS)
    assert callout.asked == ["bob@c.test", "GHOST@c.test", "ghost@c.test"]


async def test_concurrent_questions_for_one_address_share_one_callout():
    callout = CountingCallout({"bob@c.test": RecipientAnswer.EXISTS}, delay=0.05)
    verifier = RecipientVerifier(callout, Clock())
    verdicts = await asyncio.gather(*(verifier.check(ROUTE, "bob@c.test", SETTINGS) for _ in range(20)))
    assert {v.answer for v in verdicts} == {RecipientAnswer.EXISTS}
    assert callout.asked == ["bob@c.test"]


async def test_an_unavailable_destination_is_remembered_briefly_and_never_cached_as_an_answer():
    callout, clock = CountingCallout({"a@c.test": RecipientAnswer.UNAVAILABLE, "b@c.test": RecipientAnswer.UNAVAILABLE}), Clock()
    verifier = RecipientVerifier(callout, clock)
    assert (await verifier.check(ROUTE, "a@c.test", SETTINGS)).answer is RecipientAnswer.UNAVAILABLE
    assert (await verifier.check(ROUTE, "b@c.test", SETTINGS)).answer is RecipientAnswer.UNAVAILABLE
    assert callout.asked == ["a@c.test"]     # the second client did not wait for its own timeout
    clock.now += 11
    callout.answers["a@c.test"] = RecipientAnswer.EXISTS
    assert (await verifier.check(ROUTE, "a@c.test", SETTINGS)).answer is RecipientAnswer.EXISTS


async def test_a_callout_slower_than_the_timeout_is_unavailable():
    verifier = RecipientVerifier(CountingCallout({"bob@c.test": RecipientAnswer.EXISTS}, delay=5), Clock())
    verdict = await verifier.check(ROUTE, "bob@c.test", VerifyConfig(positive_ttl=60, negative_ttl=10, timeout=0.1))
    assert verdict.answer is RecipientAnswer.UNAVAILABLE and verdict.code == "4.4.315"


@pytest.mark.parametrize("verdict, reply", [
    (RecipientVerdict(RecipientAnswer.EXISTS, ""), "250 2.1.5 Recipient OK (verified)"),
    (RecipientVerdict(RecipientAnswer.UNKNOWN, "550 5.1.1 x"), "550 5.1.1 <b@c.test>: Recipient address rejected: no such user here"),
    (RecipientVerdict(RecipientAnswer.UNAVAILABLE, "", code="4.4.316", reason="connection refused"),
     "450 4.4.316 <b@c.test>: Cannot verify the recipient now (connection refused); try again later"),
    # A 5xx failure to reach the server is still only a reason to try again later.
    (RecipientVerdict(RecipientAnswer.UNAVAILABLE, "", code="5.7.1", reason="the mail server refused the verification"),
     "450 4.7.1 <b@c.test>: Cannot verify the recipient now (the mail server refused the verification); "
     "try again later"),
    (RecipientVerdict(RecipientAnswer.UNAVAILABLE, ""),
     "450 4.4.0 <b@c.test>: Cannot verify the recipient now (the mail server could not be asked); try again later"),
])
def test_rcpt_replies(verdict, reply):
    assert rcpt_reply(verdict, "b@c.test") == reply


# -- end to end -------------------------------------------------------------------------------


def _config(port: int, **domain):
    return dict(
        server={"trusted_networks": ["127.0.0.1/32"]},
        domains=[{"name": "contoso.test", "type": "internal_relay", "mailboxes": ["alice"],
                  "verify_recipients": True, **domain}],
        connectors=[{"name": "onprem", "type": "on_premises", "domains": ["contoso.test"],
                     "smart_hosts": [f"{LOOPBACK}:{port}"], "tls": "none"}],
        alerts={"invalid_recipient_quota": 100},
    )


class Directory(SinkHandler):
    """The on-premises server: knows bob, refuses everyone else, counts the questions."""

    def __init__(self):
        self.rcpts: list[str] = []
        self.sessions = []
        super().__init__(rcpt_reply=self._rcpt)

    async def handle_RCPT(self, server, session, envelope, address, options):
        self.sessions.append(server)
        return await super().handle_RCPT(server, session, envelope, address, options)

    def _rcpt(self, address):
        self.rcpts.append(address)
        return None if address.split("@")[0] in ("bob", "bob1", "bob2") else "550 5.1.1 User unknown"


def _rcpt_replies(port: int, source: str, recipients: list[str], body: bytes | None = None):
    with smtplib.SMTP(LOOPBACK, port, timeout=30, source_address=(source, 0)) as client:
        client.ehlo("client.test")
        assert client.mail("someone@example.org")[0] == 250
        replies = [client.rcpt(r) for r in recipients]
        if body is not None and any(code == 250 for code, _ in replies):
            client.data(body)
        return [(code, text.decode()) for code, text in replies]


async def test_untrusted_clients_get_the_on_premises_servers_answer_at_rcpt(relay_factory):
    directory = Directory()
    onprem = await Sink(directory).start()
    try:
        relay = await relay_factory(**_config(onprem.port))
        replies = await asyncio.to_thread(_rcpt_replies, relay.port, UNTRUSTED,
                                          ["bob@contoso.test", "ghost@contoso.test", "Ghost@Contoso.test"],
                                          message("verified"))
        assert replies[0] == (250, "2.1.5 Recipient OK (verified)")
        assert replies[1][0] == 550 and replies[1][1].startswith("5.1.1 <ghost@contoso.test>")
        assert replies[2][0] == 550
        assert "127.0.0.1" not in replies[1][1]       # nothing about the internal server
        # The second ghost came from the cache: one question each, then the delivery's RCPT.
        await eventually(lambda: onprem.messages, what="bob's message delivered")
        assert onprem.messages[0].recipients == ["bob@contoso.test"]
        assert directory.rcpts == ["bob@contoso.test", "ghost@contoso.test", "bob@contoso.test"]
        # No NDR is owed to anyone: nothing is left in the queue.
        await eventually(lambda: _queue_empty(relay), what="the queue to empty")
        # Refused addresses count towards the invalid-recipient quota.
        rows = await relay.store.invalid_recipients_since(0)
        assert any(row[0] == "contoso.test" and row[1] == "onprem" and row[3] >= 2 for row in rows), rows
    finally:
        await onprem.stop()


async def _queue_empty(relay):
    return (await relay.store.counts()) == {}


async def test_trusted_clients_and_listed_mailboxes_are_not_verified(relay_factory):
    directory = Directory()
    onprem = await Sink(directory).start()
    try:
        relay = await relay_factory(**_config(onprem.port))
        replies = await asyncio.to_thread(_rcpt_replies, relay.port, LOOPBACK, ["ghost@contoso.test"])
        assert replies == [(250, "2.1.5 Recipient OK")]
        replies = await asyncio.to_thread(_rcpt_replies, relay.port, UNTRUSTED, ["alice@contoso.test"])
        assert replies == [(250, "2.1.5 Recipient OK")]
        assert directory.rcpts == []
    finally:
        await onprem.stop()


async def test_a_server_that_cannot_be_asked_gets_450_saying_why(relay_factory):
    relay = await relay_factory(**_config(free_port()))
    replies = await asyncio.to_thread(_rcpt_replies, relay.port, UNTRUSTED, ["bob@contoso.test"])
    code, text = replies[0]
    assert code == 450
    assert text == ("4.4.316 <bob@contoso.test>: Cannot verify the recipient now (connection refused); "
                    "try again later")
    assert await relay.store.counts() == {}


async def test_the_kept_connection_is_reused_and_replaced_when_the_server_drops_it(relay_factory):
    directory = Directory()
    onprem = await Sink(directory).start()
    try:
        relay = await relay_factory(**_config(onprem.port))
        first = await asyncio.to_thread(_rcpt_replies, relay.port, UNTRUSTED, ["bob1@contoso.test"])
        again = await asyncio.to_thread(_rcpt_replies, relay.port, UNTRUSTED, ["bob@contoso.test"])
        assert again == first
        assert len({id(s) for s in directory.sessions}) == 1     # one kept connection asked both
        # The on-premises server hangs up on the kept connection.
        for session in directory.sessions:
            session.transport.close()
        second = await asyncio.to_thread(_rcpt_replies, relay.port, UNTRUSTED, ["bob2@contoso.test"])
        assert first == second == [(250, "2.1.5 Recipient OK (verified)")]
        assert directory.rcpts == ["bob1@contoso.test", "bob@contoso.test", "bob2@contoso.test"]
        assert len({id(s) for s in directory.sessions}) == 2
    finally:
        await onprem.stop()


@pytest.mark.parametrize("domain, connectors, problem", [
    ({"type": "authoritative"}, None, "domains[0].verify_recipients: only for type = \"internal_relay\""),
    ({}, [], "domains[0].verify_recipients: no enabled connector serves contoso.test"),
])
def test_config_refuses_verification_that_cannot_work(domain, connectors, problem):
    raw = _config(2526, **domain)
    if connectors is not None:
        raw["connectors"] = connectors
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems
