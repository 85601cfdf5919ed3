"""MTA-STS (RFC 8461): a recipient domain's policy, fetched, cached and applied.

A domain that publishes ``_mta-sts.<domain>`` TXT ``v=STSv1; id=...`` serves
its policy at ``https://mta-sts.<domain>/.well-known/mta-sts.txt``: which MX
hosts may receive its mail (``mx`` patterns) and whether a sender must refuse
the others and anything short of TLS with a valid certificate (``enforce``),
only report it (``testing``) or forget the policy (``none``).

- Pure, table-tested, in deliver/sts_policy.py: ``parse_txt``, ``parse_policy``,
  ``mx_matches``, ``result_type`` (the RFC 8460 result type a failure is reported under).
- ``PolicyCache``: the policies by domain, in a small JSON file under
  data_dir, so a restart keeps them.  A cached policy is used until its
  ``max_age`` passes, whatever happens to the TXT record or the policy host:
  that is what stops an attacker who can strip them (RFC 8461 5.1).
- ``MtaSts.policy(domain)``: the policy to apply, refreshed when the TXT id
  changes or the cached one has expired; a failed fetch keeps the cached
  policy, and with none cached mail goes as without a policy (RFC 8461 5).
- ``MtaSts.record``: every session under a policy, success or failure, as a
  ``TlsResult`` with RFC 8460's fields (policy domain, type, strings, MX,
  result type), logged and recorded for TLS reporting (deliver/tls_report.py).

Applying a policy to targets and sessions is deliver/smtp.py's; this module
opens no SMTP connection.  The fetch uses httpx, connected to the address our
own resolver gives for ``mta-sts.<domain>`` with that name as SNI and Host,
so the configured name servers decide here as for the MX.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx

from relaywatch.classify.observation import Observation, Outcome
from relaywatch.config import Config
from relaywatch.deliver.resolver import DnsFailure, Resolver
from relaywatch.deliver.tls_report import TlsResults
from relaywatch.deliver.sts_policy import PolicyInvalid, StsPolicy, parse_policy, parse_txt, result_type
from relaywatch.tls_results import STS_POLICY_FETCH_ERROR, STS_POLICY_INVALID, STS_WEBPKI_INVALID, TlsResult

log = logging.getLogger("relaywatch.mta_sts")

MAX_POLICY_BYTES = 64 * 1024          # RFC 8461 3.3: senders may refuse a larger body
# After a failed fetch, the same domain is not asked again for this long: a
# policy host that is down is not hammered by every message of a busy queue.
FETCH_FAILURE_HOLD = 60.0


class PolicyFetchFailed(Exception):
    def __init__(self, result_type: str, reason: str):
        super().__init__(reason)
        self.result_type = result_type
        self.reason = reason


# -- the cache ----------------------------------------------------------------------------

class PolicyCache:
    """Policies by domain in one small JSON file, rewritten atomically on change."""

    def __init__(self, path: Path):
        self.path = path
        self.policies: dict[str, StsPolicy] = {}
        try:
            data = json.loads(path.read_text())
            for domain, p in data.get("policies", {}).items():
                self.policies[domain] = StsPolicy(domain=domain, id=p["id"], mode=p["mode"], mx=tuple(p["mx"]),
                                                  max_age=int(p["max_age"]), fetched_at=float(p["fetched_at"]),
                                                  text=p.get("text", ""))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Losing the cache only costs a fetch per domain; it must not stop delivery.
            log.warning("the MTA-STS cache %s cannot be read (%s); policies will be fetched again", path, exc)

    def get(self, domain: str) -> StsPolicy | None:
        return self.policies.get(domain)

    async def put(self, policy: StsPolicy) -> None:
        self.policies[policy.domain] = policy
        await asyncio.to_thread(self._save, dict(self.policies))

    async def drop(self, domain: str) -> None:
        if self.policies.pop(domain, None) is not None:
            await asyncio.to_thread(self._save, dict(self.policies))

    def _save(self, policies: dict[str, StsPolicy]) -> None:
        data = {"version": 1, "policies": {
            d: {"id": p.id, "mode": p.mode, "mx": list(p.mx), "max_age": p.max_age,
                "fetched_at": p.fetched_at, "text": p.text} for d, p in policies.items()}}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("the MTA-STS cache %s cannot be written (%s); policies are kept in memory", self.path, exc)


# -- fetching -----------------------------------------------------------------------------

def _certificate_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


async def fetch_policy_text(domain: str, resolver: Resolver, *, port: int, ca_file: str | None,
                            timeout: float) -> str:
    """The body of ``https://mta-sts.<domain>/.well-known/mta-sts.txt``; raises PolicyFetchFailed.

    RFC 8461 3.3: a valid WebPKI certificate for the policy host, status 200,
    no redirects, text/plain, at most 64 KB."""
    host = f"mta-sts.{domain}"
    try:
        async with asyncio.timeout(timeout):
            try:
                address = (await resolver.addresses(host))[0]
            except DnsFailure as failure:
                raise PolicyFetchFailed(STS_POLICY_FETCH_ERROR,
                                        f"{host} does not resolve ({failure.observation.outcome.value})") from None
            netloc = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
            context = ssl.create_default_context(cafile=ca_file)
            authority = host if port == 443 else f"{host}:{port}"
            async with httpx.AsyncClient(verify=context, follow_redirects=False, trust_env=False,
                                         timeout=timeout) as client:
                async with client.stream("GET", f"https://{netloc}:{port}/.well-known/mta-sts.txt",
                                         headers={"Host": authority, "Accept": "text/plain"},
                                         extensions={"sni_hostname": host}) as response:
                    if response.status_code != 200:
                        how = "a redirect, which is not followed" if response.is_redirect else "not 200"
                        raise PolicyFetchFailed(STS_POLICY_FETCH_ERROR,
                                                f"{host} answered HTTP {response.status_code} ({how})")
                    media = response.headers.get("content-type", "").split(";")[0].strip().lower()
                    if media != "text/plain":
                        raise PolicyFetchFailed(STS_POLICY_INVALID,
                                                f"the policy's media type is {media or 'missing'!r}, not text/plain")
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_POLICY_BYTES:
                            raise PolicyFetchFailed(STS_POLICY_INVALID,
                                                    f"the policy is larger than {MAX_POLICY_BYTES} bytes")
    except TimeoutError:
        raise PolicyFetchFailed(STS_POLICY_FETCH_ERROR, f"{host} did not answer within {timeout:g}s") from None
    except httpx.HTTPError as exc:
        cert = _certificate_error(exc)
        if cert is not None:
            raise PolicyFetchFailed(STS_WEBPKI_INVALID, f"the certificate of {host} is not valid "
                                    f"({getattr(cert, 'verify_message', None) or cert})") from None
        raise PolicyFetchFailed(STS_POLICY_FETCH_ERROR, f"fetching from {host} failed ({type(exc).__name__}: "
                                f"{exc or 'no detail'})") from None
    try:
        return bytes(body).decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyFetchFailed(STS_POLICY_INVALID, "the policy is not UTF-8 text") from None


# -- the service --------------------------------------------------------------------------

@dataclass
class _Held:
    txt_id: str | None
    until: float


class MtaSts:
    """Policies for recipient domains, and the results of sessions under them."""

    def __init__(self, config_ref: Callable[[], Config], resolver: Resolver,
                 clock: Callable[[], float] = time.time, results: TlsResults | None = None):
        self.config_ref = config_ref
        self.resolver = resolver
        self.clock = clock
        self._cache: PolicyCache | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._held: dict[str, _Held] = {}
        self.sink = results or TlsResults()      # where every TLS result goes (deliver/tls_report.py)
        self.results = self.sink.recent

    @property
    def cache(self) -> PolicyCache:
        path = self.config_ref().mta_sts.cache
        if self._cache is None or self._cache.path != path:
            self._cache = PolicyCache(path)
        return self._cache

    async def policy(self, domain: str) -> StsPolicy | None:
        """The policy to apply to ``domain``'s MX now, or None (RFC 8461 5.1)."""
        domain = domain.lower().rstrip(".")
        lock = self._locks.setdefault(domain, asyncio.Lock())
        async with lock:   # one fetch per domain, however many messages wait for it
            return await self._policy(domain)

    async def _policy(self, domain: str) -> StsPolicy | None:
        now = self.clock()
        cached = self.cache.get(domain)
        if cached is not None and cached.expired(now):
            await self.cache.drop(domain)
            cached = None
        try:
            txt_id = parse_txt(await self.resolver.txt(f"_mta-sts.{domain}"))
        except DnsFailure:
            txt_id = None        # the cached policy, if any, still holds
        if txt_id is None or (cached is not None and cached.id == txt_id):
            return cached
        held = self._held.get(domain)
        if held is not None and held.txt_id == txt_id and now < held.until:
            return cached
        settings = self.config_ref().mta_sts
        try:
            text = await fetch_policy_text(domain, self.resolver, port=settings.https_port,
                                           ca_file=str(settings.ca_file) if settings.ca_file else None,
                                           timeout=settings.fetch_timeout)
            policy = parse_policy(text, domain, txt_id, self.clock())
        except (PolicyFetchFailed, PolicyInvalid) as exc:
            kind = exc.result_type if isinstance(exc, PolicyFetchFailed) else STS_POLICY_INVALID
            self._held[domain] = _Held(txt_id, now + FETCH_FAILURE_HOLD)
            keeps = (f"the cached policy (id {cached.id}, mode {cached.mode}) stays in force"
                     if cached is not None else "mail is delivered as without a policy (RFC 8461 5)")
            self.record(TlsResult(
                at=now, policy_domain=domain, policy_type="sts" if cached is not None else "no-policy-found",
                policy_id=cached.id if cached is not None else txt_id, mode=cached.mode if cached else None,
                result_type=kind, policy_strings=tuple(cached.policy_strings()) if cached else (),
                detail=f"the MTA-STS policy of {domain} (id {txt_id}) could not be fetched: {exc}; {keeps}"))
            return cached
        self._held.pop(domain, None)
        await self.cache.put(policy)
        log.info("mta-sts policy of %s: id %s, mode %s, mx %s, max_age %ss", domain, policy.id, policy.mode,
                 ", ".join(policy.mx) or "-", policy.max_age)
        return policy

    def record(self, result: TlsResult) -> None:
        """Say one result in the log, and record it for TLS reporting."""
        if result.result_type is not None:
            level = logging.WARNING if result.enforced or result.mode == "testing" else logging.INFO
            log.log(level, "mta-sts %s for %s%s: %s", result.result_type, result.policy_domain,
                    f" at {result.mx_host}" if result.mx_host else "", result.detail)
        self.sink.record(result)

    def session_result(self, policy: StsPolicy, host: str, ip: str | None, failure: Observation | None,
                       enforced: bool, sending_ip: str | None = None) -> TlsResult:
        """The result of one session (or one MX passed over) under ``policy``."""
        kind = result_type(failure) if failure is not None else None
        if failure is None:
            detail = f"TLS to {host} met the policy"
        elif failure.outcome is Outcome.STS_MX_MISMATCH:
            detail = f"{host} matches none of the policy's mx patterns ({', '.join(policy.mx)})"
        else:
            detail = f"the session with {host} does not meet the policy ({kind})"
        if failure is not None:
            detail += ("; the message was not sent there" if enforced
                       else "; mode testing: the message is delivered anyway")
        return TlsResult(at=self.clock(), policy_domain=policy.domain, policy_type="sts", policy_id=policy.id,
                         mode=policy.mode, result_type=kind, mx_host=host, receiving_ip=ip,
                         policy_strings=tuple(policy.policy_strings()), enforced=enforced, detail=detail,
                         sending_ip=sending_ip)
