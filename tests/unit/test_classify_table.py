"""The pure classifier, by table; and the catalog's completeness."""

import pytest

from relaywatch.classify.catalog import AUDIENCES, CATALOG, lookup
from relaywatch.classify.classify import VERIFY_SUBTYPES, classify
from relaywatch.classify.observation import Observation, Outcome, Phase
from relaywatch.model import Destination

D = Destination("mail.contoso.test", "192.0.2.5", 25, 1, 2)
DNS = {"name": "mail.contoso.test", "type": "A", "rcode": None, "nameserver": "127.0.0.1:53"}


def obs(phase, outcome, **kw):
    return Observation(Phase(phase), Outcome(outcome), kw.pop("destination", D), **kw)


TABLE = [
    # observation                                                          code       subtype            permanent
    (obs("dns", "nxdomain", dns=DNS, destination=None),                   "4.4.312", "nxdomain", False),
    (obs("dns", "servfail", dns={**DNS, "rcode": "SERVFAIL"}),            "4.4.312", "servfail", False),
    (obs("dns", "servfail", dns={**DNS, "rcode": "REFUSED"}),             "4.4.312", "refused", False),
    (obs("dns", "dns_timeout", dns=DNS),                                  "4.4.312", "timeout", False),
    (obs("dns", "no_address", dns=DNS),                                   "4.4.312", "no_address", False),
    (obs("dns", "domain_not_found", dns={**DNS, "type": "MX"}),           "5.1.2", "nxdomain", True),
    (obs("dns", "null_mx", dns={**DNS, "type": "MX"}),                    "5.1.10", "null_mx", True),
    (obs("connect", "connect_timeout"),                                   "4.4.315", "timeout", False),
    (obs("connect", "unreachable", errno="EHOSTUNREACH"),                 "4.4.315", "host_unreachable", False),
    (obs("connect", "unreachable", errno="ENETUNREACH"),                  "4.4.315", "network_unreachable", False),
    (obs("connect", "refused", errno="ECONNREFUSED"),                     "4.4.316", "refused", False),
    (obs("connect", "closed", errno="ECONNRESET"),                        "4.4.318", "closed", False),
    (obs("greeting", "reply", reply_code=421, reply_text="busy"),         "4.4.317", "greeting_421", False),
    (obs("greeting", "reply", reply_code=554, reply_text="go away"),      "4.4.317", "greeting_554", False),
    (obs("ehlo", "reply", reply_code=421, reply_text="closing"),          "4.4.317", "ehlo_rejected", False),
    (obs("starttls", "tls_not_offered"),                                  "4.4.317", "tls_not_offered", False),
    (obs("starttls", "reply", reply_code=454, reply_enhanced="4.7.0"),    "4.4.317", "starttls_refused", False),
    (obs("starttls", "tls_handshake", note="NO_SHARED_CIPHER"),           "4.4.317", "tls_handshake", False),
    (obs("starttls", "tls_handshake", note="TLSV1_ALERT_PROTOCOL_VERSION"), "4.4.317", "tls_handshake", False),
    # 220 to STARTTLS, then a reset or EOF with no TLS alert: dropped, not refused.
    (obs("starttls", "closed", errno="ECONNRESET", note="in the TLS handshake, without a TLS alert"),
     "4.4.318", "closed", False),
    (obs("starttls", "closed", note="in the TLS handshake, without a TLS alert"), "4.4.318", "closed", False),
    (obs("greeting", "closed"),                                           "4.4.318", "closed", False),
    (obs("greeting", "silent"),                                           "4.4.318", "silent", False),
    (obs("ehlo", "protocol", note="not an SMTP reply"),                   "4.4.318", "protocol", False),
    (obs("mail", "closed", errno="ECONNRESET"),                           "4.4.318", "closed", False),
    (obs("rcpt", "silent"),                                               "4.4.318", "silent", False),
    (obs("data", "stalled"),                                              "4.4.318", "stalled", False),
    (obs("after-data", "silent"),                                         "4.4.318", "silent", False),
    (obs("starttls", "certificate", tls={"verify_code": 10, "not_after": "2026-01-01T00:00:00+00:00"}),
     "4.7.320", "expired", False),
    (obs("starttls", "certificate", tls={"verify_code": 9}),              "4.7.320", "not_yet_valid", False),
    (obs("starttls", "certificate", tls={"verify_code": 62, "expected_name": "x.test", "sans": ["y.test"]}),
     "4.7.320", "name_mismatch", False),
    (obs("starttls", "certificate", tls={"verify_code": 18}),             "4.7.320", "self_signed", False),
    (obs("starttls", "certificate", tls={"verify_code": 20}),             "4.7.320", "untrusted_issuer", False),
    (obs("starttls", "certificate", tls={"verify_code": 23}),             "4.7.320", "revoked", False),
    (obs("starttls", "certificate", tls={"verify_code": 999}),            "4.7.320", "invalid", False),
    (obs("rcpt", "reply", reply_code=550, reply_enhanced="5.1.1", reply_text="unknown"), "5.1.1", None, True),
    (obs("rcpt", "reply", reply_code=452, reply_enhanced="4.2.2"),        "4.2.2", None, False),
    (obs("mail", "reply", reply_code=451),                                "4.0.0", None, False),
    (obs("after-data", "reply", reply_code=554, reply_enhanced="5.7.1"),  "5.7.1", None, True),
    (obs("data", "reply", reply_code=554),                                "5.0.0", None, True),
    (obs("local", "local_error", note="No space left on device"),         "4.3.0", "io_error", False),
    (obs("data", "internal", note="KeyError: 'x'"),                      "4.3.0", "internal", False),
]


