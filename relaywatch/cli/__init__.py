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
A command's module is imported when that command runs (``COMMANDS``), not at start-up: the
queue commands need neither the delivery code nor the console's, and every other command's
imports cost ``relaywatch queue list`` some 0.4 s of a second's start-up (big_queue bench).
JSON output (``--json``) is shaped by relaywatch/views.py alone, documented in docs/json.md
and kept stable; the HTTP API uses the same functions.
"""

from __future__ import annotations

from importlib import import_module

import click

# command name: (module under relaywatch.cli, the click command in it)
COMMANDS = {
    "serve": ("serve", "serve"), "reload": ("serve", "reload"), "config": ("config_cmd", "config_group"),
    "queue": ("queue", "queue"), "incidents": ("incidents", "incidents"), "connector": ("connectors", "connector"),
    "nodes": ("nodes", "nodes"), "node": ("nodes", "node_group"), "user": ("users", "user"), "dkim": ("dkim", "dkim"),
    "errors": ("errors_cmd", "errors"), "tls-report": ("tls_report", "tls_report"), "token": ("tokens", "token"),
}


class LazyGroup(click.Group):
    """The ``main`` group: a command's module is imported when it is asked for (running it, or its
    line in ``--help``)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name]
        return getattr(import_module(f"relaywatch.cli.{module}"), attr)


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


@click.group(cls=LazyGroup)
@click.option("--version", is_flag=True, is_eager=True, expose_value=False, callback=_print_version,
              help="Show the version and exit.")
def main():
    """relaywatch: an SMTP relay that tells you why mail is stuck."""

