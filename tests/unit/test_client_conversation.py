"""The SMTP client conversation (smtpclient/conversation.py), bytes in, events out: no sockets.

Each test plays the server as a byte script and checks the events and the bytes
the conversation sends, as tests/unit/test_conversation.py does for the server side.
"""

import itertools

import pytest

from relaywatch.classify.observation import Phase
from relaywatch.dsn_params import MessageDsn, RecipientDsn
from relaywatch.errors import LocalProtocolError, ProtocolError, RelaywatchError, RemoteProtocolError
from relaywatch.smtpclient.conversation import MAX_REPLY_LINE, ClientConversation
from relaywatch.smtpclient.events import (
    END_OF_BODY, NEED_DATA, QUIT, RSET, SEND_BODY, TLS_STARTED, Body, Failed, Mail, Rcpt, Ready, Replied,
    Transaction, TransactionReplies,
)
from relaywatch.smtpclient.protocol import Reply
from relaywatch.smtpclient.states import (
    ANSWERS, BROKEN, PHASE, REPLY_TRANSITIONS, SEND_TRANSITIONS, Answer, ClientState,
)

S = ClientState
GREET = b"220 mx.test ESMTP\r\n"
EHLO_PLAIN = b"250-mx.test\r\n250-SIZE 1000000\r\n250 8BITMIME\r\n"
EHLO_PIPELINING = b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250 8BITMIME\r\n"
EHLO_TLS = b"250-mx.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"


def talk(conv: ClientConversation, data: bytes) -> list:
    """Feed ``data``; return the events until the conversation needs more."""
    conv.receive_data(data)
    events = []
    while (event := conv.next_event()) is not NEED_DATA:
        events.append(event)
        if event is SEND_BODY:
            break
    return events


def kinds(events) -> list[str]:
    return [e.name if e is SEND_BODY else type(e).__name__ for e in events]


def opened(ehlo: bytes = EHLO_PIPELINING) -> ClientConversation:
    conv = ClientConversation("relay.test", tls_mode="none")
    assert kinds(talk(conv, GREET + ehlo)) == ["Greeting", "Capabilities", "Ready"]
    assert conv.data_to_send() == b"EHLO relay.test\r\n"
    assert conv.state is S.READY
    return conv


# -- opening the session: (TLS mode, the server's script, the events, what we sent) ------------

@pytest.mark.parametrize("mode, script, events, sent", [
    ("none", GREET + EHLO_PLAIN, ["Greeting", "Capabilities", "Ready"], b"EHLO relay.test\r\n"),
    ("none", GREET + EHLO_TLS, ["Greeting", "Capabilities", "Ready"], b"EHLO relay.test\r\n"),   # TLS not wanted
    ("none", b"554 5.7.1 go away\r\n", ["Failed"], b""),
    ("none", b"421-4.3.2 busy\r\n421 4.3.2 try later\r\n", ["Failed"], b""),
    # an old server: EHLO unknown, HELO accepted (RFC 5321 3.2)
    ("none", GREET + b"502 5.5.2 what?\r\n250 mx.test\r\n", ["Greeting", "Capabilities", "Ready"],
     b"EHLO relay.test\r\nHELO relay.test\r\n"),
    ("none", GREET + b"500 no\r\n550 no either\r\n", ["Greeting", "Failed"],
     b"EHLO relay.test\r\nHELO relay.test\r\n"),
    ("none", GREET + b"421 4.7.0 not now\r\n", ["Greeting", "Failed"], b"EHLO relay.test\r\n"),   # 4xx: no HELO
    ("opportunistic", GREET + EHLO_PLAIN, ["Greeting", "Capabilities", "Ready"], b"EHLO relay.test\r\n"),
    ("opportunistic", GREET + EHLO_TLS + b"454 4.7.0 TLS not available\r\n", ["Greeting", "Capabilities", "Ready"],
     b"EHLO relay.test\r\nSTARTTLS\r\n"),
    ("opportunistic", GREET + EHLO_TLS + b"220 2.0.0 go ahead\r\n", ["Greeting", "Capabilities", "NeedTls"],
     b"EHLO relay.test\r\nSTARTTLS\r\n"),
    ("required", GREET + EHLO_TLS + b"220 2.0.0 go ahead\r\n", ["Greeting", "Capabilities", "NeedTls"],
     b"EHLO relay.test\r\nSTARTTLS\r\n"),
    ("required", GREET + EHLO_PLAIN, ["Greeting", "Capabilities", "TlsNotOffered"], b"EHLO relay.test\r\n"),
    ("required", GREET + b"502 no\r\n250 mx.test\r\n", ["Greeting", "Capabilities", "TlsNotOffered"],
     b"EHLO relay.test\r\nHELO relay.test\r\n"),
    ("required", GREET + EHLO_TLS + b"454 4.7.0 TLS not available\r\n", ["Greeting", "Capabilities", "Failed"],
     b"EHLO relay.test\r\nSTARTTLS\r\n"),
])
def test_opening_the_session(mode, script, events, sent):
    conv = ClientConversation("relay.test", tls_mode=mode)
    out, got = b"", []
    for line in script.splitlines(keepends=True):   # one reply line at a time, as a server would answer
        got += talk(conv, line)
        out += conv.data_to_send()
    assert kinds(got) == events
    assert out == sent
    end = {"Ready": S.READY, "NeedTls": S.TLS, "Failed": S.MUST_CLOSE, "TlsNotOffered": S.MUST_CLOSE}[events[-1]]
    assert conv.state is end
    if end is S.MUST_CLOSE:
        assert conv.send(QUIT) == b"QUIT\r\n" and conv.state is S.CLOSED


