"""Where mail goes: ``[[domains]]`` (accepted domains), ``[[connectors]]`` (routes) and ``[verify]``.

Also the checks between them: a domain that verifies recipients needs an
enabled connector that serves it (``verify_problems``).
"""

from __future__ import annotations

from typing import Any

from relaywatch.config.model import Connector, Domain, QueueConfig, VerifyConfig
from relaywatch.config.pem import pem_problem
from relaywatch.config.values import (
    Reader, boolean, choice, duration_or_off, file_keys, format_seconds, hostport_list, parse_domain,
    positive_duration, string, string_list)

DOMAIN_TYPES = ("authoritative", "internal_relay")
CONNECTOR_TYPES = ("on_premises", "partner")
TLS_MODES = ("none", "opportunistic", "required")
TLS_VERIFY = ("none", "ca", "ca_and_name")
CONNECTOR_DANE = ("off", "on", "required")       # connectors.dane


def parse_domains(r: Reader, raw: dict) -> list[Domain]:
    """``[[domains]]``: the domains mail is accepted for."""
    problems = r.problems
    domains: list[Domain] = []
    for _, p, item in r.entries(raw, "domains", Domain, required=("name",)):
        if "name" not in item:
            continue
        name = r.get(item, "name", p, parse_domain, None)
        if name and name.startswith("*."):
            problems.append(f"{p}.name: {name!r}: an accepted domain is one exact name (wildcards are for "
                            f"connectors' domains); list each domain")
            name = None
        dtype = r.get(item, "type", p, choice(DOMAIN_TYPES), "authoritative")
        boxes = r.get(item, "mailboxes", p, _mailboxes(name), frozenset())
        verify = r.get(item, "verify_recipients", p, boolean, False)
        if verify and dtype != "internal_relay":
            problems.append(f"{p}.verify_recipients: only for type = \"internal_relay\" (an authoritative "
                            f"domain's mailboxes are listed here, so there is nothing to ask)")
        if name:
            if any(dm.name == name for dm in domains):
                problems.append(f"{p}.name: {name} is listed twice")
            domains.append(Domain(name, dtype, boxes, verify))
    return domains


def parse_connectors(r: Reader, raw: dict, rel, queue: QueueConfig) -> list[Connector]:
    """``[[connectors]]``: the routes to partners and on-premises servers."""
    problems = r.problems
    connectors: list[Connector] = []
    for i, p, item in r.entries(raw, "connectors", Connector, required=("name", "type", "domains"),
                                not_in_file=("paused",)):
        name = r.get(item, "name", p, string, None)
        if name in ("local", "internet"):
            problems.append(f"{p}.name: {name!r} is reserved for a built-in route")
        if name and any(c.name == name for c in connectors):
            problems.append(f"{p}.name: another connector is already called {name!r}")
        ca_file = r.get(item, "ca_file", p, rel, None)
        crl_file = r.get(item, "crl_file", p, rel, None)
        for key, value, kind in (("ca_file", ca_file, "certificate"), ("crl_file", crl_file, "CRL")):
            if value is None:
                continue
            if not value.is_file():
                problems.append(f"{p}.{key}: file {value} does not exist")
            elif problem := pem_problem(value, kind):
                problems.append(f"{p}.{key}: {problem}")
        pats = r.get(item, "domains", p, lambda v: [parse_domain(x) for x in string_list(v)], [])
        if "domains" in item and not pats:
            problems.append(f"{p}.domains: must list at least one domain")
        tls = r.get(item, "tls", p, choice(TLS_MODES), Connector.tls)
        conn = Connector(
            name=name or f"connector{i}",
            type=r.get(item, "type", p, choice(CONNECTOR_TYPES), "partner"),
            domains=tuple(pats),
            smart_hosts=r.get(item, "smart_hosts", p, hostport_list(25), ()),
            tls=tls,
            # Verifying by default only where TLS is required: opportunistic TLS
            # exists to encrypt when possible, not to block on a certificate.
            tls_verify=r.get(item, "tls_verify", p, choice(TLS_VERIFY),
                             "ca_and_name" if tls == "required" else "none"),
            tls_name=r.get(item, "tls_name", p, string, None),
            ca_file=ca_file,
            crl_file=crl_file,
            enabled=r.get(item, "enabled", p, boolean, Connector.enabled),
            delay_notice_after=r.get(item, "delay_notice_after", p, duration_or_off, Connector.delay_notice_after),
            mta_sts=r.get(item, "mta_sts", p, boolean, Connector.mta_sts),
            dane=r.get(item, "dane", p, choice(CONNECTOR_DANE), Connector.dane),
        )
        if conn.dane != "off" and conn.tls == "none":
            problems.append(f"{p}.dane: {conn.dane!r} needs TLS, but tls = \"none\" sends in plain text; "
                            f"set tls = \"opportunistic\" or \"required\", or dane = \"off\"")
        if conn.mta_sts and conn.smart_hosts:
            problems.append(f"{p}.mta_sts: has no effect with smart_hosts (an MTA-STS policy names the "
                            f"domain's MX hosts); remove smart_hosts to deliver by MX, or remove mta_sts")
        problems += _connector_tls_problems(p, item, conn)
        if ("delay_notice_after" in item and conn.delay_notice_after is not None
                and conn.delay_notice_after >= queue.message_expiration):
            problems.append(f"{p}.delay_notice_after: {format_seconds(conn.delay_notice_after)} is not shorter "
                            f"than queue.message_expiration ({format_seconds(queue.message_expiration)}), so no "
                            f"delay notice would ever be sent; shorten it or write \"off\"")
        connectors.append(conn)
    return connectors


