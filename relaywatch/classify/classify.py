"""From an observation to a catalog code: one pure function, most specific first."""

from __future__ import annotations

from relaywatch.classify.catalog import CATALOG, CatalogEntry
from relaywatch.classify.observation import UTF8_HEADERS_NOTE, Observation, Outcome, Phase
from relaywatch.model import Destination, Failure

# OpenSSL X509_V_ERR_* codes -> our subtype.  Only the code decides, never the text.
VERIFY_SUBTYPES = {
    9: "not_yet_valid",      # CERT_NOT_YET_VALID
    10: "expired",           # CERT_HAS_EXPIRED
    13: "not_yet_valid",     # ERROR_IN_CERT_NOT_BEFORE_FIELD
    14: "expired",           # ERROR_IN_CERT_NOT_AFTER_FIELD
    18: "self_signed",       # DEPTH_ZERO_SELF_SIGNED_CERT
    19: "self_signed",       # SELF_SIGNED_CERT_IN_CHAIN
    2: "untrusted_issuer",   # UNABLE_TO_GET_ISSUER_CERT
    20: "untrusted_issuer",  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: "untrusted_issuer",  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    23: "revoked",           # CERT_REVOKED
    62: "name_mismatch",     # HOSTNAME_MISMATCH
    64: "name_mismatch",     # IP_ADDRESS_MISMATCH
}

_DNS_SUBTYPES = {
    Outcome.DNS_NXDOMAIN: "nxdomain",
    Outcome.DNS_NO_ADDRESS: "no_address",
    Outcome.DNS_TIMEOUT: "timeout",
}

_TLS_SUBTYPE_WORDS = {
    "expired": "has expired",
    "not_yet_valid": "is not valid yet",
    "name_mismatch": "does not match the expected name",
    "self_signed": "is self-signed",
    "untrusted_issuer": "was issued by a CA relaywatch does not trust",
    "revoked": "has been revoked",
    "invalid": "failed verification",
}

_PHASE_WORDS = {
    Phase.GREETING: "before greeting",
    Phase.EHLO: "after EHLO",
    Phase.STARTTLS: "during STARTTLS",
    Phase.MAIL: "after MAIL FROM",
    Phase.RCPT: "after RCPT TO",
    Phase.DATA: "while sending the message body",
    Phase.AFTER_DATA: "after the end of the message (waiting for the final reply)",
    Phase.CONNECT: "while connecting",
}


def where(dest: Destination | None) -> str:
    return "the destination" if dest is None else dest.label


def _breaks_sts(obs: Observation) -> bool:
    """A TLS failure under an enforced MTA-STS policy (deliver/smtp.py attaches the policy)."""
    return (obs.outcome in (Outcome.TLS_NOT_OFFERED, Outcome.TLS_HANDSHAKE, Outcome.CERTIFICATE)
            or (obs.outcome is Outcome.REPLY and obs.phase is Phase.STARTTLS))


def _no_starttls(obs: Observation) -> str:
    return "does not offer STARTTLS" if obs.outcome is Outcome.TLS_NOT_OFFERED else f"refused STARTTLS (\"{obs.reply}\")"


def _sts(obs: Observation, here: str) -> tuple[CatalogEntry, str | None, str, int, str]:
    e = CATALOG["tls.sts_policy"]
    sts = obs.sts or {}
    domain = sts.get("policy_domain", "the recipient domain")
    policy = f"the MTA-STS policy of {domain} (id {sts.get('policy_id', '?')}, mode {sts.get('mode', 'enforce')})"
    o = obs.outcome
    if o is Outcome.STS_MX_MISMATCH:
        patterns = ", ".join(sts.get("mx") or []) or "none"
        return (e, "sts_mx_mismatch", e.code, e.smtp_code,
                f"{here} is not one of the MX hosts {policy} allows (mx: {patterns}); "
                f"relaywatch did not connect to it.")
    if o is Outcome.TLS_NOT_OFFERED or o is Outcome.REPLY:
        return (e, "sts_starttls_not_offered", e.code, e.smtp_code,
                f"{here} {_no_starttls(obs)}, and {policy} requires TLS; nothing was sent in clear.")
    if o is Outcome.CERTIFICATE:
        tls = obs.tls or {}
        why = _TLS_SUBTYPE_WORDS[VERIFY_SUBTYPES.get(tls.get("verify_code"), "invalid")]
        names = ", ".join(tls.get("sans") or []) or tls.get("subject")
        detail = f"The certificate of {here} {why}"
        if names:
            detail += f" (it is for {names}, issued by {tls.get('issuer', '?')})"
        return (e, "sts_certificate", e.code, e.smtp_code,
                f"{detail}; {policy} requires one valid for {tls.get('expected_name') or here}, "
                f"so the message was not sent.")
    return (e, "sts_tls_handshake", e.code, e.smtp_code, _handshake_failed(obs, here, f"{policy} requires"))


