"""relaywatch connector test NAME: walk the path to a destination without sending mail."""

from __future__ import annotations

import asyncio
import sys

import click

from relaywatch import views
from relaywatch.cli.common import config_option, echo_json, fail, print_steps, read_config


@click.group()
def connector():
    """Connectors: test the path to a destination."""


@connector.command("test")
@config_option
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def connector_test(config_path, name, as_json):
    """Walk the whole path (DNS, TCP, greeting, EHLO, STARTTLS, certificate, MAIL/RCPT) without sending mail."""
    from relaywatch.deliver.resolver import Resolver
    from relaywatch.deliver.smtp import SmtpRoutes
    from relaywatch.watch.probe import probe_connector
    config = read_config(config_path)
    spec = config.connector(name)
    if spec is None:
        fail(f"no connector {name!r}; configured: {', '.join(c.name for c in config.connectors) or 'none'}")
    routes = SmtpRoutes(lambda: config, Resolver(config.dns))
    result = views.probe_json(asyncio.run(probe_connector(config, routes, spec)))
    if as_json:
        echo_json(result)
    else:
        click.echo(f"Connector {name} ({spec.type}), test address {result['test_address']}:")
        print_steps(result["steps"])
        if result["error"]:
            e = result["error"]
            click.echo(f"Failed: {e['smtp_code']} {e['code']} {e['title']}" + (f" [{e['subtype']}]" if e["subtype"] else ""))
            click.echo(f"  relaywatch errors {e['code']}  explains causes and fixes")
        else:
            click.echo("Passed: mail can flow through this connector.")
    sys.exit(0 if result["ok"] else 1)
