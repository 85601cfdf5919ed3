"""One SMTP client connection, driven phase by phase.

We open the TCP connection ourselves, so at every moment we know the phase
(connect, greeting, ehlo, starttls, mail, rcpt, data, after-data); each phase
has its own timeout.  Each phase runs inside ``with self.phase(Phase.X):``,
which turns whatever escapes into an Observation through the per-phase tables
of deliver/observe.py and raises it as ``SessionFailure``: nothing a session
raises is left unclassified, on asyncio's loop or on uvloop.

TLS: with ``tls = "required"`` a server that does not offer STARTTLS gets
nothing but QUIT; plaintext is never sent.  The policy, the certificate
facts and the second, certificate-fetching session are in deliver/tls.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, replace
from typing import Iterator

from relaywatch.classify.observation import Observation, Outcome, Phase
from relaywatch.config import DeliveryConfig
from relaywatch.deliver.downgrade import body_for_destination
from relaywatch.deliver.observe import PeerClosed, SessionFailure, observe, reply_observation
from relaywatch.deliver.tls import TlsPolicy, certificate_facts, fetch_certificate, session_facts
from relaywatch.model import Destination, StoredBody
from relaywatch.smtpclient.protocol import DotStuffer, Reply, ReplyReader, mail_from, parse_ehlo, rcpt_to

__all__ = ["PeerClosed", "SessionFailure", "SmtpConnection", "TlsPolicy", "TransactionResult",
           "certificate_facts", "fetch_certificate", "observe", "reply_observation"]

log = logging.getLogger("relaywatch.transport")

_CHUNK = 256 * 1024


@dataclass
class TransactionResult:
    mail: Reply
    rcpts: dict[str, Reply]
    data: Reply | None            # reply to DATA (354) or to the final dot
    data_phase: Phase | None      # which of the two ``data`` answers


class SmtpConnection:
    def __init__(self, dest: Destination, timeouts: DeliveryConfig, helo: str):
        self.dest = dest
        self.timeouts = timeouts
        self.helo = helo
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.capabilities: dict[str, str] = {}
        self.tls: dict | None = None       # facts about the TLS session, if any
        self.greeting: Reply | None = None
        self.last_used = time.monotonic()
        self.transactions = 0
        self.broken = False

    # -- low level --------------------------------------------------------------

    @contextlib.contextmanager
    def phase(self, phase: Phase, *, writing: bool = False, handshake: bool = False) -> Iterator[None]:
        """Run one phase: whatever it raises leaves as a SessionFailure whose
        observation deliver/observe.py built from the phase's table.
        Cancellation passes through untouched."""
        try:
            yield
        except SessionFailure:
            self.broken = True
            raise
        except Exception as exc:
            self.broken = True
            obs = observe(phase, exc, self.dest, writing=writing, handshake=handshake,
                          lost=self._lost(), gone=self._gone())
            if obs.outcome is Outcome.INTERNAL:
                log.warning("unforeseen error %s with %s; the session is dropped", phase.value, self.dest,
                            exc_info=exc)
            raise SessionFailure(obs) from exc

    def _lost(self) -> BaseException | None:
        """Why the connection went, as the stream saw it (None while it is up)."""
        return self.reader.exception() if self.reader is not None else None

    def _gone(self) -> bool:
        return self.writer is not None and self.writer.transport.is_closing()

    async def _read_reply(self, phase: Phase, timeout: float) -> Reply:
        parser = ReplyReader()
        with self.phase(phase):
            async with asyncio.timeout(timeout):
                while True:
                    line = await self.reader.readline()
                    if not line.endswith(b"\n"):
                        raise PeerClosed()   # EOF, maybe in the middle of a line
                    reply = parser.feed_line(line)
                    if reply is not None:
                        return reply

    async def _write(self, phase: Phase, data: bytes, timeout: float, writing: bool = False) -> None:
        with self.phase(phase, writing=writing):
            # uvloop raises RuntimeError here once the peer has reset the
            # connection; asyncio drops the data and lets drain() raise.
            self.writer.write(data)
            transport = self.writer.transport
            if transport.get_write_buffer_size() == 0 and not transport.is_closing():
                return   # all of it is in the kernel already: nothing to wait for
            async with asyncio.timeout(timeout):
                await self.writer.drain()

    async def _command(self, phase: Phase, data: bytes, timeout: float | None = None) -> Reply:
        timeout = timeout or self.timeouts.command_timeout
        await self._write(phase, data, timeout)
        return await self._read_reply(phase, timeout)

    # -- session setup ----------------------------------------------------------------

    async def open(self, tls: TlsPolicy, server_name: str) -> None:
        """Connect, read the greeting, EHLO, STARTTLS as the policy says."""
        await self.connect()
        await self.greet()
        await self._ehlo()
        await self.starttls(tls, server_name)

    async def connect(self) -> None:
        with self.phase(Phase.CONNECT):
            async with asyncio.timeout(self.timeouts.connect_timeout):
                self.reader, self.writer = await asyncio.open_connection(self.dest.ip, self.dest.port)

    async def greet(self) -> None:
        self.greeting = await self._read_reply(Phase.GREETING, self.timeouts.command_timeout)
        if self.greeting.code != 220:
            await self._quit_quietly()
            raise SessionFailure(reply_observation(Phase.GREETING, self.greeting, self.dest))

    async def ehlo(self) -> None:
        await self._ehlo()

    async def starttls(self, tls: TlsPolicy, server_name: str) -> None:
        if tls.mode == "none":
            return
        if "STARTTLS" not in self.capabilities:
            if tls.mode == "required":
                await self._quit_quietly()
                raise SessionFailure(Observation(Phase.STARTTLS, Outcome.TLS_NOT_OFFERED, self.dest))
            return
        reply = await self._command(Phase.STARTTLS, b"STARTTLS\r\n")
        if reply.code != 220:
            if tls.mode == "required":
                await self._quit_quietly()
                raise SessionFailure(reply_observation(Phase.STARTTLS, reply, self.dest))
            # Opportunistic: carry on in clear after a refused STARTTLS, as RFC 3207 allows.
            return
        expected = tls.expected_name or server_name
        try:
            with self.phase(Phase.STARTTLS, handshake=True):
                async with asyncio.timeout(self.timeouts.command_timeout):
                    await self.writer.start_tls(tls.context(), server_hostname=expected)
        except SessionFailure as failure:
            obs = failure.observation
            if obs.outcome is not Outcome.CERTIFICATE:
                raise
            self.close()
            facts = await fetch_certificate(type(self), self.dest, self.timeouts, self.helo, expected)
            raise SessionFailure(replace(obs, tls={**facts, **(obs.tls or {})})) from failure.__cause__
        self.tls = session_facts(self.writer.get_extra_info("ssl_object"), expected)
        await self._ehlo()

    async def command(self, phase: Phase, line: str) -> Reply:
        return await self._command(phase, line.encode() + b"\r\n")

    async def _ehlo(self) -> None:
        reply = await self._command(Phase.EHLO, f"EHLO {self.helo}\r\n".encode())
        if reply.code == 250:
            self.capabilities = parse_ehlo(reply)
            return
        if reply.code >= 500:  # an old server: fall back to HELO (RFC 5321 3.2)
            helo = await self._command(Phase.EHLO, f"HELO {self.helo}\r\n".encode())
            if helo.code == 250:
                self.capabilities = {}
                return
            reply = helo
        await self._quit_quietly()
        raise SessionFailure(reply_observation(Phase.EHLO, reply, self.dest))

    # -- mail transactions --------------------------------------------------------

    async def probe(self) -> bool:
        """RSET on an idle cached connection: is it still alive?"""
        try:
            reply = await self._command(Phase.MAIL, b"RSET\r\n", min(self.timeouts.command_timeout, 10))
            return reply.code == 250
        except SessionFailure:
            return False

    async def transaction(self, sender: str, recipients: list[str], body: StoredBody) -> TransactionResult:
        """One MAIL/RCPT/DATA exchange.  Raises SessionFailure if the session dies."""
        self.last_used = time.monotonic()
        self.transactions += 1
        body = await body_for_destination(body, self.capabilities)   # lines <= 998, 7-bit if need be
        size = body.size if "SIZE" in self.capabilities else None
        eight_bit = "8BITMIME" in self.capabilities
        cmds = [mail_from(sender, size, eight_bit)] + [rcpt_to(r) for r in recipients]
        timeout = self.timeouts.command_timeout
        if "PIPELINING" in self.capabilities:
            await self._write(Phase.MAIL, b"".join(cmds) + b"DATA\r\n", timeout)
            mail = await self._read_reply(Phase.MAIL, timeout)
            rcpts = {r: await self._read_reply(Phase.RCPT, timeout) for r in recipients}
            data = await self._read_reply(Phase.DATA, timeout)
            if not mail.is_success or not any(rep.is_success for rep in rcpts.values()):
                await self._reset()
                return TransactionResult(mail, rcpts, None, None)
        else:
            mail = await self._command(Phase.MAIL, cmds[0])
            if not mail.is_success:
                await self._reset()
                return TransactionResult(mail, {}, None, None)
            rcpts = {}
            for r, cmd in zip(recipients, cmds[1:]):
                rcpts[r] = await self._command(Phase.RCPT, cmd)
            if not any(rep.is_success for rep in rcpts.values()):
                await self._reset()
                return TransactionResult(mail, rcpts, None, None)
            data = await self._command(Phase.DATA, b"DATA\r\n")
        if data.code != 354:
            await self._reset()
            return TransactionResult(mail, rcpts, data, Phase.DATA)
        await self._send_body(body)
        final = await self._read_reply(Phase.AFTER_DATA, self.timeouts.final_timeout)
        self.last_used = time.monotonic()
        return TransactionResult(mail, rcpts, final, Phase.AFTER_DATA)

    async def _send_body(self, body: StoredBody) -> None:
        stuffer = DotStuffer()
        stall = self.timeouts.data_timeout
        if body.data is not None and len(body.data) <= _CHUNK:
            # The common case: the whole message and the final dot in one write.
            await self._write(Phase.DATA, stuffer.stuff(body.data) + stuffer.end(), stall, writing=True)
            return
        if body.data is not None:
            view = memoryview(body.data)
            for start in range(0, len(view), _CHUNK):
                await self._write(Phase.DATA, stuffer.stuff(bytes(view[start:start + _CHUNK])), stall, writing=True)
        else:
            with open(body.path, "rb") as f:
                while True:
                    chunk = await asyncio.to_thread(f.read, _CHUNK * 4)
                    if not chunk:
                        break
                    # The timeout bounds each stall, not the whole upload: a slow
                    # but moving transfer is never cut off.
                    await self._write(Phase.DATA, stuffer.stuff(chunk), stall, writing=True)
        await self._write(Phase.DATA, stuffer.end(), stall, writing=True)

    async def _reset(self) -> None:
        reply = await self._command(Phase.MAIL, b"RSET\r\n")
        if reply.code != 250:
            self.broken = True

    async def _quit_quietly(self) -> None:
        try:
            self.writer.write(b"QUIT\r\n")
            async with asyncio.timeout(2):
                await self.writer.drain()
        except BaseException:
            pass
        self.close()

    async def quit(self) -> None:
        if self.writer is None or self.broken:
            self.close()
            return
        try:
            async with asyncio.timeout(5):
                self.writer.write(b"QUIT\r\n")
                await self.writer.drain()
                await self.reader.readline()
        except BaseException:
            pass
        self.close()

    def close(self) -> None:
        self.broken = True
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:
                pass