@pytest.mark.parametrize("observation, code, subtype, permanent", TABLE)
def test_classify(observation, code, subtype, permanent):
    failure = classify(observation, at=1000.0)
    assert (failure.code, failure.subtype, failure.permanent) == (code, subtype, permanent)
    assert failure.phase == observation.phase.value
    assert failure.detail.endswith(".")
    if observation.destination and observation.outcome not in (Outcome.DNS_NXDOMAIN, Outcome.LOCAL_ERROR):
        assert "mail.contoso.test" in failure.detail or "192.0.2.5" in failure.detail


def test_a_drop_in_the_tls_handshake_says_so():
    failure = classify(obs("starttls", "closed", errno="ECONNRESET", note="in the TLS handshake, without a TLS alert"),
                       at=0.0)
    assert failure.detail == ("mail.contoso.test[192.0.2.5]:25 closed the connection (ECONNRESET) during STARTTLS "
                              "(in the TLS handshake, without a TLS alert).")
    assert failure.kind == "connection.dropped"


def test_catalog_codes_have_450_for_the_connector_codes():
    for code in ("4.4.312", "4.4.315", "4.4.316", "4.4.317", "4.4.318", "4.7.320"):
        assert lookup(code).smtp_code == 450


def test_every_outcome_in_every_phase_has_a_catalog_entry():
    """Like httpx's test that every httpcore exception is mapped: a new Outcome
    or Phase without a classification fails here."""
    for outcome in Outcome:
        for phase in Phase:
            o = Observation(phase, outcome, D, reply_code=451 if outcome is Outcome.REPLY else None,
                            tls={"verify_code": 10}, dns=DNS)
            failure = classify(o, at=0.0)
            assert failure.kind in CATALOG


@pytest.mark.parametrize("entry", CATALOG.values(), ids=lambda e: e.id)
def test_every_entry_explains_causes_and_fixes_for_both_audiences(entry):
    assert entry.title and len(entry.explanation) > 40
    for audience in AUDIENCES:
        assert entry.causes[audience], f"{entry.id} has no causes for {audience}"
        assert entry.fixes[audience], f"{entry.id} has no fixes for {audience}"
        assert all(c.strip() for c in entry.causes[audience] + entry.fixes[audience])


def test_verify_codes_map_to_documented_subtypes():
    assert set(VERIFY_SUBTYPES.values()) <= {"expired", "not_yet_valid", "name_mismatch", "self_signed",
                                             "untrusted_issuer", "revoked"}


# -- the one place exceptions become observations --------------------------------------------

import asyncio  # noqa: E402
import errno  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402

from relaywatch.deliver.transport import PeerClosed, observe  # noqa: E402
from relaywatch.smtpclient.protocol import RemoteProtocolError  # noqa: E402


def _alert(reason):
    """An SSLError as the ssl module raises it for a TLS alert or a refused protocol."""
    e = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower()} (_ssl.c:1006)")
    e.reason, e.library = reason, "SSL"
    return e


def _uvloop_closed():
    return RuntimeError("unable to perform operation on <TCPTransport closed=True reading=False 0x1>; "
                        "the handler is closed")


def _cert_error(code):
    e = ssl.SSLCertVerificationError(1, "certificate verify failed")
    e.verify_code, e.verify_message = code, "x"
    return e


