"""DANE for SMTP (RFC 7672): TLSA records, whether they apply, and matching them.

An MX host (or smart host) whose domain signs its zone with DNSSEC can
publish ``_25._tcp.<host>`` TLSA records naming the certificate or key its
server presents.  A sender whose resolver validated the answers (the AD bit)
must then use STARTTLS and accept only a certificate those records match; a
man in the middle can neither strip STARTTLS nor present another
certificate.  Everything here is pure and table-tested:

- ``TlsaRecord`` and ``usable`` (RFC 7672 3.1: only DANE-TA(2) and DANE-EE(3),
  selectors 0/1, matching types 0/1/2; PKIX-TA(0) and PKIX-EE(1) are unusable
  for SMTP, where there is no agreed set of public CAs).
- ``tlsa_wanted``: whether the TLSA lookup is done at all (the MX and address
  answers must be DNSSEC-secure), ``tlsa_hosts``: at which names (an MX host
  that is an alias, RFC 7672 2.2.3) and ``verdict``: what the TLSA answer means
  (authenticate, TLS without authentication, not applicable, a failure).
- ``match_chain``: the presented chain against the usable records (DANE-EE:
  the leaf, no name or date check; DANE-TA: a certificate of the chain,
  then signatures, dates and the MX host name up to it).

DNS is deliver/resolver.py's (``Resolver.tlsa``); using a verdict for a
session is deliver/smtp.py's, the check after the handshake deliver/transport.py's.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtensionOID, NameOID

# RFC 8460 4.3 result types of a DANE failure (a missing STARTTLS is
# sts_policy.result_type's starttls-not-supported, as under MTA-STS).
from relaywatch.tls_results import CERTIFICATE_EXPIRED, CERTIFICATE_HOST_MISMATCH, TLSA_INVALID, VALIDATION_FAILURE


DANE_TA, DANE_EE = 2, 3
_DIGEST_SIZES = {1: 32, 2: 64}          # SHA2-256, SHA2-512 (RFC 6698 7.4)


@dataclass(frozen=True)
class TlsaRecord:
    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        """RFC 7672 3.1: DANE-TA/DANE-EE with a known selector and matching type (and a digest of its size)."""
        if self.usage not in (DANE_TA, DANE_EE) or self.selector not in (0, 1):
            return False
        if self.mtype == 0:
            return bool(self.data)
        return _DIGEST_SIZES.get(self.mtype) == len(self.data)

    def text(self) -> str:
        """The record as ``dig`` shows it: ``3 1 1 <hex>``."""
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"


def tlsa_name(host: str, port: int) -> str:
    return f"_{port}._tcp.{host.rstrip('.')}"


@dataclass(frozen=True)
class TlsaAnswer:
    records: tuple[TlsaRecord, ...]
    secure: bool                  # the resolver set AD: DNSSEC-validated


class Verdict(enum.Enum):
    NOT_APPLICABLE = "not_applicable"    # no (secure) TLSA: TLS as before
    AUTHENTICATE = "authenticate"        # usable records: STARTTLS required, the certificate must match one
    ENCRYPT = "encrypt"                  # secure TLSA, none usable: STARTTLS required, no authentication
    BOGUS = "bogus"                      # the TLSA lookup of a secure host failed: do not deliver there
    REQUIRED = "required"                # the connector requires DANE and this host has none usable


@dataclass(frozen=True)
class DanePolicy:
    """What DANE says for one host (and port): the verdict and its evidence."""
    verdict: Verdict
    host: str
    port: int
    reason: str = ""                                 # why, in words (not applicable: why not)
    records: tuple[TlsaRecord, ...] = ()             # the whole secure TLSA RRset
    dns: dict | None = None                          # the failed lookup (BOGUS)
    names: tuple[str, ...] = ()                      # tlsa_hosts: the TLSA owner's host first; () is (host,)

    @property
    def usable(self) -> tuple[TlsaRecord, ...]:
        return tuple(r for r in self.records if r.usable)

    @property
    def reference_names(self) -> tuple[str, ...]:
        """The names a DANE-TA certificate may carry, and (the first) whose TLSA records these are."""
        return self.names or (self.host,)

    @property
    def applies(self) -> bool:
        return self.verdict is not Verdict.NOT_APPLICABLE

    def evidence(self, domain: str) -> dict:
        """What a failure under this policy shows (docs/json.md ``dane``) and TLS-RPT reports."""
        return {"policy_domain": domain, "policy_type": "tlsa", "mx_host": self.host,
                "tlsa_name": tlsa_name(self.reference_names[0], self.port), "tlsa": [r.text() for r in self.records],
                "usable": [r.text() for r in self.usable]}


def tlsa_wanted(mode: str, mx_secure: bool, host_secure: bool, alias_secure: bool = False) -> str | None:
    """None when the TLSA records of the host are to be looked up; else why DANE does not apply.

    RFC 7672 2.2: TLSA records are only as trustworthy as the names that led
    to them, so the MX answer (for mail by MX) must be DNSSEC-validated, and
    the host's address answer too, unless the host is an alias whose own CNAME
    record is (``alias_secure``): a validated alias into an unsigned zone
    still has the MX name as its TLSA base domain (RFC 7672 2.2.2, tlsa_hosts)."""
    if mode == "off":
        return "DANE is off"
    if not mx_secure:
        return "the MX answer is not DNSSEC-validated (no AD bit)"
    if not host_secure and not alias_secure:
        return "the host's address answer is not DNSSEC-validated (no AD bit)"
    return None


def tlsa_hosts(host: str, canonical: str, expansion_secure: bool) -> tuple[str, ...]:
    """The host names whose TLSA records are asked for, in order: the TLSA base
    domains of RFC 7672 2.2.2 (and 2.2.3 for an MX host).

    An MX host that is an alias (CNAME) with a DNSSEC-validated expansion: the
    final target's records first, then the MX name's; these names are also the
    reference identifiers of a DANE-TA certificate.  An insecure expansion says
    nothing trustworthy about the target: only the MX name as the MX record
    names it (its TLSA records apply when its own CNAME is validated, tlsa_wanted)."""
    host, canonical = host.lower().rstrip("."), canonical.lower().rstrip(".")
    if canonical == host or not expansion_secure:
        return (host,)
    return (canonical, host)


def verdict(mode: str, host: str, port: int, answer: TlsaAnswer | None, *, skipped: str | None = None,
            lookup_failed: dict | None = None, names: tuple[str, ...] = ()) -> DanePolicy:
    """What the TLSA answer means for a session with ``host`` (``mode``: on | required).

    ``skipped``: why the lookup was not done (tlsa_wanted); ``lookup_failed``:
    the DNS facts of a TLSA lookup that failed (SERVFAIL: bogus, RFC 7672 2.2)."""
    if lookup_failed is not None:
        return DanePolicy(Verdict.BOGUS, host, port, "the TLSA lookup failed", dns=lookup_failed, names=names)
    if skipped is None and answer is not None and not answer.secure:
        skipped = "the TLSA answer is not DNSSEC-validated (no AD bit)"
    if skipped is None and (answer is None or not answer.records):
        skipped = "no TLSA records are published"
    if skipped is not None:
        return DanePolicy(Verdict.REQUIRED if mode == "required" else Verdict.NOT_APPLICABLE, host, port, skipped,
                          records=answer.records if answer is not None and answer.secure else (), names=names)
    if any(r.usable for r in answer.records):
        return DanePolicy(Verdict.AUTHENTICATE, host, port, "usable TLSA records", answer.records, names=names)
    if mode == "required":
        return DanePolicy(Verdict.REQUIRED, host, port, "no TLSA record is usable (DANE-TA/DANE-EE)", answer.records,
                          names=names)
    # RFC 7672 2.2: published but unusable records still mean "this server does TLS".
    return DanePolicy(Verdict.ENCRYPT, host, port, "no TLSA record is usable: TLS without authentication",
                      answer.records, names=names)


# -- matching -----------------------------------------------------------------------------

def _selected(cert: x509.Certificate, selector: int) -> bytes:
    if selector == 0:
        return cert.public_bytes(Encoding.DER)
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _digest(data: bytes, mtype: int) -> bytes:
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def matches(record: TlsaRecord, cert: x509.Certificate) -> bool:
    return _digest(_selected(cert, record.selector), record.mtype) == record.data


def name_matches(cert: x509.Certificate, host: str) -> bool:
    """The MX host name against the certificate's DNS names (RFC 7672 3.2.3: a
    wildcard only as the whole leftmost label; the CN only without DNS SANs)."""
    host = host.lower().rstrip(".")
    try:
        names = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value \
            .get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    for name in names:
        name = name.lower().rstrip(".")
        if name == host:
            return True
        if name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]:
            return True
    return False


def presented_digests(chain: list[bytes]) -> dict:
    """The leaf's digests, as a TLSA record would carry them (the evidence of a mismatch)."""
    if not chain:
        return {}
    leaf = x509.load_der_x509_certificate(chain[0])
    return {"cert_sha256": _digest(_selected(leaf, 0), 1).hex(), "spki_sha256": _digest(_selected(leaf, 1), 1).hex(),
            "chain": [x509.load_der_x509_certificate(c).subject.rfc4514_string() for c in chain]}


