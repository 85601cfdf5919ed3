"""``[tls_reporting]``: the daily TLS reports (RFC 8460) sent to the domains that ask for them."""

from __future__ import annotations

from relaywatch.config.model import TlsReportingConfig
from relaywatch.config.values import Reader, boolean, file_keys, parse_domain, string


def parse_tls_reporting(r: Reader, t: dict) -> TlsReportingConfig:
    """The submitter stays empty when unset; ``load.py`` fills in server.hostname."""
    r.unknown(t, file_keys(TlsReportingConfig), "tls_reporting")

    def contact(v):
        v = string(v).strip()
        if not v or any(c in v for c in "\r\n"):
            raise ValueError(f"{v!r} is not an email address or URL on one line")
        return v

    d = TlsReportingConfig()
    out = TlsReportingConfig(
        enabled=r.get(t, "enabled", "tls_reporting", boolean, d.enabled),
        organization_name=r.get(t, "organization_name", "tls_reporting", contact, d.organization_name),
        contact_info=r.get(t, "contact_info", "tls_reporting", contact, d.contact_info),
        submitter=r.get(t, "submitter", "tls_reporting", parse_domain, d.submitter))
    if out.submitter.startswith("*."):
        r.problems.append(f"tls_reporting.submitter: {out.submitter!r} is a pattern, not a domain name")
    if out.enabled:
        for key in ("organization_name", "contact_info"):
            if not getattr(out, key) and key not in t:
                r.problems.append(f"tls_reporting.{key}: missing; every report names it (RFC 8460 4.4), "
                                  f"so set it or turn tls_reporting off")
    return out