def test_a_refusal_says_which_phase_and_what_was_said():
    conv = ClientConversation("relay.test", tls_mode="none")
    [failed] = talk(conv, b"554 5.7.1 <relay.test> blocked\r\n")
    assert conv.greeting is failed.reply
    assert (failed.phase, failed.reply.code, failed.reply.enhanced) == (Phase.GREETING, 554, "5.7.1")
    conv = ClientConversation("relay.test", tls_mode="required")
    *_, failed = talk(conv, GREET + EHLO_TLS + b"454 4.7.0 TLS not available\r\n")
    assert failed == Failed(Phase.STARTTLS, failed.reply) and failed.reply.code == 454


def test_starttls_starts_over_with_ehlo_and_drops_what_came_in_the_clear():
    conv = ClientConversation("relay.test", tls_mode="required")
    # A man in the middle appends a reply after the 220: it must not be read as the answer to the next EHLO.
    assert kinds(talk(conv, GREET + EHLO_TLS + b"220 go ahead\r\n250-injected\r\n250 PIPELINING\r\n")) == [
        "Greeting", "Capabilities", "NeedTls"]
    conv.data_to_send()
    assert conv.send(TLS_STARTED) == b""
    assert conv.data_to_send() == b"EHLO relay.test\r\n"
    assert talk(conv, b"") == []
    assert conv.tls_active and conv.extensions == {}
    caps, ready = talk(conv, b"250-mx.test\r\n250-SIZE 1000\r\n250 STARTTLS\r\n")
    assert (caps.extensions, ready) == ({"SIZE": "1000", "STARTTLS": ""}, Ready())
    assert conv.data_to_send() == b""           # no second STARTTLS


def test_capabilities_are_the_ehlo_keywords():
    conv = ClientConversation("relay.test", tls_mode="none")
    _, caps, _ = talk(conv, GREET + b"250-mx.test hello\r\n250-pipelining\r\n250-SIZE 1000\r\n250 AUTH PLAIN LOGIN\r\n")
    assert caps.extensions == {"PIPELINING": "", "SIZE": "1000", "AUTH": "PLAIN LOGIN"}
    assert conv.pipelining and conv.esmtp


# -- transactions ------------------------------------------------------------------------------

BODY = b"Subject: s\r\n\r\n.leading dot\r\nend"


