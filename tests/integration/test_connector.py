"""The connector seam (deliver/connector.py) on its own: the scheduler's view of delivery
(each result through deliver/record.py ``classify_result``, as the scheduler does).

Real loopback destinations (aiosmtpd, scripted misfits) and a real Maildir; no store."""

import time

from helpers import LOOPBACK, Scripted, Sink, base_config
from relaywatch.clock import SYSTEM_CLOCK
from relaywatch.config import apply_overrides, parse_config
from relaywatch.watch_records import Override, Setting
from relaywatch.deliver.connector import DeliveryResult, LocalConnector, SmtpConnector, connector_for_route
from relaywatch.deliver.record import classify_result
from relaywatch.deliver.resolver import Resolver
from relaywatch.deliver.smtp import SmtpRoutes
from relaywatch.model import Entry, EntryStatus, RecipientStatus, Route, RouteKind, StoredBody
from relaywatch.route import LOCAL

PARTNER = Route(RouteKind.CONNECTOR, "partner")
BODY = StoredBody(size=24, data=b"Subject: hi\r\n\r\nhello\r\n")


def setup(tmp_path, port, **delivery):
    raw = base_config(tmp_path, connectors=[{"name": "partner", "type": "partner", "domains": ["partner.test"],
                                             "smart_hosts": [f"{LOOPBACK}:{port}"], "tls": "none"}],
                      delivery=delivery)
    config = parse_config(raw)
    routes = SmtpRoutes(lambda: config, Resolver(config.dns))
    return config, routes


def entry(route=PARTNER, n=1):
    return Entry(id=f"E{n}", sender="alice@contoso.test", received_at=0.0, expires_at=time.time() + 3600,
                 status=EntryStatus.QUEUED, attempts=0, next_attempt_at=None, route=route, size=BODY.size,
                 message_id="", body_id="b")


async def test_a_session_sends_message_after_message_over_one_connection(tmp_path):
    sink = await Sink().start()
    config, routes = setup(tmp_path, sink.port)
    connector = connector_for_route(PARTNER, lambda: config, routes, SYSTEM_CLOCK)
    assert isinstance(connector, SmtpConnector) and not connector.paused()
    session = connector.session()
    try:
        first = classify_result(await session.deliver(entry(n=1), BODY, ["bob@partner.test"]))
        conn = session.conn
        second = classify_result(await session.deliver(entry(n=2), BODY, ["carol@partner.test", "dave@partner.test"]))
        assert session.conn is conn and conn.transactions == 2          # reused, not reopened
        for result in (first, second):
            assert isinstance(result, DeliveryResult) and result.tried == ()
            assert result.destination.ip == LOOPBACK and result.destination.port == sink.port
            assert {o.status for o in result.outcomes} == {RecipientStatus.DELIVERED}
        assert [m.recipients for m in sink.messages] == [["bob@partner.test"],
                                                          ["carol@partner.test", "dave@partner.test"]]
    finally:
        await session.close()
        await sink.stop()
    assert session.conn is None


async def test_a_connection_carries_messages_per_connection_then_a_new_one_is_opened(tmp_path):
    sink = await Sink().start()
    config, routes = setup(tmp_path, sink.port, messages_per_connection=1)
    session = SmtpConnector(PARTNER, lambda: config, routes, SYSTEM_CLOCK).session()
    try:
        await session.deliver(entry(n=1), BODY, ["bob@partner.test"])
        first = session.conn
        result = classify_result(await session.deliver(entry(n=2), BODY, ["carol@partner.test"]))
        assert session.conn is not first and first.broken and session.conn.transactions == 1
        assert result.outcomes[0].status is RecipientStatus.DELIVERED and len(sink.messages) == 2
    finally:
        await session.close()
        await sink.stop()


async def test_an_unreachable_destination_is_marked_down_for_every_session_until_forgotten(tmp_path):
    async def busy(c):
        await c.say("421 4.3.2 too busy, come back later")
    server = await Scripted(busy).start()
    config, routes = setup(tmp_path, server.port)
    connector = SmtpConnector(PARTNER, lambda: config, routes, SYSTEM_CLOCK)
    one, two = connector.session(), connector.session()
    try:
        first = classify_result(await one.deliver(entry(n=1), BODY, ["bob@partner.test"]))
        failure = first.outcomes[0].failure
        assert first.outcomes[0].status is RecipientStatus.DEFERRED and failure.subtype == "greeting_421"
        assert first.destination == failure.destination and server.connections == 1
        # Another worker's entry for the same destination: deferred with that one failure, no new connection.
        second = classify_result(await two.deliver(entry(n=2), BODY, ["carol@partner.test"]))
        assert second.outcomes[0].failure is failure and server.connections == 1
        connector.forget_down()                  # queue retry / a passing probe: really try again
        third = classify_result(await two.deliver(entry(n=3), BODY, ["carol@partner.test"]))
        assert third.outcomes[0].failure is not failure and server.connections == 2
    finally:
        await one.close()
        await two.close()
        await server.stop()


async def test_a_dropped_session_is_not_reused(tmp_path):
    async def drops_after_mail(c):
        await c.greet_and_ehlo()
        await c.hear()
        c.reset()
    server = await Scripted(drops_after_mail).start()
    config, routes = setup(tmp_path, server.port)
    session = SmtpConnector(PARTNER, lambda: config, routes, SYSTEM_CLOCK).session()
    try:
        result = classify_result(await session.deliver(entry(), BODY, ["bob@partner.test"]))
        assert result.outcomes[0].status is RecipientStatus.DEFERRED and result.destination.port == server.port
        assert session.conn is None
    finally:
        await session.close()
        await server.stop()


async def test_a_paused_connector_says_so(tmp_path):
    raw = base_config(tmp_path, connectors=[{"name": "partner", "type": "partner", "domains": ["partner.test"],
                                             "smart_hosts": ["127.0.0.1:25"], "tls": "none"}])
    paused = Setting.CONNECTOR_PAUSED.of("partner")
    config = apply_overrides(parse_config(raw), {paused: Override(paused, True, 1.0)})
    routes = SmtpRoutes(lambda: config, Resolver(config.dns))
    assert SmtpConnector(PARTNER, lambda: config, routes, SYSTEM_CLOCK).paused()


async def test_local_delivery_writes_a_maildir_and_reports_what_failed(tmp_path):
    config, routes = setup(tmp_path, 25)
    connector = connector_for_route(LOCAL, lambda: config, routes, SYSTEM_CLOCK)
    assert isinstance(connector, LocalConnector) and not connector.paused()
    session = connector.session()
    result = classify_result(await session.deliver(entry(LOCAL), BODY, ["alice@contoso.test"]))
    assert result.destination.host == "local" and result.outcomes[0].status is RecipientStatus.DELIVERED
    assert result.outcomes[0].reply.startswith("maildir ")
    new = config.server.data_dir / "mailboxes" / "contoso.test" / "alice" / "new"
    assert [p.read_bytes() for p in new.iterdir()] == [b"Delivered-To: alice@contoso.test\r\n" + BODY.data]
    # A mailbox that cannot be written: a classified local failure, never an exception.
    (config.server.data_dir / "mailboxes" / "contoso.test" / "postmaster").write_text("not a directory")
    failed = classify_result(await session.deliver(entry(LOCAL), BODY, ["postmaster@contoso.test"]))
    assert failed.outcomes[0].status is not RecipientStatus.DELIVERED and failed.outcomes[0].failure.phase == "local"
    await session.close()
