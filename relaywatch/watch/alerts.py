"""Telling admins: alert email and a signed webhook, each at most once per transition.

Alert email never goes through the queue: the queue's path may be the one in
trouble.  It is sent directly to ``[alerts] smtp`` (a relay of the admin's
choosing) or, without one, to the MX of each admin address — never through
the connector of the incident it reports.  A channel that fails is retried
with backoff and its failure recorded (``relaywatch incidents show``).
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import json
import ssl
from email.message import EmailMessage
from email import policy as email_policy
from urllib.parse import urlsplit

from relaywatch import meters
from relaywatch.config import Config
from relaywatch.errors import AlertNotSent
from relaywatch.deliver.smtp import AllTargetsFailed, SmtpRoutes
from relaywatch.deliver.transport import SessionFailure, SmtpConnection, TlsPolicy
from relaywatch.model import Destination, Route, RouteKind, StoredBody, utc_minute
from relaywatch.notify.tls_report import incident_line
from relaywatch.incident_facts import StoreFacts
from relaywatch.incident import Alert, Incident, IncidentKind, Severity

MAX_ATTEMPTS = 10


def retry_at(attempts: int, now: float) -> float | None:
    if attempts + 1 >= MAX_ATTEMPTS:
        return None
    return now + min(15 * 2 ** attempts, 3600)


def _span(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def headline(inc: Incident) -> str:
    """One line: alert subjects, the CLI, events."""
    verb = "RESOLVED" if not inc.is_open else "CRITICAL" if inc.severity is Severity.CRITICAL else "OPEN"
    if inc.kind is IncidentKind.STORE:
        facts = inc.facts if isinstance(inc.facts, StoreFacts) else StoreFacts("?", 0)
        if not inc.is_open:
            return f"{verb} {inc.code} relaywatch queues mail again ({facts.refused} message(s) refused)"
        return f"{verb} {inc.code} {inc.title}: mail is refused with {facts.reply}"
    if inc.kind is not IncidentKind.BACKLOG:
        return f"{verb} {inc.title} on connector {inc.connector}"
    what = f"{inc.code} {inc.title}"
    if not inc.is_open:
        return f"{verb} {what} on connector {inc.connector}: mail flows again"
    return f"{verb} {what} on connector {inc.connector} ({inc.messages} message(s) waiting)"


def incident_text(inc: Incident, now: float, alert: Alert | None = None) -> str:
    """The human summary used in alert email, webhooks and the CLI (which tells no ``alert``)."""
    lines = [headline(inc), ""]
    e = inc.latest_error
    if inc.kind is IncidentKind.STORE:
        lines += _store_lines(inc)
    elif inc.kind is not IncidentKind.BACKLOG:
        lines.append(inc.detail or "")
    elif not inc.is_open:
        lines.append(f"Connector {inc.connector} ({inc.connector_type}) delivers again. "
                     f"The incident lasted {_span((inc.resolved_at or now) - inc.opened_at)} "
                     f"({utc_minute(inc.opened_at)} to {utc_minute(inc.resolved_at)}).")
        lines.append(f"Messages delayed: {inc.peak_messages} at the peak; delivered late since it opened: "
                     f"{inc.delivered_late}; expired and returned to senders: {inc.expired}.")
    else:
        lines.append(f"Connector {inc.connector} ({inc.connector_type}): {inc.messages} message(s), "
                     f"{inc.recipients} recipient(s) waiting since {utc_minute(inc.first_seen)}; "
                     f"the oldest is {_span(now - inc.oldest_received_at)} old.")
        lines.append(f"First messages expire (NDR to senders) in {_span(inc.first_expires_at - now)}, "
                     f"at {utc_minute(inc.first_expires_at)}, unless mail flows again.")
        if alert is not None and alert.reason:
            lines.append(f"Escalated: {alert.reason.replace('count-', 'backlog passed ')}.")
        lines.append(f"Destination: {', '.join(inc.destinations) or '-'}")
        if e is not None and e.detail:
            lines.append(f"Last error: {e.detail}" + (f" (reply: {e.reply})" if e.reply else ""))
        if inc.diagnosis is not None and inc.diagnosis.text:
            lines += ["", f"Likely cause: {inc.diagnosis.text}"]
            tls_line = incident_line(inc.diagnosis.facts.get("tls_report") or {})
            if tls_line:
                lines.append(tls_line)
        if inc.fixes:
            lines += ["", "What to do:"] + [f"  - {f}" for f in inc.fixes]
        if inc.actions:
            lines += ["", "Fix now (relaywatch incidents fix " + str(inc.id) + " ACTION [--dry-run]): "
                      + ", ".join(inc.actions)]
    return "\n".join(lines) + "\n"


def _store_lines(inc: Incident) -> list[str]:
    facts = inc.facts if isinstance(inc.facts, StoreFacts) else StoreFacts("?", 0)
    if not inc.is_open:
        return [f"relaywatch queues mail again. It could not for {_span((inc.resolved_at or 0) - inc.opened_at)} "
                f"({utc_minute(inc.opened_at)} to {utc_minute(inc.resolved_at)}); {facts.refused} message(s) "
                "were refused with a 4xx meanwhile. They stay with their senders, who retry; nothing that "
                "was accepted is lost."]
    lines = [f"relaywatch cannot write where it queues mail, so since {utc_minute(inc.opened_at)} it refuses "
             f"mail with {facts.reply} (senders keep it and retry; nothing accepted is lost):"]
    lines += [f"  {p.get('path')}: {p.get('code')} ({p.get('detail')}); refusing {p.get('refusing')}"
              for p in facts.problems]
    if inc.fixes:
        lines += ["", "What to do:"] + [f"  - {f}" for f in inc.fixes]
    return lines


def payload(inc: Incident, alert: Alert, now: float) -> dict:
    """The notification as queued and sent: the webhook's body (docs/json.md)."""
    return {"event": alert.event, "transition": alert.name, "at": now, "incident": inc.to_dict(),
            "summary": headline(inc), "text": incident_text(inc, now, alert)}


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def send_webhook(config: Config, data: dict, timeout: float = 10.0) -> None:
    """POST the JSON; raise with a readable reason unless the answer is 2xx."""
    url = urlsplit(config.alerts.webhook_url)
    body = json.dumps(data, separators=(",", ":"), default=str).encode()
    headers = {"Host": url.netloc, "Content-Type": "application/json", "Content-Length": str(len(body)),
               "User-Agent": "relaywatch", "Connection": "close",
               "X-Relaywatch-Event": data["event"], "X-Relaywatch-Delivery": f"{_ident(data['incident'])}:{data['transition']}"}
    if config.alerts.webhook_secret:
        headers["X-Relaywatch-Signature"] = signature(config.alerts.webhook_secret, body)
    port = url.port or (443 if url.scheme == "https" else 80)
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    request = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            url.hostname, port, ssl=ssl.create_default_context() if url.scheme == "https" else None)
        try:
            writer.write(request.encode() + body)
            await writer.drain()
            status = await reader.readline()
        finally:
            writer.close()
    parts = status.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit() or not 200 <= int(parts[1]) < 300:
        raise AlertNotSent(f"webhook answered {status.decode('latin-1').strip() or 'nothing'}")


