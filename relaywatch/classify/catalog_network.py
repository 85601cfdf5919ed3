"""The catalog's network failures: DNS, the TCP connection and TLS.

These are the codes Exchange Online's mail flow intelligence uses (4.4.312 to
4.4.318 and 4.7.320), so admins who know that product recognise them; the texts
are ours.
"""

from __future__ import annotations

from relaywatch.classify.catalog_entry import CatalogEntry

NETWORK: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        id="dns.failed", code="4.4.312", smtp_code=450, title="DNS query failed",
        explanation=(
            "relaywatch could not turn the destination's host name (the connector's smart host, "
            "or an MX host of the recipient domain) into an IP address, so it never tried to "
            "connect. The subtype says how the lookup failed: the name does not exist (nxdomain), "
            "it exists without an address record (no_address), the name servers answered with an "
            "error (servfail, refused), or they did not answer in time (timeout)."),
        causes={
            "on_premises": (
                "The smart host name in the connector is misspelt, or the record for it was removed.",
                "The company's DNS hosting has a problem: its name servers fail or do not answer.",
                "The domain registration lapsed, so the whole domain stopped resolving.",
                "The record was changed recently and resolvers still serve the old answer.",
            ),
            "partner": (
                "The partner's mail host name no longer resolves: renamed, removed or mistyped in the connector.",
                "The partner's DNS hosting is failing or unreachable.",
                "The partner's domain registration lapsed.",
            ),
        },
        fixes={
            "on_premises": (
                "Look the name up yourself (`dig A <host>` against the configured nameservers) and compare it with the connector's smart_hosts.",
                "If the name is wrong, correct smart_hosts in the connector and reload relaywatch.",
                "If the name servers fail, fix the zone with your DNS provider; check the domain's registration has not expired.",
                "After a recent change, wait for the old record's TTL to pass or point smart_hosts at the new address.",
            ),
            "partner": (
                "Send the partner the failing name, the nameserver and the DNS answer from this error, and ask them to fix their DNS.",
                "Ask the partner whether their mail host name changed; if so, update the connector's smart_hosts.",
            ),
        }),
    CatalogEntry(
        id="connect.timeout", code="4.4.315", smtp_code=450, title="Connection timed out",
        explanation=(
            "relaywatch resolved the destination but could not open a TCP connection to it: nothing "
            "answered before the connect timeout, or the network said the host is unreachable. Nothing "
            "was refused; the packets went unanswered."),
        causes={
            "on_premises": (
                "The mail server is down or switched off.",
                "A firewall drops (rather than rejects) connections on the SMTP port.",
                "The connector points at the wrong address, for example after a change of internet provider or public IP.",
                "A network outage between relaywatch and the server.",
            ),
            "partner": (
                "The partner's mail server is down, or their firewall silently drops our connections.",
                "The connector still points at an address the partner no longer uses.",
            ),
        },
        fixes={
            "on_premises": (
                "If the address in the error is not your server's current address, correct the connector's smart_hosts.",
                "Otherwise check the server is running and listening on the port (`ss -ltn` on the server).",
                "Check firewalls and NAT forward the port to the server and allow relaywatch's address.",
                "Run `relaywatch connector test <name>` to watch the connection step by step.",
            ),
            "partner": (
                "Tell the partner which host, IP and port time out and since when; ask whether their server is up and whether they block our address.",
                "Ask the partner for their current mail host and update the connector if it changed.",
            ),
        }),
    CatalogEntry(
        id="connect.refused", code="4.4.316", smtp_code=450, title="Connection refused",
        explanation=(
            "The destination host answered, but actively refused the TCP connection: no program "
            "listens on that port, or a firewall rejects connections from relaywatch."),
        causes={
            "on_premises": (
                "The mail service on the server is stopped or listens on another port.",
                "A firewall rule rejects connections from relaywatch's address.",
                "The server was decommissioned on purpose (mailboxes moved elsewhere) but the connector still sends to it.",
            ),
            "partner": (
                "The partner's mail service is stopped, or their firewall rejects our address.",
                "The partner moved to another mail host and retired this one.",
            ),
        },
        fixes={
            "on_premises": (
                "Start the mail service, or correct the port in smart_hosts.",
                "Allow relaywatch's address to the SMTP port in the firewall.",
                "If the server was retired on purpose, disable the connector and make the domain authoritative so mail for unknown recipients is rejected at once instead of queued.",
            ),
            "partner": (
                "Tell the partner the host, IP and port that refuse connections and ask them to allow relaywatch's address.",
                "Ask whether their mail host changed, and update the connector.",
            ),
        }),
    CatalogEntry(
        id="connect.rejected", code="4.4.317", smtp_code=450, title="Cannot connect to remote server",
        explanation=(
            "relaywatch connected, but the server turned the session down or could not meet the "
            "connector's requirements: it greeted with an error (421 or 554), refused EHLO, did not "
            "offer STARTTLS although the connector requires TLS, refused STARTTLS, or answered the "
            "TLS handshake with a TLS alert for a reason other than the certificate (no common "
            "protocol version or cipher). A server that hangs up during the handshake without an "
            "alert is 4.4.318, not this."),
        causes={
            "on_premises": (
                "The mail server is overloaded, in maintenance, or rejects relaywatch's address (its greeting says which).",
                "The connector requires TLS but STARTTLS is not enabled on the server, or a firewall strips it.",
                "The server only allows TLS versions or ciphers relaywatch will not use.",
            ),
            "partner": (
                "The partner's server rejects our connection (its greeting text says why) or is overloaded.",
                "The connector requires TLS but the partner's server does not offer it.",
            ),
        },
        fixes={
            "on_premises": (
                "Read the server's reply in the error; if it rejects relaywatch's address, allow it in the server's connection filter.",
                "For TLS: enable STARTTLS with a valid certificate on the server, check no firewall strips it, or set the connector's tls to \"opportunistic\" if encryption is not required.",
                "Enable TLS 1.2 or later on the server.",
            ),
            "partner": (
                "Send the partner the greeting or reply from the error and ask them to accept our connections.",
                "If they do not support TLS, agree with them whether tls may be \"opportunistic\" for this connector.",
            ),
        }),
    CatalogEntry(
        id="connection.dropped", code="4.4.318", smtp_code=450, title="Connection closed abruptly",
        explanation=(
            "relaywatch was connected and talking SMTP when the server closed or reset the "
            "connection, or stopped answering until the phase's timeout ran out. The phase says "
            "where in the conversation it happened; phase starttls means the server agreed to "
            "STARTTLS and then hung up during the TLS handshake without sending a TLS alert."),
        causes={
            "on_premises": (
                "A firewall or appliance that inspects SMTP interferes with the session (a masked '220 ****' greeting or a garbled EHLO reply is a sign of it).",
                "The mail server is failing: crashing, hung, out of disk or memory.",
                "An unstable network path between relaywatch and the server.",
                "During STARTTLS: the server cannot agree on a TLS version or cipher and hangs up instead of sending an alert (some servers do).",
            ),
            "partner": (
                "The partner's server or a firewall in front of it drops the session.",
                "The network path to the partner is unstable.",
            ),
        },
        fixes={
            "on_premises": (
                "Turn off SMTP inspection ('fixup', 'ESMTP inspection') on firewalls between relaywatch and the server.",
                "Check the mail server's logs, disk space and memory at the time of the error.",
                "If it happens after the final dot, check content filters on the server that may time out on large messages.",
                "Ask the network team to check the path if drops happen at random phases.",
                "If it happens during STARTTLS, look for a TLS handshake error in the server's log at that time and enable TLS 1.2 or later there.",
            ),
            "partner": (
                "Tell the partner the phase, time and IP of the drop and ask them to check their server and firewall.",
            ),
        }),
    CatalogEntry(
        id="tls.certificate_invalid", code="4.7.320", smtp_code=450, title="Certificate validation failed",
        explanation=(
            "The destination's TLS certificate does not pass the connector's tls_verify policy, so "
            "relaywatch did not send the message. The subtype says why: expired, not_yet_valid, "
            "name_mismatch, self_signed, untrusted_issuer or revoked; the evidence shows the "
            "certificate's names, issuer and dates."),
        causes={
            "on_premises": (
                "The server's certificate expired or was renewed but not installed.",
                "The certificate is for another name than the connector expects (tls_name or the smart host).",
                "The certificate is self-signed or from a private CA that relaywatch does not trust.",
                "The certificate was revoked by its issuer.",
            ),
            "partner": (
                "The partner's certificate expired, is for another name, or comes from a CA we do not trust.",
            ),
        },
        fixes={
            "on_premises": (
                "Install a current certificate on the server (check its dates in the error).",
                "Make the certificate cover the name relaywatch expects, or set the connector's tls_name to a name it covers.",
                "For a private CA, point the connector's ca_file at the CA certificate.",
                "As a stopgap, lower tls_verify (\"ca\" skips the name, \"none\" only encrypts) and plan to restore it.",
            ),
            "partner": (
                "Send the partner the certificate facts from the error (names, issuer, expiry) and ask them to renew or fix it.",
                "If they use a private CA, ask for its certificate and set it as the connector's ca_file.",
            ),
        }),
    CatalogEntry(
        id="tls.sts_policy", code="4.7.320", smtp_code=450, title="MTA-STS policy not met",
        explanation=(
            "The recipient domain publishes an MTA-STS policy (RFC 8461) in enforce mode, and this MX "
            "host does not meet it, so relaywatch held the message back rather than send it where the "
            "domain says it must not go. The subtype says how: the host is not among the policy's mx "
            "patterns and was never contacted (sts_mx_mismatch), it offers no STARTTLS or refuses it "
            "(sts_starttls_not_offered), its certificate is not valid for its name from a trusted CA "
            "(sts_certificate), or the TLS handshake failed (sts_tls_handshake). The evidence shows the "
            "policy's id, mode and mx patterns and the MX host tried. A policy in testing mode only "
            "logs these; mail is delivered."),
        causes={
            "on_premises": (
                "The domain's MX records were changed (a new provider or a backup MX) but the policy's mx lines were not.",
                "The MX host's certificate expired, is self-signed, or does not name the MX host.",
                "STARTTLS was switched off on the MX host, or something between us strips it (a downgrade attack looks the same).",
            ),
            "partner": (
                "The recipient domain moved or added an MX host and did not update its MTA-STS policy.",
                "The recipient's MX certificate expired or does not cover the MX host name.",
                "Their server stopped offering STARTTLS, or a network device on the path removes it.",
            ),
        },
        fixes={
            "on_premises": (
                "If you run the domain: list every MX host in the policy's mx lines (publish a new id in the _mta-sts TXT record), or fix the MX records.",
                "Install a certificate for the MX host name from a public CA, and keep STARTTLS enabled.",
                "Until it is fixed, switch the policy to mode: testing (new id) so senders deliver and report instead of holding mail.",
            ),
            "partner": (
                "Send the recipient domain's postmaster the policy id, the mx patterns and the MX host from this error; only they can fix the policy, the MX records or the certificate.",
                "If STARTTLS disappears only from here, suspect a device on our own network path that strips it.",
                "Mail is retried until it expires; the domain's fix (or a policy in testing mode) releases it.",
            ),
        }),
    CatalogEntry(
        id="tls.dane", code="4.7.320", smtp_code=450, title="DANE authentication failed",
        explanation=(
            "The MX host (or smart host) publishes DNSSEC-signed TLSA records (DANE, RFC 7672), so "
            "relaywatch must reach it over TLS and accept only a certificate those records name; this "
            "session did not, so the message was held back. The subtype says how: the certificate matches "
            "no usable TLSA record (dane_tlsa_mismatch), a DANE-TA record matched the issuing CA but the "
            "certificate is not for the host's name (dane_name_mismatch) or its chain does not verify or "
            "has expired (dane_chain_invalid), the server offers no STARTTLS or refuses it "
            "(dane_starttls_not_offered), the TLS handshake failed (dane_tls_handshake), the TLSA lookup "
            "of a signed host failed (dane_dnssec_bogus), or the connector requires DANE and the host has "
            "no usable TLSA records (dane_required). The evidence shows the MX host, its IP, the TLSA "
            "records and the digests of the certificate presented. Hosts whose DNS answers are not "
            "DNSSEC-validated are not affected."),
        causes={
            "on_premises": (
                "The server's certificate or key was replaced and the TLSA records still name the old one.",
                "The TLSA records were published for another port or host name, or with a wrong digest.",
                "DNSSEC for the zone is broken (expired signatures, a DS record that does not match the key).",
                "STARTTLS was switched off on the server, or a device on the path strips it.",
            ),
            "partner": (
                "The partner rotated its certificate or key without publishing matching TLSA records first.",
                "The partner's DNSSEC signatures expired or its DS record no longer matches its key.",
                "Their server stopped offering STARTTLS, or a network device on the path removes it.",
            ),
        },
        fixes={
            "on_premises": (
                "Compare the records (`dig +dnssec TLSA _25._tcp.<host>`) with the digests in the error; publish a record for the new key (3 1 1 is its SPKI SHA-256) and keep the old one until the new key is in use.",
                "Fix the zone's DNSSEC (re-sign it, update the DS record at the parent); `dig +dnssec` must return the records with the ad flag.",
                "Keep STARTTLS enabled on the server: with TLSA published, senders will not deliver without it.",
            ),
            "partner": (
                "Send the partner's postmaster the MX host, the TLSA records and the certificate digests from this error; only they can fix their TLSA records or DNSSEC.",
                "Check yourself with `dig +dnssec TLSA _25._tcp.<host>` (the ad flag says it is validated) and `openssl s_client -starttls smtp -connect <host>:25 -dane_tlsa_domain <host> -dane_tlsa_rrdata \"3 1 1 ...\"`.",
                "Mail is retried until it expires; a TLSA record that matches (or removing the records) releases it.",
            ),
        }),
)