def parse_verify(r: Reader, f: dict) -> VerifyConfig:
    """``[verify]``: how long recipient verification keeps its answers; every key a duration."""
    r.unknown(f, file_keys(VerifyConfig), "verify")
    return VerifyConfig(**{key: r.get(f, key, "verify", positive_duration, getattr(VerifyConfig, key))
                           for key in file_keys(VerifyConfig)})


def verify_problems(domains: list[Domain], connectors: list[Connector]) -> list[str]:
    """A domain that verifies recipients needs a connector to ask."""
    return [f"domains[{domains.index(dm)}].verify_recipients: no enabled connector serves {dm.name}, so there "
            f"is no server to ask"
            for dm in domains if dm.verify_recipients and not any(c.enabled and c.serves(dm.name) for c in connectors)]


def _mailboxes(domain: str | None):
    """Local parts; ``alice@<this domain>`` is taken as ``alice``, an address elsewhere refused."""
    def convert(value: Any) -> frozenset[str]:
        out = set()
        for written in string_list(value):
            box, at, other = written.rpartition("@")
            if at:
                other = other.lower().rstrip(".")
                if domain is not None and other != domain:
                    raise ValueError(f"{written!r} is an address in {other}, not in {domain}; list it under the "
                                     f"[[domains]] entry for {other}, or write only the part before the @")
            else:
                box = written
            if not box or "@" in box or any(c.isspace() for c in box):
                raise ValueError(f"{written!r} is not a mailbox name (the part before the @, such as \"alice\")")
            out.add(box.lower())
        return frozenset(out)
    return convert


def _connector_tls_problems(p: str, item: dict, conn: Connector) -> list[str]:
    """Settings the TLS mode makes meaningless: they would be silently ignored."""
    out = []
    if conn.tls == "none":
        if conn.tls_verify != "none":
            out.append(f"{p}.tls_verify: {conn.tls_verify!r} needs TLS, but tls = \"none\" sends in plain text "
                       f"and checks no certificate; set tls = \"required\" (or remove tls_verify)")
        for key in ("tls_name", "ca_file", "crl_file"):
            if key in item:
                out.append(f"{p}.{key}: has no effect with tls = \"none\" (plain text); set tls = \"required\" "
                           f"or remove {key}")
        return out
    if conn.tls_verify == "none":
        for key in ("tls_name", "ca_file", "crl_file"):
            if key in item:
                out.append(f"{p}.{key}: has no effect with tls_verify = \"none\", which checks no certificate; "
                           f"set tls_verify = \"ca_and_name\" (or \"ca\") or remove {key}")
    elif conn.tls_verify == "ca" and "tls_name" in item:
        out.append(f"{p}.tls_name: has no effect with tls_verify = \"ca\", which does not check the name; "
                   f"set tls_verify = \"ca_and_name\" or remove tls_name")
    return out
