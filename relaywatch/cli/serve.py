"""relaywatch serve (the relay in the foreground) and reload (SIGHUP to the running one)."""

from __future__ import annotations

import asyncio

import click

from relaywatch import events
from relaywatch.cli.common import config_option, fail, fail_config, read_config
from relaywatch.errors import ConfigError, RelaywatchError
from relaywatch.runtime import control


@click.command()
@config_option
@click.option("--role", type=click.Choice(["all", "receive", "deliver"]), hidden=True,
              help="Internal: run one half of the relay (serve starts the delivery half itself).")
@click.option("--wake-fd", type=int, hidden=True)
def serve(config_path, role, wake_fd):
    """Run the relay (SMTP server and delivery) in the foreground."""
    from relaywatch.app import Relaywatch, Role, default_role
    from relaywatch.preflight import start_problems
    config = read_config(config_path)
    role = Role(role) if role else default_role(config)
    if role is not Role.DELIVER:   # the delivery process is started by a serve that has checked
        problems = start_problems(config, serving=True)
        if problems:
            fail_config([f"{config.source}: {p}" for p in problems])
    events.configure(config.server.log_format)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(Relaywatch(config, role=role, wake_fd=wake_fd).serve_forever())
    except ConfigError as exc:   # e.g. a listen address taken between the check and the bind
        fail_config([f"{config.source}: {p}" for p in exc.problems])
    except OSError as exc:
        fail(f"cannot start: {exc.strerror or exc}")
    except RelaywatchError as exc:
        fail(str(exc))


@click.command()
@config_option
def reload(config_path):
    """Tell the running server to re-read its config (SIGHUP)."""
    config = read_config(config_path)
    try:
        pid = control.reload_server(config.server.data_dir)
    except control.NoServer as exc:
        fail(str(exc))
    click.echo(f"asked relaywatch (pid {pid}) to reload {config_path}")
