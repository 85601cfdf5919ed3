"""TLS for the SMTP client: the policy, the certificate facts, the second look.

- ``TlsPolicy``: whether to use STARTTLS (``none | opportunistic | required``)
  and how to verify (``none | ca | ca_and_name``), as a connector configures
  it; ``context()`` builds the ``ssl.SSLContext``.
- ``certificate_facts``: what a certificate says (names, issuer, dates), for
  the evidence of an attempt and for the certificate incident.
- ``presented_chain``: the certificates the server sent, leaf first, for
  DANE (deliver/dane.py matches them against the TLSA records).
- ``fetch_certificate``: when a certificate fails verification, the handshake
  gives no certificate to look at; a second session, without verification,
  fetches it so the evidence always has its names, issuer and dates.

No socket here: ``fetch_certificate`` is handed the session class to open
(deliver/transport.py's ``SmtpConnection``), so this module does not import
the transport that imports it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.x509.oid import ExtensionOID, NameOID

from relaywatch.config import DeliveryConfig
from relaywatch.deliver.dane import TlsaRecord
from relaywatch.deliver.observe import SessionFailure
from relaywatch.model import Destination

if TYPE_CHECKING:
    from relaywatch.deliver.transport import SmtpConnection


@dataclass(frozen=True)
class TlsPolicy:
    mode: str = "opportunistic"       # none | opportunistic | required
    verify: str = "none"              # none | ca | ca_and_name
    expected_name: str | None = None  # the name the certificate must carry (ca_and_name)
    ca_file: str | None = None
    crl_file: str | None = None
    # DANE (RFC 7672): the usable TLSA records the certificate must match
    # instead of any CA (verify is "none" then: the records are the trust).
    dane: tuple[TlsaRecord, ...] = ()
    dane_names: tuple[str, ...] = ()  # the names a DANE-TA certificate may carry (an MX alias: both)

    def context(self) -> ssl.SSLContext:
        if self.verify == "none":
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx = ssl.create_default_context(cafile=self.ca_file)
            ctx.check_hostname = self.verify == "ca_and_name"
            if self.crl_file:
                ctx.load_verify_locations(self.crl_file)
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx


def certificate_facts(der: bytes | None, expected_name: str | None) -> dict:
    facts: dict = {"expected_name": expected_name}
    if not der:
        return facts
    cert = x509.load_der_x509_certificate(der)

    def cn(name: x509.Name) -> str:
        attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(attrs[0].value) if attrs else name.rfc4514_string()
    try:
        sans = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        names = [str(n) for n in sans.get_values_for_type(x509.DNSName)]
        names += [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    facts.update(
        subject=cn(cert.subject), sans=names, issuer=cn(cert.issuer),
        not_before=cert.not_valid_before_utc.isoformat(timespec="seconds"),
        not_after=cert.not_valid_after_utc.isoformat(timespec="seconds"),
        serial=format(cert.serial_number, "x"),
        self_issued=cert.issuer == cert.subject,
    )
    return facts


def session_facts(ssl_object: ssl.SSLObject, expected_name: str | None) -> dict:
    """The TLS session the handshake set up: version, cipher, the peer's certificate."""
    return {"version": ssl_object.version(), "cipher": ssl_object.cipher()[0],
            **certificate_facts(ssl_object.getpeercert(binary_form=True), expected_name)}


def presented_chain(ssl_object: ssl.SSLObject) -> list[bytes]:
    """The chain the server presented (DER, leaf first), verified or not.

    Python 3.13 has it as ``get_unverified_chain()``; 3.11 and 3.12 have the
    same method on the private ``_sslobj`` only."""
    public = getattr(ssl_object, "get_unverified_chain", None)
    chain = public() if public is not None else ssl_object._sslobj.get_unverified_chain()
    return [c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain or ()]


async def fetch_certificate(session: type[SmtpConnection], dest: Destination, timeouts: DeliveryConfig,
                            helo: str, expected_name: str | None) -> dict:
    """A second session, without verification, only to read the certificate."""
    conn = session(dest, timeouts, helo)
    try:
        await conn.open(TlsPolicy(mode="required", verify="none", expected_name=expected_name),
                        expected_name or dest.host)
        facts = dict(conn.tls or {})
        facts["expected_name"] = expected_name
        return facts
    except SessionFailure:
        return {"expected_name": expected_name}
    finally:
        await conn.quit()
