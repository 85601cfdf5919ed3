"""DSN parameters (RFC 3461) in the receiving conversation and the xtext rules: bytes in, replies out."""

import pytest

from relaywatch.dsn_params import (MessageDsn, RecipientDsn, mail_params, rcpt_params, xtext_decode,
                                   xtext_encode)
from relaywatch.receive.conversation_events import MessageEnd, Recipient

from tests.unit.test_conversation import codes, session, talk


def ehlo():
    conv = session()
    talk(conv, b"EHLO client.test\r\n")
    return conv


@pytest.mark.parametrize("params, reply, dsn", [
    (b"", "250 2.1.0", MessageDsn()),
    (b" RET=FULL", "250 2.1.0", MessageDsn("FULL")),
    (b" RET=hdrs", "250 2.1.0", MessageDsn("HDRS")),                  # keywords are case-insensitive
    (b" ENVID=QQ314159", "250 2.1.0", MessageDsn(envid="QQ314159")),
    (b" RET=HDRS ENVID=a+2Bb+3Dc+20d", "250 2.1.0", MessageDsn("HDRS", "a+b=c d")),
    (b" ENVID=" + b"x" * 100, "250 2.1.0", MessageDsn(envid="x" * 100)),
    (b" ENVID=" + b"x" * 101, "501 5.5.4 ENVID is longer than 100", None),
    (b" RET=BODY", "501 5.5.4 RET must be FULL or HDRS", None),
    (b" RET=", "501 5.5.4 RET must be", None),
    (b" RET=FULL RET=HDRS", "501 5.5.4 Parameter RET given twice", None),
    (b" ENVID=a ENVID=b", "501 5.5.4 Parameter ENVID given twice", None),
    (b" SIZE=1 SIZE=2", "501 5.5.4 Parameter SIZE given twice", None),
    (b" ENVID=", "501 5.5.4 ENVID needs a value", None),
    (b" ENVID=a+2b", "501 5.5.4 ENVID is not valid xtext", None),        # hex must be upper case
    (b" ENVID=a+2", "501 5.5.4 ENVID is not valid xtext", None),         # + needs two digits
    (b" ENVID=a+", "501 5.5.4 ENVID is not valid xtext", None),
    (b" ENVID=a=b", "501 5.5.4 ENVID is not valid xtext", None),         # = is never xtext
    (b" ENVID=a+0Db", "501 5.5.4 ENVID must decode to printable ASCII", None),  # CR: no field injection
    (b" ENVID=a+7F", "501 5.5.4 ENVID must decode to printable ASCII", None),
    (b" NOTIFY=NEVER", "555 5.5.4 Unsupported MAIL parameter: NOTIFY", None),  # a RCPT parameter
    (b" FROB=1", "555 5.5.4 Unsupported MAIL parameter: FROB", None),
])
def test_mail_from_dsn_parameters(params, reply, dsn):
    conv = ehlo()
    [answer] = talk(conv, b"MAIL FROM:<a@client.test>" + params + b"\r\n")
    assert answer.text.startswith(reply), answer.text
    if dsn is not None:
        assert conv.dsn == dsn
    else:
        assert conv.sender is None          # refused: no transaction


@pytest.mark.parametrize("params, reply, dsn", [
    (b"", None, RecipientDsn()),
    (b" NOTIFY=NEVER", None, RecipientDsn(("NEVER",))),
    (b" NOTIFY=never", None, RecipientDsn(("NEVER",))),
    (b" NOTIFY=SUCCESS", None, RecipientDsn(("SUCCESS",))),
    (b" NOTIFY=DELAY,FAILURE,SUCCESS", None, RecipientDsn(("SUCCESS", "FAILURE", "DELAY"))),
    (b" NOTIFY=failure,delay", None, RecipientDsn(("FAILURE", "DELAY"))),
    (b" ORCPT=rfc822;x@contoso.test", None, RecipientDsn(orcpt="rfc822;x@contoso.test")),
    (b" ORCPT=RFC822;x+2Btag@contoso.test NOTIFY=SUCCESS", None,
     RecipientDsn(("SUCCESS",), "rfc822;x+tag@contoso.test")),
    (b" ORCPT=x400;a+20b", None, RecipientDsn(orcpt="x400;a b")),     # another address type, kept as given
    (b" ORCPT=rfc822;" + b"a" * 493, None, RecipientDsn(orcpt="rfc822;" + "a" * 493)),   # 500 in all
    (b" ORCPT=rfc822;" + b"a" * 494, "501 5.5.4 ORCPT is longer than 500", None),
    (b" NOTIFY=NEVER,SUCCESS", "501 5.5.4 NOTIFY=NEVER cannot be combined", None),
    (b" NOTIFY=SUCCESS,SUCCESS", "501 5.5.4 NOTIFY names a value twice", None),
    (b" NOTIFY=ALWAYS", "501 5.5.4 NOTIFY takes NEVER, or a list", None),
    (b" NOTIFY=", "501 5.5.4 NOTIFY takes NEVER, or a list", None),
    (b" NOTIFY=SUCCESS,", "501 5.5.4 NOTIFY takes NEVER, or a list", None),
    (b" NOTIFY=NEVER NOTIFY=NEVER", "501 5.5.4 Parameter NOTIFY given twice", None),
    (b" ORCPT=a@b ORCPT=a@b", "501 5.5.4 Parameter ORCPT given twice", None),
    (b" ORCPT=x@contoso.test", "501 5.5.4 ORCPT must be addr-type;address", None),
    (b" ORCPT=rfc822;", "501 5.5.4 ORCPT must be addr-type;address", None),
    (b" ORCPT=;x@contoso.test", "501 5.5.4 ORCPT must be addr-type;address", None),
    (b" ORCPT=rfc822;x+0A@contoso.test", "501 5.5.4 ORCPT must decode to printable ASCII", None),
    (b" ORCPT=rfc822;x+zz@contoso.test", "501 5.5.4 ORCPT is not valid xtext", None),
    (b" RET=FULL", "555 5.5.4 Unsupported RCPT parameter: RET", None),
    (b" FROB", "555 5.5.4 Unsupported RCPT parameter: FROB", None),
])
def test_rcpt_to_dsn_parameters(params, reply, dsn):
    conv = ehlo()
    talk(conv, b"MAIL FROM:<a@client.test>\r\n")
    [event] = talk(conv, b"RCPT TO:<x@contoso.test>" + params + b"\r\n")
    if reply is None:
        assert event == Recipient("x@contoso.test", "", dsn)
    else:
        assert event.text.startswith(reply), event.text
        assert conv.recipients == []