def transact(ehlo: bytes, replies: list[bytes], recipients=("b@partner.test", "c@partner.test")):
    """Run one transaction, the server answering each write with the next reply
    script; return (the writes we made, the end event, the conversation)."""
    conv = opened(ehlo)
    writes = [conv.send(Transaction("a@contoso.test", list(recipients), size=len(BODY)))]
    replies = list(replies)
    while True:
        events = talk(conv, replies.pop(0)) if replies else []
        if events and events[-1] is SEND_BODY:
            writes.append(conv.send(Body(BODY)) + conv.send(END_OF_BODY))
            continue
        if events:
            [end] = events
            assert isinstance(end, TransactionReplies)
            assert conv.data_to_send() == b""
            return writes, end, conv
        out = conv.data_to_send()
        assert out, "the conversation waits for a reply the script does not have"
        writes.append(out)


MAIL = b"MAIL FROM:<a@contoso.test> SIZE=%d BODY=8BITMIME\r\n" % len(BODY)
RCPTS = b"RCPT TO:<b@partner.test>\r\nRCPT TO:<c@partner.test>\r\n"
STUFFED = b"Subject: s\r\n\r\n..leading dot\r\nend\r\n.\r\n"


def test_pipelined_mail_rcpt_and_data_are_one_write_and_the_body_another():
    writes, end, conv = transact(EHLO_PIPELINING, [b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.1.5 ok\r\n354 go\r\n",
                                                   b"250 2.0.0 queued as X\r\n"])
    assert writes == [MAIL + RCPTS + b"DATA\r\n", STUFFED]
    assert (end.mail.code, {r: v.code for r, v in end.rcpts.items()}) == (
        250, {"b@partner.test": 250, "c@partner.test": 250})
    assert (str(end.data), end.data_phase) == ("250 2.0.0 queued as X", Phase.AFTER_DATA)
    assert conv.state is S.READY


def test_without_pipelining_one_command_per_reply():
    writes, end, conv = transact(EHLO_PLAIN, [b"250 ok\r\n", b"250 ok\r\n", b"550 5.1.1 no such user\r\n",
                                              b"354 go\r\n", b"250 queued\r\n"])
    assert writes == [MAIL, b"RCPT TO:<b@partner.test>\r\n", b"RCPT TO:<c@partner.test>\r\n", b"DATA\r\n", STUFFED]
    assert end.rcpts["c@partner.test"].enhanced == "5.1.1" and end.data.code == 250
    assert conv.state is S.READY


