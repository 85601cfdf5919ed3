"""The daily TLS reports (RFC 8460): after each UTC midnight, yesterday's, once per cluster.

The watch's tick (watch/monitor.py) calls ``TlsReporter.send_due`` on the
leader only.  For each policy domain with sessions counted yesterday it asks
our resolver for ``_smtp._tls.<domain>`` TXT; a domain that publishes
``rua`` URIs gets the report (notify/tls_report.py builds it):

- ``mailto:`` -- queued as a message of our own (multipart/report with the
  gzip, DKIM-signed when a ``[[dkim]]`` entry signs the submitter's domain),
  so it is delivered, retried and never lost as any other mail;
- ``https:`` -- POSTed as ``application/tlsrpt+gzip``; a 2xx is success.  A
  failed POST is kept in the store (``tls_report_posts``) and tried again
  after ``POST_RETRIES`` (10 minutes, 1 hour, 4 hours), each try claimed in
  the store so it is made once, whichever node leads by then.

A report the cluster could not send on its day (every node down over
midnight, or the leader down until after the next one) is sent late: the
last ``LATE_DAYS`` days are looked at, and each one's claim makes it go once.

``claim_tls_report`` makes each (day, domain) report go out once, whichever
node leads and however often it restarts; what happened to each URI is
stored with the claim (``relaywatch tls-report show``).  A DNS failure claims
nothing: the domain is asked again after ``DNS_RETRY``.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import Callable
from urllib.parse import urlsplit

import httpx

from relaywatch.config import Config
from relaywatch.deliver.resolver import DnsFailure, Resolver
from relaywatch.deliver.tls_report import utc_day
from relaywatch.errors import StoreError
from relaywatch.model import NewMessage, StoredBody
from relaywatch.notify.tls_report import (MEDIA_TYPE, parse_tlsrpt, policies, report, report_file, report_id,
                                          report_message)
from relaywatch.receive.dkim_sign import sign_message
from relaywatch.store.base import Store

log = logging.getLogger("relaywatch.tls_report")

DNS_RETRY = 600.0
POST_TIMEOUT = 30.0
POST_RETRIES = (600.0, 3600.0, 4 * 3600.0)    # the waits before a failed POST's 2nd, 3rd and 4th tries
POST_TRIES = 1 + len(POST_RETRIES)
LATE_DAYS = 2                                 # yesterday and the day before: older reports are of little use


class TlsReporter:
    def __init__(self, config_ref: Callable[[], Config], store: Store, resolver: Resolver,
                 clock: Callable[[], float] = time.time):
        self.config_ref = config_ref
        self.store = store
        self.resolver = resolver
        self.clock = clock
        self._done_days: set[str] = set()     # days whose reports are all out (or claimed elsewhere)
        self._retry_at = 0.0

    async def send_due(self) -> None:
        config, now = self.config_ref(), self.clock()
        if not config.tls_reporting.enabled:
            return
        await self._retry_posts(config, now)
        days = [utc_day(now - back * 86400) for back in range(LATE_DAYS, 0, -1)]
        self._done_days &= set(days)
        if now < self._retry_at:
            return
        done = True
        for day in (d for d in days if d not in self._done_days):
            if await self._send_day(config, day, now):
                self._done_days.add(day)
            else:
                done = False
        if not done:
            self._retry_at = now + DNS_RETRY

    async def _send_day(self, config: Config, day: str, now: float) -> bool:
        """Every report of ``day`` not sent yet; False when a domain is to be asked again."""
        counts = await self.store.tls_counts(day)
        done = True
        for domain in sorted({c.policy_domain for c in counts}):
            try:
                done &= await self._report(config, day, domain, counts, now)
            except StoreError:
                raise
            except Exception:   # one domain's report must never stop the watch or the others
                log.exception("tls report: the report of %s for %s failed", domain, day)
        return done

    async def incident_facts(self, policy_domain: str) -> dict:
        """Today's failures of a domain's sessions and where its report goes, for an incident."""
        now = self.clock()
        day = utc_day(now)
        counts = [c for c in await self.store.tls_counts(day) if c.policy_domain == policy_domain]
        failures: dict[str, int] = {}
        for c in counts:
            if c.result_type:
                failures[c.result_type] = failures.get(c.result_type, 0) + c.count
        try:
            rua = list(parse_tlsrpt(await self.resolver.txt(f"_smtp._tls.{policy_domain}")))
        except DnsFailure:
            rua = []
        return {"policy_domain": policy_domain, "day": day, "rua": rua,
                "enabled": self.config_ref().tls_reporting.enabled,
                "failures": sorted(failures.items(), key=lambda item: (-item[1], item[0])),
                # The report's own failure-details (RFC 8460 4.4), built by the function that builds
                # the report and the console's page: the incident tells what the partner will be told.
                "failure_details": [d for p in policies(counts) for d in p.get("failure-details", ())]}

    async def _report(self, config: Config, day: str, domain: str, counts, now: float) -> bool:
        """Send one domain's report; False to ask its DNS again later."""
        try:
            rua = parse_tlsrpt(await self.resolver.txt(f"_smtp._tls.{domain}"))
        except DnsFailure as failure:
            log.info("tls report: _smtp._tls.%s cannot be looked up (%s); asking again later", domain,
                     failure.observation.outcome.value)
            return False
        settings = config.tls_reporting
        if not await self.store.claim_tls_report(day, domain, report_id(day, domain, settings.submitter), now):
            return True   # another node (or an earlier run) sent it
        if not rua:
            await self.store.finish_tls_report(day, domain, {"rua": "none published"})
            return True
        data = report(counts, day, domain, settings.organization_name, settings.contact_info, settings.submitter)
        outcome: dict[str, str] = {}
        mailto = [u for u in rua if u.startswith("mailto:")]
        if mailto:
            message = report_message(config, data, mailto, now)
            if message is None:
                outcome.update({u: "not routable (refused by our own routing)" for u in mailto})
            else:
                ids = await self.store.enqueue(_signed(config, message))
                outcome.update({u: f"queued {', '.join(ids)}" for u in mailto})
        body = report_file(data, domain, settings.submitter)[1]
        for uri in (u for u in rua if u.startswith("https:")):
            sent, outcome[uri] = await self._post(config, uri, body)
            if not sent:
                await self.store.add_tls_report_post(day, domain, uri, body, now + POST_RETRIES[0])
                outcome[uri] += f"; trying again after {_clock_time(now + POST_RETRIES[0])} (try 1 of {POST_TRIES})"
        await self.store.finish_tls_report(day, domain, outcome)
        log.info("tls report %s sent: %s", data["report-id"], "; ".join(f"{k}: {v}" for k, v in outcome.items()))
        return True

    async def _retry_posts(self, config: Config, now: float) -> None:
        """The kept POSTs that are due, each try claimed first; the report's outcome says how it went."""
        for post in await self.store.due_tls_report_posts(now):
            made = post["attempts"]
            if made >= POST_TRIES:       # the last try was claimed and its node stopped: done with it
                await self.store.drop_tls_report_post(post)
                continue
            following = now + POST_RETRIES[min(made, len(POST_RETRIES) - 1)]
            if not await self.store.claim_tls_report_post(post, following):
                continue                 # another node made this try
            sent, text = await self._post(config, post["uri"], post["body"])
            tries = made + 1
            if sent or tries >= POST_TRIES:
                await self.store.drop_tls_report_post(post)
                text += f" (try {tries} of {POST_TRIES}{'' if sent else '; given up'})"
            else:
                text += f"; trying again after {_clock_time(following)} (try {tries} of {POST_TRIES})"
            for row in await self.store.tls_reports(post["day"]):
                if row["policy_domain"] == post["policy_domain"]:
                    await self.store.finish_tls_report(post["day"], row["policy_domain"],
                                                       {**row["outcome"], post["uri"]: text})
            log.info("tls report of %s for %s to %s: %s", post["policy_domain"], post["day"], post["uri"], text)

    async def _post(self, config: Config, uri: str, body: bytes) -> tuple[bool, str]:
        """POST the gzip to ``uri``, connected to the address our resolver gives (as for the MX):
        whether it was taken, and what happened in words."""
        parts = urlsplit(uri)
        host, port = parts.hostname, parts.port or 443
        try:
            address = (await self.resolver.addresses(host))[0]
        except DnsFailure as failure:
            return False, f"failed: {host} does not resolve ({failure.observation.outcome.value})"
        netloc = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
        ca_file = config.mta_sts.ca_file
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        target = parts._replace(netloc=f"{netloc}:{port}").geturl()
        try:
            async with httpx.AsyncClient(verify=context, trust_env=False, follow_redirects=False,
                                         timeout=POST_TIMEOUT) as client:
                response = await client.post(target, content=body, headers={
                    "Host": parts.netloc, "Content-Type": MEDIA_TYPE}, extensions={"sni_hostname": host})
        except httpx.HTTPError as exc:
            # The remote's words, kept for the CLI and the API: one printable line.
            text = "".join(c if c.isprintable() else "?" for c in str(exc) or "no detail")[:300]
            return False, f"failed: {type(exc).__name__}: {text}"
        if 200 <= response.status_code < 300:
            return True, f"sent (HTTP {response.status_code})"
        return False, f"failed: HTTP {response.status_code}"


def _clock_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _signed(config: Config, message: NewMessage) -> NewMessage:
    """DKIM-signed when a [[dkim]] entry signs the submitter's domain (RFC 8460 5.3 asks for it)."""
    signed = sign_message(config.dkim, message.body.data) if config.dkim else None
    if signed is None:
        return message
    return replace(message, body=StoredBody(size=len(signed[0]), data=signed[0]))
