"""The server side of one SMTP session, without I/O (RFC 5321).

In the manner of h11: bytes go in with ``receive()``; ``next_event()`` says
what happened, one event at a time, until it returns ``NEED_DATA``.  The
conversation answers everything it can decide alone (syntax, command order,
EHLO, SIZE); it hands the rest to its caller as events:

- ``Reply``: send this text (``close``: then hang up).
- ``Recipient``: RCPT TO for ``address`` (syntax checked, otherwise as sent;
  a source route is split off into ``source_route``); the caller normalises
  and decides, sends the reply and, if accepted, calls ``accept_recipient``.
  Its DSN parameters (NOTIFY, ORCPT; RFC 3461) are checked here
  (``relaywatch.dsn_params``) and travel with it to ``MessageEnd``, as
  MAIL FROM's RET and ENVID do.
- ``StartTls``: the 220 for STARTTLS has been given; upgrade the connection,
  then call ``tls_started``.  Bytes the client sent after STARTTLS in the
  clear are dropped (the STARTTLS command-injection attack).
- ``Authenticate``: AUTH PLAIN or LOGIN (RFC 4954) gave a user name and a
  password; the caller checks them, calls ``authenticated`` when they are
  right, and sends the reply (``AUTH_SUCCEEDED``, ``AUTH_INVALID`` ...).
  The SASL exchange itself (334 challenges, ``*`` to cancel, base64) and
  every refusal that needs no password check happen here.  AUTH is offered
  only once the connection is encrypted, and only when ``auth_available``;
  with ``auth_required`` (the submission port) MAIL waits for AUTH.
- ``MessageStart``, ``BodyData``, ``MessageEnd``: the message after the 354,
  with dot-stuffing undone (``receive.data``).  ``MessageEnd.problem`` is the
  reply when the content was refused (bare CR/LF, too big; long lines are accepted);
  otherwise the caller commits the message and sends the reply.

The caller must not ask for the next event while it is still deciding one
(committing a message, upgrading to TLS): replies keep the order of commands.
Everything here is a pure function of the bytes received, so it is tested
with tables (tests/unit/test_conversation.py).  The events are defined in
receive/conversation_events.py, the SASL exchange of AUTH in receive/sasl.py.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from relaywatch import dsn_params
from relaywatch.dsn_params import NO_MESSAGE_DSN, NO_RECIPIENT_DSN, ParameterError, RecipientDsn
from relaywatch.receive.conversation_events import (NEED_DATA, BodyData, MessageEnd, MessageStart, Recipient, Reply,
                                                    StartTls)
from relaywatch.receive.data import DataParser
from relaywatch.receive.envelope import MAIL_PARAMS, RCPT_PARAMS, parse_params, parse_path, sender_allowed
from relaywatch.receive.sasl import MECHANISMS, SaslExchange

# RFC 5321 4.5.3.1.4 allows 512 octets; extensions add parameters, and
# Postfix accepts 2048 (line_length_limit).  A longer command is refused whole.
MAX_COMMAND_LINE = 2048
# Postfix's smtpd_hard_error_limit: a client that keeps getting errors is
# broken or probing; after this many, it is disconnected.
MAX_ERRORS = 20

# RFC 6531 3.5: a non-ASCII address in a transaction opened without SMTPUTF8.
NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter on MAIL FROM (RFC 6531)"
_UTF8_VERBS = ("MAIL", "RCPT")     # the only commands that may carry UTF-8 (addresses)


class Conversation:
    def __init__(self, hostname: str, max_size: int, tls_available: bool = False, *,
                 tls_active: bool = False, auth_available: bool = False, auth_required: bool = False):
        self.hostname = hostname
        self.max_size = max_size
        self.tls_available = tls_available
        self.tls_active = tls_active          # True from the start on an implicit-TLS port (RFC 8314)
        self.auth_available = auth_available  # there are users: AUTH is offered once encrypted
        self.auth_required = auth_required    # submission: no MAIL before AUTH (RFC 6409 4.3)
        self.user: str | None = None          # who authenticated
        self.senders: frozenset[str] | None = None   # the MAIL FROM addresses the user may use; None: any
        self.helo: str | None = None      # the name the client gave in HELO/EHLO
        self.esmtp = False
        self.sender: str | None = None    # set by MAIL; None outside a transaction
        self.smtputf8 = False             # the transaction was opened with SMTPUTF8
        self.dsn = NO_MESSAGE_DSN         # MAIL FROM's RET and ENVID
        self.recipients: list[tuple[str, Any]] = []
        self.recipient_dsn: list[RecipientDsn] = []     # beside recipients
        self._asked_dsn = NO_RECIPIENT_DSN              # the last RCPT's, until the caller accepts it
        self.errors = 0
        self._buffer = bytearray()
        self._greeted = False
        self._closed = False
        self._skipping_long_line = False
        self._data: DataParser | None = None
        self._sasl: SaslExchange | None = None     # an AUTH exchange waiting for the client's next line
        self._events: deque = deque()       # decided, not yet handed out

    # -- input ---------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        if not self._closed:
            self._buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet looked at (the caller pauses reading above a limit)."""
        return len(self._buffer)

    # -- answers from the caller ----------------------------------------------------

    def accept_recipient(self, address: str, info: Any = None) -> None:
        """The last ``Recipient`` is accepted, as ``address`` (its DSN parameters go with it)."""
        self.recipients.append((address, info))
        self.recipient_dsn.append(self._asked_dsn)

    def tls_started(self) -> None:
        """The connection is now encrypted: the client starts over with EHLO (RFC 3207 4.2).

        What arrived in the clear after STARTTLS was dropped when it was read;
        the caller stops reading in the clear once it sees ``StartTls``, so
        anything received since is encrypted input and is kept."""
        self.tls_active = True
        self.helo = None
        self.esmtp = False
        self._reset()

    def authenticated(self, user: str, senders: frozenset[str] | None = None) -> None:
        """The password was right: the session belongs to ``user`` from now on."""
        self.user = user
        self.senders = senders

    # -- events --------------------------------------------------------------------

    def next_event(self):
        if not self._greeted:
            self._greeted = True
            return Reply(f"220 {self.hostname} ESMTP relaywatch")
        if self._events:
            return self._events.popleft()
        if self._closed:
            return NEED_DATA
        if self._data is not None:
            return self._next_body_event()
        line = self._next_line()
        if line is None:
            return NEED_DATA
        event = self._command(line) if self._sasl is None else self._sasl_response(line)
        if isinstance(event, Reply) and event.text[0] in "45" and not event.close:
            self.errors += 1
            if self.errors >= MAX_ERRORS:
                return self._close(f"421 4.7.0 {self.hostname} Too many errors; closing the connection")
        return event

    def _next_line(self) -> bytes | str | None:
        buf = self._buffer
        while True:
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) > MAX_COMMAND_LINE:
                    # Throw the start away now; the rest goes when its end arrives.
                    del buf[:-1]
                    self._skipping_long_line = True
                return None
            line = bytes(buf[:end])
            del buf[:end + 1]
            if self._skipping_long_line or len(line) > MAX_COMMAND_LINE:
                self._skipping_long_line = False
                return "500 5.5.2 Command line too long"
            return line[:-1] if line.endswith(b"\r") else line

    def _command(self, raw: bytes | str):
        if isinstance(raw, str):
            return Reply(raw)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return Reply("500 5.5.2 A command that is not UTF-8 (SMTPUTF8 allows UTF-8 addresses only)")
        if not line.isascii() and line[:4].upper() not in _UTF8_VERBS:
            return Reply("500 5.5.2 Non-ASCII characters are allowed only in MAIL and RCPT addresses (SMTPUTF8)")
        if "\0" in line:
            # Some servers drop NULs: what we pass on must read the same everywhere.
            return Reply("500 5.5.2 NUL character in a command")
        verb, _, arg = line.strip().partition(" ")
        verb = verb.upper()
        arg = arg.strip()
        handler = _HANDLERS.get(verb)
        if handler is None:
            if not verb:
                return Reply("500 5.5.2 Empty command")
            return Reply(f'500 5.5.2 Command not recognized: "{verb[:32]}"')
        return handler(self, arg)

    def _close(self, text: str) -> Reply:
        self._closed = True
        self._buffer.clear()
        return Reply(text, close=True)

    def _reset(self) -> None:
        self.sender = None
        self.smtputf8 = False
        self.dsn = NO_MESSAGE_DSN
        self.recipients = []
        self.recipient_dsn = []
        self._data = None

    # -- commands ------------------------------------------------------------------

    def _ehlo(self, arg: str) -> Reply:
        if not arg:
            return Reply("501 5.5.4 Syntax: EHLO hostname")
        self.helo, self.esmtp = arg.split()[0], True
        self._reset()
        lines = [self.hostname, f"SIZE {self.max_size}", "8BITMIME", "PIPELINING", "SMTPUTF8", "DSN",
                 "ENHANCEDSTATUSCODES"]
        if self.tls_available and not self.tls_active:
            lines.append("STARTTLS")
        if self.auth_available and self.tls_active and self.user is None:
            lines.append("AUTH " + " ".join(MECHANISMS))   # never in the clear (RFC 4954 4)
        return Reply("\r\n".join(f"250{'-' if i < len(lines) - 1 else ' '}{text}" for i, text in enumerate(lines)))

    def _helo(self, arg: str) -> Reply:
        if not arg:
            return Reply("501 5.5.4 Syntax: HELO hostname")
        self.helo, self.esmtp = arg.split()[0], False
        self._reset()
        return Reply(f"250 {self.hostname}")

    def _mail(self, arg: str) -> Reply:
        if self.helo is None:
            return Reply("503 5.5.1 Send HELO or EHLO first")
        if self.sender is not None:
            return Reply("503 5.5.1 Sender already given (RSET starts over)")
        if self.auth_required and self.user is None:
            if not self.tls_active:
                return Reply("530 5.7.0 Must issue a STARTTLS command first")
            return Reply("530 5.7.0 Authentication required")
        if arg[:5].upper() != "FROM:":
            return Reply("501 5.5.4 Syntax: MAIL FROM:<address>")
        address, rest = parse_path(arg[5:])
        if address is None:
            return Reply("501 5.1.7 Bad sender address syntax")
        try:
            params = parse_params(rest)
        except ParameterError as exc:
            return Reply(exc.reply)
        if params is None or (params and not self.esmtp):
            return Reply("501 5.5.4 Bad MAIL parameters")
        # AUTH=<mailbox> (RFC 4954 5) is accepted where AUTH is offered, and ignored:
        # the identity that counts is the session's.
        unknown = set(params) - MAIL_PARAMS - ({"AUTH"} if self.auth_available else set())
        if unknown:
            return Reply(f"555 5.5.4 Unsupported MAIL parameter: {sorted(unknown)[0]}")
        if params.get("SMTPUTF8"):
            return Reply("501 5.5.4 SMTPUTF8 takes no value")
        if not address.isascii() and "SMTPUTF8" not in params:
            return Reply(NEEDS_SMTPUTF8)
        if not rest.isascii():
            return Reply("501 5.5.4 Bad MAIL parameters (non-ASCII)")
        if "BODY" in params and params["BODY"].upper() not in ("7BIT", "8BITMIME"):
            return Reply("501 5.5.4 BODY must be 7BIT or 8BITMIME")
        if "SIZE" in params:
            if not params["SIZE"].isdigit():
                return Reply("501 5.5.4 SIZE must be a number")
            if int(params["SIZE"]) > self.max_size:
                return Reply(f"552 5.3.4 Message too big (the limit is {self.max_size} bytes)")
        try:
            dsn = dsn_params.parse_mail(params)
        except ParameterError as exc:
            return Reply(exc.reply)
        if self.user is not None and not sender_allowed(self.senders, address):
            return Reply(f"553 5.7.1 <{address}>: Sender address rejected: not owned by user {self.user}")
        self.sender = address
        self.smtputf8 = "SMTPUTF8" in params
        self.dsn = dsn
        self.recipients = []
        self.recipient_dsn = []
        return Reply("250 2.1.0 Sender OK")

    def _rcpt(self, arg: str):
        if self.sender is None:
            return Reply("503 5.5.1 Need MAIL command")
        if arg[:3].upper() != "TO:":
            return Reply("501 5.5.4 Syntax: RCPT TO:<address>")
        path = arg[3:].lstrip()
        address, rest = parse_path(path)
        if not address:
            return Reply("501 5.1.3 Bad recipient address syntax")
        try:
            params = parse_params(rest)
            if params is None or not rest.isascii():
                return Reply("555 5.5.4 RCPT parameters not recognized")
            if params and not self.esmtp:
                return Reply("555 5.5.4 RCPT parameters need EHLO")
            unknown = set(params) - RCPT_PARAMS
            if unknown:
                return Reply(f"555 5.5.4 Unsupported RCPT parameter: {sorted(unknown)[0][:32]}")
            dsn = dsn_params.parse_rcpt(params)
        except ParameterError as exc:
            return Reply(exc.reply)
        if not address.isascii() and not self.smtputf8:
            return Reply(NEEDS_SMTPUTF8)
        # parse_path took the source route off (RFC 5321 4.1.1.3); the policy decides about it.
        source_route = path[1:].partition(":")[0] if path.startswith("<@") else ""
        self._asked_dsn = dsn
        return Recipient(address, source_route, dsn)

    def _data_cmd(self, arg: str) -> Reply:
        if arg:
            return Reply("501 5.5.4 Syntax: DATA")
        if self.sender is None:
            return Reply("503 5.5.1 Need MAIL command")
        if not self.recipients:
            return Reply("554 5.5.1 No valid recipients")
        self._data = DataParser(self.max_size)
        self._events.append(MessageStart())
        return Reply("354 End data with <CR><LF>.<CR><LF>")

    def _next_body_event(self):
        if not self._buffer:
            return NEED_DATA
        parser = self._data
        data = bytes(self._buffer)
        self._buffer.clear()
        content = parser.feed(data)
        if parser.done:
            self._buffer += parser.leftover     # commands pipelined after the final dot
            self._events.append(MessageEnd(parser.problem, self.sender, tuple(self.recipients), self.user,
                                           self.smtputf8, self.helo, self.dsn,
                                           tuple(self.recipient_dsn) if any(self.recipient_dsn) else ()))
            self._reset()
        if content:
            return BodyData(content)
        return self.next_event()

    def _rset(self, arg: str) -> Reply:
        self._reset()
        return Reply("250 2.0.0 OK")

    def _noop(self, arg: str) -> Reply:
        return Reply("250 2.0.0 OK")

    def _quit(self, arg: str) -> Reply:
        return self._close("221 2.0.0 Bye")

    def _vrfy(self, arg: str) -> Reply:
        return Reply("252 2.5.2 Cannot verify the address; send the message and delivery will be tried")

    def _expn(self, arg: str) -> Reply:
        return Reply("502 5.5.1 EXPN is not offered")

    def _help(self, arg: str) -> Reply:
        return Reply("214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY"
                     + (" STARTTLS" if self.tls_available else "") + (" AUTH" if self.auth_available else ""))

    def _starttls(self, arg: str):
        if arg:
            return Reply("501 5.5.4 Syntax: STARTTLS")
        if self.tls_active:
            return Reply("503 5.5.1 TLS is already active")
        if not self.tls_available:
            return Reply("454 4.7.0 TLS is not available (no certificate configured)")
        # Anything pipelined after STARTTLS was sent in the clear: drop it.
        self._buffer.clear()
        self._events.append(StartTls())
        return Reply("220 2.0.0 Ready to start TLS")

    def _auth(self, arg: str):
        if not self.auth_available:
            return Reply("503 5.5.1 AUTH is not offered; relaying is allowed by client address")
        if self.helo is None or not self.esmtp:
            return Reply("503 5.5.1 Send EHLO first")
        if self.user is not None:
            return Reply("503 5.5.1 Already authenticated")
        if self.sender is not None:
            return Reply("503 5.5.1 AUTH is not allowed during a mail transaction")
        if not self.tls_active:
            return Reply("538 5.7.11 Encryption required for requested authentication mechanism"
                         " (STARTTLS first)")
        mechanism, _, initial = arg.partition(" ")
        mechanism, initial = mechanism.upper(), initial.strip()
        if mechanism not in MECHANISMS:
            return Reply(f"504 5.5.4 Unrecognized authentication type (offered: {' '.join(MECHANISMS)})")
        self._sasl = SaslExchange(mechanism)
        return self._sasl_step(self._sasl.start(initial))

    def _sasl_response(self, raw: bytes | str):
        """The client's answer to a 334."""
        return self._sasl_step(self._sasl.respond(raw))

    def _sasl_step(self, event):
        if self._sasl.done:
            self._sasl = None
        return event

    def _bdat(self, arg: str) -> Reply:
        return Reply("502 5.5.1 BDAT is not offered (CHUNKING is not advertised)")


_HANDLERS = {
    "EHLO": Conversation._ehlo, "HELO": Conversation._helo, "MAIL": Conversation._mail,
    "RCPT": Conversation._rcpt, "DATA": Conversation._data_cmd, "RSET": Conversation._rset,
    "NOOP": Conversation._noop, "QUIT": Conversation._quit, "VRFY": Conversation._vrfy,
    "EXPN": Conversation._expn, "HELP": Conversation._help, "STARTTLS": Conversation._starttls,
    "AUTH": Conversation._auth, "BDAT": Conversation._bdat,
}
