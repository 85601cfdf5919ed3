"""``[server]``: the receiving side (listeners, TLS, AUTH), the store, the node, the postmaster.

``parse_server`` reads the table; the checks after it are the ones between
keys of the section (TLS and users for the submission ports, listeners that
would collide at bind, heartbeat against lapse).  ``postmaster`` is resolved
last, by ``load.py``, as its default depends on ``[alerts]`` and ``[[domains]]``.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import re
from pathlib import Path
from typing import Any

from relaywatch.config.model import AlertsConfig, Domain, ServerConfig
from relaywatch.config.pem import key_pair_problems, pem_problem
from relaywatch.config.users_file import UsersFileError, load_users
from relaywatch.config.values import (
    Reader, auto_bool, boolean, choice, duration_or_off, file_keys, format_hostport, host_name, hostport_list,
    network_list, non_negative_int, parse_domain, parse_duration, parse_size, positive_duration, positive_int,
    string)

LOG_FORMATS = ("text", "json")


def parse_server(r: Reader, s: dict, base_dir: Path, rel) -> ServerConfig:
    """``[server]`` but ``postmaster`` (see ``postmaster``), and the checks between its keys."""
    problems = r.problems
    r.unknown(s, file_keys(ServerConfig), "server")
    d = ServerConfig()
    tls_cert = r.get(s, "tls_cert", "server", rel, None)
    tls_key = r.get(s, "tls_key", "server", rel, None)
    if (tls_cert is None) != (tls_key is None):
        problems.append("server.tls_key: tls_cert and tls_key must be set together")
    missing = False
    for key, value in (("tls_cert", tls_cert), ("tls_key", tls_key)):
        if value is not None and not value.is_file():
            problems.append(f"server.{key}: file {value} does not exist")
            missing = True
    if tls_cert is not None and tls_key is not None and not missing:
        problems += key_pair_problems(tls_cert, tls_key)
    server = ServerConfig(
        hostname=r.get(s, "hostname", "server", host_name, d.hostname),
        listen=r.get(s, "listen", "server", hostport_list(25, allow_zero=True), d.listen),
        trusted_networks=r.get(s, "trusted_networks", "server", network_list, d.trusted_networks),
        data_dir=r.get(s, "data_dir", "server", rel, (base_dir / d.data_dir).resolve()),
        max_message_size=r.get(s, "max_message_size", "server", parse_size, d.max_message_size),
        max_connections=r.get(s, "max_connections", "server", positive_int, d.max_connections),
        max_connections_per_ip=r.get(s, "max_connections_per_ip", "server", positive_int,
                                     d.max_connections_per_ip),
        idle_timeout=r.get(s, "idle_timeout", "server", positive_duration, d.idle_timeout),
        reserved_trusted_connections=r.get(s, "reserved_trusted_connections", "server", non_negative_int,
                                           d.reserved_trusted_connections),
        busy_command_timeout=r.get(s, "busy_command_timeout", "server", positive_duration,
                                   d.busy_command_timeout),
        tls_cert=tls_cert,
        tls_key=tls_key,
        log_format=r.get(s, "log_format", "server", choice(LOG_FORMATS), d.log_format),
        shutdown_grace=r.get(s, "shutdown_grace", "server", parse_duration, d.shutdown_grace),
        delivery_process=r.get(s, "delivery_process", "server", auto_bool, d.delivery_process),
        delivery_restart_reset=r.get(s, "delivery_restart_reset", "server", positive_duration,
                                     d.delivery_restart_reset),
        store=r.get(s, "store", "server", _store_url, d.store),
        store_statement_timeout=r.get(s, "store_statement_timeout", "server", duration_or_off,
                                      d.store_statement_timeout),
        store_prepared_statements=r.get(s, "store_prepared_statements", "server", boolean,
                                        d.store_prepared_statements),
        delivery_sync_commits=r.get(s, "delivery_sync_commits", "server", boolean, d.delivery_sync_commits),
        submission_listen=r.get(s, "submission_listen", "server", hostport_list(587, allow_zero=True),
                                d.submission_listen),
        submissions_listen=r.get(s, "submissions_listen", "server", hostport_list(465, allow_zero=True),
                                 d.submissions_listen),
        users_file=r.get(s, "users_file", "server", rel, None),
        auth_max_failures=r.get(s, "auth_max_failures", "server", positive_int, d.auth_max_failures),
        auth_failure_delay=r.get(s, "auth_failure_delay", "server", parse_duration, d.auth_failure_delay),
        auth_block_time=r.get(s, "auth_block_time", "server", positive_duration, d.auth_block_time),
        tls_client_ca=r.get(s, "tls_client_ca", "server", rel, None),
        client_certs=r.get(s, "client_certs", "server", _client_certs, d.client_certs),
        node_name=r.get(s, "node_name", "server", _node_name, d.node_name),
        heartbeat_interval=r.get(s, "heartbeat_interval", "server", positive_duration, d.heartbeat_interval),
        node_lapse=r.get(s, "node_lapse", "server", positive_duration, d.node_lapse),
    )
    problems += _auth_problems(server)
    if server.node_lapse < 3 * server.heartbeat_interval:
        problems.append(f"server.node_lapse: must be at least three times server.heartbeat_interval "
                        f"({server.heartbeat_interval:g}s), or a live node would be taken for dead")
    if (server.reserved_trusted_connections is not None
            and server.reserved_trusted_connections >= server.max_connections):
        problems.append(f"server.reserved_trusted_connections: must be less than server.max_connections "
                        f"({server.max_connections}), or untrusted clients could never connect")
    if not server.listen and not server.submission_listen and not server.submissions_listen:
        problems.append("server.listen: needs at least one address, such as \"127.0.0.1:2525\"")
    problems += _listen_problems(server.listen + server.submission_listen + server.submissions_listen)
    return server


def _store_url(value: Any) -> str:
    value = string(value)
    if value != "sqlite" and not value.startswith(("postgresql://", "postgres://")):
        raise ValueError(f"must be \"sqlite\" or a postgresql:// URL (got {value!r})")
    if value != "sqlite":
        _check_postgres_url(value)
    return value


def _check_postgres_url(url: str) -> None:
    if importlib.util.find_spec("psycopg") is None:
        raise ValueError("a PostgreSQL store needs psycopg, which is not installed: "
                         "pip install 'relaywatch[postgresql]'")
    import psycopg
    import psycopg.conninfo
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        # libpq quotes the whole URL, password and all: keep it out of the message.
        reason = str(exc).strip().splitlines()[0].replace(url, "the URL")
        raise ValueError(f"not a valid PostgreSQL URL: {reason}") from None
    port = str(params.get("port", "5432"))
    if not all(p.isdigit() and 1 <= int(p) <= 65535 for p in port.split(",")):
        raise ValueError(f"the URL's port {port!r} is not a port number from 1 to 65535")


_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def _node_name(value: Any) -> str:
    name = string(value)
    if not _NODE_NAME.fullmatch(name):
        raise ValueError(f"{value!r} is not a node name (letters, digits, '.', '_', '-'; at most 63)")
    return name


def _client_certs(value: Any) -> tuple[tuple[str, str], ...]:
    """``{"<sha256 fingerprint>" = "user"}``; colons and case in the fingerprint do not matter."""
    if not isinstance(value, dict):
        raise ValueError('must be a table of "SHA-256 fingerprint" = "user"')
    out = []
    for fingerprint, name in value.items():
        hex_digits = fingerprint.replace(":", "").lower()
        if not re.fullmatch(r"[0-9a-f]{64}", hex_digits):
            raise ValueError(f"{fingerprint!r} is not a SHA-256 fingerprint (64 hex digits, colons allowed)")
        out.append((hex_digits, string(name)))
    return tuple(out)


def _auth_problems(server: ServerConfig) -> list[str]:
    """Submission ports need TLS and users; the users file must parse (users_file.py)."""
    out = []
    for key in ("submission_listen", "submissions_listen"):
        if getattr(server, key):
            if server.tls_cert is None:
                out.append(f"server.{key}: needs server.tls_cert and server.tls_key (AUTH is never offered "
                           f"in the clear)")
            if server.users_file is None:
                out.append(f"server.{key}: needs server.users_file (clients must authenticate there)")
    if server.tls_client_ca is not None:
        if problem := pem_problem(server.tls_client_ca, "certificate"):
            out.append(f"server.tls_client_ca: {problem}")
        if server.tls_cert is None:
            out.append("server.tls_client_ca: needs server.tls_cert and server.tls_key")
    if server.client_certs and server.tls_client_ca is None:
        out.append("server.client_certs: needs server.tls_client_ca (the CA that issues the client certificates)")
    if server.client_certs and server.users_file is None:
        out.append("server.client_certs: needs server.users_file (each certificate logs in as one of its users)")
    if server.users_file is not None:
        if server.tls_cert is None:
            out.append("server.users_file: needs server.tls_cert and server.tls_key (AUTH is offered only "
                       "after STARTTLS)")
        try:
            users = load_users(server.users_file)
        except UsersFileError as exc:
            out.append(f"server.users_file: {exc}")
        else:
            for fingerprint, name in server.client_certs:
                if name not in users:
                    out.append(f"server.client_certs: {fingerprint[:16]}... maps to {name!r}, who is not in "
                               f"{server.users_file}")
    return out


def _listen_problems(listen: tuple[tuple[str, int], ...]) -> list[str]:
    """The same address twice, or a wildcard that already covers another: the second bind would fail."""
    out = []
    seen: list[tuple[str, int]] = []
    for host, port in listen:
        if port == 0:
            continue   # the OS picks a different port for each
        for other_host, other_port in seen:
            if other_port != port:
                continue
            if other_host == host:
                out.append(f"server.listen: {format_hostport(host, port)} is listed twice")
            elif {other_host, host} & {"0.0.0.0", "::"} and _same_family(host, other_host):
                wildcard, specific = (host, other_host) if host in ("0.0.0.0", "::") else (other_host, host)
                out.append(f"server.listen: {format_hostport(wildcard, port)} already covers "
                           f"{format_hostport(specific, port)}; list one of them")
        seen.append((host, port))
    return out


def _same_family(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a).version == ipaddress.ip_address(b).version
    except ValueError:
        return False   # a host name: the bind check at start-up sees what it resolves to


def postmaster(r: Reader, s: dict, server: ServerConfig, domains: list[Domain], alerts: AlertsConfig) -> str:
    """``server.postmaster``, or its default: the first admin alerts go to (people who
    read mail about this relay), else the Maildir postmaster@<hostname> under data_dir."""
    def address(v: Any) -> str:
        v = string(v)
        local, at, domain = v.rpartition("@")
        if not at or not local or " " in v or domain.startswith("*"):
            raise ValueError(f"{v!r} is not an email address such as \"admin@contoso.test\"")
        return f"{local}@{parse_domain(domain)}"
    explicit = r.get(s, "postmaster", "server", address, None)
    if explicit is None and "postmaster" in s:
        return ""     # invalid: already reported
    if explicit is not None:
        target, source = explicit, "server.postmaster:"
    elif alerts.notify:
        target = alerts.notify[0]
        source = "server.postmaster: not set, and its default, the first alerts.notify address,"
    else:
        return f"postmaster@{server.hostname.lower().rstrip('.')}"
    local, _, domain = target.rpartition("@")
    accepted = next((d for d in domains if d.name == domain.lower().rstrip(".")), None)
    if accepted is not None and accepted.type == "authoritative" and not accepted.has_mailbox(local):
        r.problems.append(f"{source} {target} is not a mailbox of the authoritative domain {accepted.name}; "
                        f"add {local!r} to its mailboxes or set server.postmaster to another address")
    return target
