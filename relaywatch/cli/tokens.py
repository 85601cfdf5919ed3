"""relaywatch token new NAME: a fresh admin token for the console, and its http.tokens line hashed at rest."""

from __future__ import annotations

import secrets

import click

from relaywatch.cli.common import fail
from relaywatch.config.http import TOKEN_NAME, hashed_line


@click.group()
def token():
    """Admin tokens of the console and the HTTP API ([http] tokens)."""


@token.command("new")
@click.argument("name")
def token_new(name):
    """Print a new random token for NAME (shown once: give it to the admin) and the line for
    http.tokens (a list entry or a line of the token file) that holds only its SHA-256."""
    if not TOKEN_NAME.fullmatch(name):
        fail(f"the name {name!r} may only have letters, digits and _ . @ - (at most 64)")
    value = secrets.token_hex(24)
    click.echo(f"token:  {value}")
    click.echo(f"line:   {hashed_line(name, value)}")
