"""The SMTP server conversation (receive/conversation.py, envelope.py), bytes in, events out: no sockets."""

import pytest

import base64

from relaywatch.receive.conversation import MAX_COMMAND_LINE, MAX_ERRORS, Conversation
from relaywatch.receive.conversation_events import (NEED_DATA, Authenticate, BodyData, MessageEnd, MessageStart,
                                                    Recipient, Reply, StartTls)
from relaywatch.receive.sasl import AUTH_SUCCEEDED
from relaywatch.receive.envelope import parse_path, sender_allowed


def talk(conv: Conversation, data: bytes, accept=lambda address: "@" in address) -> list:
    """Feed ``data``; return the events, answering RCPT as a policy would."""
    conv.receive(data)
    events = []
    while (event := conv.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, Recipient) and accept(event.address):
            conv.accept_recipient(event.address, "route")
    return events


def codes(events) -> list[str]:
    return [e.text[:3] for e in events if isinstance(e, Reply)]


def session(tls: bool = False, max_size: int = 1000) -> Conversation:
    conv = Conversation("relay.test", max_size, tls_available=tls)
    assert talk(conv, b"") == [Reply("220 relay.test ESMTP relaywatch")]
    return conv


def in_transaction() -> Conversation:
    conv = session()
    assert codes(talk(conv, b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n")) == ["250", "250"]
    return conv


# -- commands one by one: (what the client sends after EHLO, the reply codes) -------------------

@pytest.mark.parametrize("lines, expected", [
    (b"NOOP\r\n", ["250"]),
    (b"RSET\r\n", ["250"]),
    (b"VRFY alice\r\n", ["252"]),
    (b"EXPN staff\r\n", ["502"]),
    (b"HELP\r\n", ["214"]),
    (b"AUTH PLAIN AGFiAGM=\r\n", ["503"]),
    (b"BDAT 10 LAST\r\n", ["502"]),
    (b"FROB\r\n", ["500"]),
    (b"\r\n", ["500"]),
    (b"MAIL FROM:<caf\xc3\xa9@client.test>\r\n", ["553"]),          # UTF-8 without SMTPUTF8 (RFC 6531 3.5)
    (b"MAIL FROM:<caf\xc3\xa9@client.test> SMTPUTF8\r\n", ["250"]),
    (b"MAIL FROM:<a@client.test> SMTPUTF8 BODY=8BITMIME\r\n", ["250"]),
    (b"MAIL FROM:<a@client.test> SMTPUTF8=yes\r\n", ["501"]),       # the keyword takes no value
    (b"MAIL FROM:<caf\xe9@client.test> SMTPUTF8\r\n", ["500"]),      # Latin-1, not UTF-8
    (b"MAIL FROM:<a@client.test> S\xc3\x89ZE=1\r\n", ["501"]),      # a non-ASCII parameter
    (b"MAIL FROM:<a@client.test>\r\nRCPT TO:<\xce\xb4@\xcf\x80.test>\r\n", ["250", "553"]),
    (b"MAIL FROM:<a@client.test> SMTPUTF8\r\nRCPT TO:<\xce\xb4@\xcf\x80.test>\r\n", ["250"]),  # a Recipient
    (b"MAIL FROM:<a@client.test> SMTPUTF8\r\nRSET\r\nMAIL FROM:<a@client.test>\r\n"
     b"RCPT TO:<\xce\xb4@c.test>\r\n", ["250", "250", "250", "553"]),   # RSET forgets SMTPUTF8
    (b"NOOP caf\xc3\xa9\r\n", ["500"]),                               # UTF-8 only in MAIL and RCPT
    (b"RCPT TO:<x@contoso.test>\r\n", ["503"]),                      # no MAIL yet
    (b"DATA\r\n", ["503"]),
    (b"MAIL TO:<a@client.test>\r\n", ["501"]),
    (b"MAIL FROM:a@client.test\r\n", ["250"]),                       # brackets left out, as Postfix allows
    (b"MAIL FROM:<not an address>\r\n", ["501"]),
    (b"MAIL FROM:<a@client.test> SIZE=1001\r\n", ["552"]),
    (b"MAIL FROM:<a@client.test> SIZE=1000 BODY=8BITMIME\r\n", ["250"]),
    (b"MAIL FROM:<a@client.test> SIZE=many\r\n", ["501"]),
    (b"MAIL FROM:<a@client.test> BODY=BINARYMIME\r\n", ["501"]),
    (b"MAIL FROM:<a@client.test> RET=HDRS\r\n", ["250"]),            # DSN (RFC 3461): tests/unit/test_dsn_params.py
    (b"MAIL FROM:<a@client.test> FROB=1\r\n", ["555"]),              # an unknown parameter
    (b"MAIL FROM:<a@client.test>\r\nMAIL FROM:<b@client.test>\r\n", ["250", "503"]),
    (b"MAIL FROM:<a@client.test>\r\nRCPT TO:<x@contoso.test> NOTIFY=NEVER\r\n", ["250"]),   # a Recipient
    (b"MAIL FROM:<a@client.test>\r\nRCPT TO:<x@contoso.test> FROB\r\n", ["250", "555"]),
    (b"MAIL FROM:<a@client.test>\r\nRCPT TO:<>\r\n", ["250", "501"]),
    (b"MAIL FROM:<a@client.test>\r\nDATA\r\n", ["250", "554"]),      # no recipient accepted
    (b"MAIL FROM:<a@client.test>\r\nRCPT TO:<x@contoso.test>\r\nDATA now\r\n", ["250", "501"]),
    (b"MAIL FROM:<a@client.test>\r\nRSET\r\nRCPT TO:<x@contoso.test>\r\n", ["250", "250", "503"]),
    (b"STARTTLS\r\n", ["454"]),                                      # no certificate
    (b"EHLO\r\n", ["501"]),
    (b"HELO\r\n", ["501"]),
])
def test_command_replies(lines, expected):
    conv = session()
    talk(conv, b"EHLO client.test\r\n")
    assert codes(talk(conv, lines)) == expected


def test_every_reply_has_an_enhanced_status_code():
    conv = session()
    events = talk(conv, b"EHLO c\r\nNOOP\r\nFROB\r\nMAIL FROM:<a@b.test> RET=FULL\r\nDATA\r\nSTARTTLS\r\nQUIT\r\n")
    for reply in events[1:]:
        assert reply.text[4:5].isdigit() and reply.text[5] == ".", reply.text


def test_mail_needs_helo_first_and_params_need_ehlo():
    conv = session()
    assert codes(talk(conv, b"MAIL FROM:<a@client.test>\r\n")) == ["503"]
    assert codes(talk(conv, b"HELO client.test\r\n")) == ["250"]
    assert conv.esmtp is False
    assert codes(talk(conv, b"MAIL FROM:<a@client.test> SIZE=10\r\n")) == ["501"]
    assert codes(talk(conv, b"MAIL FROM:<a@client.test>\r\n")) == ["250"]


def test_ehlo_lists_the_extensions_and_starttls_only_when_possible():
    plain = session()
    [reply] = talk(plain, b"EHLO client.test\r\n")
    assert reply.text.split("\r\n") == ["250-relay.test", "250-SIZE 1000", "250-8BITMIME", "250-PIPELINING",
                                        "250-SMTPUTF8", "250-DSN", "250 ENHANCEDSTATUSCODES"]
    assert plain.helo == "client.test" and plain.esmtp
    tls = session(tls=True)
    [reply] = talk(tls, b"EHLO client.test\r\n")
    assert reply.text.endswith("250-ENHANCEDSTATUSCODES\r\n250 STARTTLS")


@pytest.mark.parametrize("text, address, rest", [
    ("<a@b.test>", "a@b.test", ""),
    ("<a@b.test> SIZE=10", "a@b.test", " SIZE=10"),
    (" <first.last+tag@sub.b.test>", "first.last+tag@sub.b.test", ""),
    ('<"john doe"@b.test>', '"john doe"@b.test', ""),
    ("<@relay.test,@other.test:a@b.test>", "a@b.test", ""),       # source route, ignored (RFC 5321 4.1.1.3)
    ("<a@[192.0.2.1]>", "a@[192.0.2.1]", ""),
    ("<postmaster>", "postmaster", ""),
    ("<>", "", ""),
    ("a@b.test", "a@b.test", ""),
    ("<a@b.test", None, "<a@b.test"),
    ("<a..b@b.test>", None, "<a..b@b.test>"),
    ("<a@-b.test>", None, "<a@-b.test>"),
    ("<δοκιμή@παράδειγμα.test> SMTPUTF8", "δοκιμή@παράδειγμα.test", " SMTPUTF8"),   # RFC 6531 3.3
    ('<"δο κιμή"@b.test>', '"δο κιμή"@b.test', ""),
    ("<δοκιμή@-παράδειγμα.test>", None, "<δοκιμή@-παράδειγμα.test>"),
])
def test_paths(text, address, rest):
    assert parse_path(text) == (address, rest)


# -- the message -----------------------------------------------------------------------------

def test_a_whole_transaction_with_pipelined_commands_around_the_body():
    conv = session()
    events = talk(conv, b"EHLO client.test\r\nMAIL FROM:<>\r\nRCPT TO:<x@contoso.test>\r\n"
                        b"RCPT TO:<y@contoso.test>\r\nDATA\r\n",
                  accept=lambda a: a.startswith("x"))
    assert codes(events) == ["250", "250", "354"]
    assert events[-2:] == [Reply("354 End data with <CR><LF>.<CR><LF>"), MessageStart()]
    events = talk(conv, b"Subject: hi\r\n\r\n..leading dot\r\n.\r\nNOOP\r\n")
    assert events[0] == BodyData(b"Subject: hi\r\n\r\n.leading dot\r\n")
    assert events[1] == MessageEnd(None, "", (("x@contoso.test", "route"),), helo="client.test")
    assert codes(events[2:]) == ["250"]        # the NOOP sent after the dot
    assert conv.sender is None and conv.recipients == []


@pytest.mark.parametrize("body, problem", [
    (b"bare\nLF\r\n.\r\n", "554 5.6.11"),
    (b"x" * 1200 + b"\r\n.\r\n", "552 5.3.4"),
])
def test_refused_content_ends_with_the_reason(body, problem):
    conv = in_transaction()
    talk(conv, b"RCPT TO:<x@contoso.test>\r\nDATA\r\n")
    events = talk(conv, body)
    assert isinstance(events[-1], MessageEnd) and events[-1].problem.startswith(problem)
    assert codes(talk(conv, b"RCPT TO:<x@contoso.test>\r\n")) == ["503"]   # the transaction is over


def test_the_same_events_whatever_the_chunks():
    wire = (b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<x@contoso.test>\r\nDATA\r\n"
            b"Subject: s\r\n\r\nline\r\n..dot\r\n.\r\nQUIT\r\n")
    whole = session()
    expected = talk(whole, wire)

    def merged(events):
        body = b"".join(e.data for e in events if isinstance(e, BodyData))
        return [e for e in events if not isinstance(e, BodyData)], body
    for size in (1, 2, 3, 7, 64):
        conv = session()
        events = []
        for start in range(0, len(wire), size):
            events += talk(conv, wire[start:start + size])
        assert merged(events) == merged(expected), size


# -- limits and hanging up ---------------------------------------------------------------------

def test_a_command_line_too_long_is_refused_and_the_session_goes_on():
    conv = session()
    talk(conv, b"EHLO c.test\r\n")
    assert talk(conv, b"NOOP " + b"x" * MAX_COMMAND_LINE) == []      # still waiting for its end
    assert codes(talk(conv, b"x" * 100 + b"\r\nNOOP\r\n")) == ["500", "250"]


def test_quit_closes_and_later_input_is_ignored():
    conv = session()
    events = talk(conv, b"QUIT\r\nNOOP\r\n")
    assert events == [Reply("221 2.0.0 Bye", close=True)]
    assert talk(conv, b"NOOP\r\n") == []


def test_too_many_errors_close_the_connection():
    conv = session()
    events = talk(conv, b"FROB\r\n" * MAX_ERRORS + b"NOOP\r\n")
    assert codes(events) == ["500"] * (MAX_ERRORS - 1) + ["421"]
    assert events[-1].close


# -- STARTTLS ------------------------------------------------------------------------------

def test_starttls_drops_what_was_pipelined_in_the_clear_and_starts_over():
    conv = session(tls=True)
    talk(conv, b"EHLO c.test\r\n")
    events = talk(conv, b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
    assert events == [Reply("220 2.0.0 Ready to start TLS"), StartTls()]
    # Input that arrives before the caller reports the handshake done is encrypted input: kept.
    conv.receive(b"EHLO c.test\r\n")
    conv.tls_started()
    [reply] = talk(conv, b"")
    assert "STARTTLS" not in reply.text and conv.tls_active
    assert codes(talk(conv, b"STARTTLS\r\n")) == ["503"]


def test_after_starttls_the_client_must_say_ehlo_again():
    conv = session(tls=True)
    talk(conv, b"EHLO c.test\r\nSTARTTLS\r\n")
    conv.tls_started()
    assert codes(talk(conv, b"MAIL FROM:<a@c.test>\r\n")) == ["503"]


# -- SMTP smuggling: no ending but CRLF . CRLF ends DATA, however it arrives ---------------

SMUGGLED = b"MAIL FROM:<evil@evil.test>\r\nRCPT TO:<x@contoso.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nx"
ENDINGS = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\n.\r", b"\r\n\r.\r\n",
           b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\r\n\x00.\x00\r\n", b"\r\n\x00\r\n.\n"]


@pytest.mark.parametrize("ending", ENDINGS, ids=repr)
@pytest.mark.parametrize("chunk", [1, 5, 10_000])
def test_a_smuggled_end_of_data_never_ends_the_message(ending, chunk):
    conv = in_transaction()
    talk(conv, b"RCPT TO:<x@contoso.test>\r\nDATA\r\n")
    wire = b"Subject: innocent\r\n\r\nhello" + ending + SMUGGLED + b"\r\n.\r\nNOOP\r\n"
    events = []
    for start in range(0, len(wire), chunk):
        events += talk(conv, wire[start:start + chunk])
    ends = [e for e in events if isinstance(e, MessageEnd)]
    # One message, refused whole; the smuggled MAIL/RCPT/DATA were never commands.
    assert len(ends) == 1 and ends[0].problem.startswith("554 5.6."), events
    assert not any(isinstance(e, (Recipient, MessageStart)) for e in events)
    assert events[-1] == Reply("250 2.0.0 OK") and codes(events) == ["250"]    # the NOOP after the real end
    assert b"".join(e.data for e in events if isinstance(e, BodyData)).count(b"smuggled") <= 1


def test_nul_in_a_command_is_refused():
    conv = session()
    talk(conv, b"EHLO c.test\r\n")
    assert [e.text for e in talk(conv, b"HELO a\x00b\r\nNOOP\x00\r\n")] == ["500 5.5.2 NUL character in a command"] * 2
    assert conv.helo == "c.test"


@pytest.mark.parametrize("line, event", [
    (b"RCPT TO:<@a.test,@b.test:user@c.test>\r\n", Recipient("user@c.test", "@a.test,@b.test")),
    (b"RCPT TO: <@a.test:user@c.test>\r\n", Recipient("user@c.test", "@a.test")),
    (b"RCPT TO:<user@c.test>\r\n", Recipient("user@c.test", "")),
    (b"RCPT TO:<Postmaster>\r\n", Recipient("Postmaster", "")),
])
def test_a_source_route_is_split_off_for_the_policy(line, event):
    conv = in_transaction()
    assert talk(conv, line, accept=lambda a: False) == [event]


# -- AUTH (RFC 4954) ------------------------------------------------------------------------

def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


PLAIN_ALICE = b64("\0alice\0secret")


def auth_session(*, tls_active=True, required=False, tls=True) -> Conversation:
    """A session on a port with users, after EHLO (encrypted unless ``tls_active`` is False)."""
    conv = Conversation("relay.test", 1000, tls_available=tls, tls_active=tls_active, auth_available=True,
                        auth_required=required)
    talk(conv, b"")
    talk(conv, b"EHLO client.test\r\n")
    return conv


def auth_talk(conv: Conversation, data: bytes, password="secret", senders=None) -> list:
    """As ``talk``, answering Authenticate as the caller would (password right for "alice")."""
    conv.receive(data)
    out = []
    while (event := conv.next_event()) is not NEED_DATA:
        out.append(event)
        if isinstance(event, Authenticate):
            if event.username == "alice" and event.password == password:
                conv.authenticated("alice", senders)
                out.append(Reply(AUTH_SUCCEEDED))
            else:
                out.append(Reply("535 5.7.8 Authentication credentials invalid"))
        if isinstance(event, Recipient):
            conv.accept_recipient(event.address, "route")
    return out


# (what the client sends, the events: Authenticate shown as ("PLAIN"/"LOGIN", user), replies by code)
AUTH_EXCHANGES = [
    ("PLAIN with an initial response", b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n", [("PLAIN", "alice"), "235"]),
    ("PLAIN after an empty 334 challenge", b"AUTH PLAIN\r\n" + PLAIN_ALICE + b"\r\n",
     ["334", ("PLAIN", "alice"), "235"]),
    ("PLAIN with authzid equal to the user", b"AUTH PLAIN " + b64("alice\0alice\0secret") + b"\r\n",
     [("PLAIN", "alice"), "235"]),
    ("PLAIN acting for another user: refused without a check",
     b"AUTH PLAIN " + b64("bob\0alice\0secret") + b"\r\n", ["535"]),
    ("PLAIN wrong password", b"AUTH PLAIN " + b64("\0alice\0guess") + b"\r\n", [("PLAIN", "alice"), "535"]),
    ("mechanism names are case-insensitive", b"auth plain " + PLAIN_ALICE + b"\r\n", [("PLAIN", "alice"), "235"]),
    ("LOGIN's two 334 prompts", b"AUTH LOGIN\r\n" + b64("alice") + b"\r\n" + b64("secret") + b"\r\n",
     ["334", "334", ("LOGIN", "alice"), "235"]),
    ("LOGIN with the user name on the AUTH line", b"AUTH LOGIN " + b64("alice") + b"\r\n" + b64("secret") + b"\r\n",
     ["334", ("LOGIN", "alice"), "235"]),
    ("* cancels PLAIN", b"AUTH PLAIN\r\n*\r\n", ["334", "501"]),
    ("* cancels LOGIN at the password", b"AUTH LOGIN\r\n" + b64("alice") + b"\r\n*\r\nNOOP\r\n",
     ["334", "334", "501", "250"]),
    ("bad base64 in the initial response", b"AUTH PLAIN !!!!\r\n", ["501"]),
    ("bad base64 after a challenge", b"AUTH LOGIN\r\nnot base64\r\nNOOP\r\n", ["334", "501", "250"]),
    ("PLAIN without two NULs", b"AUTH PLAIN " + b64("alice secret") + b"\r\n", ["501"]),
    ("PLAIN with an empty initial response (=)", b"AUTH PLAIN =\r\n", ["501"]),
    ("an unknown mechanism", b"AUTH CRAM-MD5\r\n", ["504"]),
    ("AUTH twice", b"AUTH PLAIN " + PLAIN_ALICE + b"\r\nAUTH PLAIN " + PLAIN_ALICE + b"\r\n",
     [("PLAIN", "alice"), "235", "503"]),
    ("AUTH in a transaction", b"MAIL FROM:<a@client.test>\r\nAUTH PLAIN " + PLAIN_ALICE + b"\r\n", ["250", "503"]),
    ("a response line too long ends the exchange", b"AUTH LOGIN\r\n" + b"A" * (MAX_COMMAND_LINE + 10) + b"\r\nNOOP\r\n",
     ["334", "500", "250"]),
    ("MAIL AUTH= is accepted where AUTH is offered", b"MAIL FROM:<a@client.test> AUTH=<>\r\n", ["250"]),
]


def shown(events) -> list:
    return [(e.mechanism, e.username) if isinstance(e, Authenticate) else e.text[:3] for e in events]


@pytest.mark.parametrize("what, wire, expected", AUTH_EXCHANGES, ids=[a[0] for a in AUTH_EXCHANGES])
def test_auth_exchanges(what, wire, expected):
    conv = auth_session()
    assert shown(auth_talk(conv, wire)) == expected


def test_auth_gives_the_password_to_the_caller_and_the_user_to_the_message():
    conv = auth_session()
    events = auth_talk(conv, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
    assert events[0] == Authenticate("PLAIN", "alice", "secret") and "secret" not in repr(events[0])
    assert conv.user == "alice"
    events = auth_talk(conv, b"MAIL FROM:<a@c.test>\r\nRCPT TO:<x@contoso.test>\r\nDATA\r\nhi\r\n.\r\n")
    assert [e for e in events if isinstance(e, MessageEnd)][0].user == "alice"


@pytest.mark.parametrize("what, conv_args, wire, expected", [
    ("before EHLO", {}, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n", ["503"]),
    ("after HELO (AUTH is ESMTP)", {}, b"HELO c\r\nAUTH PLAIN " + PLAIN_ALICE + b"\r\n", ["250", "503"]),
    ("in the clear where STARTTLS is possible", {"tls_active": False},
     b"EHLO c\r\nAUTH PLAIN " + PLAIN_ALICE + b"\r\n", ["250", "538"]),
    ("submission: MAIL before STARTTLS", {"tls_active": False, "required": True},
     b"EHLO c\r\nMAIL FROM:<a@c.test>\r\n", ["250", "530"]),
    ("submission: MAIL before AUTH", {"required": True}, b"EHLO c\r\nMAIL FROM:<a@c.test>\r\n", ["250", "530"]),
    ("submission: MAIL after AUTH", {"required": True},
     b"EHLO c\r\nAUTH PLAIN " + PLAIN_ALICE + b"\r\nMAIL FROM:<a@c.test>\r\n", ["250", ("PLAIN", "alice"), "235", "250"]),
])
def test_auth_order(what, conv_args, wire, expected):
    conv = Conversation("relay.test", 1000, tls_available=True, auth_available=True,
                        tls_active=conv_args.get("tls_active", True), auth_required=conv_args.get("required", False))
    talk(conv, b"")
    assert shown(auth_talk(conv, wire)) == expected


def test_submission_replies_say_what_is_missing():
    conv = auth_session(tls_active=False, required=True)
    assert [e.text for e in auth_talk(conv, b"MAIL FROM:<a@c.test>\r\n")] == [
        "530 5.7.0 Must issue a STARTTLS command first"]
    conv = auth_session(required=True)
    assert [e.text for e in auth_talk(conv, b"MAIL FROM:<a@c.test>\r\n")] == ["530 5.7.0 Authentication required"]
    [reply] = auth_talk(auth_session(tls_active=False), b"AUTH LOGIN\r\n")
    assert reply.text.startswith("538 5.7.11 ")


def test_auth_is_offered_only_when_encrypted_and_not_after_it_succeeded():
    clear = Conversation("relay.test", 1000, tls_available=True, auth_available=True)
    talk(clear, b"")
    [reply] = talk(clear, b"EHLO c\r\n")
    assert "AUTH" not in reply.text and "STARTTLS" in reply.text
    talk(clear, b"STARTTLS\r\n")
    clear.tls_started()
    [reply] = talk(clear, b"EHLO c\r\n")
    assert reply.text.endswith("250 AUTH PLAIN LOGIN")
    auth_talk(clear, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
    [reply] = talk(clear, b"EHLO c\r\n")
    assert "AUTH" not in reply.text and clear.user == "alice"     # EHLO again keeps the login
    implicit = auth_session()
    assert implicit.tls_active
    no_users = Conversation("relay.test", 1000, tls_available=True, tls_active=True)
    talk(no_users, b"")
    [reply] = talk(no_users, b"EHLO c\r\n")
    assert "AUTH" not in reply.text
    assert codes(talk(no_users, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")) == ["503"]
    plain = session()
    assert codes(talk(plain, b"EHLO c\r\nMAIL FROM:<a@c.test> AUTH=<>\r\n")) == ["250", "555"]  # not offered


@pytest.mark.parametrize("senders, address, allowed", [
    (None, "anyone@anywhere.test", True),
    (frozenset({"alice@contoso.test"}), "alice@contoso.test", True),
    (frozenset({"alice@contoso.test"}), "Alice@Contoso.TEST", True),
    (frozenset({"alice@contoso.test"}), "bob@contoso.test", False),
    (frozenset({"@contoso.test"}), "bob@contoso.test", True),
    (frozenset({"@contoso.test"}), "bob@sub.contoso.test", False),
    (frozenset({"@contoso.test"}), "bob@evilcontoso.test", False),
    (frozenset({"alice@contoso.test"}), "", True),              # the null sender, as Postfix
    (frozenset({"alice@contoso.test"}), "alice", False),
])
def test_sender_allowed(senders, address, allowed):
    assert sender_allowed(senders, address) is allowed


def test_a_restricted_user_is_refused_other_senders_with_553():
    conv = auth_session()
    auth_talk(conv, b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n", senders=frozenset({"@contoso.test"}))
    events = auth_talk(conv, b"MAIL FROM:<ceo@fabrikam.test>\r\nMAIL FROM:<alice@contoso.test>\r\n")
    assert [e.text for e in events] == [
        "553 5.7.1 <ceo@fabrikam.test>: Sender address rejected: not owned by user alice",
        "250 2.1.0 Sender OK"]


def test_smtputf8_travels_with_the_message_and_the_utf8_address_is_kept_exactly():
    conv = session()
    events = talk(conv, "EHLO c\r\nMAIL FROM:<δοκιμή@παράδειγμα.test> SMTPUTF8\r\n"
                        "RCPT TO:<Δοκιμή@ΠΑΡΆΔΕΙΓΜΑ.test>\r\nDATA\r\nhi\r\n.\r\n".encode())
    assert Recipient("Δοκιμή@ΠΑΡΆΔΕΙΓΜΑ.test") in events     # as sent: route.normalize maps the domain
    [end] = [e for e in events if isinstance(e, MessageEnd)]
    assert end.smtputf8 and end.sender == "δοκιμή@παράδειγμα.test"
    talk(conv, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@c.test>\r\nDATA\r\nhi\r\n.\r\n")
    assert not conv.smtputf8
