"""Reading the file: TOML, ``RELAYWATCH_SECTION__KEY`` overrides, then every section in order.

``parse_config`` is the one place that knows the order of the sections and
the checks between them (a connector's delay notice against the queue's
expiry, the postmaster against the accepted domains); each section's own
keys are read by its module.  Every problem is collected; ``ConfigError``
lists them all.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from relaywatch.config.alerts import parse_alerts
from relaywatch.config.delivery import parse_delivery, parse_dns, parse_mta_sts, parse_queue
from relaywatch.config.dkim import parse_dkim
from relaywatch.config.http import parse_http
from relaywatch.config.model import Config
from relaywatch.config.routes import parse_connectors, parse_domains, parse_verify, verify_problems
from relaywatch.config.server import parse_server, postmaster
from relaywatch.config.tls_reporting import parse_tls_reporting
from relaywatch.config.values import Reader, file_keys, string
from relaywatch.errors import ConfigError


def load_config(path: str | os.PathLike, env: dict[str, str] | None = None) -> Config:
    """Read and validate a config file; raise ConfigError listing every problem.

    Each problem is one line that starts with the file (and for a syntax error
    its line and column, as compilers write them): ``FILE: server.listen: ...``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start} cannot be decoded)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_toml_position(path, text, str(exc))) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    from_env = _apply_env(raw, os.environ if env is None else env)
    try:
        return parse_config(raw, base_dir=path.parent, source=path)
    except ConfigError as exc:
        problems = [f"{path}: {p}{_set_by(p, from_env)}" for p in exc.problems]
        raise ConfigError("\n".join(problems), problems=problems) from None


def _set_by(problem: str, from_env: dict[str, str]) -> str:
    """" (set by RELAYWATCH_X__Y)" when that variable, not the file, holds the value at fault."""
    for where, name in from_env.items():
        if problem.startswith(f"{where}:"):
            return f" (set by {name})"
    return ""


def _toml_position(path: Path, text: str, message: str) -> str:
    """tomllib's "Invalid value (at line 3, column 7)" as "FILE:3:7: not valid TOML: invalid value"."""
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if m:
        line, column = m.group(1), m.group(2)
    else:
        lines = text.split("\n")
        line, column = len(lines), len(lines[-1]) + 1
        m = re.search(r"\s*\(at end of document\)$", message)
    what = message[:m.start()] if m else message
    return f"{path}:{line}:{column}: not valid TOML: {what[:1].lower()}{what[1:]}"


def _apply_env(raw: dict, env) -> dict[str, str]:
    """``RELAYWATCH_SECTION__KEY=value`` overrides a scalar in a table.

    Values are parsed as TOML values when they can be (numbers, booleans,
    lists), otherwise taken as strings.  Returns which variable set which key
    (``"queue.lease_time"``, or ``"section"`` for a table only a variable names).
    """
    from_env = {}
    for name, value in env.items():
        if not name.startswith("RELAYWATCH_") or "__" not in name:
            continue
        section, _, key = name[len("RELAYWATCH_"):].lower().partition("__")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value
        if section not in raw:
            from_env[section] = name
        table = raw.setdefault(section, {})
        if isinstance(table, dict):
            table[key] = parsed
            from_env[f"{section}.{key}"] = name
    return from_env


def parse_config(raw: dict, base_dir: Path = Path("."), source: Path | None = None) -> Config:
    problems: list[str] = []
    r = Reader(problems)
    r.unknown(raw, file_keys(Config, not_in_file=("source",)), "")

    def rel(p: Any) -> Path:
        p = Path(string(p))
        return (p if p.is_absolute() else (base_dir / p)).resolve()

    s = r.table(raw, "server", "server")
    server = parse_server(r, s, base_dir, rel)
    queue = parse_queue(r, r.table(raw, "queue", "queue"))
    dns = parse_dns(r, r.table(raw, "dns", "dns"))
    mta_sts = parse_mta_sts(r, r.table(raw, "mta_sts", "mta_sts"), rel)
    tls_reporting = parse_tls_reporting(r, r.table(raw, "tls_reporting", "tls_reporting"))
    delivery = parse_delivery(r, r.table(raw, "delivery", "delivery"))
    domains = parse_domains(r, raw)
    connectors = parse_connectors(r, raw, rel, queue)
    alerts = parse_alerts(r, r.table(raw, "alerts", "alerts"), server)
    verify = parse_verify(r, r.table(raw, "verify", "verify"))
    http = parse_http(r, r.table(raw, "http", "http"), rel, server)
    problems += verify_problems(domains, connectors)
    server = replace(server, postmaster=postmaster(r, s, server, domains, alerts))
    dkim = parse_dkim(r, raw, rel)
    if problems:
        raise ConfigError("\n".join(problems), problems=problems)
    mta_sts = replace(mta_sts, cache=server.data_dir / mta_sts.cache)   # an absolute cache stays as it is
    if not tls_reporting.submitter:
        tls_reporting = replace(tls_reporting, submitter=server.hostname.lower())
    return Config(server=server, queue=queue, dns=dns, mta_sts=mta_sts, tls_reporting=tls_reporting,
                  delivery=delivery, domains=tuple(domains), connectors=tuple(connectors), alerts=alerts,
                  verify=verify, dkim=dkim, http=http, source=source)
