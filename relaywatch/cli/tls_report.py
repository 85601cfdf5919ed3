"""``relaywatch tls-report show``: a day's TLS sessions per recipient domain, as its
RFC 8460 report counts them, and whether that report went out (watch/tls_report.py)."""

from __future__ import annotations

import time
from datetime import datetime

import click

from relaywatch import views
from relaywatch.cli.common import config_option, echo_json, read_config, with_store
from relaywatch.deliver.tls_report import utc_day
from relaywatch.idn import domain_both_ways


def _day(_ctx, _param, value: str | None) -> str:
    if value is None:
        return utc_day(time.time())
    try:
        return datetime.strptime(value, "%Y-%m-%d").strftime("%Y-%m-%d")
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date such as 2026-11-30") from None


@click.group("tls-report")
def tls_report():
    """TLS reporting (RFC 8460): sessions under MTA-STS and opportunistic TLS, per domain and day."""


@tls_report.command("show")
@config_option
@click.option("--date", "day", callback=_day, help="The UTC day (YYYY-MM-DD); today by default.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/json.md).")
def tls_report_show(config_path, day, as_json):
    """One UTC day's TLS sessions per domain, the failures by type and MX, and the report sent."""
    config = read_config(config_path)

    async def read(store):
        return await store.tls_counts(day), await store.tls_reports(day)
    counts, reports = with_store(config, read)
    data = views.tls_report_json(day, counts, reports)
    if as_json:
        echo_json(data)
        return
    if not data["domains"]:
        click.echo(f"No TLS sessions to domains with a policy (or by MX) recorded on {day} (UTC).")
        return
    for d in data["domains"]:
        click.echo(domain_both_ways(d["policy_domain"]))     # an IDN as people write it, and as looked up
        for p in d["policies"]:
            s = p["summary"]
            click.echo(f"  {p['policy']['policy-type']}: {s['total-successful-session-count']} session(s) ok, "
                       f"{s['total-failure-session-count']} failed")
            for f in p.get("failure-details", []):
                click.echo(f"    {f['failed-session-count']:>6}  {f['result-type']}  "
                           f"{f.get('receiving-mx-hostname', '-')}  {f.get('receiving-ip', '-')}")
                if f.get("failure-reason-code"):
                    click.echo(f"            {f['failure-reason-code']!r}")   # remote text: quoted, escaped
        report = d["report"]
        if report is None:
            click.echo("  report: not sent (yet)")
        else:
            click.echo(f"  report {report['report_id']}, {report['sent_at']}:")
            for uri, what in report["outcome"].items():
                click.echo(f"    {uri}: {what}")
    click.echo(f"{day} (UTC); a day's reports go out after its end (UTC) when [tls_reporting] is enabled")
