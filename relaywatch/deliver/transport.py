"""One SMTP client connection: the I/O around smtpclient/'s conversation.

The conversation (smtpclient/conversation.py) decides everything SMTP: what
to send, what a reply means, pipelining, the HELO fallback, when TLS starts.
This module only moves bytes: connect, read, write, start TLS, close, with a
timeout per phase.  ``_next_event()`` is the loop (write what the
conversation wants sent, read until it has an event); ``start_session``,
``transaction`` and ``ask`` react to the events.

Each phase runs inside ``with self.phase(...)``, which turns whatever
escapes into an Observation through the per-phase tables of
deliver/observe.py and raises it as ``SessionFailure``: nothing a session
raises is left unclassified, on asyncio's loop or on uvloop.  The phase is
the conversation's (``ClientConversation.phase``): the state whose reply was
awaited names it.

TLS: with ``tls = "required"`` a server that does not offer STARTTLS gets
nothing but QUIT; plaintext is never sent.  The policy, the certificate
facts and the second, certificate-fetching session are in deliver/tls.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from dataclasses import replace
from typing import Awaitable, Callable, Iterator, Sequence

from relaywatch.classify.observation import UTF8_HEADERS_NOTE, Observation, Outcome, Phase
from relaywatch.config import DeliveryConfig
from relaywatch.deliver.downgrade import body_for_destination
from relaywatch.deliver.observe import PeerClosed, SessionFailure, observe, reply_observation
from relaywatch.deliver.dane import match_chain
from relaywatch.deliver.tls import TlsPolicy, certificate_facts, fetch_certificate, presented_chain, session_facts
from relaywatch.dsn_params import NO_MESSAGE_DSN, MessageDsn, RecipientDsn
from relaywatch.errors import LeaseFenced
from relaywatch.idn import needs_smtputf8
from relaywatch.model import Destination, StoredBody
from relaywatch.smtpclient.conversation import ClientConversation
from relaywatch.smtpclient.events import (
    END_OF_BODY, NEED_DATA, QUIT, RSET, SEND_BODY, TLS_STARTED, Body, Capabilities, Failed, Greeting, NeedTls, Quit,
    Ready, TlsNotOffered, Transaction, TransactionReplies,
)
from relaywatch.smtpclient.protocol import Reply
from relaywatch.smtpclient.states import BROKEN

__all__ = ["PeerClosed", "SessionFailure", "SmtpConnection", "TlsPolicy", "TransactionResult",
           "certificate_facts", "fetch_certificate", "observe", "reply_observation"]

log = logging.getLogger("relaywatch.transport")

_CHUNK = 256 * 1024
_READ = 64 * 1024

TransactionResult = TransactionReplies   # what transaction() returns (mail, rcpts, data, data_phase)


class SmtpConnection:
    def __init__(self, dest: Destination, timeouts: DeliveryConfig, helo: str):
        self.dest = dest
        self.timeouts = timeouts
        self.helo = helo
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.conversation = ClientConversation(helo, "none")   # replaced, with the TLS mode, by start_session
        self.tls: dict | None = None       # facts about the TLS session, if any
        self.local_ip: str | None = None   # our end, once connected (TLS reports' sending-mta-ip)
        self.last_used = time.monotonic()
        self.transactions = 0

    @property
    def capabilities(self) -> dict[str, str]:
        return self.conversation.extensions

    @property
    def greeting(self) -> Reply | None:
        return self.conversation.greeting

    @property
    def broken(self) -> bool:
        """Not to carry another message: failed, refused or closed (a state, not a flag)."""
        return self.conversation.state in BROKEN

    # -- I/O ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def phase(self, phase: Phase | None = None, *, writing: bool = False,
              handshake: bool = False) -> Iterator[None]:
        """Run one phase: whatever it raises leaves as a SessionFailure whose
        observation deliver/observe.py built from the phase's table.  Without
        ``phase``, the conversation's phase when it failed.  Cancellation
        passes through untouched."""
        try:
            yield
        except SessionFailure:
            self.conversation.connection_failed()
            raise
        except Exception as exc:
            self.conversation.connection_failed()
            phase = phase or self.conversation.phase
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

    async def _write(self, phase: Phase, data: bytes | tuple[bytes, ...], timeout: float,
                     writing: bool = False) -> None:
        """``data``: bytes, or a tuple of them sent in one system call (uvloop: writev)."""
        with self.phase(phase, writing=writing):
            # uvloop raises RuntimeError here once the peer has reset the
            # connection; asyncio drops the data and lets drain() raise.
            if type(data) is tuple:
                self.writer.writelines(data)
            else:
                self.writer.write(data)
            transport = self.writer.transport
            if transport.get_write_buffer_size() == 0 and not transport.is_closing():
                return   # all of it is in the kernel already: nothing to wait for
            async with asyncio.timeout(timeout):
                await self.writer.drain()

    async def _next_event(self, timeout: float):
        """The loop: write what the conversation sends by itself, read until it has an event."""
        conv = self.conversation
        while True:
            try:
                event = conv.next_event()
            except Exception:
                with self.phase():   # a reply that is not SMTP: mapped in the phase it broke
                    raise
            if event is not NEED_DATA:
                return event
            out = conv.data_to_send()
            if out:
                await self._write(conv.phase, out, timeout)
            with self.phase(conv.phase):
                async with asyncio.timeout(timeout):
                    data = await self.reader.read(_READ)
                if not data:
                    raise PeerClosed()   # EOF, maybe in the middle of a reply
            conv.receive_data(data)

    # -- session setup ----------------------------------------------------------------

    async def open(self, tls: TlsPolicy, server_name: str) -> None:
        """Connect, read the greeting, EHLO, STARTTLS as the policy says."""
        await self.connect()
        await self.start_session(tls, server_name)

    async def connect(self) -> None:
        with self.phase(Phase.CONNECT):
            async with asyncio.timeout(self.timeouts.connect_timeout):
                self.reader, self.writer = await asyncio.open_connection(self.dest.ip, self.dest.port)
        sockname = self.writer.get_extra_info("sockname")
        self.local_ip = sockname[0] if sockname else None

    async def start_session(self, tls: TlsPolicy, server_name: str,
                            on_event: Callable[[object], None] | None = None) -> None:
        """Greeting, EHLO (or HELO), STARTTLS and EHLO again, as the conversation
        decides; ``on_event`` sees each event once it is handled (the probe times them)."""
        self.conversation = ClientConversation(self.helo, tls.mode)
        timeout = self.timeouts.command_timeout
        while True:
            event = await self._next_event(timeout)
            kind = type(event)
            if kind is NeedTls:
                await self._start_tls(tls, server_name)
            elif kind is Failed:
                await self._quit_quietly()
                raise SessionFailure(reply_observation(event.phase, event.reply, self.dest))
            elif kind is TlsNotOffered:
                await self._quit_quietly()
                raise SessionFailure(Observation(Phase.STARTTLS, Outcome.TLS_NOT_OFFERED, self.dest))
            if on_event is not None:
                on_event(event)
            if kind is Ready:
                return
            assert kind in (Greeting, Capabilities, NeedTls), event

    async def _start_tls(self, tls: TlsPolicy, server_name: str) -> None:
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
        ssl_object = self.writer.get_extra_info("ssl_object")
        self.tls = session_facts(ssl_object, expected)
        if tls.dane:
            self._authenticate_dane(tls, presented_chain(ssl_object), expected)
        self.conversation.send(TLS_STARTED)

    def _authenticate_dane(self, tls: TlsPolicy, chain: list[bytes], host: str) -> None:
        """RFC 7672 3: the presented chain must match a usable TLSA record; else nothing is sent."""
        match = match_chain(tls.dane, chain, tls.dane_names or (host,), datetime.datetime.now(datetime.timezone.utc))
        if match.ok:
            self.tls["dane_match"] = match.record
        else:
            self.close()
            raise SessionFailure(Observation(Phase.STARTTLS, Outcome.TLSA_MISMATCH, self.dest, tls=self.tls, dane={
                "subtype": match.subtype, "result_type": match.result_type, "reason": match.reason,
                "presented": match.presented}))

    # -- commands on their own (verification, probes) ----------------------------------------

    async def ask(self, command, timeout: float | None = None) -> Reply:
        """Send one Mail, Rcpt or Rset and return its reply."""
        timeout = timeout or self.timeouts.command_timeout
        conv = self.conversation
        data = conv.send(command)
        await self._write(conv.phase, data, timeout)
        return (await self._next_event(timeout)).reply

    async def probe(self) -> bool:
        """RSET on an idle cached connection: is it still alive?"""
        try:
            reply = await self.ask(RSET, min(self.timeouts.command_timeout, 10))
            return reply.code == 250
        except SessionFailure:
            return False

    # -- mail transactions --------------------------------------------------------

    async def transaction(self, sender: str, recipients: list[str], body: StoredBody,
                          dsn: MessageDsn = NO_MESSAGE_DSN,
                          recipient_dsn: Sequence[RecipientDsn] = (), utf8_headers: bool = False,
                          still_held: Callable[[], Awaitable[bool]] | None = None) -> TransactionResult:
        """One MAIL/RCPT/DATA exchange (with the DSN parameters if the server offers DSN);
        ``utf8_headers``: RFC 6532 headers, which need SMTPUTF8 as a UTF-8 address does.
        ``still_held``: asked right before the final dot; False closes the connection without
        it (the destination drops the transaction) and raises LeaseFenced.
        Raises SessionFailure if the session dies."""
        self.last_used = time.monotonic()
        self.transactions += 1
        smtputf8 = utf8_headers or needs_smtputf8(sender, *recipients)
        if smtputf8 and "SMTPUTF8" not in self.capabilities:
            # RFC 6531 3.4: such an address has no ASCII form; send nothing, change nothing.
            await self._quit_quietly()
            utf8 = [a for a in (sender, *recipients) if not a.isascii()]
            raise SessionFailure(Observation(Phase.MAIL, Outcome.SMTPUTF8_NOT_OFFERED, self.dest,
                                             note=", ".join(utf8[:3]) or UTF8_HEADERS_NOTE))
        body = await body_for_destination(body, self.capabilities)   # lines <= 998, 7-bit if need be
        replies = await self._envelope(sender, recipients, body.size, smtputf8, dsn, recipient_dsn)
        if replies is not SEND_BODY:
            return replies
        await self._send_body(body, still_held)
        replies = await self._next_event(self.timeouts.final_timeout)
        self.last_used = time.monotonic()
        return replies

    async def _envelope(self, sender: str, recipients: list[str], size: int, smtputf8: bool = False,
                        dsn: MessageDsn = NO_MESSAGE_DSN, recipient_dsn: Sequence[RecipientDsn] = ()):
        """MAIL, RCPTs and DATA (pipelined if offered): SEND_BODY after a 354, else how it ended."""
        timeout = self.timeouts.command_timeout
        tx = Transaction(sender, recipients, size, smtputf8, dsn, tuple(recipient_dsn))
        await self._write(Phase.MAIL, self.conversation.send(tx), timeout)
        return await self._next_event(timeout)

    async def _send_body(self, body: StoredBody, still_held: Callable[[], Awaitable[bool]] | None = None) -> None:
        conv = self.conversation
        stall = self.timeouts.data_timeout
        if body.data is not None and len(body.data) <= _CHUNK:
            # The common case: the whole message and the final dot in one write
            # (a writev: the body is not copied to append the dot).
            await self._fence(still_held)
            await self._write(Phase.DATA, (conv.send(Body(body.data)), conv.send(END_OF_BODY)), stall, writing=True)
            return
        if body.data is not None:
            view = memoryview(body.data)
            for start in range(0, len(view), _CHUNK):
                await self._write(Phase.DATA, conv.send(Body(bytes(view[start:start + _CHUNK]))), stall,
                                  writing=True)
        else:
            with open(body.path, "rb") as f:
                while True:
                    chunk = await asyncio.to_thread(f.read, _CHUNK * 4)
                    if not chunk:
                        break
                    # The timeout bounds each stall, not the whole upload: a slow
                    # but moving transfer is never cut off.
                    await self._write(Phase.DATA, conv.send(Body(chunk)), stall, writing=True)
        await self._fence(still_held)
        await self._write(Phase.DATA, conv.send(END_OF_BODY), stall, writing=True)

    async def _fence(self, still_held: Callable[[], Awaitable[bool]] | None) -> None:
        """The last moment the message can be taken back: without the final dot, a server
        must not deliver it (RFC 5321 4.1.1.4).  A lease this node no longer holds ends here."""
        if still_held is not None and not await still_held():
            self.close()
            raise LeaseFenced("the lease on this message is another node's now")

    # -- the end ----------------------------------------------------------------------

    async def _quit_quietly(self) -> None:
        """QUIT after a refusal, without waiting for its reply."""
        try:
            self.writer.write(self.conversation.send(QUIT))
            async with asyncio.timeout(2):
                await self.writer.drain()
        except BaseException:
            pass
        self.close()

    async def quit(self) -> None:
        if self.writer is None or self.broken or not self.conversation.may_send(Quit):
            # failed, refused, or mid-transaction (cancelled): nothing polite to say
            self.close()
            return
        try:
            async with asyncio.timeout(5):
                self.writer.write(self.conversation.send(QUIT))
                await self.writer.drain()
                await self.reader.readline()
        except BaseException:
            pass
        self.close()

    def close(self) -> None:
        self.conversation.connection_closed()
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:
                pass
