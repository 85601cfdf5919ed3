"""The client conversation's states and every transition between them, as data.

h11's rule: everything that decides a transition lives in this file.  Two
tables and one set of answer functions:

- ``SEND_TRANSITIONS[state][command type] -> state``: which commands may be
  sent in which state.  Anything else is a ``LocalProtocolError`` (our bug).
- ``ANSWERS[state](code, facts) -> Answer``: what a reply means in the state
  that waited for it.  Besides the code, an answer may look at the facts the
  conversation has gathered (``Facts``): the TLS mode and whether TLS is on,
  the EHLO keywords, PIPELINING, the replies of the transaction so far.
- ``REPLY_TRANSITIONS[state][answer] -> state``.

Two more moves are possible from any state: the driver reporting that the
connection failed (``ERROR``) or was closed (``CLOSED``).  ``MUST_CLOSE``:
the server refused the session or a reset; QUIT (no reply awaited) and close.

    GREETING -220-> EHLO -250-> STARTTLS -220-> TLS -TlsStarted-> EHLO -250-> READY
                      \\-5xx-> HELO -250-/          (opportunistic, refused -> READY)
    READY -Transaction-> MAIL -> RCPT ... -> DATA -354-> BODY -EndOfBody-> FINAL -> READY
                          (a refusal -> RESET -250-> READY)
    READY -Mail-> ASK_MAIL -250-> SENDER -Rcpt-> ASK_RCPT -> SENDER -Rset-> RESET -> READY

``PHASE`` names the delivery phase of each state, which picks the error table
(deliver/observe.py) and the reply's classification.
"""

from __future__ import annotations

import enum
from typing import Callable, Mapping, Protocol

from relaywatch.classify.observation import Phase
from relaywatch.smtpclient.events import (
    Body, EndOfBody, Mail, Quit, Rcpt, Rset, TlsStarted, Transaction,
)


class ClientState(enum.Enum):
    GREETING = "greeting"        # connected: the server speaks first
    EHLO = "ehlo"                # EHLO sent
    HELO = "helo"                # EHLO refused (5xx): HELO sent (RFC 5321 3.2)
    STARTTLS = "starttls"        # STARTTLS sent
    TLS = "tls"                  # 220 to STARTTLS: the driver does the handshake
    READY = "ready"              # the session is open, no transaction
    MAIL = "mail"                # a transaction's MAIL sent (pipelined: with its RCPTs and DATA)
    RCPT = "rcpt"                # waiting for the reply to one of its RCPTs
    DATA = "data"                # waiting for the reply to DATA
    BODY = "body"                # 354: the driver sends the message
    FINAL = "final"              # the final dot sent: waiting for the reply to the message
    RESET = "reset"              # RSET sent (after a refused transaction, or on its own)
    ASK_MAIL = "ask-mail"        # MAIL sent on its own
    SENDER = "sender"            # ... and accepted: RCPT or RSET next
    ASK_RCPT = "ask-rcpt"        # RCPT sent on its own
    MUST_CLOSE = "must-close"    # refused: QUIT and close
    CLOSED = "closed"
    ERROR = "error"              # something failed: the connection is unusable


class Answer(enum.Enum):
    OK = "ok"                    # the reply this state waits for
    REFUSED = "refused"          # any other reply
    UNKNOWN_EHLO = "unknown-ehlo"  # EHLO refused with 5xx: try HELO
    START_TLS = "start-tls"      # hello accepted; STARTTLS offered and wanted
    IN_CLEAR = "in-clear"        # hello (or STARTTLS) done; no TLS to start (not wanted, on already, or optional)
    TLS_MISSING = "tls-missing"  # hello accepted; TLS required and not offered
    MORE = "more"                # a recipient's reply; more recipients to hear
    NEXT = "next"                # pipelined: the next reply is already on its way, whatever this one said


class Facts(Protocol):
    """What the answer functions may look at (ClientConversation has these)."""
    tls_mode: str
    tls_active: bool
    extensions: Mapping[str, str]
    pipelining: bool
    recipients_left: int
    mail_accepted: bool
    any_accepted: bool


S = ClientState

SEND_TRANSITIONS: dict[ClientState, dict[type, ClientState]] = {
    S.TLS: {TlsStarted: S.EHLO},
    S.READY: {Transaction: S.MAIL, Mail: S.ASK_MAIL, Rset: S.RESET, Quit: S.CLOSED},
    S.SENDER: {Rcpt: S.ASK_RCPT, Rset: S.RESET, Quit: S.CLOSED},
    S.BODY: {Body: S.BODY, EndOfBody: S.FINAL},
    S.MUST_CLOSE: {Quit: S.CLOSED},
}

