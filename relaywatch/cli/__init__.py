"""The relaywatch command line: the ``main`` group, and every command group in a module of its own.

    relaywatch serve|reload -c FILE                  serve.py
    relaywatch config check|show -c FILE             config_cmd.py
    relaywatch queue list|show|trace|retry|hold|release|delete|bounce   queue.py
    relaywatch incidents list|show|fix|undo          incidents.py
    relaywatch connector test NAME                   connectors.py
    relaywatch nodes, relaywatch node drain          nodes.py
    relaywatch user add NAME                         users.py
    relaywatch dkim keygen DOMAIN                    dkim.py
    relaywatch errors [CODE]                         errors_cmd.py
    relaywatch tls-report show [--date DAY]          tls_report.py

common.py holds what they share (the config option, the store, failing cleanly).
JSON output (``--json``) is shaped by relaywatch/views.py alone, documented in docs/json.md
and kept stable; the HTTP API uses the same functions.
"""

from __future__ import annotations

import click

from relaywatch.cli import (config_cmd, connectors, dkim, errors_cmd, incidents, nodes, queue, serve, tls_report, tokens,
                            users)


def _version() -> str:
    """The installed distribution's version (what pip and pipx report), else the source tree's."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("relaywatch")
    except PackageNotFoundError:   # run from a checkout that was never installed
        from relaywatch import __version__
        return __version__


def _print_version(ctx: click.Context, _param, value: bool) -> None:
    if value:
        click.echo(f"relaywatch {_version()}")
        ctx.exit()


@click.group()
@click.option("--version", is_flag=True, is_eager=True, expose_value=False, callback=_print_version,
              help="Show the version and exit.")
def main():
    """relaywatch: an SMTP relay that tells you why mail is stuck."""


for _command in (serve.serve, serve.reload, config_cmd.config_group, queue.queue, incidents.incidents,
                 connectors.connector, nodes.nodes, nodes.node_group, users.user, dkim.dkim, errors_cmd.errors,
                 tls_report.tls_report, tokens.token):
    main.add_command(_command)
