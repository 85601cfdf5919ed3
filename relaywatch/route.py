"""Routing: which way a recipient's mail goes.  Pure: config in, decision out.

Recipients are normalised once, where they are received (``normalize``): the
domain in lower case without its trailing dot and as A-labels (an IDN, with
the UTS #46 mapping: relaywatch.idn), a quoted local part that needs no quotes
unquoted (RFC 5321 4.1.2); a UTF-8 local part (SMTPUTF8) is kept as it is.  What cannot be routed is refused there
with the reason, so it never reaches a connector that would refuse it and
leave us to send an NDR to a sender nobody verified (backscatter).

Order, as an admin reads the config:
0. ``postmaster`` (no domain), ``postmaster@<server.hostname>`` and the
   postmaster of an authoritative domain that lists no such mailbox
                                                                   -> ``server.postmaster`` (RFC 5321 4.5.1).
1. The recipient's domain is an accepted domain with that mailbox  -> local Maildir.
2. An authoritative accepted domain without that mailbox          -> rejected at RCPT (5.1.10).
3. The first enabled connector whose ``domains`` match             -> that connector
   (by its smart hosts, or by the recipient domain's MX when it has none).
4. An internal-relay domain with no enabled connector              -> internet (MX lookup).
5. Anything else                                                   -> internet, if the client may relay.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relaywatch.config import Config, Connector
from relaywatch.idn import BadDomain, to_ascii
from relaywatch.model import Route, RouteKind

LOCAL = Route(RouteKind.LOCAL, "local")
POSTMASTER = "postmaster"

_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_QUOTED_PAIR = re.compile(r"\\(.)")


@dataclass(frozen=True)
class RouteDecision:
    route: Route | None          # None: the recipient does not exist
    accepted_domain: bool        # one of our domains (no relay permission needed)
    address: str = ""            # where it goes: the recipient, or the postmaster it stands for


@dataclass(frozen=True)
class Refusal:
    """A recipient refused before routing: the SMTP reply and a short reason for the log."""
    reply: str
    detail: str


def split_address(address: str) -> tuple[str, str]:
    """(local part, domain) with the domain normalised; a quoted local part may contain ``@``."""
    local, domain = _split(address)
    return local, domain.lower().rstrip(".")


def _split(address: str) -> tuple[str, str]:
    if address.startswith('"'):
        end = _closing_quote(address)
        if end > 0:
            return address[:end + 1], address[end + 2:] if address[end + 1:end + 2] == "@" else ""
    local, at, domain = address.rpartition("@")
    return (local, domain) if at else (address, "")


def _closing_quote(text: str) -> int:
    i = 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i
        i += 1
    return -1


def unquoted_local(local: str) -> str:
    """The local part as the receiving system reads it: quotes and backslashes undone."""
    if len(local) >= 2 and local[0] == local[-1] == '"':
        return _QUOTED_PAIR.sub(r"\1", local[1:-1])
    return local


def normalize(address: str) -> str | Refusal:
    """The recipient as relaywatch keeps, routes and sends it, or why it cannot be routed.

    ``address`` has passed the RFC 5321 syntax check of the conversation."""
    local, domain = _split(address)
    plain = unquoted_local(local)
    if _DOT_ATOM.fullmatch(plain):
        local = plain     # "alice"@x is alice@x (RFC 5321 4.1.2: quoting that is not needed)
    if not domain:
        if plain.lower() == POSTMASTER:
            return POSTMASTER
        return Refusal("501 5.1.3 Recipient address must include a domain (only <postmaster> may go without)",
                       "no domain")
    domain = domain.lower()
    if domain.endswith("."):
        domain = domain[:-1]        # the root: contoso.test. is contoso.test
    if domain.startswith("["):
        return Refusal("550 5.1.2 Address literals are not routed by this relay; use a domain name",
                       "address literal")
    try:
        domain = to_ascii(domain)     # IDN: routed, looked up and queued as A-labels
    except BadDomain as exc:
        return Refusal(f"553 5.1.3 Bad recipient address syntax (not a valid internationalised domain name: {exc})",
                       "bad IDN domain")
    labels = domain.split(".")
    if not domain or len(domain) > 253 or any(not 0 < len(label) <= 63 for label in labels):
        return Refusal("501 5.1.3 Bad recipient address syntax (domain name too long or empty)", "bad domain")
    if labels[-1].isdigit():
        return Refusal("501 5.1.3 Bad recipient address syntax (not a domain name; an IP address is not routed)",
                       "numeric domain")
    return f"{local}@{domain}"


def normalize_sender(address: str) -> str:
    """The reverse-path as it is queued and sent on: normalised as recipients are, or as
    given where ``normalize`` finds fault (what only matters for routing does not refuse a sender)."""
    normalized = normalize(address) if address else ""
    return normalized if isinstance(normalized, str) else address


def sender_routing(address: str, source_route: str = "") -> str | None:
    """What in the recipient asks the next server to relay further, or None.

    Postfix refuses these from untrusted clients (``allow_untrusted_routing =
    no``): an accepted domain's server may honour them and relay for anyone."""
    if source_route:
        return "a source route"
    local = unquoted_local(_split(address)[0])
    for char, name in (("@", "an @ in the local part"), ("%", "a % in the local part"),
                       ("!", "a ! (bang path) in the local part")):
        if char in local:
            return name
    return None


def is_postmaster(config: Config, address: str) -> bool:
    """Mail for the relay's postmaster (RFC 5321 4.5.1), case-insensitive."""
    local, domain = split_address(address)
    if local.lower() != POSTMASTER:
        return False
    if not domain or domain == own_domain(config):
        return True
    accepted = config.domain(domain)
    return accepted is not None and accepted.type == "authoritative" and not accepted.has_mailbox(local)


def decide(config: Config, address: str) -> RouteDecision:
    if is_postmaster(config, address):
        return _postmaster(config)
    return _decide(config, address)


def own_domain(config: Config) -> str:
    return config.server.hostname.lower().rstrip(".")


def _postmaster(config: Config) -> RouteDecision:
    target = config.server.postmaster or f"{POSTMASTER}@{own_domain(config)}"
    _, domain = split_address(target)
    if domain == own_domain(config) and config.domain(domain) is None:
        return RouteDecision(LOCAL, True, target)
    decision = _decide(config, target)
    if decision.route is None:
        # A Fix-now override made its domain authoritative without that mailbox:
        # postmaster mail is still never refused; it waits in the relay's own Maildir.
        return RouteDecision(LOCAL, True, f"{POSTMASTER}@{own_domain(config)}")
    return RouteDecision(decision.route, True, target)


def connector_route(connector: Connector, domain: str) -> Route:
    """The route of ``domain``'s mail through ``connector``: its smart hosts, or the domain's MX."""
    return Route(RouteKind.CONNECTOR, connector.name, "" if connector.smart_hosts else domain)


def _decide(config: Config, address: str) -> RouteDecision:
    local, domain = split_address(address)
    accepted = config.domain(domain)
    if accepted is not None:
        if accepted.has_mailbox(local):
            return RouteDecision(LOCAL, True, address)
        if accepted.type == "authoritative":
            return RouteDecision(None, True, address)
    for connector in config.connectors:
        if connector.enabled and connector.serves(domain):
            return RouteDecision(connector_route(connector, domain), accepted is not None, address)
    return RouteDecision(Route(RouteKind.INTERNET, "internet", domain), accepted is not None, address)