REPLY_TRANSITIONS: dict[ClientState, dict[Answer, ClientState]] = {
    S.GREETING: {Answer.OK: S.EHLO, Answer.REFUSED: S.MUST_CLOSE},
    S.EHLO: {Answer.START_TLS: S.STARTTLS, Answer.IN_CLEAR: S.READY, Answer.TLS_MISSING: S.MUST_CLOSE,
             Answer.UNKNOWN_EHLO: S.HELO, Answer.REFUSED: S.MUST_CLOSE},
    S.HELO: {Answer.START_TLS: S.STARTTLS, Answer.IN_CLEAR: S.READY, Answer.TLS_MISSING: S.MUST_CLOSE,
             Answer.REFUSED: S.MUST_CLOSE},
    S.STARTTLS: {Answer.OK: S.TLS, Answer.IN_CLEAR: S.READY, Answer.REFUSED: S.MUST_CLOSE},
    S.MAIL: {Answer.NEXT: S.RCPT, Answer.OK: S.RCPT, Answer.REFUSED: S.RESET},
    S.RCPT: {Answer.MORE: S.RCPT, Answer.NEXT: S.DATA, Answer.OK: S.DATA, Answer.REFUSED: S.RESET},
    S.DATA: {Answer.OK: S.BODY, Answer.REFUSED: S.RESET},
    S.FINAL: {Answer.OK: S.READY},
    S.RESET: {Answer.OK: S.READY, Answer.REFUSED: S.MUST_CLOSE},
    S.ASK_MAIL: {Answer.OK: S.SENDER, Answer.REFUSED: S.READY},
    S.ASK_RCPT: {Answer.OK: S.SENDER},
}


def _positive(code: int) -> bool:
    return 200 <= code < 400


def _tls_next(f: Facts) -> Answer:
    if f.tls_mode == "none" or f.tls_active:
        return Answer.IN_CLEAR
    if "STARTTLS" in f.extensions:
        return Answer.START_TLS
    return Answer.TLS_MISSING if f.tls_mode == "required" else Answer.IN_CLEAR


def _greeting(code: int, f: Facts) -> Answer:
    return Answer.OK if code == 220 else Answer.REFUSED


def _ehlo(code: int, f: Facts) -> Answer:
    if code == 250:
        return _tls_next(f)
    return Answer.UNKNOWN_EHLO if code >= 500 else Answer.REFUSED


def _helo(code: int, f: Facts) -> Answer:
    return _tls_next(f) if code == 250 else Answer.REFUSED


def _starttls(code: int, f: Facts) -> Answer:
    if code == 220:
        return Answer.OK
    # Opportunistic: carry on in clear after a refused STARTTLS, as RFC 3207 allows.
    return Answer.REFUSED if f.tls_mode == "required" else Answer.IN_CLEAR


def _mail(code: int, f: Facts) -> Answer:
    if f.pipelining:
        return Answer.NEXT
    return Answer.OK if _positive(code) else Answer.REFUSED


def _rcpt(code: int, f: Facts) -> Answer:
    if f.recipients_left:
        return Answer.MORE
    if f.pipelining:
        return Answer.NEXT
    return Answer.OK if f.any_accepted else Answer.REFUSED


def _data(code: int, f: Facts) -> Answer:
    return Answer.OK if code == 354 and f.mail_accepted and f.any_accepted else Answer.REFUSED


def _any(code: int, f: Facts) -> Answer:
    return Answer.OK


def _reset(code: int, f: Facts) -> Answer:
    return Answer.OK if code == 250 else Answer.REFUSED


def _ask_mail(code: int, f: Facts) -> Answer:
    return Answer.OK if _positive(code) else Answer.REFUSED


ANSWERS: dict[ClientState, Callable[[int, Facts], Answer]] = {
    S.GREETING: _greeting, S.EHLO: _ehlo, S.HELO: _helo, S.STARTTLS: _starttls,
    S.MAIL: _mail, S.RCPT: _rcpt, S.DATA: _data, S.FINAL: _any, S.RESET: _reset,
    S.ASK_MAIL: _ask_mail, S.ASK_RCPT: _any,
}
"""The states that wait for a reply, and how to read it."""

PHASE: dict[ClientState, Phase] = {
    S.GREETING: Phase.GREETING, S.EHLO: Phase.EHLO, S.HELO: Phase.EHLO,
    S.STARTTLS: Phase.STARTTLS, S.TLS: Phase.STARTTLS,
    S.READY: Phase.MAIL, S.MAIL: Phase.MAIL, S.RCPT: Phase.RCPT, S.DATA: Phase.DATA,
    S.BODY: Phase.DATA, S.FINAL: Phase.AFTER_DATA, S.RESET: Phase.MAIL,
    S.ASK_MAIL: Phase.MAIL, S.SENDER: Phase.MAIL, S.ASK_RCPT: Phase.RCPT,
    S.MUST_CLOSE: Phase.MAIL, S.CLOSED: Phase.MAIL, S.ERROR: Phase.MAIL,
}

BROKEN = frozenset({S.MUST_CLOSE, S.CLOSED, S.ERROR})
"""States in which the connection must not carry another message."""
