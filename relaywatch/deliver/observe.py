"""What an SMTP session raised, as an Observation: the one table per phase.

httpcore's ``map_exceptions`` idea: the driver (deliver/transport.py) runs each
phase inside ``SmtpConnection.phase(...)``, which hands whatever escapes to
``observe()`` here; the phase picks the table, the first matching row (most
specific first) builds the Observation.  classify/ then turns the observation
into a code.  Nothing here looks at message text.

Three tables:

- CONNECT: opening the TCP connection.
- HANDSHAKE: the TLS handshake after the server's 220 to STARTTLS.  A TLS error
  the peer *answered* (an alert such as protocol_version or handshake_failure,
  or TLS we will not speak) is ``TLS_HANDSHAKE`` (4.4.317).  A reset or EOF
  with no alert is ``CLOSED`` (4.4.318): nothing was refused, the connection
  went.  (asyncio-based servers such as aiosmtpd hang up this way even when
  their handshake failed: without an alert the evidence cannot say it was TLS.)
- SESSION: every other phase, reading replies and writing commands or the body.

Every table ends with ``Exception``: an exception nobody foresaw still becomes
an observation, never a message left unclassified.  If the connection is gone
by then it is ``CLOSED``.  This is how uvloop reports a write to a transport
the peer has reset: ``RuntimeError: unable to perform operation on
<TCPTransport closed=True …>``, where asyncio drops the write and lets
``drain()`` raise ``ConnectionResetError``.  Otherwise it is ``INTERNAL``: a
fault on our side, retried, and logged with its traceback by the driver.
"""

from __future__ import annotations

import asyncio
import errno as errno_module
import ssl
from dataclasses import dataclass
from typing import Callable

from relaywatch.classify.observation import Observation, Outcome, Phase
from relaywatch.model import Destination
from relaywatch.smtpclient.protocol import RemoteProtocolError, Reply


class SessionFailure(Exception):
    """The session with a destination failed; ``observation`` says how."""

    def __init__(self, observation: Observation):
        super().__init__(f"{observation.phase.value}: {observation.outcome.value}")
        self.observation = observation


class PeerClosed(ConnectionError):
    """The server closed the connection (EOF)."""


@dataclass(frozen=True)
class Facts:
    """What the driver knew when the exception escaped."""
    dest: Destination | None
    writing: bool = False                    # we were sending the body: a timeout is a stall
    tls: dict | None = None                  # certificate facts fetched after a verify failure
    lost: BaseException | None = None        # why the connection went, if it has (StreamReader.exception())
    gone: bool = False                       # the transport is closed or closing


def _errno_name(exc: BaseException | None) -> str | None:
    if isinstance(exc, ssl.SSLError):
        return None      # its errno is an SSL_ERROR_* number, not an OS errno
    code = getattr(exc, "errno", None)
    return errno_module.errorcode.get(code) if isinstance(code, int) else None


def _closed(phase: Phase, exc: BaseException, f: Facts) -> Observation:
    return Observation(phase, Outcome.CLOSED, f.dest, errno=_errno_name(exc) or _errno_name(f.lost))


def _closed_in_handshake(phase: Phase, exc: BaseException, f: Facts) -> Observation:
    return Observation(phase, Outcome.CLOSED, f.dest, errno=_errno_name(exc) or _errno_name(f.lost),
                       note="in the TLS handshake, without a TLS alert")


def _tls_broken(phase: Phase, exc: BaseException, f: Facts) -> Observation:
    # An established TLS session the peer broke (EOF without close_notify, a bad record).
    reason = getattr(exc, "reason", None)
    return Observation(phase, Outcome.CLOSED, f.dest, errno=_errno_name(f.lost),
                       note=f"TLS: {reason}" if reason else None)


def _silent(phase: Phase, exc: BaseException, f: Facts) -> Observation:
    return Observation(phase, Outcome.STALLED if f.writing else Outcome.SILENT, f.dest)


def _protocol(phase: Phase, exc: BaseException, f: Facts) -> Observation:
    return Observation(phase, Outcome.PROTOCOL, f.dest, note=str(exc)[:120])


def _certificate(phase: Phase, exc: BaseException, f: Facts) -> Observation:
    facts = dict(f.tls or {})
    facts.setdefault("verify_code", getattr(exc, "verify_code", None))
    facts.setdefault("verify_message", getattr(exc, "verify_message", None))
    return Observation(phase, Outcome.CERTIFICATE, f.dest, tls=facts)