OBSERVE_TABLE = [
    # phase        exception                                           flags                 outcome
    ("connect", TimeoutError(),                                        {},                   "connect_timeout"),
    ("connect", ConnectionRefusedError(errno.ECONNREFUSED, "x"),       {},                   "refused"),
    ("connect", OSError(errno.EHOSTUNREACH, "x"),                      {},                   "unreachable"),
    ("connect", OSError(errno.ENETUNREACH, "x"),                       {},                   "unreachable"),
    ("connect", OSError(errno.ETIMEDOUT, "x"),                         {},                   "connect_timeout"),
    ("connect", ConnectionResetError(errno.ECONNRESET, "x"),           {},                   "closed"),
    ("greeting", TimeoutError(),                                       {},                   "silent"),
    ("greeting", PeerClosed(),                                         {},                   "closed"),
    ("ehlo", RemoteProtocolError("XXXX"),                              {},                   "protocol"),
    ("mail", asyncio.IncompleteReadError(b"", 10),                     {},                   "closed"),
    ("data", TimeoutError(),                                           {"writing": True},    "stalled"),
    ("data", BrokenPipeError(errno.EPIPE, "x"),                        {"writing": True},    "closed"),
    ("after-data", TimeoutError(),                                     {},                   "silent"),
    ("starttls", _cert_error(10),                                      {"handshake": True},  "certificate"),
    ("starttls", ssl.SSLError(1, "no shared cipher"),                  {"handshake": True},  "tls_handshake"),
    ("starttls", _alert("TLSV1_ALERT_PROTOCOL_VERSION"),               {"handshake": True},  "tls_handshake"),
    ("starttls", _alert("SSLV3_ALERT_HANDSHAKE_FAILURE"),              {"handshake": True},  "tls_handshake"),
    ("starttls", _alert("WRONG_VERSION_NUMBER"),                       {"handshake": True},  "tls_handshake"),
    # The 220 came, then no alert: the connection was closed abruptly (4.4.318), on either loop.
    ("starttls", ConnectionResetError(errno.ECONNRESET, "x"),          {"handshake": True},  "closed"),
    ("starttls", ConnectionResetError(),                               {"handshake": True},  "closed"),
    ("starttls", ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), {"handshake": True}, "closed"),
    ("starttls", ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed"), {"handshake": True}, "closed"),
    ("starttls", BrokenPipeError(errno.EPIPE, "x"),                    {"handshake": True},  "closed"),
    ("starttls", TimeoutError(),                                       {"handshake": True},  "silent"),
    ("starttls", PeerClosed(),                                         {},                   "closed"),
    ("mail", ssl.SSLEOFError(8, "EOF"),                                {},                   "closed"),
    # uvloop: a write to a transport the peer reset raises RuntimeError; the stream knows why it went.
    ("data", _uvloop_closed(),                                         {"writing": True, "gone": True,
                                                                        "lost": ConnectionResetError(errno.ECONNRESET, "x")},
     "closed"),
    ("mail", _uvloop_closed(),                                         {"gone": True},       "closed"),
    ("after-data", KeyError("nobody foresaw this"),                    {"gone": True},       "closed"),
    ("rcpt", KeyError("nobody foresaw this"),                          {},                   "internal"),
    ("connect", RuntimeError("x"),                                     {},                   "internal"),
]


@pytest.mark.parametrize("phase, exc, flags, outcome", OBSERVE_TABLE)
def test_observe_maps_exceptions_by_phase(phase, exc, flags, outcome):
    assert observe(Phase(phase), exc, D, **flags).outcome is Outcome(outcome)


def test_the_uvloop_write_error_keeps_the_errno_of_the_reset():
    o = observe(Phase.DATA, _uvloop_closed(), D, writing=True, gone=True,
                lost=ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"))
    assert (o.outcome, o.errno) == (Outcome.CLOSED, "ECONNRESET")


def test_an_ssl_errno_is_not_reported_as_an_os_errno():
    o = observe(Phase.STARTTLS, ssl.SSLEOFError(8, "EOF"), D, handshake=True)
    assert (o.outcome, o.errno) == (Outcome.CLOSED, None)   # 8 is SSL_ERROR_EOF, not ENOEXEC


def _every_exception_class():
    import builtins
    import inspect
    seen = set()
    for module in (builtins, ssl, asyncio, socket):
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Exception) and cls not in seen:
                seen.add(cls)
                yield cls


def _instance(cls):
    for args in ((), ("x",), (1, "x"), (b"", 1), ("x", b"", 0, 1, "y"), ("x", "", 0, 1, "y"), ("", 0, 1, "y"), ("x", [ValueError("x")])):
        try:
            return cls(*args)
        except Exception:
            continue
    raise AssertionError(f"cannot make a {cls.__name__}")