_DANE_OUTCOMES = (Outcome.TLSA_MISMATCH, Outcome.DNSSEC_BOGUS, Outcome.DANE_REQUIRED)


def _breaks_dane(obs: Observation) -> bool:
    """A failure under usable TLSA records (deliver/smtp.py attaches them): DANE's own, or TLS missing."""
    return obs.outcome in _DANE_OUTCOMES or (obs.dane is not None and _breaks_sts(obs))


def _dane(obs: Observation, here: str) -> tuple[CatalogEntry, str | None, str, int, str]:
    e = CATALOG["tls.dane"]
    dane = obs.dane or {}
    name = dane.get("tlsa_name") or "its TLSA name"
    o = obs.outcome
    if o is Outcome.DNSSEC_BOGUS:
        dns = obs.dns or {}
        ede = dns.get("ede")
        said = (f"the resolver reports \"{ede.get('text') or 'EDE ' + str(ede.get('code'))}\" (EDE {ede.get('code')})"
                if ede else "a validating resolver answers so for DNSSEC-bogus data")
        return (e, "dane_dnssec_bogus", e.code, e.smtp_code,
                f"The TLSA lookup of {name} failed with {dns.get('rcode') or 'SERVFAIL'} ({said}); {here} has "
                f"DNSSEC-signed addresses, so relaywatch did not connect to it.")
    if o is Outcome.DANE_REQUIRED:
        return (e, "dane_required", e.code, e.smtp_code,
                f"The connector requires DANE, and {here} has no usable DNSSEC-validated TLSA records at {name} "
                f"({dane.get('reason') or 'none found'}); nothing was sent.")
    if o is Outcome.TLSA_MISMATCH:
        subtype = dane.get("subtype") or "dane_tlsa_mismatch"
        presented = dane.get("presented") or {}
        records = "; ".join(dane.get("usable") or []) or "none"
        return (e, subtype, e.code, e.smtp_code,
                f"{dane.get('reason') or 'No TLSA record matches'} at {here} (TLSA {name}: {records}; the server's "
                f"key is SPKI SHA-256 {presented.get('spki_sha256', '?')}); nothing was sent.")
    if o is Outcome.TLS_NOT_OFFERED or o is Outcome.REPLY:
        return (e, "dane_starttls_not_offered", e.code, e.smtp_code,
                f"{here} {_no_starttls(obs)}, but its DNSSEC-signed TLSA records at {name} say it does TLS; nothing was "
                f"sent in clear.")
    return (e, "dane_tls_handshake", e.code, e.smtp_code,
            _handshake_failed(obs, here, f"its TLSA records at {name} require"))


def _handshake_failed(obs: Observation, here: str, requirement: str) -> str:
    """The detail of a failed TLS handshake that a policy (MTA-STS, DANE) does not let go by in clear."""
    return (f"The TLS handshake with {here} failed ({obs.note or 'no common protocol or cipher'}), and {requirement} "
            f"TLS; nothing was sent in clear.")


def classify(obs: Observation, at: float) -> Failure:
    """Map one observation to a Failure carrying its catalog code and evidence."""
    entry, subtype, code, smtp_code, detail = _decide(obs)
    return Failure(
        code=code, smtp_code=smtp_code, title=entry.title, subtype=subtype, detail=detail,
        phase=obs.phase.value, permanent=entry.permanent,
        at=at, kind=entry.id, destination=obs.destination, reply=obs.reply, errno=obs.errno,
        dns=obs.dns, tls=obs.tls, sts=obs.sts if entry.id == "tls.sts_policy" else None,
        dane=obs.dane if entry.id == "tls.dane" else None)


