"""Routing: which way a recipient's mail goes.  Pure: config in, decision out.

Order, as an admin reads the config:
1. The recipient's domain is an accepted domain with that mailbox  -> local Maildir.
2. An authoritative accepted domain without that mailbox          -> rejected at RCPT (5.1.10).
3. The first enabled connector whose ``domains`` match             -> that connector
   (by its smart hosts, or by the recipient domain's MX when it has none).
4. An internal-relay domain with no enabled connector              -> internet (MX lookup).
5. Anything else                                                   -> internet, if the client may relay.
"""

from __future__ import annotations

from dataclasses import dataclass

from relaywatch.config import Config
from relaywatch.model import Route, RouteKind

LOCAL = Route(RouteKind.LOCAL, "local")


@dataclass(frozen=True)
class RouteDecision:
    route: Route | None          # None: the recipient does not exist
    accepted_domain: bool        # one of our domains (no relay permission needed)


def split_address(address: str) -> tuple[str, str]:
    local, _, domain = address.rpartition("@")
    return local, domain.lower().rstrip(".")


def decide(config: Config, address: str) -> RouteDecision:
    local, domain = split_address(address)
    accepted = config.domain(domain)
    if accepted is not None:
        if accepted.has_mailbox(local):
            return RouteDecision(LOCAL, True)
        if accepted.type == "authoritative":
            return RouteDecision(None, True)
    for connector in config.connectors:
        if connector.enabled and connector.serves(domain):
            mx_domain = "" if connector.smart_hosts else domain
            return RouteDecision(Route(RouteKind.CONNECTOR, connector.name, mx_domain), accepted is not None)
    return RouteDecision(Route(RouteKind.INTERNET, "internet", domain), accepted is not None)
