"""What every command shares: the config option, loading the config, opening the store,
failing with a message (never a traceback), printing JSON and ages."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import click

from relaywatch.config import Config, load_config
from relaywatch.errors import ConfigError, RelaywatchError
from relaywatch.runtime import control
from relaywatch.store import open_store

DEFAULT_CONFIG = "/etc/relaywatch/relaywatch.toml"


def rich():
    """rich's Console and Table, imported on first use: JSON output and the server never
    need them, and importing them is a sixth of the CLI's start-up."""
    from rich.console import Console
    from rich.table import Table
    return Console(highlight=False), Table


def fail(message: str, code: int = 1):
    click.echo(f"relaywatch: {message}", err=True)
    sys.exit(code)


def fail_config(problems: list[str]):
    """One line per problem, each naming the file and the key (exit 2)."""
    for problem in problems:
        click.echo(f"relaywatch: {problem}", err=True)
    sys.exit(2)


def read_config(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        fail_config(exc.problems)


config_option = click.option("-c", "--config", "config_path", envvar="RELAYWATCH_CONFIG",
                             default=DEFAULT_CONFIG, show_default=True, help="Config file (TOML).")


def echo_json(data: Any) -> None:
    """``--json`` output; ``data`` comes from relaywatch/views.py (docs/json.md), the API's shapes too."""
    click.echo(json.dumps(data, indent=2))


def with_store(config: Config, fn):
    async def run():
        if config.server.store == "sqlite" and not config.store_path.exists():
            fail(f"no queue at {config.store_path} (has relaywatch run with this config?)")
        store = open_store(config)
        await store.open()
        try:
            return await fn(store)
        finally:
            await store.close()
    try:
        return asyncio.run(run())
    except RelaywatchError as exc:
        fail(str(exc))


def wake_server(config: Config) -> None:
    """SIGUSR1 to a running server: look at the queue now (it polls every second anyway)."""
    control.wake_server(config.server.data_dir)


def age(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    seconds = int(now - ts)
    sign = "" if seconds >= 0 else "in "
    seconds = abs(seconds)
    if seconds < 120:
        text = f"{seconds}s"
    elif seconds < 7200:
        text = f"{seconds // 60}m"
    elif seconds < 172800:
        text = f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    else:
        text = f"{seconds // 86400}d"
    return sign + text


def operator_name() -> str:
    """Who acts, for the audit log."""
    return os.environ.get("SUDO_USER") or os.environ.get("USER") or f"uid {os.getuid()}"


def print_steps(steps: list[dict]) -> None:
    for st in steps:
        click.echo(f"  {'ok  ' if st['ok'] else 'FAIL'} {st['step']:<11} {st['ms']:>7.1f} ms  {st['detail']}")

