"""Pick the likely cause from the evidence, instead of listing every cause.

Pure: the incident's latest evidence, the connector's last-known-good
delivery (time, host, IP, certificate) and the latest probe in; one
sentence and the facts behind it out.  It goes by the catalog entry of the
failure (``Failure.kind``), as the classifier does, then by its subtype.
"""

from __future__ import annotations

import re

from relaywatch.incident_facts import CertificateFacts
from relaywatch.incident import Diagnosis, Incident, IncidentKind, ProbeResult
from relaywatch.model import utc_minute
from relaywatch.watch_records import LastGood


def _date(iso: str | None) -> str:
    return (iso or "?")[:10]


_MASKED_GREETING = re.compile(r"^220[ -]\**\s*$|^220[ -][\s*]{6,}")


def diagnose(incident: Incident, last_good: LastGood | None, probe: ProbeResult | None = None) -> Diagnosis:
    if incident.kind is IncidentKind.CERT_EXPIRING:
        cert = incident.facts.certificate if isinstance(incident.facts, CertificateFacts) else {}
        return Diagnosis("cert_expiring", incident.detail or "", dict(cert))
    e = incident.latest_error
    kind = incident.catalog_id or (e.kind if e else None)
    subtype = e.subtype if e else None
    dest = e.destination if e else None
    ip, host, port = (dest.ip, dest.host, dest.port) if dest else (None, None, None)
    dns_answer = (e.dns if e else None) or {}
    tls = (e.tls if e else None) or {}
    reply = e.reply if e else None
    good_ip = last_good.ip if last_good else None
    good_since = utc_minute(last_good.at if last_good else None, "?")
    facts: dict = {"last_good": last_good.to_dict() if last_good else None}

    def out(cause: str, text: str) -> Diagnosis:
        return Diagnosis(cause, text, facts)

    if kind == "dns.failed":
        dns = dns_answer
        name = dns.get("name", host)
        if subtype == "nxdomain":
            return out("name_gone", f"{name} does not exist in DNS any more (NXDOMAIN from {dns.get('nameserver')}): "
                                    "the record was removed or renamed, or the domain's registration lapsed.")
        if subtype in ("servfail", "refused"):
            return out("dns_hosting", f"The name servers fail to answer for {name} ({dns.get('rcode')}): "
                                      "a problem at the DNS hosting, not at the mail server.")
        if subtype == "timeout":
            return out("dns_unreachable", f"No name server answered for {name}: the DNS servers "
                                          f"({dns.get('nameserver')}) are down or unreachable from relaywatch.")
        if subtype == "no_address":
            return out("record_removed", f"{name} exists but has no address record: the A/AAAA record was "
                                         "removed or never published.")
    if kind in ("connect.timeout", "connect.refused") and good_ip and ip and good_ip != ip:
        facts["address_changed"] = {"was": good_ip, "now": ip, "dns": dns_answer or None}
        if dns_answer.get("answer") is not None:
            how = (f"DNS for {dns_answer.get('name')} now answers {', '.join(dns_answer['answer'])} "
                   f"(TTL {dns_answer.get('ttl')} s, from {dns_answer.get('nameserver')}): the record changed "
                   "recently, or a resolver still serves an old answer.")
        else:
            how = "the connector's smart host setting changed."
        verb = "does not answer" if kind == "connect.timeout" else "refuses connections"
        return out("address_changed", f"Mail last went to {good_ip} ({good_since}); relaywatch now connects to "
                                      f"{ip}, which {verb}: {how}")
    if kind == "connect.timeout":
        if good_ip:
            return out("server_silent", f"{ip or host} took mail until {good_since} and now does not answer: the "
                                        "server is down, or a firewall drops connections.")
        return out("never_reached", f"relaywatch has never delivered to {host}: check the address and port in "
                                    "the connector and that a firewall lets relaywatch in.")
    if kind == "connect.refused":
        if last_good:
            return out("stopped_accepting", f"{ip or host} accepted mail until {good_since} and now refuses "
                                            "connections: a firewall change, the mail service stopped, or the "
                                            "server was decommissioned.")
        return out("nothing_listening", f"Nothing accepts connections on {host}:{port}: wrong port, "
                                        "service not running, or a firewall rejects relaywatch.")
    if kind == "connect.rejected":
        if subtype == "tls_not_offered":
            return out("starttls_missing", f"{host} does not offer STARTTLS, and the connector requires TLS "
                                           "(or a firewall strips STARTTLS from the server's EHLO reply).")
        if subtype and subtype.startswith("greeting_"):
            return out("greeting_rejected", f"{host} turns relaywatch away at the greeting: \"{reply}\".")
        if subtype == "starttls_refused":
            return out("starttls_refused", f"{host} offers STARTTLS but refuses it: \"{reply}\".")
        if subtype == "tls_handshake":
            return out("tls_incompatible", f"relaywatch and {host} share no TLS version or cipher.")
        return out("session_rejected", f"{host} rejects the session: \"{reply}\".")
    if kind == "connection.dropped":
        greeting = (probe.greeting if probe else None) or ""
        if _MASKED_GREETING.match(greeting) or subtype == "protocol":
            facts["firewall_signature"] = greeting or (e.detail if e else None)
            return out("smtp_inspection", f"The session is mangled between relaywatch and {host} (greeting "
                                          f"\"{greeting or '?'}\"): a firewall inspecting SMTP is the likely cause.")
        return out("server_failing", f"{host} drops the session at phase {e.phase if e else '?'}: the server hangs, "
                                     "crashes or runs out of resources, or the network path is unstable.")
    if kind == "tls.certificate_invalid":
        if subtype == "expired":
            return out("cert_expired", f"The certificate of {host} expired on {_date(tls.get('not_after'))}.")
        if subtype == "not_yet_valid":
            return out("cert_future", f"The certificate of {host} is valid only from {_date(tls.get('not_before'))} "
                                      "(or the server's clock is wrong).")
        if subtype == "name_mismatch":
            names = ", ".join(tls.get("sans") or []) or tls.get("subject")
            return out("cert_name", f"The certificate is for {names}; the connector expects {tls.get('expected_name')}.")
        if subtype in ("untrusted_issuer", "self_signed"):
            return out("cert_issuer", f"The certificate was issued by {tls.get('issuer')}, which relaywatch does "
                                      "not trust (set the connector's ca_file for a private CA).")
        if subtype == "revoked":
            return out("cert_revoked", f"The certificate of {host} (serial {tls.get('serial')}) has been revoked.")
    if kind == "tls.sts_policy":
        return _sts(subtype, host, tls, (e.sts if e else None) or {}, facts, out)
    if kind == "tls.dane":
        return _dane(subtype, host, (e.dane if e else None) or {}, facts, out)
    return out("destination_reply", f"{host} answers \"{reply or (e.detail if e else '')}\".")


