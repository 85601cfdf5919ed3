"""What the transport saw when an attempt failed: facts, no judgement.

The delivery driver records the phase it was in and turns the exception (or
reply) it got into one ``Observation`` in exactly one place: the per-phase
tables of deliver/observe.py, applied by ``SmtpConnection.phase()``.  classify.classify() turns an observation
into a catalog entry.  Message text is never inspected.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from relaywatch.model import Destination


class Phase(str, enum.Enum):
    DNS = "dns"
    CONNECT = "connect"
    GREETING = "greeting"
    EHLO = "ehlo"
    STARTTLS = "starttls"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"              # the DATA command and sending the body
    AFTER_DATA = "after-data"  # waiting for the reply to the final dot
    LOCAL = "local"            # writing into a local Maildir


class Outcome(str, enum.Enum):
    # DNS, for a host name (smart host or MX target)
    DNS_NXDOMAIN = "nxdomain"
    DNS_NO_ADDRESS = "no_address"      # the name exists but has no A/AAAA
    DNS_SERVFAIL = "servfail"          # SERVFAIL, REFUSED or another error rcode
    DNS_TIMEOUT = "dns_timeout"
    # DNS, for the recipient domain's MX (internet route)
    DOMAIN_NOT_FOUND = "domain_not_found"
    NULL_MX = "null_mx"
    # TCP
    CONNECT_TIMEOUT = "connect_timeout"
    UNREACHABLE = "unreachable"        # EHOSTUNREACH / ENETUNREACH
    REFUSED = "refused"
    # after connecting
    CLOSED = "closed"                  # EOF or reset
    SILENT = "silent"                  # the phase's timeout expired waiting for a reply
    STALLED = "stalled"                # the peer stopped reading our body
    REPLY = "reply"                    # an error reply (see .reply_code)
    TLS_NOT_OFFERED = "tls_not_offered"
    TLS_HANDSHAKE = "tls_handshake"    # TLS failed for a non-certificate reason
    CERTIFICATE = "certificate"        # the certificate failed verification
    PROTOCOL = "protocol"              # the peer spoke something that is not SMTP
    SMTPUTF8_NOT_OFFERED = "smtputf8_not_offered"   # UTF-8 addresses, and the server has no SMTPUTF8 (RFC 6531)
    LOCAL_ERROR = "local_error"        # the local mailbox could not be written
    INTERNAL = "internal"              # relaywatch itself failed mid-session (the connection was still up)
    # MTA-STS (RFC 8461): an MX host the domain's enforced policy does not list; never connected to
    STS_MX_MISMATCH = "sts_mx_mismatch"
    # DANE (RFC 7672): the certificate matches no usable TLSA record (or its chain or name fails under DANE-TA)
    TLSA_MISMATCH = "tlsa_mismatch"
    # DANE: the TLSA lookup of a DNSSEC-secure host failed (SERVFAIL: a validating resolver's "bogus")
    DNSSEC_BOGUS = "dnssec_bogus"
    # DANE: the connector requires it (dane = "required") and the host has no secure, usable TLSA records
    DANE_REQUIRED = "dane_required"


@dataclass(frozen=True)
class Observation:
    phase: Phase
    outcome: Outcome
    destination: Destination | None = None
    reply_code: int | None = None
    reply_enhanced: str | None = None
    reply_text: str | None = None
    errno: str | None = None
    dns: dict[str, Any] | None = None        # name, type, rcode, nameserver
    tls: dict[str, Any] | None = None        # verify_code, subject, sans, issuer, dates, expected name
    note: str | None = None                  # a low-level fact for the detail line
    sts: dict[str, Any] | None = None        # the MTA-STS policy in force: domain, id, mode, mx, result_type
    dane: dict[str, Any] | None = None       # the TLSA records in force: host, records, presented digests, result_type

    @property
    def reply(self) -> str | None:
        if self.reply_code is None:
            return None
        parts = [str(self.reply_code)]
        if self.reply_enhanced:
            parts.append(self.reply_enhanced)
        if self.reply_text:
            parts.append(self.reply_text)
        return " ".join(parts)



# The note of an SMTPUTF8_NOT_OFFERED whose cause is RFC 6532 headers, not an address.
UTF8_HEADERS_NOTE = "UTF-8 headers"
