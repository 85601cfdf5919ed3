"""Where a route's mail goes: smart hosts or MX, and opening a session there.

Delivery (``connect``) and the connector probe (watch/probe.py) choose
targets and addresses here, the same way.

Targets are tried in order (smart hosts as listed, MX by preference) and, for
each, its addresses; the first that completes greeting, EHLO and STARTTLS is
used.  When all fail, the primary target's failure is the one reported (it is
the one that should have worked); every other is kept in the attempt's
``hosts_tried``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from relaywatch.classify.observation import Observation
from relaywatch.config import Config, Connector
from relaywatch.deliver.resolver import DnsFailure, Resolver
from relaywatch.deliver.tls import TlsPolicy
from relaywatch.deliver.transport import SessionFailure, SmtpConnection
from relaywatch.model import Destination, Route, RouteKind

MAX_ADDRESSES_PER_HOST = 2


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    index: int
    count: int


class AllTargetsFailed(Exception):
    def __init__(self, observations: list[Observation]):
        super().__init__(f"{len(observations)} destination(s) failed")
        self.observations = observations

    @property
    def primary(self) -> Observation:
        return self.observations[0]


class SmtpRoutes:
    def __init__(self, config_ref: Callable[[], Config], resolver: Resolver):
        self.config_ref = config_ref
        self.resolver = resolver

    def connector_for(self, route: Route) -> Connector | None:
        if route.kind is not RouteKind.CONNECTOR:
            return None
        connector = self.config_ref().connector(route.name)
        return connector if connector is not None and connector.enabled else None

    def tls_policy(self, route: Route, host: str) -> TlsPolicy:
        connector = self.connector_for(route)
        if connector is None:
            # The internet: encrypt when offered, never block on a certificate.
            return TlsPolicy(mode="opportunistic", verify="none")
        return TlsPolicy(mode=connector.tls, verify=connector.tls_verify,
                         expected_name=connector.tls_name or host,
                         ca_file=str(connector.ca_file) if connector.ca_file else None,
                         crl_file=str(connector.crl_file) if connector.crl_file else None)

    async def targets(self, route: Route, recipient_domain: str) -> list[Target]:
        connector = self.connector_for(route)
        if connector is not None and connector.smart_hosts:
            n = len(connector.smart_hosts)
            return [Target(h, p, i + 1, n) for i, (h, p) in enumerate(connector.smart_hosts)]
        port = self.config_ref().delivery.smtp_port
        hosts = await self.resolver.mx(route.domain or recipient_domain)
        return [Target(mx.host, port, i + 1, len(hosts)) for i, mx in enumerate(hosts)]

    async def destinations(self, target: Target) -> list[Destination]:
        """Every address of ``target`` (in the resolver's order); raises DnsFailure."""
        addresses = await self.resolver.addresses(target.host)
        return [Destination(target.host, ip, target.port, target.index, target.count) for ip in addresses]

    def session(self, dest: Destination) -> SmtpConnection:
        """A connection to ``dest``, not yet opened, with the delivery timeouts and our name."""
        config = self.config_ref()
        return SmtpConnection(dest, config.delivery, config.server.hostname)

    async def connect(self, route: Route, recipient_domain: str) -> SmtpConnection:
        try:
            targets = await self.targets(route, recipient_domain)
        except DnsFailure as failure:
            raise AllTargetsFailed([failure.observation]) from None
        seen: list[Observation] = []
        for target in targets:
            try:
                dests = await self.destinations(target)
            except DnsFailure as failure:
                obs = failure.observation
                seen.append(Observation(obs.phase, obs.outcome, Destination(
                    target.host, None, target.port, target.index, target.count), dns=obs.dns, note=obs.note))
                continue
            for dest in dests[:MAX_ADDRESSES_PER_HOST]:
                conn = self.session(dest)
                try:
                    await conn.open(self.tls_policy(route, target.host), target.host)
                    return conn
                except SessionFailure as failure:
                    obs = failure.observation
                    if obs.dns is None and target.host in self.resolver.answers:
                        # Which DNS answer led here (and its TTL): "the address changed" evidence.
                        obs = replace(obs, dns=self.resolver.answers[target.host])
                    seen.append(obs)
        raise AllTargetsFailed(seen)
