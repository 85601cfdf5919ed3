"""The value parsers every section uses, and ``Reader``, which applies them to a table.

Each converter takes a TOML value and returns it typed, or raises ValueError
with the sentence that follows the key in the problem (``server.idle_timeout:
must be longer than zero``).  ``Reader.get`` adds the key path and collects
the problem, so one bad key never hides the next.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from dataclasses import fields
from typing import Any, Iterator

from relaywatch.idn import BadDomain, to_ascii

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$", re.I)
_SIZE_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
               "kib": 1024, "mib": 1024**2, "gib": 1024**3, None: 1}
_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*", re.I)
_DNS_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*")     # a selector: lower-cased first, so no re.I


class Reader:
    """Pulls typed values out of a TOML table, collecting errors by key path."""

    def __init__(self, problems: list[str]):
        self.problems = problems

    def table(self, data: dict, key: str, path: str) -> dict:
        value = data.get(key, {})
        if not isinstance(value, dict):
            self.problems.append(f"{path}: must be a table ([{key}])")
            return {}
        return value

    def unknown(self, data: dict, known: set[str], path: str) -> None:
        for key in data:
            if key not in known:
                where = f"{path}.{key}" if path else key
                close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                self.problems.append(f"{where}: unknown key{hint}")

    def entries(self, data: dict, key: str, cls, required: tuple[str, ...],
                not_in_file: tuple[str, ...] = ()) -> Iterator[tuple[int, str, dict]]:
        """The tables of the array ``[[key]]`` as (index, key path, table), each checked for keys
        ``cls`` does not have and for ``required`` keys it lacks; an entry that is no table is
        reported and skipped."""
        items = data.get(key, [])
        if not isinstance(items, list):
            self.problems.append(f"{key}: must be an array of tables ([[{key}]])")
            return
        for i, item in enumerate(items):
            path = f"{key}[{i}]"
            if not isinstance(item, dict):
                self.problems.append(f"{path}: must be a table")
                continue
            self.unknown(item, file_keys(cls, not_in_file=not_in_file), path)
            self.problems += [f"{path}.{k}: missing" for k in required if k not in item]
            yield i, path, item

    def get(self, data: dict, key: str, path: str, convert, default):
        if key not in data:
            return default
        try:
            return convert(data[key])
        except (ValueError, TypeError) as exc:
            self.problems.append(f"{path}.{key}: {exc}")
            return default


def file_keys(cls, *, not_in_file: tuple[str, ...] = (), spelled: dict[str, str] | None = None) -> set[str]:
    """The keys a table may have: the dataclass's fields, as the file spells them."""
    spelled = spelled or {}
    return {spelled.get(f.name, f.name) for f in fields(cls) if f.name not in not_in_file}


def parse_duration(value: Any) -> float:
    """``"90s"``, ``"5m"``, ``"24h"``, ``"1d"`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as \"90s\", \"5m\" or \"24h\"")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(f"{value!r} is not a duration; use a number with a unit, such as \"90s\", \"5m\" or \"24h\"")


def parse_size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a size such as \"36MB\"")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("must be positive")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            unit = m.group(2).lower() if m.group(2) else None
            size = int(float(m.group(1)) * _SIZE_UNITS[unit])
            if size <= 0:
                # Zero must not read as "no limit": there is no unlimited.
                raise ValueError(f"must be larger than zero (got {value!r})")
            return size
    raise ValueError(f"{value!r} is not a size; use bytes or a unit, such as \"36MB\"")


def parse_hostport(value: str, default_port: int, allow_zero: bool = False) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address.
    Port 0 (the OS picks one) only where ``allow_zero``: for listeners."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{value!r} is not host:port")
        port = rest[1:] if rest else None
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host, port = value, None
    if not host:
        raise ValueError(f"{value!r} has no host")
    if port is None:
        return host, default_port
    lowest = 0 if allow_zero else 1
    if not port.isdigit() or not lowest <= int(port) <= 65535:
        raise ValueError(f"{value!r} has an invalid port (use {lowest}-65535)")
    return host, int(port)


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (and ::ffff:127.x), or the name localhost."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty string")
    return value.strip()


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def auto_bool(value: Any) -> bool | str:
    if value == "auto" or isinstance(value, bool):
        return value
    raise ValueError(f"must be true, false or \"auto\" (got {value!r})")


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"must be a positive whole number (got {value!r})")
    return value


def non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"must be a whole number, 0 or more (got {value!r})")
    return value


def port_number(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"must be a port number from 1 to 65535 (got {value!r})")
    return value


def choice(options: tuple[str, ...]):
    def convert(value: Any) -> str:
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)} (got {value!r})")
        return value
    return convert


def string_list(value: Any) -> list[str]:
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of strings, such as [\"a\", \"b\"]")
    return [v.strip() for v in value]


def network_list(value: Any):
    nets = []
    for item in string_list(value):
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP network such as \"10.0.0.0/8\"") from None
    return tuple(nets)


def hostport_list(default_port: int, allow_zero: bool = False):
    def convert(value: Any) -> tuple[tuple[str, int], ...]:
        return tuple(parse_hostport(v, default_port, allow_zero) for v in string_list(value))
    return convert


def durations(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list of durations, such as [\"1m\", \"5m\"]")
    out = tuple(parse_duration(v) for v in value)
    if any(v <= 0 for v in out):
        raise ValueError("every interval must be longer than zero")
    return out


def duration_or_off(value: Any) -> float | None:
    if value == "off":
        return None
    return positive_duration(value)


def positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be longer than zero")
    return seconds


def format_seconds(value: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if value >= size and value % size == 0:
            return f"{value // size:.0f}{unit}"
    return f"{value:g}s"


def parse_domain(value: Any) -> str:
    """A domain as relaywatch keeps it: lower case, A-labels (U-labels are converted, IDNA2008/UTS #46)."""
    name = string(value).lower().rstrip(".")
    wildcard, rest = ("*.", name[2:]) if name.startswith("*.") else ("", name)
    try:
        name = wildcard + to_ascii(rest)
    except BadDomain as exc:
        raise ValueError(f"{value!r} is not a domain name: {exc}") from None
    if not re.fullmatch(rf"(\*\.)?{_LABEL}(\.{_LABEL})*", name):
        raise ValueError(f"{value!r} is not a domain name")
    return name


def host_name(value: Any) -> str:
    name = string(value)
    if not _HOSTNAME.fullmatch(name):
        raise ValueError(f"{value!r} is not a host name (EHLO needs one, such as \"relay.contoso.test\")")
    return name


def email_address(value: str) -> str:
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain or any(c.isspace() for c in value):
        raise ValueError(f"{value!r} is not an email address")
    return value


def parse_selector(value: Any) -> str:
    """A DKIM selector (``s=``): DNS labels, lower case."""
    name = string(value).lower()
    if not _DNS_NAME.fullmatch(name):
        raise ValueError(f"{value!r} is not a selector (DNS labels, such as \"rsa-202612\")")
    return name
