"""One SMTP client connection, driven phase by phase.

We open the TCP connection ourselves, so at every moment we know the phase
(connect, greeting, ehlo, starttls, mail, rcpt, data, after-data); each phase
has its own timeout.  Everything that goes wrong is turned into an
Observation by ``observe()`` — the only place where exceptions are mapped —
and raised as ``SessionFailure``.

TLS: with ``tls = "required"`` a server that does not offer STARTTLS gets
nothing but QUIT; plaintext is never sent.  When a certificate fails
verification, a second handshake without verification fetches the
certificate so the evidence always has its names, issuer and dates.
"""

from __future__ import annotations

import asyncio
import errno as errno_module
import ssl
import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ExtensionOID, NameOID

from relaywatch.classify.observation import Observation, Outcome, Phase
from relaywatch.config import DeliveryConfig
from relaywatch.deliver.downgrade import body_for_destination
from relaywatch.model import Destination, StoredBody
from relaywatch.smtpclient.protocol import (
    DotStuffer, RemoteProtocolError, Reply, ReplyReader, mail_from, parse_ehlo, rcpt_to,
)

_CHUNK = 256 * 1024


class SessionFailure(Exception):
    """The session with a destination failed; ``observation`` says how."""

    def __init__(self, observation: Observation):
        super().__init__(f"{observation.phase.value}: {observation.outcome.value}")
        self.observation = observation


class PeerClosed(ConnectionError):
    """The server closed the connection (EOF)."""


@dataclass(frozen=True)
class TlsPolicy:
    mode: str = "opportunistic"       # none | opportunistic | required
    verify: str = "none"              # none | ca | ca_and_name
    expected_name: str | None = None  # the name the certificate must carry (ca_and_name)
    ca_file: str | None = None
    crl_file: str | None = None

    def context(self) -> ssl.SSLContext:
        if self.verify == "none":
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx = ssl.create_default_context(cafile=self.ca_file)
            ctx.check_hostname = self.verify == "ca_and_name"
            if self.crl_file:
                ctx.load_verify_locations(self.crl_file)
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx


def _errno_name(exc: BaseException) -> str | None:
    code = getattr(exc, "errno", None)
    return errno_module.errorcode.get(code) if isinstance(code, int) else None


def observe(phase: Phase, exc: BaseException, dest: Destination | None, *, writing: bool = False,
            handshake: bool = False, tls: dict | None = None) -> Observation:
    """Map what was raised in ``phase`` to an Observation, most specific first.

    ``handshake``: raised by the TLS handshake itself (after the server's 220
    to STARTTLS).  A server that cannot agree on a protocol or cipher often
    just hangs up instead of sending an alert, so a close there is a TLS
    failure (4.4.317), not a dropped connection.
    """
    if isinstance(exc, SessionFailure):
        return exc.observation
    if isinstance(exc, ssl.SSLCertVerificationError):
        facts = dict(tls or {})
        facts.setdefault("verify_code", exc.verify_code)
        facts.setdefault("verify_message", exc.verify_message)
        return Observation(phase, Outcome.CERTIFICATE, dest, tls=facts)
    if isinstance(exc, ssl.SSLError):
        if handshake:
            return Observation(phase, Outcome.TLS_HANDSHAKE, dest, note=getattr(exc, "reason", None) or type(exc).__name__)
        return Observation(phase, Outcome.CLOSED, dest, note=getattr(exc, "reason", None))
    if handshake and isinstance(exc, (ConnectionError, EOFError)):
        return Observation(phase, Outcome.TLS_HANDSHAKE, dest, errno=_errno_name(exc),
                           note="the server closed the connection during the handshake")
    if isinstance(exc, TimeoutError):
        if phase is Phase.CONNECT:
            return Observation(phase, Outcome.CONNECT_TIMEOUT, dest)
        return Observation(phase, Outcome.STALLED if writing else Outcome.SILENT, dest)
    if isinstance(exc, ConnectionRefusedError):
        return Observation(phase, Outcome.REFUSED, dest, errno=_errno_name(exc) or "ECONNREFUSED")
    if isinstance(exc, OSError) and exc.errno in (errno_module.EHOSTUNREACH, errno_module.ENETUNREACH):
        return Observation(phase, Outcome.UNREACHABLE, dest, errno=_errno_name(exc))
    if isinstance(exc, OSError) and exc.errno == errno_module.ETIMEDOUT and phase is Phase.CONNECT:
        return Observation(phase, Outcome.CONNECT_TIMEOUT, dest, errno="ETIMEDOUT")
    if isinstance(exc, (PeerClosed, asyncio.IncompleteReadError, ConnectionError, OSError)):
        return Observation(phase, Outcome.CLOSED, dest, errno=_errno_name(exc))
    if isinstance(exc, (RemoteProtocolError, ValueError, asyncio.LimitOverrunError)):
        return Observation(phase, Outcome.PROTOCOL, dest, note=str(exc)[:120])
    raise exc


