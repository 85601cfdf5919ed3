"""The client side of one SMTP session, without I/O (RFC 5321, 3207, 2920).

The shape of receive/conversation.py and of h11: the driver feeds what it
read with ``receive_data()`` and asks ``next_event()`` what happened until it
returns ``NEED_DATA``; then it writes ``data_to_send()`` (the commands the
conversation sends by itself) and reads again.  Commands the caller decides on
go through ``send(command)``, which returns their bytes.

The conversation owns the rules: the greeting, EHLO with the HELO fallback,
STARTTLS as the TLS mode says (``required`` never sends a command in the
clear after EHLO; ``opportunistic`` carries on in clear when TLS is not
offered or refused), PIPELINING (a ``Transaction`` goes out as one write when
the server offers it, one command per reply otherwise), the RSET after a
refused transaction, multi-line replies with enhanced codes, and
dot-stuffing.  The transitions are data, in smtpclient/states.py.

Whose fault: a reply that is not SMTP raises ``RemoteProtocolError``; a
command out of its state raises ``LocalProtocolError``.  Either leaves the
conversation in ``ERROR``, as does the driver's ``connection_failed()``.
End of file is the driver's to report (it is a closed connection, not a
protocol error).
"""

from __future__ import annotations

from collections import deque

from relaywatch.classify.observation import Phase
from relaywatch.dsn_params import NO_RECIPIENT_DSN
from relaywatch.errors import LocalProtocolError, RemoteProtocolError
from relaywatch.smtpclient.events import (
    NEED_DATA, SEND_BODY, Body, Capabilities, EndOfBody, Failed, Greeting, Mail, NeedTls, Quit, Rcpt, Ready,
    Replied, Rset, TlsNotOffered, TlsStarted, Transaction, TransactionReplies,
)
from relaywatch.smtpclient.protocol import DotStuffer, Reply, ReplyReader, mail_from, parse_ehlo, rcpt_to
from relaywatch.smtpclient.states import ANSWERS, PHASE, REPLY_TRANSITIONS, SEND_TRANSITIONS, Answer, ClientState

S = ClientState
# asyncio.StreamReader's default limit, which the driver used to read lines with.
MAX_REPLY_LINE = 64 * 1024
_SETUP = frozenset({S.GREETING, S.EHLO, S.HELO, S.STARTTLS})


