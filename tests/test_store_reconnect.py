"""The queue store goes away and comes back: PostgreSQL cut through a loopback proxy.

What must hold (issue 9, item 7): while the database cannot be reached DATA
gets 451 (never 5xx, never a hang); once it is back the relay accepts and
delivers again without a restart; and an outcome that could not be recorded
while the destination accepted the message is kept and recorded later, never
turned into a second delivery.
"""

import asyncio
import collections
import json
import os
import re
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from helpers import (
    LOOPBACK, CuttableProxy, Sink, SinkHandler, base_config, eventually, free_port, message, to_toml,
)

ROOT = Path(__file__).resolve().parent.parent
_MESSAGE_ID = re.compile(rb"^Message-ID: (<[^>]+>)", re.MULTILINE | re.IGNORECASE)


def through(proxy: CuttableProxy, dsn: str) -> str:
    """``dsn`` (same database, same schema) by way of the proxy's port."""
    parts = urlsplit(dsn)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"{LOOPBACK}:{proxy.port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


class TimedSink(SinkHandler):
    """A destination that takes a while per message and notes when each arrived."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay
        self.arrivals: list[tuple[float, bytes]] = []     # (monotonic time, Message-ID)

    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(self.delay)
        reply = await super().handle_DATA(server, session, envelope)
        self.arrivals.append((time.monotonic(), _MESSAGE_ID.search(envelope.original_content).group(1)))
        return reply


def _submit(port: int, mid: str) -> int:
    """One message over SMTP; the reply code to DATA (or to whatever failed)."""
    try:
        with smtplib.SMTP(LOOPBACK, port, timeout=30) as c:
            c.sendmail("alice@contoso.test", ["bob@fabrikam.test"], message(mid, message_id=mid))
        return 250
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code
    except smtplib.SMTPRecipientsRefused as exc:
        return next(iter(exc.recipients.values()))[0]


def _connector(port: int) -> dict:
    return {"name": "onprem", "type": "on_premises", "domains": ["fabrikam.test"],
            "smart_hosts": [f"{LOOPBACK}:{port}"], "tls": "none"}


def _duplicates(handler: TimedSink) -> dict[bytes, int]:
    return {mid: n for mid, n in collections.Counter(mid for _, mid in handler.arrivals).items() if n > 1}


async def test_a_postgresql_cut_answers_451_then_recovers_and_delivers_nothing_twice(pg_dsn, relay_factory):
    proxy = await CuttableProxy(5432).start()
    handler = TimedSink(delay=0.1)
    sink = await Sink(handler).start()
    try:
        relay = await relay_factory(
            server={"store": through(proxy, pg_dsn)},
            # A lease shorter than the cut: without a kept outcome, what was
            # delivered during the cut would be leased and delivered again.
            queue={"lease_time": "2s", "retry_intervals": ["1s"]},
            delivery={"concurrency": 4, "per_destination": 4},
            connectors=[_connector(sink.port)])
        replies: dict[str, int] = {}
        n = 0

        async def send(tag: str) -> int:
            nonlocal n
            n += 1
            mid = f"<{tag}-{n}@client.test>"
            replies[mid] = await asyncio.to_thread(_submit, relay.port, mid)
            return replies[mid]

        # A backlog the destination is still working through when the cut comes.
        for _ in range(40):
            assert await send("before") == 250
        await eventually(lambda: len(handler.arrivals) >= 4, what="deliveries to start")

        cut_at = time.monotonic()
        proxy.cut(3.0)
        during = []
        while proxy.is_cut:
            during.append(await send("during"))
        restored_at = time.monotonic()

        # The first message after the database is back.
        first_250 = None
        while first_250 is None:
            assert time.monotonic() - restored_at < 15, "no message accepted within 15 s of the store coming back"
            if await send("after") == 250:
                first_250 = time.monotonic() - restored_at
        for _ in range(10):
            await send("after")

        delivered_in_cut = sum(1 for t, _ in handler.arrivals if cut_at <= t <= restored_at)
        refused = collections.Counter(during)
        print(f"\nstore back -> first 250: {first_250:.2f} s; during the {restored_at - cut_at:.1f} s cut: "
              f"{delivered_in_cut} delivered, DATA replies {dict(refused)}")
        assert delivered_in_cut > 0, "the test must deliver while the store is cut"
        assert refused and all(400 <= code < 500 for code in refused), refused   # never 5xx
        assert refused[451] > 0

        accepted = {mid.encode() for mid, code in replies.items() if code == 250}
        expected = [m for m in replies if m.startswith("<after") and replies[m] == 250]
        assert len(expected) >= 11

        async def drained():
            return (await relay.store.counts() == {} and not getattr(relay.app.scheduler, "pending", ())
                    and accepted <= {mid for _, mid in handler.arrivals})
        await eventually(drained, timeout=30, what=lambda: (
            f"every accepted message delivered and the queue empty "
            f"({len(accepted - {mid for _, mid in handler.arrivals})} missing)"))
        assert _duplicates(handler) == {}
        print(f"{len(handler.arrivals)} delivered, 0 twice")
    finally:
        await sink.stop()
        await proxy.stop()