def test_rcpt_parameters_need_ehlo():
    conv = session()
    assert codes(talk(conv, b"HELO client.test\r\nMAIL FROM:<a@client.test>\r\n")) == ["250", "250"]
    [reply] = talk(conv, b"RCPT TO:<x@contoso.test> NOTIFY=NEVER\r\n")
    assert reply.text.startswith("555 5.5.4")


def test_the_parameters_travel_with_each_accepted_recipient_to_message_end():
    conv = ehlo()
    events = talk(conv, b"MAIL FROM:<a@client.test> RET=HDRS ENVID=env+2B1\r\n"
                        b"RCPT TO:<x@contoso.test> NOTIFY=SUCCESS ORCPT=rfc822;X@contoso.test\r\n"
                        b"RCPT TO:<bad>\r\n"                                     # refused: takes nothing
                        b"RCPT TO:<y@contoso.test>\r\n"
                        b"RCPT TO:<z@contoso.test> NOTIFY=NEVER\r\n"
                        b"DATA\r\nhi\r\n.\r\n")
    [end] = [e for e in events if isinstance(e, MessageEnd)]
    assert end.dsn == MessageDsn("HDRS", "env+1")
    assert [a for a, _ in end.recipients] == ["x@contoso.test", "y@contoso.test", "z@contoso.test"]
    assert end.recipient_dsn == (RecipientDsn(("SUCCESS",), "rfc822;X@contoso.test"), RecipientDsn(),
                                 RecipientDsn(("NEVER",)))
    # RSET (and the next MAIL) forget them.
    talk(conv, b"MAIL FROM:<a@client.test>\r\nRCPT TO:<x@contoso.test>\r\nDATA\r\nhi\r\n.\r\n")
    assert conv.dsn == MessageDsn()


@pytest.mark.parametrize("decoded, encoded", [
    ("plain", "plain"),
    ("a+b=c", "a+2Bb+3Dc"),
    ("with space", "with+20space"),
    ("~!", "~!"),
])
def test_xtext_round_trip(decoded, encoded):
    assert xtext_encode(decoded) == encoded
    assert xtext_decode(encoded, "ENVID") == decoded


def test_what_is_passed_on_is_encoded_again():
    assert mail_params(MessageDsn()) == ""
    assert mail_params(MessageDsn("HDRS", "a b")) == " RET=HDRS ENVID=a+20b"
    assert rcpt_params(RecipientDsn()) == ""
    assert rcpt_params(RecipientDsn(("SUCCESS", "DELAY"), "rfc822;x+y@c.test")) == \
        " NOTIFY=SUCCESS,DELAY ORCPT=rfc822;x+2By@c.test"
    assert rcpt_params(RecipientDsn(("NEVER",))) == " NOTIFY=NEVER"


@pytest.mark.parametrize("dsn, success, failure, delay", [
    (RecipientDsn(), False, True, True),                 # no NOTIFY: as relaywatch always did
    (RecipientDsn(("NEVER",)), False, False, False),
    (RecipientDsn(("SUCCESS",)), True, False, False),
    (RecipientDsn(("FAILURE", "DELAY")), False, True, True),
    (RecipientDsn(("SUCCESS", "FAILURE")), True, True, False),
])
def test_which_notices_a_recipient_wants(dsn, success, failure, delay):
    assert (dsn.wants("SUCCESS"), dsn.wants("FAILURE"), dsn.wants("DELAY")) == (success, failure, delay)


def test_stored_forms_read_back_tolerantly():
    assert RecipientDsn.from_stored(None, None) == RecipientDsn()
    assert RecipientDsn.from_stored("SUCCESS,DELAY", "rfc822;a@b") == RecipientDsn(("SUCCESS", "DELAY"), "rfc822;a@b")
    assert RecipientDsn.from_stored("NEVER,FUTURE", None) == RecipientDsn(("NEVER",))   # a newer value dropped