def reply_observation(phase: Phase, reply: Reply, dest: Destination | None) -> Observation:
    return Observation(phase, Outcome.REPLY, dest, reply_code=reply.code,
                       reply_enhanced=reply.enhanced, reply_text=reply.text)


def certificate_facts(der: bytes | None, expected_name: str | None) -> dict:
    facts: dict = {"expected_name": expected_name}
    if not der:
        return facts
    cert = x509.load_der_x509_certificate(der)

    def cn(name: x509.Name) -> str:
        attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(attrs[0].value) if attrs else name.rfc4514_string()
    try:
        sans = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        names = [str(n) for n in sans.get_values_for_type(x509.DNSName)]
        names += [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    facts.update(
        subject=cn(cert.subject), sans=names, issuer=cn(cert.issuer),
        not_before=cert.not_valid_before_utc.isoformat(timespec="seconds"),
        not_after=cert.not_valid_after_utc.isoformat(timespec="seconds"),
        serial=format(cert.serial_number, "x"),
        self_issued=cert.issuer == cert.subject,
    )
    return facts


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

    async def _read_reply(self, phase: Phase, timeout: float) -> Reply:
        parser = ReplyReader()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    line = await self.reader.readline()
                    if not line:
                        raise PeerClosed()
                    if not line.endswith(b"\n"):
                        raise PeerClosed()   # EOF in the middle of a line
                    reply = parser.feed_line(line)
                    if reply is not None:
                        return reply
        except BaseException as exc:
            self.broken = True
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise SessionFailure(observe(phase, exc, self.dest)) from exc

    async def _write(self, phase: Phase, data: bytes, timeout: float, writing: bool = False) -> None:
        try:
            self.writer.write(data)
            transport = self.writer.transport
            if transport.get_write_buffer_size() == 0 and not transport.is_closing():
                return   # all of it is in the kernel already: nothing to wait for
            async with asyncio.timeout(timeout):
                await self.writer.drain()
        except BaseException as exc:
            self.broken = True
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise SessionFailure(observe(phase, exc, self.dest, writing=writing)) from exc

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
        try:
            async with asyncio.timeout(self.timeouts.connect_timeout):
                self.reader, self.writer = await asyncio.open_connection(self.dest.ip, self.dest.port)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise SessionFailure(observe(Phase.CONNECT, exc, self.dest)) from exc

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
            async with asyncio.timeout(self.timeouts.command_timeout):
                await self.writer.start_tls(tls.context(), server_hostname=expected)
        except BaseException as exc:
            self.broken = True
            if isinstance(exc, asyncio.CancelledError):
                raise
            facts = None
            if isinstance(exc, ssl.SSLCertVerificationError):
                self.close()
                facts = await fetch_certificate(self.dest, self.timeouts, self.helo, expected)
            raise SessionFailure(observe(Phase.STARTTLS, exc, self.dest, handshake=True, tls=facts)) from exc
        ssl_object = self.writer.get_extra_info("ssl_object")
        self.tls = {"version": ssl_object.version(), "cipher": ssl_object.cipher()[0],
                    **certificate_facts(ssl_object.getpeercert(binary_form=True), expected)}
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


async def fetch_certificate(dest: Destination, timeouts: DeliveryConfig, helo: str,
                            expected_name: str | None) -> dict:
    """A second session, without verification, only to read the certificate."""
    conn = SmtpConnection(dest, timeouts, helo)
    try:
        await conn.open(TlsPolicy(mode="required", verify="none", expected_name=expected_name),
                        expected_name or dest.host)
        facts = dict(conn.tls or {})
        facts["expected_name"] = expected_name
        return facts
    except SessionFailure:
        return {"expected_name": expected_name}
    finally:
        await conn.quit()
