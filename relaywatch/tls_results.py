"""The TLS-reporting vocabulary (RFC 8460) every stage shares: the result types, one
session's ``TlsResult`` and the stored daily ``TlsCount``.

Delivery makes ``TlsResult``s (MTA-STS, DANE, opportunistic TLS by MX), the store keeps
``TlsCount``s, and notify/tls_report.py builds the reports from them.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

# The result types of RFC 8460 4.3: why a session under a policy failed.
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
CERTIFICATE_EXPIRED = "certificate-expired"
CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"
STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
STS_POLICY_INVALID = "sts-policy-invalid"
STS_WEBPKI_INVALID = "sts-webpki-invalid"
TLSA_INVALID = "tlsa-invalid"
DNSSEC_INVALID = "dnssec-invalid"
DANE_REQUIRED = "dane-required"


@dataclass(frozen=True)
class TlsResult:
    """One session (or policy fetch) to a recipient domain that has, or might have, a TLS
    policy: the fact RFC 8460 reports aggregate.  MTA-STS, DANE and plain opportunistic
    TLS on the MX route each produce it and hand it to deliver/tls_report.py's ``TlsResults.record``."""
    at: float
    policy_domain: str
    policy_type: str                   # "sts", "tlsa", or "no-policy-found"
    policy_id: str | None
    mode: str | None
    result_type: str | None            # None: a successful session; else one of the result types above
    mx_host: str | None = None         # receiving-mx-hostname
    receiving_ip: str | None = None
    policy_strings: tuple[str, ...] = ()
    enforced: bool = False             # the mail was held back because of it
    detail: str = ""
    sending_ip: str | None = None      # sending-mta-ip: our end of the connection

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TlsCount:
    """Sessions of one UTC day under one policy of one domain, with one result (the
    stored aggregate; ``result_type`` "" counts successes, and then mx/ips are "").
    ``detail`` is not part of the key: the latest failing session's ``TlsResult.detail``
    (the report's ``failure-reason-code``, RFC 8460 4.4), "" for the successes."""
    day: str                           # YYYY-MM-DD, UTC
    policy_domain: str
    policy_type: str
    policy_strings: tuple[str, ...]
    result_type: str = ""
    mx_host: str = ""
    receiving_ip: str = ""
    sending_ip: str = ""
    count: int = 0
    detail: str = ""

    @property
    def policy_key(self) -> str:
        """A short stable key for the policy strings (they may be long; they are not a key column)."""
        return hashlib.sha256("\n".join(self.policy_strings).encode()).hexdigest()[:32]

    def key(self) -> tuple:
        return (self.day, self.policy_domain, self.policy_type, self.policy_key, self.result_type, self.mx_host,
                self.receiving_ip, self.sending_ip)
