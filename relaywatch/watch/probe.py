"""Connector probes: the whole path, step by step, without sending a message.

DNS, TCP, greeting, EHLO, STARTTLS, certificate, MAIL FROM / RCPT TO for a
test address, then RSET and QUIT.  Each step has its outcome and timing; the
first failing step carries the catalog code, classified exactly as a real
delivery attempt would be.

Nothing here speaks SMTP: the targets, addresses and TLS policy are
deliver/smtp.py's (``SmtpRoutes``), the session is deliver/transport.py's
driver of the one client conversation (smtpclient/), whose events end the
steps.  The probe only times them and builds the result.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

from relaywatch.classify.classify import classify, where
from relaywatch.classify.observation import Phase
from relaywatch.config import Config, Connector
from relaywatch.deliver.dane import Verdict, tlsa_name
from relaywatch.deliver.resolver import DnsFailure
from relaywatch.deliver.smtp import SmtpRoutes
from relaywatch.deliver.transport import SessionFailure, reply_observation
from relaywatch.route import connector_route
from relaywatch.smtpclient.events import RSET, Capabilities, Greeting, Mail, Rcpt, Ready
from relaywatch.incident import ProbeResult, ProbeStep


def test_address(connector: Connector) -> str:
    domain = next((d for d in connector.domains if not d.startswith("*.")), connector.domains[0].lstrip("*."))
    return f"postmaster@{domain}"


async def probe_connector(config: Config, routes: SmtpRoutes, connector: Connector) -> ProbeResult:
    steps: list[ProbeStep] = []
    rcpt = test_address(connector)
    domain = rcpt.split("@", 1)[1]
    route = connector_route(connector, domain)
    at = time.time()
    seen: dict = {"greeting": None, "certificate": None}   # filled in as the session gets that far

    def done(ok: bool, error=None) -> ProbeResult:
        return ProbeResult(connector.name, connector.type, rcpt, at, tuple(steps), ok, error, seen["greeting"],
                           seen["certificate"])

    def step(name: str, started: float, ok: bool, detail: str) -> None:
        steps.append(ProbeStep(name, ok, round((time.monotonic() - started) * 1000, 1), detail))

    def fail(name: str, started: float, failure) -> ProbeResult:
        step(name, started, False, failure.detail)
        return done(False, failure)

    started = time.monotonic()
    try:
        targets = await routes.targets(route, domain)
    except DnsFailure as exc:
        return fail("dns", started, classify(exc.observation, time.time()))
    if not connector.smart_hosts:
        step("dns", started, True, f"MX of {domain}: " + ", ".join(t.host for t in targets))
    target = targets[0]
    started = time.monotonic()
    try:
        dests, addresses = await routes.resolve(target)
        dane = await routes.dane_policy(route, target, addresses)
    except DnsFailure as exc:
        return fail("dns", started, classify(exc.observation, time.time()))
    step("dns", started, True, f"{target.host} -> {', '.join(d.ip for d in dests)}")
    if dane.verdict in (Verdict.BOGUS, Verdict.REQUIRED):
        return fail("dane", started, classify(routes.dane_refused(target, dane), time.time()))
    if dane.applies:
        step("dane", started, True, f"TLSA {tlsa_name(dane.reference_names[0], target.port)}: "
                                    f"{'; '.join(r.text() for r in dane.records)} ({dane.reason})")

    dest = dests[0]
    conn = routes.session(dest)
    policy = routes.tls_policy(route, target.host, dane=dane)
    phase_name = "tcp"

    def on_event(event) -> None:
        """Each session event ends a step (the driver hands them over as it handles them)."""
        nonlocal phase_name, started
        kind = type(event)
        if kind is Greeting:
            step("greeting", started, True, str(event.reply))
            phase_name = "ehlo"
        elif kind is Capabilities and phase_name == "ehlo":
            step("ehlo", started, True, " ".join(sorted(event.extensions)) or "(no extensions)")
            phase_name = "starttls" if policy.mode != "none" else "mail"
        elif kind is Ready and phase_name == "starttls":
            if conn.tls:
                step("starttls", started, True, f"{conn.tls['version']} {conn.tls['cipher']}")
                seen["certificate"] = cert = {k: conn.tls.get(k) for k in (
                    "subject", "sans", "issuer", "not_before", "not_after", "expected_name")}
                days = _days_left(cert.get("not_after"))
                cert["days_left"] = days
                step("certificate", started, True,
                     f"{cert['subject']} (names {', '.join(cert['sans'] or [])}), issued by {cert['issuer']}, "
                     f"valid until {cert['not_after']} ({days} days); verified: "
                     f"{'DANE, ' + str(conn.tls.get('dane_match')) if policy.dane else policy.verify}")
            else:
                step("starttls", started, True, "not offered; continuing in clear (tls = opportunistic)")
            phase_name = "mail"
        else:
            return
        started = time.monotonic()

    try:
        started = time.monotonic()
        await conn.connect()
        step("tcp", started, True, f"connected to {where(dest)}")
        phase_name, started = "greeting", time.monotonic()
        try:
            await conn.start_session(policy, target.host, on_event=on_event)
        finally:
            seen["greeting"] = str(conn.greeting) if conn.greeting else None
        phase_name, started = "mail", time.monotonic()
        reply = await conn.ask(Mail(config.alerts.sender))
        if not reply.is_success:
            return fail("mail", started, classify(reply_observation(Phase.MAIL, reply, dest), time.time()))
        step("mail", started, True, str(reply))
        phase_name, started = "rcpt", time.monotonic()
        reply = await conn.ask(Rcpt(rcpt))
        # The destination is reachable and talking SMTP: a refusal of our made-up
        # test address is reported, but does not fail the probe.
        step("rcpt", started, True, str(reply) + ("" if reply.is_success else " (test address refused)"))
        phase_name, started = "rset", time.monotonic()
        reply = await conn.ask(RSET)
        step("rset", started, reply.is_success, str(reply))
        return done(True)
    except SessionFailure as exc:
        obs = routes.dane_violation(target, dane, exc.observation) or exc.observation
        return fail(phase_name, started, classify(obs, time.time()))
    finally:
        await conn.quit()


def _days_left(not_after: str | None) -> float | None:
    if not not_after:
        return None
    end = datetime.fromisoformat(not_after)
    return round((end - datetime.now(timezone.utc)).total_seconds() / 86400, 1)