def _ident(inc: dict) -> str:
    """The incident's id; one told before the store could number it (the store's own
    incident) is named by kind and opening time."""
    if inc.get("id") is not None:
        return str(inc["id"])
    return f"{inc.get('kind') or inc['code']}@{inc['opened_at']:.3f}"


def alert_email(config: Config, data: dict) -> bytes:
    msg = EmailMessage(policy=email_policy.SMTP)
    msg["From"] = f"relaywatch <{config.alerts.sender}>"
    msg["To"] = ", ".join(config.alerts.notify)
    msg["Subject"] = f"[relaywatch] {data['summary']}"
    msg["Date"] = email.utils.formatdate(data["at"])
    msg["Message-ID"] = email.utils.make_msgid(domain=config.server.hostname)
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Relaywatch-Incident"] = f"{_ident(data['incident'])} {data['transition']}"
    msg.set_content(data["text"])
    return msg.as_bytes()


async def send_email(config: Config, routes: SmtpRoutes, data: dict) -> None:
    """Straight to the alert relay or the admins' MX; raise on failure."""
    body = alert_email(config, data)
    stored = StoredBody(size=len(body), data=body)
    if config.alerts.smtp:
        host, port = config.alerts.smtp
        groups = {(host, port): list(config.alerts.notify)}
    else:
        groups = {}
        for address in config.alerts.notify:
            groups.setdefault((address.rsplit("@", 1)[1], None), []).append(address)
    problems = []
    for (host, port), recipients in groups.items():
        try:
            if port is not None:
                ips = await routes.resolver.addresses(host)
                conn = SmtpConnection(Destination(host, ips[0], port), config.delivery, config.server.hostname)
                await conn.open(TlsPolicy(mode="opportunistic", verify="none"), host)
            else:
                # The internet route: MX of the admins' domain, never the connector in trouble.
                conn = await routes.connect(Route(RouteKind.INTERNET, "internet", host), host)
            try:
                result = await conn.transaction(config.alerts.sender, recipients, stored)
            finally:
                await conn.quit()
            if result.data is None or not result.data.is_success:
                problems.append(f"{host}: {result.data or result.mail}")
        except SessionFailure as exc:
            problems.append(f"{host}: {exc.observation.outcome.value}")
        except AllTargetsFailed as exc:
            problems.append(f"{host}: {exc.primary.outcome.value}")
        except OSError as exc:
            problems.append(f"{host}: {exc}")
    if problems:
        raise AlertNotSent("; ".join(problems))


async def deliver_notification(config: Config, routes: SmtpRoutes, channel: str, payload: dict) -> None:
    """Send one notification on ``channel`` (``channels``): the store's due ones (monitor.py)
    and the store incident's, told before it could be recorded (store_incident.py)."""
    try:
        if channel == "webhook":
            await send_webhook(config, payload)
        else:
            await send_email(config, routes, payload)
    except Exception:
        meters.notification_failed(channel)    # /metrics; the caller logs and retries
        raise


def channels(config: Config) -> list[str]:
    out = []
    if config.alerts.notify:
        out.append("email")
    if config.alerts.webhook_url:
        out.append("webhook")
    return out