@pytest.mark.parametrize("phase", [p for p in Phase if p not in (Phase.DNS, Phase.LOCAL)], ids=lambda p: p.value)
def test_every_exception_in_every_phase_is_observed_and_classified(phase):
    """httpx's test_httpcore_all_exceptions_mapped, for us: whatever either event
    loop (or ssl, or our own code) raises in a phase becomes an observation
    that classify() turns into a catalog entry; none is re-raised."""
    classes = list(_every_exception_class())
    assert len(classes) > 60
    for cls in classes:
        exc = _instance(cls)
        for flags in ({}, {"writing": True}, {"handshake": True}, {"gone": True},
                      {"lost": ConnectionResetError(errno.ECONNRESET, "x"), "gone": True}):
            if flags.get("handshake") and phase is not Phase.STARTTLS:
                continue
            o = observe(phase, exc, D, **flags)
            assert o.phase is phase
            failure = classify(o, at=0.0)
            assert failure.kind in CATALOG, (cls, flags)
            if flags.get("gone") and o.outcome is not Outcome.PROTOCOL and phase is not Phase.CONNECT:
                # the connection is gone: never blamed on relaywatch
                assert o.outcome is not Outcome.INTERNAL, (cls, flags)


def test_cancellation_is_never_mapped():
    with pytest.raises(asyncio.CancelledError):
        observe(Phase.DATA, asyncio.CancelledError(), D)


def test_certificate_observation_keeps_the_verify_code():
    o = observe(Phase.STARTTLS, _cert_error(62), D, handshake=True, tls={"subject": "x"})
    assert o.tls == {"subject": "x", "verify_code": 62, "verify_message": "x"}


# -- diagnosis ----------------------------------------------------------------------------------

from relaywatch.model import Failure  # noqa: E402
from relaywatch.watch.diagnosis import diagnose  # noqa: E402
from relaywatch.incident import Incident, IncidentKind, ProbeResult  # noqa: E402
from relaywatch.watch_records import LastGood  # noqa: E402


def _inc(code, subtype=None, kind=None, **error):
    dest = {"host": "mail.contoso.test", "ip": error.pop("ip", "192.0.2.9"), "port": 25}
    failure = Failure.from_dict({"code": code, "kind": kind or lookup(code).id, "subtype": subtype, **error,
                                 "destination": dest})
    return Incident(kind=IncidentKind.BACKLOG, connector="onprem", code=code, title="", opened_at=0.0,
                    latest_error=failure)


GOOD = LastGood("onprem", 1_800_000_000.0, host="mail.contoso.test", ip="192.0.2.5", port=25)


@pytest.mark.parametrize("incident, last_good, probe, cause, words", [
    (_inc("4.4.312", "nxdomain", dns={"name": "mail.contoso.test", "nameserver": "ns"}), None, None,
     "name_gone", "does not exist in DNS"),
    (_inc("4.4.312", "servfail", dns={"name": "mail.contoso.test", "rcode": "SERVFAIL"}), None, None,
     "dns_hosting", "DNS hosting"),
    (_inc("4.4.315", "timeout", dns={"name": "mail.contoso.test", "answer": ["192.0.2.9"], "ttl": 300,
                                     "nameserver": "ns"}), GOOD, None,
     "address_changed", "now answers 192.0.2.9 (TTL 300 s"),
    (_inc("4.4.315", "timeout", ip="192.0.2.5"), GOOD, None, "server_silent", "does not answer"),
    (_inc("4.4.316", "refused", ip="192.0.2.5"), GOOD, None, "stopped_accepting", "decommissioned"),
    (_inc("4.4.316", "refused"), None, None, "nothing_listening", "Nothing accepts connections"),
    (_inc("4.4.317", "tls_not_offered"), None, None, "starttls_missing", "does not offer STARTTLS"),
    (_inc("4.4.317", "greeting_554", reply="554 go away"), None, None, "greeting_rejected", "554 go away"),
    (_inc("4.4.318", "closed", phase="ehlo"), None, {"greeting": "220 ************************"},
     "smtp_inspection", "firewall inspecting SMTP"),
    (_inc("4.4.318", "closed", phase="after-data"), None, {"greeting": "220 mail ESMTP"},
     "server_failing", "phase after-data"),
    (_inc("4.7.320", "expired", tls={"not_after": "2026-01-02T00:00:00+00:00"}), None, None,
     "cert_expired", "expired on 2026-01-02"),
    (_inc("4.7.320", "name_mismatch", tls={"sans": ["old.test"], "expected_name": "mail.contoso.test"}), None, None,
     "cert_name", "is for old.test; the connector expects mail.contoso.test"),
    (_inc("4.7.320", "untrusted_issuer", tls={"issuer": "Corp CA"}), None, None, "cert_issuer", "issued by Corp CA"),
])
def test_diagnosis_picks_one_cause(incident, last_good, probe, cause, words):
    d = diagnose(incident, last_good, ProbeResult.from_dict(probe) if probe else None)
    assert d.cause == cause and words in d.text, d.text


