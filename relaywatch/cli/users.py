"""relaywatch user add NAME: the users that may authenticate (server.users_file)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from relaywatch.cli.common import config_option, fail


@click.group()
def user():
    """Users that may authenticate (server.users_file)."""


def _users_file(config_path: str, users_file: str | None) -> Path:
    """--users-file, else the config's server.users_file (read without checking the rest: the
    file may not exist yet, and config check refuses a missing one)."""
    if users_file:
        return Path(users_file)
    import tomllib
    try:
        raw = tomllib.loads(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        fail(f"{config_path}: cannot read server.users_file from it ({exc}); or give --users-file")
    value = raw.get("server", {}).get("users_file") if isinstance(raw.get("server"), dict) else None
    if not isinstance(value, str) or not value:
        fail(f"{config_path}: server.users_file is not set; set it, or give --users-file")
    path = Path(value)
    return path if path.is_absolute() else Path(config_path).parent / path


@user.command("add")
@config_option
@click.argument("name")
@click.option("--users-file", help="The users file (default: the config's server.users_file).")
@click.option("--senders", help="MAIL FROM addresses and @domains the user may send as, comma-separated "
                                "(default: any).")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
def user_add(config_path, name, users_file, senders, password_stdin):
    """Add a user (or set a user's password and senders anew)."""
    from relaywatch.config.users_file import User, UsersFileError, parse_senders, valid_name
    from relaywatch.receive.auth import hash_password, write_user
    if not valid_name(name):
        fail(f"{name!r} is not a user name (letters, digits, . _ @ + -; at most 128)")
    try:
        allowed = parse_senders(senders) if senders else None
    except ValueError as exc:
        fail(f"--senders: {exc}")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not password:
        fail("the password is empty")
    path = _users_file(config_path, users_file)
    try:
        new = write_user(path, User(name, hash_password(password), allowed))
    except UsersFileError as exc:
        fail(f"{exc}; fix the file first")
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror}")
    click.echo(f"{'added' if new else 'updated'} user {name} in {path}")
