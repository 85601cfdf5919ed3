"""Where a route's mail goes: smart hosts or MX, and opening a session there.

Delivery (``connect``) and the connector probe (watch/probe.py) choose
targets and addresses here, the same way.

Targets are tried in order (smart hosts as listed, MX by preference) and, for
each, its addresses; the first that completes greeting, EHLO and STARTTLS is
used.  When all fail, the primary target's failure is the one reported (it is
the one that should have worked); every other is kept in the attempt's
``hosts_tried``.

MTA-STS (deliver/mta_sts.py) on the MX route: ``targets`` hands each MX its
domain's policy, ``_passed_over`` skips an MX an enforced policy does not
list (it is never resolved or contacted), ``tls_policy`` turns a policy into
"TLS required, certificate valid for the MX name", and ``_open`` records each
session's result.  In testing mode a session that would fail the policy is
logged and opened again as without one, so mail flows while the domain tests.
A session by MX under no policy is recorded too, as RFC 8460's "no-policy-found"
(``_record_opportunistic``), for the domain's TLS report.

DANE (deliver/dane.py) where ``delivery.dane`` (the internet route) or the
connector's ``dane`` says so: after a target's addresses, ``dane_policy``
looks up its TLSA records when the MX and address answers were
DNSSEC-validated; ``tls_policy`` turns usable records into "TLS required,
the certificate must match them" (no CA, no name for DANE-EE).  A host with
usable TLSA is held to DANE and not to MTA-STS (RFC 8461 2: STS must not
override a failed DANE check).  A bogus TLSA lookup, or a connector that
requires DANE where there is none, fails the host without connecting.  Each
DANE session's result is a ``TlsResult`` of policy type ``tlsa``.

A TLS report of ours (``connect(..., tls_report=True)``, RFC 8460 5.3) must
arrive despite the very failures it reports: it ignores MTA-STS and DANE, on
MX delivery takes TLS as offered without checking the certificate (a smart
host keeps its connector's TLS settings: that is our own path, not the
domain's policy), and records no result, so its sessions are not in the next
report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable

from relaywatch.classify.observation import Observation, Outcome, Phase
from relaywatch.config import Config, Connector
from relaywatch.deliver.dane import DanePolicy, Verdict, tlsa_hosts, tlsa_name, tlsa_wanted, verdict
from relaywatch.deliver.mta_sts import MtaSts
from relaywatch.deliver.resolver import AddressAnswer, DnsFailure, Resolver
from relaywatch.deliver.sts_policy import StsPolicy, is_violation, mx_mismatch, result_type
from relaywatch.deliver.tls import TlsPolicy
from relaywatch.deliver.tls_report import opportunistic_result
from relaywatch.deliver.transport import SessionFailure, SmtpConnection
from relaywatch.model import Destination, Route, RouteKind
from relaywatch.tls_results import DANE_REQUIRED, DNSSEC_INVALID, TlsResult

log = logging.getLogger("relaywatch.dane")

MAX_ADDRESSES_PER_HOST = 2
NO_DANE = DanePolicy(Verdict.NOT_APPLICABLE, "", 0, "DANE is off")


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    index: int
    count: int
    sts: StsPolicy | None = None   # the recipient domain's MTA-STS policy in force (enforce or testing)
    mx_secure: bool = True         # named by the config (a smart host) or by a DNSSEC-validated MX answer
    domain: str = ""               # the recipient (policy) domain


class AllTargetsFailed(Exception):
    def __init__(self, observations: list[Observation]):
        super().__init__(f"{len(observations)} destination(s) failed")
        self.observations = observations

    @property
    def primary(self) -> Observation:
        return self.observations[0]


class SmtpRoutes:
    def __init__(self, config_ref: Callable[[], Config], resolver: Resolver, mta_sts: MtaSts | None = None):
        self.config_ref = config_ref
        self.resolver = resolver
        self.mta_sts = mta_sts or MtaSts(config_ref, resolver)
        # Every TLS result (MTA-STS, DANE, opportunistic TLS by MX) is recorded here: deliver/tls_report.py.
        self.tls_results = self.mta_sts.sink

    def connector_for(self, route: Route) -> Connector | None:
        if route.kind is not RouteKind.CONNECTOR:
            return None
        connector = self.config_ref().connector(route.name)
        return connector if connector is not None and connector.enabled else None

    def uses_mta_sts(self, route: Route) -> bool:
        """MX delivery on the internet route (``[mta_sts] enabled``) or by a connector with ``mta_sts = true``."""
        connector = self.connector_for(route)
        if connector is None:
            return route.kind is RouteKind.INTERNET and self.config_ref().mta_sts.enabled
        return connector.mta_sts and not connector.smart_hosts

    def dane_mode(self, route: Route) -> str:
        """``off`` | ``on`` | ``required``: the internet route's ``delivery.dane``, or the connector's ``dane``."""
        connector = self.connector_for(route)
        if connector is None:
            return self.config_ref().delivery.dane if route.kind is RouteKind.INTERNET else "off"
        return connector.dane

    def tls_policy(self, route: Route, host: str, sts: StsPolicy | None = None,
                   dane: DanePolicy = NO_DANE) -> TlsPolicy:
        if dane.verdict is Verdict.AUTHENTICATE:
            # RFC 7672 3: the TLSA records are the trust; SNI and DANE-TA's name check use the host name.
            return TlsPolicy(mode="required", verify="none", expected_name=host, dane=dane.usable,
                             dane_names=dane.reference_names)
        policy = self._tls_policy(route, host, sts)
        if dane.verdict is Verdict.ENCRYPT:
            # TLSA published, none usable (RFC 7672 2.2): TLS is mandatory, verified as it would be anyway.
            policy = replace(policy, mode="required")
        return policy

    def _tls_policy(self, route: Route, host: str, sts: StsPolicy | None) -> TlsPolicy:
        if sts is not None:
            # RFC 8461 4.2: TLS, a certificate from a trusted CA, valid for the MX host's name.
            ca_file = self.config_ref().mta_sts.ca_file
            return TlsPolicy(mode="required", verify="ca_and_name", expected_name=host,
                             ca_file=str(ca_file) if ca_file else None)
        connector = self.connector_for(route)
        if connector is None:
            # The internet: encrypt when offered, never block on a certificate.
            return TlsPolicy(mode="opportunistic", verify="none")
        return TlsPolicy(mode=connector.tls, verify=connector.tls_verify,
                         expected_name=connector.tls_name or host,
                         ca_file=str(connector.ca_file) if connector.ca_file else None,
                         crl_file=str(connector.crl_file) if connector.crl_file else None)

    async def targets(self, route: Route, recipient_domain: str, tls_report: bool = False) -> list[Target]:
        connector = self.connector_for(route)
        if connector is not None and connector.smart_hosts:
            n = len(connector.smart_hosts)
            return [Target(h, p, i + 1, n, domain=route.domain or recipient_domain)
                    for i, (h, p) in enumerate(connector.smart_hosts)]
        port = self.config_ref().delivery.smtp_port
        domain = route.domain or recipient_domain
        answer = await self.resolver.mx_answer(domain)
        hosts = answer.hosts
        policy = await self.mta_sts.policy(domain) if self.uses_mta_sts(route) and not tls_report else None
        if policy is not None and policy.mode == "none":
            policy = None
        return [Target(mx.host, port, i + 1, len(hosts), policy, mx_secure=answer.secure, domain=domain)
                for i, mx in enumerate(hosts)]

    async def destinations(self, target: Target) -> list[Destination]:
        """Every address of ``target`` (in the resolver's order); raises DnsFailure."""
        return (await self.resolve(target))[0]

    async def resolve(self, target: Target) -> tuple[list[Destination], AddressAnswer]:
        """The addresses of ``target`` and their answer (DNSSEC-validated? an alias of?); raises DnsFailure."""
        answer = await self.resolver.address_answer(target.host)
        dests = [Destination(target.host, ip, target.port, target.index, target.count) for ip in answer.addresses]
        return dests, answer

    async def dane_policy(self, route: Route, target: Target, addresses: AddressAnswer,
                          tls_report: bool = False) -> DanePolicy:
        """What DANE says for ``target``; raises DnsFailure when a TLSA lookup times out.

        An alias with a secure expansion: the target name's TLSA records, else the
        MX name's (RFC 7672 2.2.2/2.2.3); a DANE-TA certificate may carry either name.
        An alias with an insecure expansion (a target in an unsigned zone): the MX
        name's, when its own CNAME record is validated."""
        mode = "off" if tls_report else self.dane_mode(route)
        alias = (addresses.canonical or target.host).lower().rstrip(".") != target.host.lower().rstrip(".")
        # One more query, only then; a failure of it fails this host, as a TLSA lookup's would.
        alias_secure = (mode != "off" and target.mx_secure and alias and not addresses.secure
                        and await self.resolver.alias_secure(target.host))
        skipped = tlsa_wanted(mode, target.mx_secure, addresses.secure, alias_secure)
        if mode == "off" or skipped is not None:
            return verdict(mode, target.host, target.port, None, skipped=skipped)
        hosts = tlsa_hosts(target.host, addresses.canonical or target.host, addresses.secure)
        policy = NO_DANE
        for i, host in enumerate(hosts):
            names = (host, *hosts[:i], *hosts[i + 1:])          # the TLSA owner first
            try:
                answer = await self.resolver.tlsa(tlsa_name(host, target.port))
            except DnsFailure as failure:
                if failure.observation.outcome is not Outcome.DNS_SERVFAIL:
                    raise
                return verdict(mode, target.host, target.port, None, lookup_failed=failure.observation.dns,
                               names=names)
            policy = verdict(mode, target.host, target.port, answer, names=names)
            if answer.secure and answer.records:
                break
        return policy

    def session(self, dest: Destination) -> SmtpConnection:
        """A connection to ``dest``, not yet opened, with the delivery timeouts and our name."""
        config = self.config_ref()
        return SmtpConnection(dest, config.delivery, config.server.hostname)

    async def connect(self, route: Route, recipient_domain: str, tls_report: bool = False) -> SmtpConnection:
        try:
            targets = await self.targets(route, recipient_domain, tls_report)
        except DnsFailure as failure:
            raise AllTargetsFailed([failure.observation]) from None
        seen: list[Observation] = []
        for target in targets:
            passed_over = self._passed_over(target)
            if passed_over is not None:
                seen.append(passed_over)
                continue
            try:
                dests, addresses = await self.resolve(target)
                dane = await self.dane_policy(route, target, addresses, tls_report)
            except DnsFailure as failure:
                obs = failure.observation
                seen.append(Observation(obs.phase, obs.outcome, Destination(
                    target.host, None, target.port, target.index, target.count), dns=obs.dns, note=obs.note))
                continue
            if dane.verdict in (Verdict.BOGUS, Verdict.REQUIRED):
                refused = self.dane_refused(target, dane)
                self._record_dane(dane, target, None, refused.dane)
                seen.append(refused)
                continue
            for dest in dests[:MAX_ADDRESSES_PER_HOST]:
                try:
                    if tls_report:
                        return await self._open_for_report(route, target, dest)
                    return await self._open(route, target, dest, dane)
                except SessionFailure as failure:
                    obs = failure.observation
                    if obs.dns is None and target.host in self.resolver.answers:
                        # Which DNS answer led here (and its TTL): "the address changed" evidence.
                        obs = replace(obs, dns=self.resolver.answers[target.host])
                    seen.append(obs)
        raise AllTargetsFailed(seen)

    def _passed_over(self, target: Target) -> Observation | None:
        """An MX the enforced policy does not list: its observation (never connected to)."""
        sts = target.sts
        if sts is None or sts.allows(target.host):
            return None
        obs = mx_mismatch(sts, Destination(target.host, None, target.port, target.index, target.count))
        enforced = sts.mode == "enforce"
        self.mta_sts.record(self.mta_sts.session_result(sts, target.host, None, obs, enforced))
        return obs if enforced else None

    def dane_refused(self, target: Target, dane: DanePolicy) -> Observation:
        """A host DANE forbids before any connection: its TLSA lookup was bogus, or DANE is required and absent."""
        bogus = dane.verdict is Verdict.BOGUS
        evidence = {**dane.evidence(target.domain), "reason": dane.reason,
                    "result_type": DNSSEC_INVALID if bogus else DANE_REQUIRED}
        return Observation(Phase.DNS, Outcome.DNSSEC_BOGUS if bogus else Outcome.DANE_REQUIRED,
                           Destination(target.host, None, target.port, target.index, target.count),
                           dns=dane.dns, dane=evidence)

    def dane_violation(self, target: Target, dane: DanePolicy, obs: Observation) -> Observation | None:
        """``obs`` with the TLSA evidence when it breaks DANE (no match, TLS missing); None otherwise."""
        if not dane.applies or not (obs.outcome is Outcome.TLSA_MISMATCH or is_violation(obs)):
            return None
        if obs.outcome is Outcome.CERTIFICATE:
            return None     # no TLSA usable: the certificate was checked by the connector's or MTA-STS's rules
        evidence = {**dane.evidence(target.domain), **(obs.dane or {})}
        evidence.setdefault("result_type", result_type(obs))
        return replace(obs, dane=evidence)

    def _record_dane(self, dane: DanePolicy, target: Target, ip: str | None, failure: dict | None,
                     local_ip: str | None = None) -> None:
        """One DANE session's result, with the fields RFC 8460 aggregates by (policy type tlsa)."""
        kind = failure["result_type"] if failure else None
        detail = (f"{failure.get('reason') or kind}; the message was not sent there" if failure
                  else f"the certificate of {target.host} matches its TLSA records")
        result = TlsResult(at=self.mta_sts.clock(), policy_domain=target.domain, policy_type="tlsa", policy_id=None,
                           mode=None, result_type=kind, mx_host=target.host, receiving_ip=ip,
                           policy_strings=tuple(r.text() for r in dane.records), enforced=failure is not None,
                           detail=detail, sending_ip=local_ip)
        self.tls_results.record(result)
        if failure:
            log.warning("dane %s for %s at %s%s: %s", kind, target.domain, target.host, f"[{ip}]" if ip else "", detail)

    async def _open(self, route: Route, target: Target, dest: Destination,
                    dane: DanePolicy = NO_DANE) -> SmtpConnection:
        """One session to ``dest`` as the target's policies say; raises SessionFailure."""
        sts = None if dane.verdict is Verdict.AUTHENTICATE else target.sts     # RFC 8461 2: STS never overrides DANE
        conn = self.session(dest)
        try:
            await conn.open(self.tls_policy(route, target.host, sts, dane), target.host)
        except SessionFailure as failure:
            obs = failure.observation
            broken = self.dane_violation(target, dane, obs)
            if broken is not None:
                self._record_dane(dane, target, dest.ip, broken.dane, conn.local_ip)
                raise SessionFailure(broken) from failure.__cause__
            if sts is None and not dane.applies:
                self._record_opportunistic(route, target, dest, conn, obs)
            if sts is None or not is_violation(obs):
                raise
            enforced = sts.mode == "enforce"
            self.mta_sts.record(self.mta_sts.session_result(sts, target.host, dest.ip, obs, enforced, conn.local_ip))
            if enforced:
                raise SessionFailure(replace(obs, sts={**sts.evidence(), "mx_host": target.host,
                                                       "result_type": result_type(obs)})) from failure.__cause__
            # Testing mode: the would-be failure is recorded; deliver as without a policy.
            conn = self.session(dest)
            await conn.open(self.tls_policy(route, target.host), target.host)
            return conn
        if dane.applies:
            self._record_dane(dane, target, dest.ip, None, conn.local_ip)
        if sts is not None:
            self.mta_sts.record(self.mta_sts.session_result(sts, target.host, dest.ip, None, sts.mode == "enforce",
                                                            conn.local_ip))
        elif not dane.applies:
            self._record_opportunistic(route, target, dest, conn, None)
        return conn

    async def _open_for_report(self, route: Route, target: Target, dest: Destination) -> SmtpConnection:
        """A session for a TLS report: TLS as offered (the connector's own TLS towards a smart
        host), nothing recorded; raises SessionFailure."""
        connector = self.connector_for(route)
        if connector is not None and connector.smart_hosts:
            conn = self.session(dest)
            await conn.open(self.tls_policy(route, target.host), target.host)
            return conn
        conn = self.session(dest)
        try:
            await conn.open(TlsPolicy(mode="opportunistic", verify="none"), target.host)
        except SessionFailure as failure:
            if failure.observation.outcome is not Outcome.TLS_HANDSHAKE:
                raise
            conn = self.session(dest)       # 5.3: "without TLS" is allowed, when TLS itself fails
            await conn.open(TlsPolicy(mode="none"), target.host)
        return conn

    def _record_opportunistic(self, route: Route, target: Target, dest: Destination, conn: SmtpConnection,
                              failure: Observation | None) -> None:
        """A session by MX under no TLS policy: RFC 8460's "no-policy-found" (a smart host is
        no MX of the domain: its sessions are not the domain's to hear about)."""
        connector = self.connector_for(route)
        if (connector.smart_hosts if connector is not None else route.kind is not RouteKind.INTERNET):
            return
        result = opportunistic_result(target.domain, target.host, dest.ip, conn.local_ip, conn.tls is not None,
                                      failure, self.mta_sts.clock())
        if result is not None:
            self.tls_results.record(result)