@pytest.mark.parametrize("ehlo, replies, writes, data, data_phase", [
    # MAIL refused: RSET at once (no RCPT sent)
    (EHLO_PLAIN, [b"452 4.3.1 full\r\n", b"250 reset\r\n"], [MAIL, b"RSET\r\n"], None, None),
    # no recipient accepted: no DATA, RSET
    (EHLO_PLAIN, [b"250 ok\r\n", b"550 no\r\n", b"450 later\r\n", b"250 reset\r\n"],
     [MAIL, b"RCPT TO:<b@partner.test>\r\n", b"RCPT TO:<c@partner.test>\r\n", b"RSET\r\n"], None, None),
    # DATA refused
    (EHLO_PLAIN, [b"250 ok\r\n", b"250 ok\r\n", b"250 ok\r\n", b"554 5.5.1 no valid recipients\r\n", b"250 reset\r\n"],
     [MAIL, b"RCPT TO:<b@partner.test>\r\n", b"RCPT TO:<c@partner.test>\r\n", b"DATA\r\n", b"RSET\r\n"],
     554, Phase.DATA),
    # pipelined: every reply is heard even after MAIL was refused; DATA's refusal is then no news
    (EHLO_PIPELINING, [b"550 5.7.1 sender refused\r\n503 5.5.1 no MAIL\r\n503 5.5.1 no MAIL\r\n503 5.5.1 no MAIL\r\n",
                       b"250 reset\r\n"], [MAIL + RCPTS + b"DATA\r\n", b"RSET\r\n"], None, None),
    (EHLO_PIPELINING, [b"250 ok\r\n550 no\r\n550 no\r\n554 no valid recipients\r\n", b"250 reset\r\n"],
     [MAIL + RCPTS + b"DATA\r\n", b"RSET\r\n"], None, None),
    (EHLO_PIPELINING, [b"250 ok\r\n550 no\r\n250 ok\r\n451 4.3.0 try later\r\n", b"250 reset\r\n"],
     [MAIL + RCPTS + b"DATA\r\n", b"RSET\r\n"], 451, Phase.DATA),
    # the final reply refuses the message: no RSET needed, the transaction is over
    (EHLO_PIPELINING, [b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n", b"552 5.3.4 too big\r\n"],
     [MAIL + RCPTS + b"DATA\r\n", STUFFED], 552, Phase.AFTER_DATA),
])
def test_refusals_end_the_transaction(ehlo, replies, writes, data, data_phase):
    got, end, conv = transact(ehlo, replies)
    assert got == writes
    assert (end.data.code if end.data else None, end.data_phase) == (data, data_phase)
    assert conv.state is S.READY
    # the connection carries the next message
    assert conv.send(Transaction("a@contoso.test", ["d@partner.test"])).startswith(b"MAIL FROM:<a@contoso.test>")


def test_a_refused_reset_means_the_connection_is_not_reused():
    _, end, conv = transact(EHLO_PLAIN, [b"550 no\r\n", b"421 4.4.2 closing\r\n"])
    assert end.mail.code == 550 and conv.state is S.MUST_CLOSE and conv.state in BROKEN
    with pytest.raises(LocalProtocolError):
        conv.send(Transaction("a@contoso.test", ["b@partner.test"]))


def test_large_bodies_go_in_pieces_and_dots_are_stuffed_across_them():
    conv = opened()
    conv.send(Transaction("a@contoso.test", ["b@partner.test"]))
    assert talk(conv, b"250 ok\r\n250 ok\r\n354 go\r\n") == [SEND_BODY]
    wire = conv.send(Body(b"line\r")) + conv.send(Body(b"\n.dot\r\n")) + conv.send(END_OF_BODY)
    assert wire == b"line\r\n..dot\r\n.\r\n"
    assert conv.state is S.FINAL and conv.phase is Phase.AFTER_DATA
    [end] = talk(conv, b"250 ok\r\n")
    assert end.data_phase is Phase.AFTER_DATA


def test_phases_follow_the_replies_of_a_pipelined_transaction():
    conv = opened()
    conv.send(Transaction("a@contoso.test", ["b@partner.test", "c@partner.test"]))
    seen = [conv.phase]
    for reply in (b"250 ok\r\n", b"250 ok\r\n", b"250 ok\r\n"):
        talk(conv, reply)
        seen.append(conv.phase)
    assert seen == [Phase.MAIL, Phase.RCPT, Phase.RCPT, Phase.DATA]


# -- verification and probes: one command at a time ------------------------------------------

def test_mail_rcpt_rset_one_at_a_time():
    conv = opened()
    assert conv.send(Mail("")) == b"MAIL FROM:<>\r\n"
    assert talk(conv, b"250 2.1.0 ok\r\n") == [Replied(Reply(250, ("2.1.0 ok",)))]
    assert conv.state is S.SENDER
    assert conv.send(Rcpt("x@partner.test")) == b"RCPT TO:<x@partner.test>\r\n"
    [replied] = talk(conv, b"550 5.1.1 unknown\r\n")
    assert replied.reply.enhanced == "5.1.1" and conv.state is S.SENDER
    assert conv.send(RSET) == b"RSET\r\n"
    [replied] = talk(conv, b"250 2.0.0 ok\r\n")
    assert replied.reply.code == 250 and conv.state is S.READY


def test_a_refused_sender_leaves_the_session_ready():
    conv = opened()
    conv.send(Mail("alerts@relay.test"))
    [replied] = talk(conv, b"553 5.7.1 not you\r\n")
    assert replied.reply.code == 553 and conv.state is S.READY


def test_an_idle_check_is_a_reset_on_its_own():
    conv = opened()
    conv.send(RSET)
    [replied] = talk(conv, b"421 4.4.2 idle too long\r\n")
    assert replied.reply.code == 421 and conv.state is S.MUST_CLOSE


# -- every chunking of a script gives the same events -----------------------------------------

SCRIPT = (GREET + b"250-mx.test\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250 8BITMIME\r\n"
          b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550-5.1.1 no such\r\n550 5.1.1 user\r\n354 go\r\n")


def run_script(pieces) -> tuple[list, bytes]:
    conv = ClientConversation("relay.test", tls_mode="opportunistic")
    events, sent = [], b""
    for piece in pieces:
        conv.receive_data(piece)
        while (event := conv.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, Ready):
                sent += conv.send(Transaction("a@contoso.test", ["b@partner.test", "c@partner.test"]))
            if event is SEND_BODY:
                break
        sent += conv.data_to_send()
    return events, sent


def test_the_same_events_whatever_the_chunks():
    expected = run_script([SCRIPT])
    assert kinds(expected[0]) == ["Greeting", "Capabilities", "Ready", "SEND_BODY"]
    for size in (1, 2, 3, 5, 7, 13, 64):
        assert run_script([SCRIPT[i:i + size] for i in range(0, len(SCRIPT), size)]) == expected, size
    for cut in range(1, len(SCRIPT)):                       # every way of cutting it in two
        assert run_script([SCRIPT[:cut], SCRIPT[cut:]]) == expected, cut
    for a, b in itertools.combinations(range(0, len(SCRIPT), 9), 2):   # and many in three
        assert run_script([SCRIPT[:a], SCRIPT[a:b], SCRIPT[b:]]) == expected, (a, b)


def test_multi_line_replies_keep_their_lines_and_enhanced_code():
    conv = ClientConversation("relay.test", tls_mode="none")
    [failed] = talk(conv, b"421-4.7.0 mx.test too busy\r\n421-4.7.0 try again\r\n421 4.7.0 later\r\n")
    reply = conv.greeting
    assert (reply.code, reply.enhanced, reply.lines) == (421, "4.7.0", ("4.7.0 mx.test too busy", "4.7.0 try again",
                                                                        "4.7.0 later"))
    assert reply.text == "mx.test too busy 4.7.0 try again 4.7.0 later"
    assert failed.reply is reply


def test_a_multi_line_rcpt_refusal_is_one_reply():
    _, end, _ = transact(EHLO_PIPELINING, [b"250 ok\r\n550-5.1.1 one\r\n550 5.1.1 two\r\n250 ok\r\n354 go\r\n",
                                           b"250 queued\r\n"])
    refused = end.rcpts["b@partner.test"]
    assert (refused.code, refused.enhanced, refused.text, len(refused.lines)) == (550, "5.1.1", "one 5.1.1 two", 2)
    assert end.rcpts["c@partner.test"].code == 250 and end.data.code == 250


# -- whose fault: garbage from the server, misuse by us ----------------------------------------

@pytest.mark.parametrize("garbage", [
    b"HTTP/1.1 400 Bad Request\r\n", b"2500 x\r\n", b"999 x\r\n", b"25\r\n", b"250-a\r\n251 b\r\n",
    b"250x\r\n", b"250-a\r\n" * 101, b"2" * (MAX_REPLY_LINE + 1),
])
def test_garbage_from_the_server_is_a_remote_protocol_error(garbage):
    conv = opened()
    conv.send(Transaction("a@contoso.test", ["b@partner.test"]))
    conv.receive_data(b"250 ok\r\n" + garbage)
    with pytest.raises(RemoteProtocolError):
        while conv.next_event() is not NEED_DATA:
            pass
    assert conv.state is S.ERROR and conv.state in BROKEN
    assert conv.phase is Phase.RCPT                       # where it broke, for the classification
    with pytest.raises(LocalProtocolError):
        conv.next_event()
    assert issubclass(RemoteProtocolError, ProtocolError) and issubclass(ProtocolError, RelaywatchError)


def test_a_garbage_greeting_is_remote():
    conv = ClientConversation("relay.test")
    conv.receive_data(b"SSH-2.0-OpenSSH_9.6\r\n")
    with pytest.raises(RemoteProtocolError):
        conv.next_event()
    assert conv.phase is Phase.GREETING


@pytest.mark.parametrize("state_of, command", [
    (lambda: ClientConversation("relay.test"), Transaction("a@contoso.test", ["b@partner.test"])),
    (lambda: ClientConversation("relay.test"), Mail("a@contoso.test")),
    (opened, Rcpt("b@partner.test")),                     # RCPT without MAIL
    (opened, Body(b"x")),                                 # a body without a 354
    (opened, END_OF_BODY),
    (opened, TLS_STARTED),                                # no STARTTLS was asked for
])
def test_commands_out_of_state_are_a_local_protocol_error(state_of, command):
    conv = state_of()
    with pytest.raises(LocalProtocolError):
        conv.send(command)
    assert conv.state is S.ERROR


def test_a_second_transaction_before_the_first_ended_is_refused():
    conv = opened()
    conv.send(Transaction("a@contoso.test", ["b@partner.test"]))
    with pytest.raises(LocalProtocolError):
        conv.send(Transaction("a@contoso.test", ["c@partner.test"]))


def test_an_unsafe_address_is_refused_before_anything_is_sent():
    conv = opened()
    with pytest.raises(ValueError):
        conv.send(Transaction("a@contoso.test", ["b@partner.test>\r\nRCPT TO:<evil@x.test"]))
    assert conv.state is S.READY and conv.data_to_send() == b""


def test_the_driver_reports_failure_and_close():
    conv = opened()
    conv.send(Transaction("a@contoso.test", ["b@partner.test"]))
    conv.connection_failed()
    assert (conv.state, conv.phase) == (S.ERROR, Phase.MAIL)
    conv = opened()
    conv.connection_closed()
    assert conv.state is S.CLOSED and not conv.may_send(type(QUIT))


# -- the tables themselves ---------------------------------------------------------------------

def test_every_state_either_waits_for_a_reply_or_for_us():
    assert not set(ANSWERS) & set(SEND_TRANSITIONS)
    assert set(ANSWERS) == set(REPLY_TRANSITIONS)
    assert set(PHASE) == set(ClientState)
    for table in (*SEND_TRANSITIONS.values(), *REPLY_TRANSITIONS.values()):
        assert all(isinstance(target, ClientState) for target in table.values())


def test_every_answer_a_state_can_give_has_a_move():
    """Every answer function, over every reply code and every fact it reads, lands in the table."""
    class Facts:
        pass
    for state, answer_of in ANSWERS.items():
        for code, mode, active, starttls, pipelining, left, mail_ok, any_ok in itertools.product(
                (220, 250, 354, 421, 450, 500, 502, 550), ("none", "opportunistic", "required"), (False, True),
                (False, True), (False, True), (0, 1), (False, True), (False, True)):
            f = Facts()
            f.tls_mode, f.tls_active, f.extensions = mode, active, {"STARTTLS": ""} if starttls else {}
            f.pipelining, f.recipients_left, f.mail_accepted, f.any_accepted = pipelining, left, mail_ok, any_ok
            answer = answer_of(code, f)
            assert isinstance(answer, Answer) and answer in REPLY_TRANSITIONS[state], (state, code, answer)


# -- DSN parameters (RFC 3461): passed on only to a server that offers DSN -------------------

_DSN_TX = Transaction("a@contoso.test", ["b@partner.test", "c@partner.test"], dsn=MessageDsn("HDRS", "id 1"),
                      recipient_dsn=(RecipientDsn(("SUCCESS", "FAILURE"), "rfc822;B+x@contoso.test"),
                                     RecipientDsn()))


@pytest.mark.parametrize("ehlo, sent", [
    (b"250-mx.test\r\n250-PIPELINING\r\n250 DSN\r\n",
     b"MAIL FROM:<a@contoso.test> RET=HDRS ENVID=id+201\r\n"
     b"RCPT TO:<b@partner.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;B+2Bx@contoso.test\r\n"
     b"RCPT TO:<c@partner.test>\r\nDATA\r\n"),
    (EHLO_PIPELINING,                                                   # no DSN: nothing of it is sent
     b"MAIL FROM:<a@contoso.test> BODY=8BITMIME\r\nRCPT TO:<b@partner.test>\r\nRCPT TO:<c@partner.test>\r\n"
     b"DATA\r\n"),
])
def test_dsn_parameters_go_only_to_a_server_that_offers_dsn(ehlo, sent):
    conv = opened(ehlo)
    assert conv.send(_DSN_TX) == sent
