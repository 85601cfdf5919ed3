"""The users file (``server.users_file``): its format, parsed into ``User``s.

Here, below both, because ``config check`` validates the file (config/server.py)
and the receiving side reads it for AUTH (receive/auth.py, which re-reads it
when it changes and checks the passwords).  Parsing only: no hashing, so
config never needs argon2.  The format is described in receive/auth.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
_SENDER = re.compile(r"(?:[^@\s,:]+)?@[A-Za-z0-9.-]+")


class UsersFileError(ValueError):
    """The users file cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str = field(repr=False)
    senders: frozenset[str] | None = None     # None: any MAIL FROM


def valid_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def parse_senders(text: str) -> frozenset[str]:
    """``alice@contoso.test,@fabrikam.test`` as a set, lower-cased; ValueError naming a bad entry."""
    out = set()
    for item in (s.strip() for s in text.split(",")):
        if not _SENDER.fullmatch(item):
            raise ValueError(f"{item!r} is not an address (alice@contoso.test) or a domain (@contoso.test)")
        out.add(item.lower())
    if not out:
        raise ValueError("the sender list is empty")
    return frozenset(out)


def parse_users(text: str, source: str = "users file") -> dict[str, User]:
    users: dict[str, User] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{number}"
        name, sep, rest = line.partition(":")
        if not sep:
            raise UsersFileError(f"{where}: expected name:hash[:senders]")
        password_hash, _, senders_text = rest.partition(":")
        if not valid_name(name):
            raise UsersFileError(f"{where}: {name!r} is not a user name (letters, digits, . _ @ + -)")
        if name in users:
            raise UsersFileError(f"{where}: user {name!r} is listed twice")
        if not password_hash.startswith("$argon2"):
            raise UsersFileError(f"{where}: user {name!r} has no Argon2 hash (create it with `relaywatch user add`)")
        try:
            senders = parse_senders(senders_text) if senders_text.strip() else None
        except ValueError as exc:
            raise UsersFileError(f"{where}: user {name!r}: {exc}") from None
        users[name] = User(name, password_hash, senders)
    return users


def load_users(path: Path) -> dict[str, User]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsersFileError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsersFileError(f"{path}: not UTF-8 text") from None
    return parse_users(text, str(path))