class ClientConversation:
    def __init__(self, helo: str, tls_mode: str = "opportunistic"):
        self.helo = helo
        self.tls_mode = tls_mode               # none | opportunistic | required
        self.tls_active = False
        self.state = S.GREETING
        self.broken_in: ClientState | None = None   # the state we were in when it failed
        self.greeting: Reply | None = None
        self.extensions: dict[str, str] = {}
        self.esmtp = False
        self.pipelining = False
        self._buffer = bytearray()
        self._outgoing = bytearray()
        self._events: deque = deque()
        self._lines = ReplyReader()
        # the transaction in progress
        self._recipients: tuple | list = ()
        self._rcpt_lines: list[bytes] = []
        self._mail: Reply | None = None
        self._rcpts: dict[str, Reply] = {}
        self._heard = 0
        self._data: Reply | None = None
        self._in_transaction = False
        self.any_accepted = False
        self._stuffer: DotStuffer | None = None

    # -- facts the answer functions read (states.Facts) ------------------------------------

    @property
    def recipients_left(self) -> int:
        return len(self._recipients) - self._heard

    @property
    def mail_accepted(self) -> bool:
        return self._mail is not None and self._mail.is_success

    @property
    def phase(self) -> Phase:
        """The delivery phase we are in (or failed in)."""
        return PHASE[self.broken_in if self.state is S.ERROR and self.broken_in else self.state]

    # -- input / output ------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def data_to_send(self) -> bytes:
        """Commands the conversation decided to send (EHLO, HELO, STARTTLS, a
        RCPT or DATA without pipelining, RSET); the driver writes them before reading."""
        if not self._outgoing:
            return b""
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def may_send(self, command_type: type) -> bool:
        return command_type in SEND_TRANSITIONS.get(self.state, ())

    def send(self, command) -> bytes:
        state = self.state
        target = SEND_TRANSITIONS.get(state, {}).get(type(command))
        if target is None:
            self._fail()
            raise LocalProtocolError(f"{type(command).__name__} cannot be sent in state {state.name}")
        data = _SENDERS[type(command)](self, command)   # may refuse an unsafe address (ValueError): nothing sent
        self.state = target
        if target is S.EHLO:                            # after TLS: the client starts over (RFC 3207 4.2)
            self._outgoing += b"EHLO " + self.helo.encode() + b"\r\n"
        elif self._outgoing:                            # what the conversation sent itself goes first
            data = self.data_to_send() + data
        return data

    def connection_failed(self) -> None:
        """The driver's I/O failed (h11's send_failed): the conversation cannot go on."""
        self._fail()

    def connection_closed(self) -> None:
        if self.state is not S.ERROR:
            self.state = S.CLOSED

    def _fail(self) -> None:
        if self.state is not S.ERROR:
            self.broken_in = self.state
            self.state = S.ERROR

    # -- events --------------------------------------------------------------------------

    def next_event(self):
        events = self._events
        while not events:
            answer_of = ANSWERS.get(self.state)
            if answer_of is None:
                if self.state is S.ERROR:
                    raise LocalProtocolError("the conversation has failed: open a new connection")
                return NEED_DATA           # nothing awaited: it is our turn to send
            try:
                reply = self._next_reply()
            except RemoteProtocolError:
                self._fail()
                raise
            if reply is None:
                return NEED_DATA
            self._hear(reply, answer_of)
        return events.popleft()

    def _next_reply(self) -> Reply | None:
        buf = self._buffer
        while True:
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) > MAX_REPLY_LINE:
                    raise RemoteProtocolError(f"reply line longer than {MAX_REPLY_LINE} bytes")
                return None
            line = bytes(buf[:end + 1])
            del buf[:end + 1]
            reply = self._lines.feed_line(line)
            if reply is not None:
                return reply

    def _hear(self, reply: Reply, answer_of) -> None:
        state = self.state
        _HEARD[state](self, reply)
        answer = answer_of(reply.code, self)
        target = REPLY_TRANSITIONS[state].get(answer)
        if target is None:
            raise LocalProtocolError(f"states.py has no move from {state.name} on {answer.name}")
        self.state = target
        self._enter(state, answer, target, reply)

    # -- what each state does with its reply (recording only) ------------------------------

    def _heard_greeting(self, reply: Reply) -> None:
        self.greeting = reply

    def _heard_hello(self, reply: Reply) -> None:
        if reply.code == 250:
            esmtp = self.state is S.EHLO
            self.extensions = parse_ehlo(reply) if esmtp else {}
            self.esmtp = esmtp
            self.pipelining = "PIPELINING" in self.extensions
            self._events.append(Capabilities(reply, self.extensions))

    def _heard_mail(self, reply: Reply) -> None:
        self._mail = reply

    def _heard_rcpt(self, reply: Reply) -> None:
        self._rcpts[self._recipients[self._heard]] = reply
        self._heard += 1
        if reply.is_success:
            self.any_accepted = True

    def _heard_data(self, reply: Reply) -> None:
        # A refused DATA counts only when there was something to send.
        self._data = reply if self.mail_accepted and self.any_accepted else None

    def _heard_nothing(self, reply: Reply) -> None:
        pass

    # -- what entering a state does ---------------------------------------------------------

    def _enter(self, came_from: ClientState, answer: Answer, state: ClientState, reply: Reply) -> None:
        events = self._events
        if state is S.EHLO:
            if came_from is S.GREETING:
                events.append(Greeting(reply))
            self._outgoing += b"EHLO " + self.helo.encode() + b"\r\n"
        elif state is S.HELO:
            self._outgoing += b"HELO " + self.helo.encode() + b"\r\n"
        elif state is S.STARTTLS:
            self._outgoing += b"STARTTLS\r\n"
        elif state is S.TLS:
            # Anything after the 220 came in the clear and could be injected: drop it.
            self._buffer.clear()
            events.append(NeedTls())
        elif state is S.RCPT:
            if not self.pipelining:
                self._outgoing += self._rcpt_lines[self._heard]
        elif state is S.DATA:
            if not self.pipelining:
                self._outgoing += b"DATA\r\n"
        elif state is S.BODY:
            self._stuffer = DotStuffer()
            events.append(SEND_BODY)
        elif state is S.RESET:
            if came_from is not S.DATA:
                self._data = None
            self._outgoing += b"RSET\r\n"
        elif state is S.READY or state is S.MUST_CLOSE or state is S.SENDER:
            if came_from in _SETUP:
                if state is S.READY:
                    events.append(Ready())
                elif answer is Answer.TLS_MISSING:
                    events.append(TlsNotOffered())
                else:
                    events.append(Failed(PHASE[came_from], reply))
            elif came_from is S.FINAL:
                events.append(self._end_transaction(reply, Phase.AFTER_DATA))
            elif came_from is S.RESET and self._in_transaction:
                events.append(self._end_transaction(self._data, Phase.DATA if self._data else None))
            else:
                events.append(Replied(reply))

    # -- transactions --------------------------------------------------------------------

    def _end_transaction(self, data: Reply | None, data_phase: Phase | None) -> TransactionReplies:
        replies = TransactionReplies(self._mail, self._rcpts, data, data_phase)
        self._in_transaction = False
        self._recipients, self._rcpt_lines, self._rcpts = (), [], {}
        self._mail = self._data = self._stuffer = None
        self._heard, self.any_accepted = 0, False
        return replies

    def _send_transaction(self, tx: Transaction) -> bytes:
        if not tx.recipients:
            raise LocalProtocolError("a transaction needs at least one recipient")
        ext = self.extensions
        if tx.smtputf8 and "SMTPUTF8" not in ext:
            raise LocalProtocolError("an SMTPUTF8 transaction to a server that does not offer SMTPUTF8")
        # DSN (RFC 3461 5.2): the parameters go on only to a server that offers it.
        dsn = "DSN" in ext
        mail = mail_from(tx.sender, tx.size if "SIZE" in ext else None, "8BITMIME" in ext, tx.smtputf8,
                         tx.dsn if dsn else None)
        rcpt_dsn = tx.recipient_dsn or [NO_RECIPIENT_DSN] * len(tx.recipients)
        rcpt_lines = [rcpt_to(r, tx.smtputf8, d if dsn else None) for r, d in zip(tx.recipients, rcpt_dsn, strict=True)]
        self._in_transaction = True
        self._recipients, self._rcpt_lines, self._rcpts = tx.recipients, rcpt_lines, {}
        self._heard, self.any_accepted, self._mail, self._data = 0, False, None, None
        if self.pipelining:
            return b"".join([mail, *rcpt_lines, b"DATA\r\n"])
        return mail

    def _send_mail(self, command: Mail) -> bytes:
        if command.smtputf8 and "SMTPUTF8" not in self.extensions:
            raise LocalProtocolError("SMTPUTF8 to a server that does not offer SMTPUTF8")
        return mail_from(command.sender, smtputf8=command.smtputf8)

    def _send_rcpt(self, command: Rcpt) -> bytes:
        return rcpt_to(command.recipient, command.smtputf8)

    def _send_rset(self, command: Rset) -> bytes:
        self._in_transaction = False
        return b"RSET\r\n"

    def _send_quit(self, command: Quit) -> bytes:
        return b"QUIT\r\n"

    def _send_tls_started(self, command: TlsStarted) -> bytes:
        self.tls_active = True
        self.extensions, self.esmtp, self.pipelining = {}, False, False
        return b""

    def _send_body(self, command: Body) -> bytes:
        return self._stuffer.stuff(command.data)

    def _send_end(self, command: EndOfBody) -> bytes:
        return self._stuffer.end()


_HEARD = {
    S.GREETING: ClientConversation._heard_greeting, S.EHLO: ClientConversation._heard_hello,
    S.HELO: ClientConversation._heard_hello, S.STARTTLS: ClientConversation._heard_nothing,
    S.MAIL: ClientConversation._heard_mail, S.RCPT: ClientConversation._heard_rcpt,
    S.DATA: ClientConversation._heard_data, S.FINAL: ClientConversation._heard_nothing,
    S.RESET: ClientConversation._heard_nothing, S.ASK_MAIL: ClientConversation._heard_nothing,
    S.ASK_RCPT: ClientConversation._heard_nothing,
}

_SENDERS = {
    Transaction: ClientConversation._send_transaction, Mail: ClientConversation._send_mail,
    Rcpt: ClientConversation._send_rcpt, Rset: ClientConversation._send_rset,
    Quit: ClientConversation._send_quit, TlsStarted: ClientConversation._send_tls_started,
    Body: ClientConversation._send_body, EndOfBody: ClientConversation._send_end,
}