@dataclass(frozen=True)
class ChainMatch:
    ok: bool
    reason: str                              # ok: which record; else: why not
    subtype: str | None = None               # dane_tlsa_mismatch | dane_name_mismatch | dane_chain_invalid
    result_type: str | None = None           # RFC 8460
    record: str | None = None                # the record that matched (text form)
    presented: dict = field(default_factory=dict)


def match_chain(records: tuple[TlsaRecord, ...], chain: list[bytes], names: tuple[str, ...],
                now: datetime.datetime) -> ChainMatch:
    """Does the presented chain (leaf first, DER) satisfy one of the usable records?

    ``names``: the reference identifiers a DANE-TA leaf may carry (tlsa_hosts)."""
    presented = presented_digests(chain)
    if not chain:
        return ChainMatch(False, "the server presented no certificate", "dane_tlsa_mismatch", TLSA_INVALID,
                          presented=presented)
    certs = [x509.load_der_x509_certificate(c) for c in chain]
    usable = [r for r in records if r.usable]
    for r in usable:
        if r.usage == DANE_EE and matches(r, certs[0]):
            # RFC 7672 3.1.1: the key is the identity; names and dates do not matter.
            return ChainMatch(True, f"the certificate matches {r.text()}", record=r.text(), presented=presented)
    near: ChainMatch | None = None
    for r in usable:
        if r.usage != DANE_TA:
            continue
        for depth in range(1, len(certs)):
            if not matches(r, certs[depth]):
                continue
            problem = _chain_problem(certs[:depth + 1], now)
            if problem is not None:
                near = near or ChainMatch(False, f"{r.text()} matches the trust anchor at depth {depth}, but "
                                          f"{problem}", "dane_chain_invalid",
                                          CERTIFICATE_EXPIRED if "expired" in problem or "not valid" in problem
                                          else VALIDATION_FAILURE, r.text(), presented)
            elif not any(name_matches(certs[0], name) for name in names):
                near = ChainMatch(False, f"{r.text()} matches the trust anchor, but the certificate is not for "
                                  f"{' or '.join(names)}",
                                  "dane_name_mismatch", CERTIFICATE_HOST_MISMATCH, r.text(), presented)
            else:
                return ChainMatch(True, f"the chain leads to the trust anchor of {r.text()}", record=r.text(),
                                  presented=presented)
    if near is not None:
        return near
    return ChainMatch(False, "no usable TLSA record matches the certificate the server presented",
                      "dane_tlsa_mismatch", TLSA_INVALID, presented=presented)


def _chain_problem(certs: list[x509.Certificate], now: datetime.datetime) -> str | None:
    """Signatures and dates from the leaf up to the trust anchor (the last one), or what is wrong."""
    for depth, (cert, issuer) in enumerate(zip(certs, certs[1:])):
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature) as exc:
            return f"the certificate at depth {depth} is not signed by the one above it ({type(exc).__name__})"
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return (f"the certificate at depth {depth} is not valid now (valid "
                    f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}; expired or not yet valid)")
    return None
