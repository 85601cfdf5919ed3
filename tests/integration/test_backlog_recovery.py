"""A backlog goes out without admin action soon after its destination comes back: the
watch probes a young backlog every few seconds (watch/probe_schedule.py), not every
probe_interval, and releases it when a probe passes."""

import logging

import pytest

from helpers import LOOPBACK, Sink, eventually, free_port, message

pytestmark = [pytest.mark.both_loops, pytest.mark.both_stores]

MESSAGES = 20


def partner(port):
    return [{"name": "partner", "type": "partner", "domains": ["partner.test"],
             "smart_hosts": [f"{LOOPBACK}:{port}"], "tls": "none"}]


async def test_a_young_backlog_is_released_by_the_next_short_probe_when_the_destination_returns(
        relay_factory, caplog):
    caplog.set_level(logging.INFO, logger="relaywatch")
    port = free_port()   # nothing listens: every connection is refused
    # Nobody intervenes, retries are an hour away, and so is probe_interval (the longest gap
    # between probes): only the short gaps of a young backlog can bring the mail out in time.
    relay = await relay_factory(queue={"retry_intervals": ["1h"]}, connectors=partner(port),
                                alerts={"open_after": "0s", "evaluate_interval": "0.2s", "probe_interval": "1h",
                                        "cert_probe_interval": "1h"})
    for i in range(MESSAGES):
        await relay.send("alice@contoso.test", [f"user{i}@partner.test"], message(f"m{i}"))

    async def deferred():
        return [m for m in await relay.queue() if m["status"] == "deferred"]
    await eventually(lambda: _len_is(deferred(), MESSAGES), what=f"{MESSAGES} deferred messages")

    async def probed_and_failed():   # the probe made when the incident opened
        return [i for i in await relay.store.open_incidents() if i.probe and not i.probe.ok]
    await eventually(probed_and_failed, what="a failed probe of the refused destination")

    sink = await Sink(port=port).start()   # the destination comes back on the same port
    try:
        await eventually(lambda: len(sink.messages) == MESSAGES, timeout=30,
                         what=lambda: f"the backlog without admin action ({len(sink.messages)} of {MESSAGES})")
    finally:
        await sink.stop()

    # A probe released it, after failed ones whose next probe was the shortest gap away
    # (alerts.probe_min_interval, 2 s, stretched by at most a tenth), not probe_interval.
    released = [r.mail_fields for r in caplog.records if getattr(r, "mail_event", None) == "released"]
    assert [(f["connector"], f["status"]) for f in released] == [("partner", "probe passed")]
    assert released[0]["detail"].startswith(f"{MESSAGES} deferred message(s) released")
    failed = [r for r in caplog.records if r.name == "relaywatch.watch" and r.msg.startswith("probe of %s failed")]
    assert failed and failed[0].args[0] == "partner" and failed[0].args[-1] <= 2.0 * 1.1
    passed = [r for r in caplog.records if r.name == "relaywatch.watch" and r.msg.startswith("probe of %s passed")]
    assert [r.args[0] for r in passed] == ["partner"] and passed[0].args[-1] == MESSAGES
    assert caplog.records.index(failed[-1]) < caplog.records.index(passed[0])


async def _len_is(awaitable, n):
    return len(await awaitable) == n