def _tls_answered(phase: Phase, exc: BaseException, f: Facts) -> Observation:
    # reason is OpenSSL's name for it: TLSV1_ALERT_PROTOCOL_VERSION, SSLV3_ALERT_HANDSHAKE_FAILURE, ...
    return Observation(phase, Outcome.TLS_HANDSHAKE, f.dest, note=getattr(exc, "reason", None) or type(exc).__name__)


def _connect_timeout(phase: Phase, exc: BaseException, f: Facts) -> Observation:
    return Observation(phase, Outcome.CONNECT_TIMEOUT, f.dest, errno=_errno_name(exc))


def _refused(phase: Phase, exc: BaseException, f: Facts) -> Observation:
    return Observation(phase, Outcome.REFUSED, f.dest, errno=_errno_name(exc) or "ECONNREFUSED")


def _connect_oserror(phase: Phase, exc: BaseException, f: Facts) -> Observation:
    if getattr(exc, "errno", None) in (errno_module.EHOSTUNREACH, errno_module.ENETUNREACH):
        return Observation(phase, Outcome.UNREACHABLE, f.dest, errno=_errno_name(exc))
    if getattr(exc, "errno", None) == errno_module.ETIMEDOUT:
        return Observation(phase, Outcome.CONNECT_TIMEOUT, f.dest, errno="ETIMEDOUT")
    return _closed(phase, exc, f)


def _unforeseen(phase: Phase, exc: BaseException, f: Facts) -> Observation:
    if f.gone or f.lost is not None:
        return _closed(phase, exc, f)
    return Observation(phase, Outcome.INTERNAL, f.dest, note=f"{type(exc).__name__}: {exc}"[:160])


Rule = tuple[type[BaseException] | tuple[type[BaseException], ...], Callable[[Phase, BaseException, Facts], Observation]]

# ssl.SSLError, TimeoutError and ConnectionError are all OSErrors, and
# SSLCertVerificationError is also a ValueError: the order of the rows matters.
CONNECT: tuple[Rule, ...] = (
    (TimeoutError, _connect_timeout),
    (ConnectionRefusedError, _refused),
    (OSError, _connect_oserror),
    (Exception, _unforeseen),
)

HANDSHAKE: tuple[Rule, ...] = (
    (ssl.SSLCertVerificationError, _certificate),
    ((ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError), _closed_in_handshake),
    (ssl.SSLError, _tls_answered),
    (TimeoutError, _silent),
    ((ConnectionError, EOFError, OSError), _closed_in_handshake),
    (Exception, _unforeseen),
)

SESSION: tuple[Rule, ...] = (
    (ssl.SSLError, _tls_broken),
    (TimeoutError, _silent),
    ((asyncio.IncompleteReadError, ConnectionError, EOFError, OSError), _closed),
    ((RemoteProtocolError, ValueError, asyncio.LimitOverrunError), _protocol),
    (Exception, _unforeseen),
)


def table_for(phase: Phase, handshake: bool = False) -> tuple[Rule, ...]:
    if phase is Phase.CONNECT:
        return CONNECT
    if handshake:
        return HANDSHAKE
    return SESSION


def observe(phase: Phase, exc: BaseException, dest: Destination | None, *, writing: bool = False,
            handshake: bool = False, tls: dict | None = None, lost: BaseException | None = None,
            gone: bool = False) -> Observation:
    """Map what was raised in ``phase`` to an Observation (first matching row).

    ``handshake``: raised by the TLS handshake itself (after the server's 220
    to STARTTLS).  ``lost``/``gone``: whether, and why, the connection had
    already gone when ``exc`` was raised.
    """
    if isinstance(exc, SessionFailure):
        return exc.observation
    facts = Facts(dest, writing=writing, tls=tls, lost=lost, gone=gone)
    for types, build in table_for(phase, handshake):
        if isinstance(exc, types):
            return build(phase, exc, facts)
    raise exc   # a BaseException (CancelledError, KeyboardInterrupt): never ours to map


def reply_observation(phase: Phase, reply: Reply, dest: Destination | None) -> Observation:
    return Observation(phase, Outcome.REPLY, dest, reply_code=reply.code,
                       reply_enhanced=reply.enhanced, reply_text=reply.text)