def _sts(subtype: str | None, host: str | None, tls: dict, sts: dict, facts: dict, out) -> Diagnosis:
    """An MX that does not meet the recipient domain's enforced MTA-STS policy (RFC 8461)."""
    facts["sts"] = sts
    policy = f"the MTA-STS policy of {sts.get('policy_domain', '?')} (id {sts.get('policy_id', '?')})"
    if subtype == "sts_mx_mismatch":
        return out("sts_mx_not_listed", f"{host} is an MX of {sts.get('policy_domain', 'the domain')} but {policy} "
                                        f"lists only {', '.join(sts.get('mx') or []) or 'other hosts'}: the "
                                        "domain changed its MX records without its policy, or its MX answer was "
                                        "tampered with.")
    if subtype == "sts_starttls_not_offered":
        return out("sts_starttls_missing", f"{host} does not offer STARTTLS, which {policy} requires: TLS is off on "
                                           "that server, or something on the network path strips it (a downgrade).")
    if subtype == "sts_certificate":
        names = ", ".join(tls.get("sans") or []) or tls.get("subject") or "?"
        return out("sts_certificate", f"The certificate of {host} is for {names} (issued by {tls.get('issuer', '?')}), "
                                      f"not a valid one for {tls.get('expected_name') or host}, as {policy} requires.")
    return out("sts_tls_failed", f"TLS with {host} fails, and {policy} does not allow mail without it.")


def _dane(subtype: str | None, host: str | None, dane: dict, facts: dict, out) -> Diagnosis:
    """An MX host whose DNSSEC-signed TLSA records (RFC 7672) its own TLS does not meet."""
    facts["dane"] = dane
    name = dane.get("tlsa_name") or f"_25._tcp.{host}"
    check = f"check with `dig +dnssec TLSA {name}`"
    if subtype == "dane_tlsa_mismatch":
        spki = (dane.get("presented") or {}).get("spki_sha256", "?")
        return out("dane_key_rotated", f"The certificate of {host} matches none of its TLSA records: the server's key "
                                       f"or certificate was replaced without publishing a matching TLSA record first. "
                                       f"Only the domain's admins can fix it (publish 3 1 1 {spki}); {check}.")
    if subtype in ("dane_name_mismatch", "dane_chain_invalid"):
        return out("dane_ta_certificate", f"{host} presents a certificate from the CA its TLSA records name, but "
                                          f"{dane.get('reason') or 'it does not verify'}; the domain's admins must "
                                          f"install a correct certificate; {check}.")
    if subtype == "dane_starttls_not_offered":
        return out("dane_starttls_missing", f"{host} publishes TLSA records but does not offer STARTTLS: TLS is off on "
                                            "that server, or something on the network path strips it (a downgrade).")
    if subtype == "dane_dnssec_bogus":
        return out("dnssec_bogus", f"The DNSSEC signatures of {name} do not validate (expired signatures or a DS "
                                   f"record that does not match the zone's key): a fault of the domain's DNS; {check}.")
    if subtype == "dane_required":
        return out("dane_missing", f"The connector requires DANE, and {host} has no usable DNSSEC-validated TLSA "
                                   f"records ({dane.get('reason') or 'none'}); {check}.")
    return out("dane_tls_failed", f"TLS with {host} fails, and its TLSA records do not allow mail without it.")
