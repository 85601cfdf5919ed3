"""TLS reports (RFC 8460), pure: the record that asks for them, the report, its mail.

- ``parse_tlsrpt``: the ``_smtp._tls.<domain>`` TXT strings -> the ``rua``
  URIs (``mailto:`` and ``https:``), or none (RFC 8460 3).
- ``report``: one day's stored counts of one policy domain -> the JSON
  report (4.4): a ``policies`` entry per policy, its summary, and
  ``failure-details`` by result type, our address, MX and its address,
  with the latest such failure's detail as ``failure-reason-code``.
- ``report_file``: the gzipped JSON and its file name (5.3).
- ``report_message``: the mail for a ``mailto:`` destination (5.3): a
  multipart/report of type tlsrpt with the gzip as application/tlsrpt+gzip,
  TLS-Report-Domain and TLS-Report-Submitter, queued as any other message
  but marked ``is_tls_report``: delivery takes TLS as it comes for it, never
  the rua domain's MTA-STS or DANE (5.3: delivered despite TLS failures).

Sending and the daily trigger are watch/tls_report.py's.
"""

from __future__ import annotations

import calendar
import email.utils
import gzip
import json
import re
from datetime import datetime
from email.message import EmailMessage
from email import policy as email_policy
from urllib.parse import unquote, urlsplit

from relaywatch.config import Config
from relaywatch.model import NewMessage, StoredBody
from relaywatch.tls_results import TlsCount
from relaywatch.route import decide

MEDIA_TYPE = "application/tlsrpt+gzip"
REPORT_EXPIRATION = 3 * 86400     # a report nobody takes within three days is of no use any more


def parse_tlsrpt(texts: list[str]) -> tuple[str, ...]:
    """The ``rua`` URIs of a TLSRPTv1 record; () when there is no single valid one.

    RFC 8460 3: only records starting ``v=TLSRPTv1``; any other number of them
    than one means the domain does not ask for reports.  Unknown schemes are
    skipped (only mailto and https are defined)."""
    records = [t for t in texts if re.match(r"v=TLSRPTv1\s*(;|$)", t)]
    if len(records) != 1:
        return ()
    rua = ""
    for part in records[0].split(";"):
        key, eq, value = part.strip().partition("=")
        if eq and key.strip() == "rua":
            rua = value.strip()
            break
    out = []
    for uri in (u.strip() for u in rua.split(",")):
        if not uri.isprintable() or " " in uri:
            continue   # the domain's words end up in incident text and the CLI: one clean token each
        parts = urlsplit(uri)
        if parts.scheme == "mailto" and "@" in unquote(parts.path):
            out.append(uri)
        elif parts.scheme == "https" and parts.hostname:
            out.append(uri)
    return tuple(out)


def mailto_address(uri: str) -> str:
    return unquote(urlsplit(uri).path)


def day_range(day: str) -> tuple[int, int]:
    """The first and last second of a UTC day, as Unix times."""
    start = calendar.timegm(datetime.strptime(day, "%Y-%m-%d").timetuple())
    return start, start + 86399


def report_id(day: str, domain: str, submitter: str) -> str:
    return f"{day}T00:00:00Z_{domain}@{submitter}"


def policies(counts: list[TlsCount]) -> list[dict]:
    """The ``policies`` of one domain's report from its counts: one entry per policy
    (type and strings), successes and failures summed, failures detailed."""
    groups: dict[tuple, dict] = {}
    for c in sorted(counts, key=lambda c: (c.policy_type, c.policy_strings)):
        group = groups.setdefault((c.policy_type, c.policy_strings), {
            "policy": {"policy-type": c.policy_type, "policy-string": list(c.policy_strings),
                       "policy-domain": c.policy_domain,
                       **({"mx-host": [line[3:].strip() for line in c.policy_strings if line.startswith("mx:")]}
                          if c.policy_type == "sts" else {})},
            "summary": {"total-successful-session-count": 0, "total-failure-session-count": 0},
            "failure-details": []})
        if not c.result_type:
            group["summary"]["total-successful-session-count"] += c.count
            continue
        group["summary"]["total-failure-session-count"] += c.count
        group["failure-details"].append({
            "result-type": c.result_type,
            **({"sending-mta-ip": c.sending_ip} if c.sending_ip else {}),
            **({"receiving-mx-hostname": c.mx_host} if c.mx_host else {}),
            **({"receiving-ip": c.receiving_ip} if c.receiving_ip else {}),
            "failed-session-count": c.count,
            **({"failure-reason-code": c.detail} if c.detail else {})})
    out = []
    for group in groups.values():
        details = sorted(group.pop("failure-details"),
                         key=lambda d: (d["result-type"], d.get("receiving-mx-hostname", ""),
                                        d.get("receiving-ip", ""), d.get("sending-mta-ip", "")))
        out.append({**group, **({"failure-details": details} if details else {})})
    return out