def _decide(obs: Observation) -> tuple[CatalogEntry, str | None, str, int, str]:
    o, here = obs.outcome, where(obs.destination)

    if _breaks_dane(obs):
        return _dane(obs, here)
    if o is Outcome.STS_MX_MISMATCH or (obs.sts is not None and _breaks_sts(obs)):
        return _sts(obs, here)

    if o is Outcome.DOMAIN_NOT_FOUND:
        e = CATALOG["dns.domain_not_found"]
        name = (obs.dns or {}).get("name", "the recipient domain")
        return e, "nxdomain", e.code, e.smtp_code, f"The recipient domain {name} does not exist (NXDOMAIN)."
    if o is Outcome.NULL_MX:
        e = CATALOG["dns.null_mx"]
        name = (obs.dns or {}).get("name", "the recipient domain")
        return e, "null_mx", e.code, e.smtp_code, f"{name} publishes a null MX: it accepts no mail."

    if o in (Outcome.DNS_NXDOMAIN, Outcome.DNS_NO_ADDRESS, Outcome.DNS_SERVFAIL, Outcome.DNS_TIMEOUT):
        e = CATALOG["dns.failed"]
        dns = obs.dns or {}
        name, qtype, ns = dns.get("name", "?"), dns.get("type", "A"), dns.get("nameserver")
        via = f" from {ns}" if ns else ""
        if o is Outcome.DNS_SERVFAIL:
            rcode = (dns.get("rcode") or "SERVFAIL").upper()
            subtype = "refused" if rcode == "REFUSED" else "servfail"
            detail = f"The lookup of {name} ({qtype}) failed with {rcode}{via}."
            if dns.get("ede"):
                detail += f" The resolver says: {dns['ede'].get('text') or dns['ede'].get('code')} (EDE {dns['ede'].get('code')})."
        elif o is Outcome.DNS_NXDOMAIN:
            subtype, detail = "nxdomain", f"{name} does not exist in DNS (NXDOMAIN{via})."
        elif o is Outcome.DNS_NO_ADDRESS:
            subtype, detail = "no_address", f"{name} exists but has no A or AAAA record."
        else:
            subtype, detail = "timeout", f"The name servers did not answer the lookup of {name} ({qtype}) in time."
        return e, subtype, e.code, e.smtp_code, detail

    if o in (Outcome.CONNECT_TIMEOUT, Outcome.UNREACHABLE):
        e = CATALOG["connect.timeout"]
        if o is Outcome.CONNECT_TIMEOUT:
            return e, "timeout", e.code, e.smtp_code, f"No answer from {here} before the connect timeout."
        subtype = "network_unreachable" if obs.errno == "ENETUNREACH" else "host_unreachable"
        return e, subtype, e.code, e.smtp_code, f"{here} is unreachable ({obs.errno or 'no route'})."

    if o is Outcome.REFUSED:
        e = CATALOG["connect.refused"]
        return e, "refused", e.code, e.smtp_code, f"{here} refused the TCP connection ({obs.errno or 'ECONNREFUSED'})."

    if o is Outcome.CERTIFICATE:
        e = CATALOG["tls.certificate_invalid"]
        tls = obs.tls or {}
        subtype = VERIFY_SUBTYPES.get(tls.get("verify_code"), "invalid")
        detail = f"The certificate of {here} {_TLS_SUBTYPE_WORDS[subtype]}"
        if subtype == "expired" and tls.get("not_after"):
            detail += f" (on {tls['not_after']})"
        elif subtype == "not_yet_valid" and tls.get("not_before"):
            detail += f" (valid from {tls['not_before']})"
        elif subtype == "name_mismatch" and tls.get("expected_name"):
            names = ", ".join(tls.get("sans") or []) or tls.get("subject") or "other names"
            detail += f": it is for {names}, the connector expects {tls['expected_name']}"
        elif subtype in ("untrusted_issuer", "self_signed") and tls.get("issuer"):
            detail += f" (issuer: {tls['issuer']})"
        return e, subtype, e.code, e.smtp_code, detail + "."

    if o in (Outcome.TLS_NOT_OFFERED, Outcome.TLS_HANDSHAKE):
        e = CATALOG["connect.rejected"]
        if o is Outcome.TLS_NOT_OFFERED:
            return (e, "tls_not_offered", e.code, e.smtp_code,
                    f"{here} does not offer STARTTLS and the connector requires TLS; nothing was sent in clear.")
        return (e, "tls_handshake", e.code, e.smtp_code,
                f"The TLS handshake with {here} failed: the server answered with a TLS alert or with TLS "
                f"relaywatch will not use ({obs.note or 'no common protocol or cipher'}).")

    if o is Outcome.REPLY and obs.phase in (Phase.GREETING, Phase.EHLO, Phase.STARTTLS):
        e = CATALOG["connect.rejected"]
        if obs.phase is Phase.GREETING:
            subtype, what = f"greeting_{obs.reply_code}", "greeted with an error"
        elif obs.phase is Phase.EHLO:
            subtype, what = "ehlo_rejected", "rejected EHLO"
        else:
            subtype, what = "starttls_refused", "refused STARTTLS"
        return e, subtype, e.code, e.smtp_code, f"{here} {what}: \"{obs.reply}\"."

    if o in (Outcome.CLOSED, Outcome.SILENT, Outcome.STALLED, Outcome.PROTOCOL):
        e = CATALOG["connection.dropped"]
        phase = _PHASE_WORDS.get(obs.phase, obs.phase.value)
        if o is Outcome.CLOSED:
            how = "closed the connection"
            if obs.errno:
                how += f" ({obs.errno})"
            subtype = "closed"
        elif o is Outcome.SILENT:
            subtype, how = "silent", "stopped answering (timeout)"
        elif o is Outcome.STALLED:
            subtype, how = "stalled", "stopped reading the message (timeout)"
        else:
            subtype, how = "protocol", f"answered with something that is not SMTP ({obs.note or 'garbled reply'})"
        if o is Outcome.CLOSED and obs.note:
            return e, subtype, e.code, e.smtp_code, f"{here} {how} {phase} ({obs.note})."
        return e, subtype, e.code, e.smtp_code, f"{here} {how} {phase}."

    if o is Outcome.SMTPUTF8_NOT_OFFERED:
        e = CATALOG["smtputf8.not_offered"]
        return (e, "smtputf8_not_offered", e.code, e.smtp_code,
                f"{here} does not offer SMTPUTF8, and the message has an address that exists only in "
                f"UTF-8 ({obs.note or 'a non-ASCII local part'}); it was not sent, and no address was changed."
                if obs.note != UTF8_HEADERS_NOTE else
                f"{here} does not offer SMTPUTF8, and the message came with SMTPUTF8 and UTF-8 headers "
                f"(RFC 6532), which need it; it was not sent, and nothing was changed.")

    if o is Outcome.INTERNAL:
        e = CATALOG["relay.internal_error"]
        phase = _PHASE_WORDS.get(obs.phase, obs.phase.value)
        return (e, "internal", e.code, e.smtp_code,
                f"relaywatch failed {phase} with {here} ({obs.note or 'unforeseen error'}); it dropped the session.")

    if o is Outcome.LOCAL_ERROR:
        e = CATALOG["local.delivery_failed"]
        return e, obs.errno or "io_error", e.code, e.smtp_code, f"Writing to the local mailbox failed ({obs.note})."

    if o is Outcome.REPLY:
        code = obs.reply_code or 451
        permanent = code >= 500
        e = CATALOG["smtp.permanent_reply" if permanent else "smtp.transient_reply"]
        enhanced = obs.reply_enhanced or (f"{code // 100}.0.0")
        phase = {Phase.MAIL: "MAIL FROM", Phase.RCPT: "RCPT TO", Phase.DATA: "DATA",
                 Phase.AFTER_DATA: "the end of the message"}.get(obs.phase, obs.phase.value)
        verb = "rejected" if permanent else "deferred"
        return e, None, enhanced, code, f"{here} {verb} {phase}: \"{obs.reply}\"."

    raise ValueError(f"unclassifiable observation: {obs!r}")