def test_diagnosis_goes_by_the_failure_kind_not_the_code():
    """A destination that answers 450 4.4.316 itself is a reply, not a refused connection."""
    incident = _inc("4.4.316", None, kind="smtp.transient_reply", reply="450 4.4.316 mailbox busy")
    d = diagnose(incident, GOOD)
    assert d.cause == "destination_reply" and "450 4.4.316 mailbox busy" in d.text
    # The evidence is kept in the incident's JSON (diagnosis.facts) in the shape it always had.
    assert d.facts["last_good"] == {"host": "mail.contoso.test", "ip": "192.0.2.5", "port": 25,
                                    "at": 1_800_000_000.0, "tls": None}


def test_diagnosis_of_an_expiring_certificate_is_its_detail():
    from relaywatch.incident_facts import CertificateFacts
    inc = Incident(kind=IncidentKind.CERT_EXPIRING, connector="p", code="watch:cert_expiring", title="", opened_at=0.0,
                   detail="The certificate of h expires on 2027-01-01.", facts=CertificateFacts({"days_left": 4}))
    d = diagnose(inc, None)
    assert (d.cause, d.text, d.facts) == ("cert_expiring", inc.detail, {"days_left": 4})


# -- incident rules -------------------------------------------------------------------------------

from relaywatch.config import parse_config  # noqa: E402
from relaywatch.incident import BacklogSummary, Incident  # noqa: E402
from relaywatch.watch.rules import WatchFacts, evaluate  # noqa: E402

RULES = parse_config({"alerts": {"open_after": "5m", "min_messages": 2, "escalate_before_expiry": "4h",
                                 "escalate_steps": [100, 1000]},
                      "connectors": [{"name": "onprem", "type": "on_premises", "domains": ["c.test"]}]})
NOW = 1_800_000_000.0


def summary(messages, oldest_age, expires_in, code="4.4.316"):
    return {"connector": "onprem", "code": code, "messages": messages, "recipients": messages,
            "oldest_received_at": NOW - oldest_age, "first_expires_at": NOW + expires_in, "first_failure_at": NOW - 60,
            "latest_error": {"kind": "connect.refused", "subtype": "refused", "at": NOW}, "destinations": ["h:25"]}


@pytest.mark.parametrize("summaries, open_, expected", [
    ([summary(5, 60, 86000)], [], []),                                     # too young: not yet
    ([summary(1, 600, 86000)], [], []),                                    # too few
    ([summary(5, 600, 86000)], [], [("open", "open")]),
    ([summary(150, 600, 86000)], [dict(id=1, **{**summary(5, 600, 86000), "state": "open", "escalations": [],
                                               "last_seen": NOW})], [("escalate", "escalate:count-100")]),
    ([summary(5, 600, 3600)], [dict(id=1, **{**summary(5, 600, 86000), "state": "open", "escalations": [],
                                             "last_seen": NOW})], [("escalate", "escalate:expiry")]),
    ([summary(5, 600, 3600)], [dict(id=1, **{**summary(5, 600, 86000), "state": "open",
                                             "escalations": ["expiry"], "last_seen": NOW})], [("update", None)]),
    ([], [dict(id=1, **{**summary(5, 600, 86000), "state": "open", "escalations": [], "last_seen": NOW,
                        "opened_at": NOW - 900})], [("resolve", "resolve")]),
    ([summary(5, 600, 86000, code="4.7.320")],
     [dict(id=1, **{**summary(5, 600, 86000), "state": "open", "escalations": [], "last_seen": NOW,
                    "opened_at": NOW - 900})], [("resolve", "resolve"), ("open", "open")]),
])
def test_incident_rules(summaries, open_, expected):
    facts = WatchFacts(tuple(BacklogSummary.from_dict(s) for s in summaries))
    got = [(t.kind, t.alert.name if t.alert else None) for t in evaluate(facts, [Incident.from_dict(i) for i in open_], RULES, NOW)]
    assert got == expected