def report(counts: list[TlsCount], day: str, domain: str, organization: str, contact: str,
           submitter: str) -> dict:
    start = datetime.strptime(day, "%Y-%m-%d").strftime("%Y-%m-%dT00:00:00Z")
    end = datetime.strptime(day, "%Y-%m-%d").strftime("%Y-%m-%dT23:59:59Z")
    return {"organization-name": organization, "date-range": {"start-datetime": start, "end-datetime": end},
            "contact-info": contact, "report-id": report_id(day, domain, submitter),
            "policies": policies([c for c in counts if c.day == day and c.policy_domain == domain])}


def report_file(data: dict, domain: str, submitter: str) -> tuple[str, bytes]:
    """The file name (5.3: ``submitter!domain!begin!end.json.gz``) and the gzipped report."""
    start, end = day_range(data["date-range"]["start-datetime"][:10])
    body = gzip.compress(json.dumps(data, indent=1).encode(), mtime=0)
    return f"{submitter}!{domain}!{start}!{end}.json.gz", body


def report_sender(submitter: str) -> str:
    return f"noreply-smtp-tls-reporting@{submitter}"


def report_message(config: Config, data: dict, rua: list[str], now: float) -> NewMessage | None:
    """The report as mail to the ``mailto:`` destinations, ready for the queue (None: none to route)."""
    settings = config.tls_reporting
    submitter = settings.submitter or config.server.hostname
    domain = data["policies"][0]["policy"]["policy-domain"]
    name, body = report_file(data, domain, submitter)
    recipients = []
    for uri in rua:
        address = mailto_address(uri)
        route = decide(config, address).route
        if route is not None:
            recipients.append((address, route))
    if not recipients:
        return None
    msg = EmailMessage(policy=email_policy.SMTP)
    msg["From"] = report_sender(submitter)
    msg["To"] = ", ".join(a for a, _ in recipients)
    msg["Subject"] = f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{data['report-id']}>"
    msg["Date"] = email.utils.formatdate(now)
    msg["Message-ID"] = email.utils.make_msgid(domain=submitter)
    msg["TLS-Report-Domain"] = domain
    msg["TLS-Report-Submitter"] = submitter
    msg.set_content(f"This is the SMTP TLS report (RFC 8460) for {domain} from {settings.organization_name}, "
                    f"covering {data['date-range']['start-datetime'][:10]} (UTC).\n")
    msg.add_attachment(body, maintype="application", subtype="tlsrpt+gzip", filename=name)
    msg.set_type("multipart/report")
    msg.set_param("report-type", "tlsrpt")
    data_bytes = msg.as_bytes()
    return NewMessage(sender=report_sender(submitter), recipients=tuple(recipients),
                      body=StoredBody(size=len(data_bytes), data=data_bytes), received_at=now,
                      expires_at=now + REPORT_EXPIRATION, message_id=msg["Message-ID"], client="relaywatch",
                      is_tls_report=True)


def incident_line(facts: dict) -> str | None:
    """The lines an MTA-STS (or DANE) incident's text gets from the day's TLS results
    (watch/tls_report.py ``TlsReporter.incident_facts``), or None without any: the
    failures by result type and where the report goes, then the report's failure-details
    (what the partner is told: the MX, the address, its failure-reason-code)."""
    failures = facts.get("failures") or []
    domain = facts.get("policy_domain", "the domain")
    if not failures:
        return None
    counted = ", ".join(f"{n} with {kind}" for kind, n in failures)
    total = sum(n for _, n in failures)
    if not facts.get("enabled"):
        where = "TLS reporting is off here ([tls_reporting] enabled), so the domain is not told"
    elif facts.get("rua"):
        where = f"the daily TLS report goes to rua={','.join(facts['rua'])}"
    else:
        where = f"{domain} publishes no _smtp._tls record, so no TLS report is sent"
    lines = [f"{total} session(s) to {domain} failed today (UTC): {counted}; {where}."]
    for d in facts.get("failure_details") or ():      # absent from incidents stored before it was kept
        at = " ".join(x for x in (d.get("receiving-mx-hostname"), d.get("receiving-ip") and f"[{d['receiving-ip']}]")
                      if x)
        reason = d.get("failure-reason-code")
        lines.append(f"  {d.get('failed-session-count')} {d.get('result-type')}" + (f" at {at}" if at else "")
                     + (f": {json.dumps(reason, ensure_ascii=False)}" if reason else ""))   # remote text, quoted
    return "\n".join(lines)
