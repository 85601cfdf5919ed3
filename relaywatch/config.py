"""Configuration: a TOML file read into frozen dataclasses.

Validation is ours rather than a schema library's so that every error names the
TOML key the admin has to edit (``connectors[1].tls``) and says what is wrong
with it in one sentence.  All errors are collected and reported together.
"""

from __future__ import annotations

import difflib
import importlib.util
import ipaddress
import os
import re
import socket
import ssl
import tomllib
import urllib.parse
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from relaywatch.errors import ConfigError
from relaywatch.idn import BadDomain, to_ascii

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$", re.I)
_SIZE_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
               "kib": 1024, "mib": 1024**2, "gib": 1024**3, None: 1}
_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*", re.I)

DOMAIN_TYPES = ("authoritative", "internal_relay")
CONNECTOR_TYPES = ("on_premises", "partner")
TLS_MODES = ("none", "opportunistic", "required")
TLS_VERIFY = ("none", "ca", "ca_and_name")
DELIVERY_DANE = ("off", "on")                    # delivery.dane (the internet route)
CONNECTOR_DANE = ("off", "on", "required")       # connectors.dane
LOG_FORMATS = ("text", "json")


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


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = "relaywatch.localdomain"
    listen: tuple[tuple[str, int], ...] = (("127.0.0.1", 2525),)
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    data_dir: Path = Path("data")
    max_message_size: int = 36_000_000
    max_connections: int = 500
    max_connections_per_ip: int = 50
    idle_timeout: float = 300.0
    # Slowloris defence (receive/admission.py): slots only trusted clients may
    # use (None: a tenth of max_connections), and the time a session that has
    # not started a transaction gets to complete each command once 80 % of
    # the slots are taken.
    reserved_trusted_connections: int | None = None
    busy_command_timeout: float = 10.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    log_format: str = "text"
    shutdown_grace: float = 30.0
    delivery_process: bool | str = "auto"   # deliver from a second process (see app.py)
    delivery_restart_reset: float = 300.0   # a delivery process that ran this long restarts at once
    store: str = "sqlite"                    # or a postgresql:// URL (store/postgres.py)
    store_statement_timeout: float | None = 30.0   # PostgreSQL: longest statement; None: the server's
    # Several nodes on one queue (relaywatch/cluster/): this node's name (by default
    # the machine's host name), how often it beats, and how old a heartbeat makes it dead.
    node_name: str = field(default_factory=lambda: default_node_name())
    heartbeat_interval: float = 5.0
    node_lapse: float = 30.0
    # Where mail for postmaster goes (RFC 5321 4.5.1); parse_config fills in the
    # default: the first [alerts] notify address, else postmaster@<hostname> in a Maildir.
    postmaster: str = ""
    # Clients that authenticate (receive/auth.py): listen above is the smtp port
    # (AUTH after STARTTLS when there are users); submission (587) requires
    # STARTTLS and AUTH before MAIL; submissions (465) is TLS from the first byte.
    submission_listen: tuple[tuple[str, int], ...] = ()
    submissions_listen: tuple[tuple[str, int], ...] = ()
    users_file: Path | None = None
    auth_max_failures: int = 5          # wrong passwords from one IP before AUTH is blocked
    auth_failure_delay: float = 1.0     # times the failures so far: the wait before a 535
    auth_block_time: float = 600.0      # how long the block lasts; failures older than this are forgotten
    # Client certificates on the submission ports: the CA that issues them, and which
    # certificate (SHA-256 fingerprint of its DER form, lower-case hex) logs in as which user.
    tls_client_ca: Path | None = None
    client_certs: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class QueueConfig:
    message_expiration: float = 24 * 3600.0
    retry_intervals: tuple[float, ...] = (60.0, 300.0, 600.0, 900.0, 1800.0, 3600.0)
    lease_time: float = 600.0
    trace_retention: float = 7 * 86400.0   # a message that left the queue can be traced this long; 0 = off


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[tuple[str, int], ...] = ()
    timeout: float = 10.0


@dataclass(frozen=True)
class MtaStsConfig:
    """MTA-STS (RFC 8461) for mail sent by MX: deliver/mta_sts.py."""
    enabled: bool = True                  # on the internet route; connectors opt in with mta_sts = true
    cache: Path = Path("mta-sts.json")    # under server.data_dir unless absolute; survives restarts
    fetch_timeout: float = 10.0           # the whole policy fetch: DNS, connect, TLS, the body
    # Verifying the policy host's and the MX hosts' certificates: the system's
    # CAs by default; a CA file only for a private PKI (or tests).
    ca_file: Path | None = None
    https_port: int = 443                 # the policy host's port (RFC 8461 says 443; tests move it)


@dataclass(frozen=True)
class TlsReportingConfig:
    """Daily TLS reports (RFC 8460) to the domains that ask for them: watch/tls_report.py."""
    enabled: bool = False
    organization_name: str = ""           # the report's organization-name (required when enabled)
    contact_info: str = ""                # an address or URL to reach whoever runs this relay
    submitter: str = ""                   # TLS-Report-Submitter; server.hostname when unset


@dataclass(frozen=True)
class DeliveryConfig:
    concurrency: int = 100
    per_destination: int = 20
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    data_timeout: float = 180.0
    final_timeout: float = 600.0
    # How long an idle connection to a destination stays open waiting for more
    # mail; short, since the scheduler hands mail over as soon as it is due.
    connection_idle: float = 2.0
    messages_per_connection: int = 100
    # The port MX hosts are contacted on (Postfix's smtp_tcp_port); smart hosts
    # carry their own port.
    smtp_port: int = 25
    # DANE (RFC 7672) on the internet route: "on" applies DNSSEC-validated TLSA
    # records where published (Postfix's "dane" level), else TLS as before.
    dane: str = "on"


@dataclass(frozen=True)
class Domain:
    name: str
    type: str
    mailboxes: frozenset[str] = frozenset()
    # internal_relay only: ask the connector's server at RCPT whether an address
    # exists, for clients outside trusted_networks (receive/verify.py).
    verify_recipients: bool = False

    def has_mailbox(self, local_part: str) -> bool:
        return local_part.lower() in self.mailboxes


@dataclass(frozen=True)
class Connector:
    name: str
    type: str
    domains: tuple[str, ...]
    smart_hosts: tuple[tuple[str, int], ...] = ()
    tls: str = "opportunistic"
    tls_verify: str = "ca_and_name"
    tls_name: str | None = None
    ca_file: Path | None = None
    # A CRL (PEM) to check the destination's certificate against; without one
    # a revoked certificate cannot be told from a good one.
    crl_file: Path | None = None
    enabled: bool = True
    # Send the sender one "delayed" DSN once a message has waited this long
    # (None: never).
    delay_notice_after: float | None = 4 * 3600.0
    # Apply the recipient domain's MTA-STS policy (RFC 8461); only for a
    # connector without smart_hosts (by MX), as the internet route always does.
    mta_sts: bool = False
    # DANE (RFC 7672) for this connector's hosts: "off", "on" (where published
    # and DNSSEC-validated), "required" (no usable TLSA: no delivery).
    dane: str = "off"
    # Set only by a "pause" fix (an override in the store), never in the file.
    paused: bool = False

    def serves(self, domain: str) -> bool:
        return any(domain_matches(pattern, domain) for pattern in self.domains)


def domain_matches(pattern: str, domain: str) -> bool:
    """``*.fabrikam.test`` matches any subdomain (not the apex), else exact."""
    pattern, domain = pattern.lower(), domain.lower()
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:])
    return pattern == domain


@dataclass(frozen=True)
class AlertsConfig:
    notify: tuple[str, ...] = ()                   # admin addresses for alert email
    smtp: tuple[str, int] | None = None            # relay for alert email; None: the recipients' MX
    sender: str = ""                               # From of alert email; default relaywatch@hostname
    webhook_url: str | None = None
    webhook_secret: str | None = None
    open_after: float = 300.0                      # oldest deferred message at least this old...
    min_messages: int = 1                          # ...and at least this many deferred
    escalate_before_expiry: float = 4 * 3600.0
    escalate_steps: tuple[int, ...] = (100, 1000)
    probe_interval: float = 30.0
    cert_probe_interval: float = 900.0
    cert_warning_days: float = 14.0
    invalid_recipient_quota: int = 0               # per rolling 24 h; 0: not watched
    evaluate_interval: float = 5.0


@dataclass(frozen=True)
class VerifyConfig:
    """Recipient verification ([[domains]] verify_recipients): how long answers are kept."""
    positive_ttl: float = 3600.0                   # an address the server accepted
    negative_ttl: float = 600.0                    # an address the server refused (5xx)
    timeout: float = 10.0                          # longer than this: 450, the client retries


@dataclass(frozen=True)
class DkimSigning:
    """One ``[[dkim]]`` entry: mail From this domain is signed with this key (receive/dkim.py)."""
    domain: str
    selector: str
    key_file: Path
    algorithm: str = ""                       # rsa-sha256 or ed25519-sha256; the key's
    sub_domains: bool = False
    headers: tuple[str, ...] = ()             # default: receive/dkim.py DEFAULT_HEADERS
    oversign_headers: tuple[str, ...] = ()    # default: DEFAULT_OVERSIGN (from)
    canonicalization: str = "relaxed/relaxed"
    key: Any = field(default=None, compare=False, repr=False)   # the loaded SigningKey, not in the file


@dataclass(frozen=True)
class AdminToken:
    """One admin bearer token of the console: its name (who, in the audit log)
    and the SHA-256 of the token.  The token itself is not kept."""
    name: str
    digest: bytes


@dataclass(frozen=True)
class HttpConfig:
    """The mail flow console's listener (relaywatch/console/): API, metrics, health."""
    listen: tuple[str, int] | None = ("127.0.0.1", 8025)   # None: "off"
    tokens: tuple[AdminToken, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    mta_sts: MtaStsConfig = field(default_factory=MtaStsConfig)
    tls_reporting: TlsReportingConfig = field(default_factory=TlsReportingConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    domains: tuple[Domain, ...] = ()
    connectors: tuple[Connector, ...] = ()
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    dkim: tuple[DkimSigning, ...] = ()
    http: HttpConfig = field(default_factory=HttpConfig)
    source: Path | None = None

    def connector(self, name: str) -> Connector | None:
        return next((c for c in self.connectors if c.name == name), None)

    def domain(self, name: str) -> Domain | None:
        name = name.lower()
        return next((d for d in self.domains if d.name == name), None)

    @property
    def store_path(self) -> Path:
        return self.server.data_dir / "queue.sqlite3"


def apply_overrides(config: Config, overrides: dict[str, dict]) -> Config:
    """The running config: the file's, with the store's "Fix now" overrides on top.

    Keys: ``connector:<name>:enabled``, ``connector:<name>:paused``,
    ``domain:<name>:type``.  Overrides for names no longer in the file are
    ignored.
    """
    if not overrides:
        return config
    values = {k: v["value"] for k, v in overrides.items()}
    connectors = tuple(
        replace(c, enabled=values.get(f"connector:{c.name}:enabled", c.enabled),
                paused=values.get(f"connector:{c.name}:paused", c.paused))
        for c in config.connectors)
    domains = tuple(replace(d, type=values.get(f"domain:{d.name}:type", d.type)) for d in config.domains)
    return replace(config, connectors=connectors, domains=domains)


class _Reader:
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

    def get(self, data: dict, key: str, path: str, convert, default):
        if key not in data:
            return default
        try:
            return convert(data[key])
        except (ValueError, TypeError) as exc:
            self.problems.append(f"{path}.{key}: {exc}")
            return default


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty string")
    return value.strip()


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _store_url(value: Any) -> str:
    value = _string(value)
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


def _auto_bool(value: Any) -> bool | str:
    if value == "auto" or isinstance(value, bool):
        return value
    raise ValueError(f"must be true, false or \"auto\" (got {value!r})")


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"must be a positive whole number (got {value!r})")
    return value


def _non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"must be a whole number, 0 or more (got {value!r})")
    return value


def _choice(options: tuple[str, ...]):
    def convert(value: Any) -> str:
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)} (got {value!r})")
        return value
    return convert


def _string_list(value: Any) -> list[str]:
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of strings, such as [\"a\", \"b\"]")
    return [v.strip() for v in value]


def _network_list(value: Any):
    nets = []
    for item in _string_list(value):
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP network such as \"10.0.0.0/8\"") from None
    return tuple(nets)


def _hostport_list(default_port: int, allow_zero: bool = False):
    def convert(value: Any) -> tuple[tuple[str, int], ...]:
        return tuple(parse_hostport(v, default_port, allow_zero) for v in _string_list(value))
    return convert


def _durations(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list of durations, such as [\"1m\", \"5m\"]")
    out = tuple(parse_duration(v) for v in value)
    if any(v <= 0 for v in out):
        raise ValueError("every interval must be longer than zero")
    return out


def _duration_or_off(value: Any) -> float | None:
    if value == "off":
        return None
    return _positive_duration(value)


def _retention(value: Any) -> float:
    """A positive duration, or "off" (0: keep nothing)."""
    if value == "off":
        return 0.0
    try:
        return _positive_duration(value)
    except ValueError as exc:
        raise ValueError(f'{exc} (or "off" to keep no trace of messages that left the queue)') from None


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be longer than zero")
    return seconds


def _domain_name(value: Any) -> str:
    """A domain as relaywatch keeps it: lower case, A-labels (U-labels are converted, IDNA2008/UTS #46)."""
    name = _string(value).lower().rstrip(".")
    wildcard, rest = ("*.", name[2:]) if name.startswith("*.") else ("", name)
    try:
        name = wildcard + to_ascii(rest)
    except BadDomain as exc:
        raise ValueError(f"{value!r} is not a domain name: {exc}") from None
    if not re.fullmatch(rf"(\*\.)?{_LABEL}(\.{_LABEL})*", name):
        raise ValueError(f"{value!r} is not a domain name")
    return name


def _hostname(value: Any) -> str:
    name = _string(value)
    if not _HOSTNAME.fullmatch(name):
        raise ValueError(f"{value!r} is not a host name (EHLO needs one, such as \"relay.contoso.test\")")
    return name


_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def default_node_name() -> str:
    """The machine's host name, as a node name."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).lstrip("._-")[:63]
    return name or "relaywatch"


def _node_name(value: Any) -> str:
    name = _string(value)
    if not _NODE_NAME.fullmatch(name):
        raise ValueError(f"{value!r} is not a node name (letters, digits, '.', '_', '-'; at most 63)")
    return name


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"must be a port number from 1 to 65535 (got {value!r})")
    return value


def _address(value: str) -> str:
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain or any(c.isspace() for c in value):
        raise ValueError(f"{value!r} is not an email address")
    return value


def _mailboxes(domain: str | None):
    """Local parts; ``alice@<this domain>`` is taken as ``alice``, an address elsewhere refused."""
    def convert(value: Any) -> frozenset[str]:
        out = set()
        for written in _string_list(value):
            box, at, other = written.rpartition("@")
            if at:
                other = other.lower().rstrip(".")
                if domain is not None and other != domain:
                    raise ValueError(f"{written!r} is an address in {other}, not in {domain}; list it under the "
                                     f"[[domains]] entry for {other}, or write only the part before the @")
            else:
                box = written
            if not box or "@" in box or any(c.isspace() for c in box):
                raise ValueError(f"{written!r} is not a mailbox name (the part before the @, such as \"alice\")")
            out.add(box.lower())
        return frozenset(out)
    return convert


def _file_keys(cls, *, not_in_file: tuple[str, ...] = (), spelled: dict[str, str] | None = None) -> set[str]:
    """The keys a table may have: the dataclass's fields, as the file spells them."""
    spelled = spelled or {}
    return {spelled.get(f.name, f.name) for f in fields(cls) if f.name not in not_in_file}


def _seconds(value: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if value >= size and value % size == 0:
            return f"{value // size:.0f}{unit}"
    return f"{value:g}s"


def _no_passphrase(*_args):
    raise ValueError("the key is encrypted; relaywatch needs it without a passphrase")


def _pem_problem(path: Path, kind: str) -> str | None:
    """Why ``path`` is no usable PEM certificate (kind "certificate") or CRL (kind "CRL"), or None."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    marker = b"-----BEGIN X509 CRL-----" if kind == "CRL" else b"-----BEGIN CERTIFICATE-----"
    if marker not in data:
        return f"{path} holds no PEM {kind} (no {marker.decode()} line)"
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(path))
    except ssl.SSLError as exc:
        return f"{path} does not parse as a PEM {kind}: {exc.reason or exc}"
    return None


def _server_tls_problems(cert: Path, key: Path, section: str = "server") -> list[str]:
    problem = _pem_problem(cert, "certificate")
    if problem:
        return [f"{section}.tls_cert: {problem}"]
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(cert), str(key), password=_no_passphrase)
    except ValueError as exc:
        return [f"{section}.tls_key: {key}: {exc}"]
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return [f"{section}.tls_key: {key} is not the key of the certificate in {section}.tls_cert ({cert})"]
        return [f"{section}.tls_key: {key} is not a usable PEM private key: {exc.reason or exc}"]
    except OSError as exc:
        return [f"{section}.tls_key: cannot read {key}: {exc.strerror}"]
    return []


def _auth_problems(server: ServerConfig) -> list[str]:
    """Submission ports need TLS and users; the users file must parse (receive/auth.py)."""
    from relaywatch.receive.auth import UsersFileError, load_users
    out = []
    for key in ("submission_listen", "submissions_listen"):
        if getattr(server, key):
            if server.tls_cert is None:
                out.append(f"server.{key}: needs server.tls_cert and server.tls_key (AUTH is never offered "
                           f"in the clear)")
            if server.users_file is None:
                out.append(f"server.{key}: needs server.users_file (clients must authenticate there)")
    if server.tls_client_ca is not None:
        if problem := _pem_problem(server.tls_client_ca, "certificate"):
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


def _client_certs(value: Any) -> tuple[tuple[str, str], ...]:
    """``{"<sha256 fingerprint>" = "user"}``; colons and case in the fingerprint do not matter."""
    if not isinstance(value, dict):
        raise ValueError('must be a table of "SHA-256 fingerprint" = "user"')
    out = []
    for fingerprint, name in value.items():
        hex_digits = fingerprint.replace(":", "").lower()
        if not re.fullmatch(r"[0-9a-f]{64}", hex_digits):
            raise ValueError(f"{fingerprint!r} is not a SHA-256 fingerprint (64 hex digits, colons allowed)")
        out.append((hex_digits, _string(name)))
    return tuple(out)


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
    r = _Reader(problems)
    r.unknown(raw, _file_keys(Config, not_in_file=("source",)), "")

    s = r.table(raw, "server", "server")
    r.unknown(s, _file_keys(ServerConfig), "server")
    d = ServerConfig()

    def rel(p: Any) -> Path:
        p = Path(_string(p))
        return (p if p.is_absolute() else (base_dir / p)).resolve()

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
        problems += _server_tls_problems(tls_cert, tls_key)
    server = ServerConfig(
        hostname=r.get(s, "hostname", "server", _hostname, d.hostname),
        listen=r.get(s, "listen", "server", _hostport_list(25, allow_zero=True), d.listen),
        trusted_networks=r.get(s, "trusted_networks", "server", _network_list, d.trusted_networks),
        data_dir=r.get(s, "data_dir", "server", rel, (base_dir / d.data_dir).resolve()),
        max_message_size=r.get(s, "max_message_size", "server", parse_size, d.max_message_size),
        max_connections=r.get(s, "max_connections", "server", _positive_int, d.max_connections),
        max_connections_per_ip=r.get(s, "max_connections_per_ip", "server", _positive_int,
                                     d.max_connections_per_ip),
        idle_timeout=r.get(s, "idle_timeout", "server", _positive_duration, d.idle_timeout),
        reserved_trusted_connections=r.get(s, "reserved_trusted_connections", "server", _non_negative_int,
                                           d.reserved_trusted_connections),
        busy_command_timeout=r.get(s, "busy_command_timeout", "server", _positive_duration,
                                   d.busy_command_timeout),
        tls_cert=tls_cert,
        tls_key=tls_key,
        log_format=r.get(s, "log_format", "server", _choice(LOG_FORMATS), d.log_format),
        shutdown_grace=r.get(s, "shutdown_grace", "server", parse_duration, d.shutdown_grace),
        delivery_process=r.get(s, "delivery_process", "server", _auto_bool, d.delivery_process),
        delivery_restart_reset=r.get(s, "delivery_restart_reset", "server", _positive_duration,
                                     d.delivery_restart_reset),
        store=r.get(s, "store", "server", _store_url, d.store),
        store_statement_timeout=r.get(s, "store_statement_timeout", "server", _duration_or_off,
                                      d.store_statement_timeout),
        submission_listen=r.get(s, "submission_listen", "server", _hostport_list(587, allow_zero=True),
                                d.submission_listen),
        submissions_listen=r.get(s, "submissions_listen", "server", _hostport_list(465, allow_zero=True),
                                 d.submissions_listen),
        users_file=r.get(s, "users_file", "server", rel, None),
        auth_max_failures=r.get(s, "auth_max_failures", "server", _positive_int, d.auth_max_failures),
        auth_failure_delay=r.get(s, "auth_failure_delay", "server", parse_duration, d.auth_failure_delay),
        auth_block_time=r.get(s, "auth_block_time", "server", _positive_duration, d.auth_block_time),
        tls_client_ca=r.get(s, "tls_client_ca", "server", rel, None),
        client_certs=r.get(s, "client_certs", "server", _client_certs, d.client_certs),
        node_name=r.get(s, "node_name", "server", _node_name, d.node_name),
        heartbeat_interval=r.get(s, "heartbeat_interval", "server", _positive_duration, d.heartbeat_interval),
        node_lapse=r.get(s, "node_lapse", "server", _positive_duration, d.node_lapse),
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

    q = r.table(raw, "queue", "queue")
    r.unknown(q, _file_keys(QueueConfig), "queue")
    dq = QueueConfig()
    queue = QueueConfig(
        message_expiration=r.get(q, "message_expiration", "queue", _positive_duration, dq.message_expiration),
        retry_intervals=r.get(q, "retry_intervals", "queue", _durations, dq.retry_intervals),
        lease_time=r.get(q, "lease_time", "queue", _positive_duration, dq.lease_time),
        trace_retention=r.get(q, "trace_retention", "queue", _retention, dq.trace_retention),
    )

    n = r.table(raw, "dns", "dns")
    r.unknown(n, _file_keys(DnsConfig), "dns")
    dns = DnsConfig(
        nameservers=r.get(n, "nameservers", "dns", _hostport_list(53), ()),
        timeout=r.get(n, "timeout", "dns", _positive_duration, DnsConfig.timeout),
    )
    for host, _ in dns.nameservers:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            problems.append(f"dns.nameservers: {host!r} must be an IP address, not a name")

    mta_sts = _mta_sts(r, r.table(raw, "mta_sts", "mta_sts"), rel, problems)
    tls_reporting = _tls_reporting(r, r.table(raw, "tls_reporting", "tls_reporting"), problems)

    v = r.table(raw, "delivery", "delivery")
    r.unknown(v, _file_keys(DeliveryConfig), "delivery")
    dd = DeliveryConfig()
    convert = {"concurrency": _positive_int, "per_destination": _positive_int,
               "messages_per_connection": _positive_int, "smtp_port": _port, "dane": _choice(DELIVERY_DANE)}
    delivery = DeliveryConfig(**{
        f.name: r.get(v, f.name, "delivery", convert.get(f.name, _positive_duration), getattr(dd, f.name))
        for f in fields(DeliveryConfig)
    })

    domains: list[Domain] = []
    raw_domains = raw.get("domains", [])
    if not isinstance(raw_domains, list):
        problems.append("domains: must be an array of tables ([[domains]])")
        raw_domains = []
    for i, item in enumerate(raw_domains):
        p = f"domains[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{p}: must be a table")
            continue
        r.unknown(item, _file_keys(Domain), p)
        if "name" not in item:
            problems.append(f"{p}.name: missing")
            continue
        name = r.get(item, "name", p, _domain_name, None)
        if name and name.startswith("*."):
            problems.append(f"{p}.name: {name!r}: an accepted domain is one exact name (wildcards are for "
                            f"connectors' domains); list each domain")
            name = None
        dtype = r.get(item, "type", p, _choice(DOMAIN_TYPES), "authoritative")
        boxes = r.get(item, "mailboxes", p, _mailboxes(name), frozenset())
        verify = r.get(item, "verify_recipients", p, _bool, False)
        if verify and dtype != "internal_relay":
            problems.append(f"{p}.verify_recipients: only for type = \"internal_relay\" (an authoritative "
                            f"domain's mailboxes are listed here, so there is nothing to ask)")
        if name:
            if any(dm.name == name for dm in domains):
                problems.append(f"{p}.name: {name} is listed twice")
            domains.append(Domain(name, dtype, boxes, verify))

    connectors: list[Connector] = []
    raw_connectors = raw.get("connectors", [])
    if not isinstance(raw_connectors, list):
        problems.append("connectors: must be an array of tables ([[connectors]])")
        raw_connectors = []
    for i, item in enumerate(raw_connectors):
        p = f"connectors[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{p}: must be a table")
            continue
        r.unknown(item, _file_keys(Connector, not_in_file=("paused",)), p)
        for required in ("name", "type", "domains"):
            if required not in item:
                problems.append(f"{p}.{required}: missing")
        name = r.get(item, "name", p, _string, None)
        if name in ("local", "internet"):
            problems.append(f"{p}.name: {name!r} is reserved for a built-in route")
        if name and any(c.name == name for c in connectors):
            problems.append(f"{p}.name: another connector is already called {name!r}")
        ca_file = r.get(item, "ca_file", p, rel, None)
        crl_file = r.get(item, "crl_file", p, rel, None)
        for key, value, kind in (("ca_file", ca_file, "certificate"), ("crl_file", crl_file, "CRL")):
            if value is None:
                continue
            if not value.is_file():
                problems.append(f"{p}.{key}: file {value} does not exist")
            elif problem := _pem_problem(value, kind):
                problems.append(f"{p}.{key}: {problem}")
        pats = r.get(item, "domains", p, lambda v: [_domain_name(x) for x in _string_list(v)], [])
        if "domains" in item and not pats:
            problems.append(f"{p}.domains: must list at least one domain")
        tls = r.get(item, "tls", p, _choice(TLS_MODES), Connector.tls)
        conn = Connector(
            name=name or f"connector{i}",
            type=r.get(item, "type", p, _choice(CONNECTOR_TYPES), "partner"),
            domains=tuple(pats),
            smart_hosts=r.get(item, "smart_hosts", p, _hostport_list(25), ()),
            tls=tls,
            # Verifying by default only where TLS is required: opportunistic TLS
            # exists to encrypt when possible, not to block on a certificate.
            tls_verify=r.get(item, "tls_verify", p, _choice(TLS_VERIFY),
                             "ca_and_name" if tls == "required" else "none"),
            tls_name=r.get(item, "tls_name", p, _string, None),
            ca_file=ca_file,
            crl_file=crl_file,
            enabled=r.get(item, "enabled", p, _bool, Connector.enabled),
            delay_notice_after=r.get(item, "delay_notice_after", p, _duration_or_off, Connector.delay_notice_after),
            mta_sts=r.get(item, "mta_sts", p, _bool, Connector.mta_sts),
            dane=r.get(item, "dane", p, _choice(CONNECTOR_DANE), Connector.dane),
        )
        if conn.dane != "off" and conn.tls == "none":
            problems.append(f"{p}.dane: {conn.dane!r} needs TLS, but tls = \"none\" sends in plain text; "
                            f"set tls = \"opportunistic\" or \"required\", or dane = \"off\"")
        if conn.mta_sts and conn.smart_hosts:
            problems.append(f"{p}.mta_sts: has no effect with smart_hosts (an MTA-STS policy names the "
                            f"domain's MX hosts); remove smart_hosts to deliver by MX, or remove mta_sts")
        problems += _connector_tls_problems(p, item, conn)
        if ("delay_notice_after" in item and conn.delay_notice_after is not None
                and conn.delay_notice_after >= queue.message_expiration):
            problems.append(f"{p}.delay_notice_after: {_seconds(conn.delay_notice_after)} is not shorter than "
                            f"queue.message_expiration ({_seconds(queue.message_expiration)}), so no delay notice "
                            f"would ever be sent; shorten it or write \"off\"")
        connectors.append(conn)

    alerts = _alerts(r, r.table(raw, "alerts", "alerts"), server, problems)
    f = r.table(raw, "verify", "verify")
    r.unknown(f, _file_keys(VerifyConfig), "verify")
    verify = VerifyConfig(**{key: r.get(f, key, "verify", _positive_duration, getattr(VerifyConfig, key))
                             for key in _file_keys(VerifyConfig)})
    http = _http(r, r.table(raw, "http", "http"), rel, server, problems)
    for dm in domains:
        if dm.verify_recipients and not any(c.enabled and c.serves(dm.name) for c in connectors):
            problems.append(f"domains[{domains.index(dm)}].verify_recipients: no enabled connector serves "
                            f"{dm.name}, so there is no server to ask")
    server = replace(server, postmaster=_postmaster(r, s, server, domains, alerts, problems))
    dkim = _dkim(r, raw.get("dkim", []), rel, problems)
    if problems:
        raise ConfigError("\n".join(problems), problems=problems)
    mta_sts = replace(mta_sts, cache=server.data_dir / mta_sts.cache)   # an absolute cache stays as it is
    if not tls_reporting.submitter:
        tls_reporting = replace(tls_reporting, submitter=server.hostname.lower())
    return Config(server=server, queue=queue, dns=dns, mta_sts=mta_sts, tls_reporting=tls_reporting,
                  delivery=delivery,
                  domains=tuple(domains), connectors=tuple(connectors), alerts=alerts, verify=verify,
                  dkim=dkim, http=http, source=source)


def _mta_sts(r: _Reader, t: dict, rel, problems: list[str]) -> MtaStsConfig:
    r.unknown(t, _file_keys(MtaStsConfig), "mta_sts")
    d = MtaStsConfig()
    ca_file = r.get(t, "ca_file", "mta_sts", rel, None)
    if ca_file is not None:
        if not ca_file.is_file():
            problems.append(f"mta_sts.ca_file: file {ca_file} does not exist")
        elif problem := _pem_problem(ca_file, "certificate"):
            problems.append(f"mta_sts.ca_file: {problem}")
    return MtaStsConfig(
        enabled=r.get(t, "enabled", "mta_sts", _bool, d.enabled),
        cache=r.get(t, "cache", "mta_sts", lambda v: Path(_string(v)), d.cache),
        fetch_timeout=r.get(t, "fetch_timeout", "mta_sts", _positive_duration, d.fetch_timeout),
        ca_file=ca_file,
        https_port=r.get(t, "https_port", "mta_sts", _port, d.https_port),
    )


def _tls_reporting(r: _Reader, t: dict, problems: list[str]) -> TlsReportingConfig:
    r.unknown(t, _file_keys(TlsReportingConfig), "tls_reporting")

    def contact(v):
        v = _string(v).strip()
        if not v or any(c in v for c in "\r\n"):
            raise ValueError(f"{v!r} is not an email address or URL on one line")
        return v

    d = TlsReportingConfig()
    out = TlsReportingConfig(
        enabled=r.get(t, "enabled", "tls_reporting", _bool, d.enabled),
        organization_name=r.get(t, "organization_name", "tls_reporting", contact, d.organization_name),
        contact_info=r.get(t, "contact_info", "tls_reporting", contact, d.contact_info),
        submitter=r.get(t, "submitter", "tls_reporting", _domain_name, d.submitter))
    if out.submitter.startswith("*."):
        problems.append(f"tls_reporting.submitter: {out.submitter!r} is a pattern, not a domain name")
    if out.enabled:
        for key in ("organization_name", "contact_info"):
            if not getattr(out, key) and key not in t:
                problems.append(f"tls_reporting.{key}: missing; every report names it (RFC 8460 4.4), "
                                f"so set it or turn tls_reporting off")
    return out


def _connector_tls_problems(p: str, item: dict, conn: Connector) -> list[str]:
    """Settings the TLS mode makes meaningless: they would be silently ignored."""
    out = []
    if conn.tls == "none":
        if conn.tls_verify != "none":
            out.append(f"{p}.tls_verify: {conn.tls_verify!r} needs TLS, but tls = \"none\" sends in plain text "
                       f"and checks no certificate; set tls = \"required\" (or remove tls_verify)")
        for key in ("tls_name", "ca_file", "crl_file"):
            if key in item:
                out.append(f"{p}.{key}: has no effect with tls = \"none\" (plain text); set tls = \"required\" "
                           f"or remove {key}")
        return out
    if conn.tls_verify == "none":
        for key in ("tls_name", "ca_file", "crl_file"):
            if key in item:
                out.append(f"{p}.{key}: has no effect with tls_verify = \"none\", which checks no certificate; "
                           f"set tls_verify = \"ca_and_name\" (or \"ca\") or remove {key}")
    elif conn.tls_verify == "ca" and "tls_name" in item:
        out.append(f"{p}.tls_name: has no effect with tls_verify = \"ca\", which does not check the name; "
                   f"set tls_verify = \"ca_and_name\" or remove tls_name")
    return out


def _postmaster(r: _Reader, s: dict, server: ServerConfig, domains: list[Domain], alerts: AlertsConfig,
                problems: list[str]) -> str:
    """``server.postmaster``, or its default: the first admin alerts go to (people who
    read mail about this relay), else the Maildir postmaster@<hostname> under data_dir."""
    def address(v: Any) -> str:
        v = _string(v)
        local, at, domain = v.rpartition("@")
        if not at or not local or " " in v or domain.startswith("*"):
            raise ValueError(f"{v!r} is not an email address such as \"admin@contoso.test\"")
        return f"{local}@{_domain_name(domain)}"
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
        problems.append(f"{source} {target} is not a mailbox of the authoritative domain {accepted.name}; "
                        f"add {local!r} to its mailboxes or set server.postmaster to another address")
    return target


def _alerts(r: _Reader, a: dict, server: ServerConfig, problems: list[str]) -> AlertsConfig:
    d = AlertsConfig()
    r.unknown(a, _file_keys(AlertsConfig, spelled={"sender": "from"}), "alerts")

    def addresses(v):
        return tuple(_address(x) for x in _string_list(v))

    def url(v):
        v = _string(v)
        parts = urllib.parse.urlsplit(v)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("http", "https") or not parts.hostname or port == -1 or port == 0:
            raise ValueError(f"{v!r} is not an http:// or https:// URL with a host (and a port from 1 to 65535)")
        return v

    def steps(v):
        if not isinstance(v, list) or not all(isinstance(x, int) and x > 0 for x in v):
            raise ValueError("must be a list of positive whole numbers, such as [100, 1000]")
        return tuple(sorted(v))

    def non_negative_int(v):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"must be a whole number, 0 or more (got {v!r})")
        return v

    def days(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ValueError(f"must be a number of days (got {v!r})")
        return float(v)

    alerts = AlertsConfig(
        notify=r.get(a, "notify", "alerts", addresses, d.notify),
        smtp=r.get(a, "smtp", "alerts", lambda v: parse_hostport(_string(v), 25), d.smtp),
        sender=r.get(a, "from", "alerts", lambda v: _address(_string(v)), f"relaywatch@{server.hostname}"),
        webhook_url=r.get(a, "webhook_url", "alerts", url, d.webhook_url),
        webhook_secret=r.get(a, "webhook_secret", "alerts", _string, d.webhook_secret),
        open_after=r.get(a, "open_after", "alerts", parse_duration, d.open_after),
        min_messages=r.get(a, "min_messages", "alerts", _positive_int, d.min_messages),
        escalate_before_expiry=r.get(a, "escalate_before_expiry", "alerts", parse_duration, d.escalate_before_expiry),
        escalate_steps=r.get(a, "escalate_steps", "alerts", steps, d.escalate_steps),
        probe_interval=r.get(a, "probe_interval", "alerts", _positive_duration, d.probe_interval),
        cert_probe_interval=r.get(a, "cert_probe_interval", "alerts", _positive_duration, d.cert_probe_interval),
        cert_warning_days=r.get(a, "cert_warning_days", "alerts", days, d.cert_warning_days),
        invalid_recipient_quota=r.get(a, "invalid_recipient_quota", "alerts", non_negative_int,
                                      d.invalid_recipient_quota),
        evaluate_interval=r.get(a, "evaluate_interval", "alerts", _positive_duration, d.evaluate_interval),
    )
    if "webhook_secret" in a and "webhook_url" not in a:
        problems.append("alerts.webhook_secret: set, but there is no alerts.webhook_url to sign requests for")
    return alerts


def _dkim(r: _Reader, raw_dkim: Any, rel, problems: list[str]) -> tuple[DkimSigning, ...]:
    """``[[dkim]]`` entries, their key files loaded (an unusable key is an error naming the file)."""
    if raw_dkim == []:
        return ()   # nothing to sign: receive/dkim.py (and cryptography) is never imported
    from relaywatch.receive import dkim as signing
    if not isinstance(raw_dkim, list):
        problems.append("dkim: must be an array of tables ([[dkim]])")
        return ()

    def header_names(v):
        names = [h.lower() for h in _string_list(v)]
        for h in names:
            if not signing.FIELD_NAME.fullmatch(h):
                raise ValueError(f"{h!r} is not a header field name")
            if h in signing.NEVER_SIGNED:
                raise ValueError(f"{h!r} must not be signed: it is added or changed on the way (RFC 6376 5.4.1)")
        return tuple(dict.fromkeys(names))

    out: list[DkimSigning] = []
    for i, item in enumerate(raw_dkim):
        p = f"dkim[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{p}: must be a table")
            continue
        r.unknown(item, _file_keys(DkimSigning, not_in_file=("key",)), p)
        for required in ("domain", "selector", "key_file"):
            if required not in item:
                problems.append(f"{p}.{required}: missing")
        domain = r.get(item, "domain", p, _domain_name, None)
        if domain and domain.startswith("*."):
            problems.append(f"{p}.domain: {domain!r}: write the domain itself and set sub_domains = true")
            domain = None
        selector = r.get(item, "selector", p, _selector, None)
        key_file = r.get(item, "key_file", p, rel, None)
        algorithm = r.get(item, "algorithm", p, _choice(signing.ALGORITHMS), "")
        headers = r.get(item, "headers", p, header_names, signing.DEFAULT_HEADERS)
        if "from" not in headers:
            problems.append(f"{p}.headers: must include \"from\" (RFC 6376 5.4: From is always signed)")
        key = None
        if key_file is not None:
            try:
                key = signing.load_key(key_file)
            except signing.KeyProblem as exc:
                problems.append(f"{p}.key_file: {exc}")
        if key is not None and algorithm and algorithm != key.algorithm:
            problems.append(f"{p}.algorithm: {algorithm!r}, but {key_file} is a key for {key.algorithm}; "
                            f"remove algorithm (it follows the key) or name the right key_file")
        entry = DkimSigning(
            domain=domain or "", selector=selector or "", key_file=key_file or Path(),
            algorithm=key.algorithm if key else algorithm,
            sub_domains=r.get(item, "sub_domains", p, _bool, False),
            headers=headers,
            oversign_headers=r.get(item, "oversign_headers", p, header_names, signing.DEFAULT_OVERSIGN),
            canonicalization=r.get(item, "canonicalization", p, _choice(signing.CANONICALIZATIONS),
                                   DkimSigning.canonicalization),
            key=key)
        if domain and selector and any(o.domain == domain and o.selector == selector for o in out):
            problems.append(f"{p}.selector: {domain} already has an entry with selector {selector!r}")
        out.append(entry)
    return tuple(out)


def _selector(value: Any) -> str:
    name = _string(value).lower()
    if not re.fullmatch(rf"{_LABEL}(\.{_LABEL})*", name):
        raise ValueError(f"{value!r} is not a selector (DNS labels, such as \"rsa-202612\")")
    return name


_TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
MIN_TOKEN_LENGTH = 16


def _http(r: _Reader, h: dict, rel, server: ServerConfig, problems: list[str]) -> HttpConfig:
    """[http]: the console's listener.  Tokens are hashed here; only the hashes are kept."""
    d = HttpConfig()
    r.unknown(h, _file_keys(HttpConfig), "http")

    def listen(v):
        if v == "off":
            return None
        host, port = parse_hostport(_string(v), 8025, allow_zero=True)
        if (host, port) in server.listen and port != 0:
            raise ValueError(f"{format_hostport(host, port)} is also in server.listen (the SMTP port)")
        return host, port
    address = r.get(h, "listen", "http", listen, d.listen)
    tokens = _http_tokens(h, rel, problems) if "tokens" in h else ()
    tls_cert = r.get(h, "tls_cert", "http", rel, None)
    tls_key = r.get(h, "tls_key", "http", rel, None)
    if (tls_cert is None) != (tls_key is None):
        problems.append("http.tls_key: tls_cert and tls_key must be set together")
    elif tls_cert is not None:
        missing = [f"http.{k}: file {v} does not exist" for k, v in (("tls_cert", tls_cert), ("tls_key", tls_key))
                   if not v.is_file()]
        problems += missing or _server_tls_problems(tls_cert, tls_key, "http")
    if address is not None and not tokens and not is_loopback(address[0]) and "tokens" not in h:
        # Without tokens only loopback clients get in (console/auth.py): on any
        # other address the console would answer 401 to everyone.
        problems.append(f"http.tokens: needed, since http.listen ({format_hostport(*address)}) is not a loopback "
                        f"address and only loopback clients may use the console without a token")
    return HttpConfig(listen=address, tokens=tokens, tls_cert=tls_cert, tls_key=tls_key)


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


def _http_tokens(h: dict, rel, problems: list[str]) -> tuple[AdminToken, ...]:
    """``tokens``: a list of "name:token" strings, or the path of a file with one
    "name:token" a line (blank lines and # comments skipped)."""
    import hashlib
    value = h["tokens"]
    if isinstance(value, str):
        try:
            path = rel(value)
            text = path.read_text(encoding="utf-8")
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            problems.append(f"http.tokens: cannot read the token file {value}: {reason}")
            return ()
        lines = [(f"http.tokens ({path}:{n})", line.strip()) for n, line in enumerate(text.splitlines(), 1)
                 if line.strip() and not line.strip().startswith("#")]
        if not lines:
            problems.append(f"http.tokens: the token file {path} holds no \"name:token\" line")
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        lines = [(f"http.tokens[{i}]", v.strip()) for i, v in enumerate(value)]
    else:
        problems.append("http.tokens: must be a list of \"name:token\" strings or the path of a file of them")
        return ()
    out: list[AdminToken] = []
    for where, line in lines:
        name, sep, token = line.partition(":")
        name, token = name.strip(), token.strip()
        # Problems never quote the token itself: config check output ends up in tickets.
        if not sep or not name or not token:
            problems.append(f"{where}: must be \"name:token\" (the name is who acts, in the audit log)")
        elif not _TOKEN_NAME.fullmatch(name):
            problems.append(f"{where}: the name {name!r} may only have letters, digits and _ . @ - (at most 64)")
        elif len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
            problems.append(f"{where}: the token of {name} is too weak: use at least {MIN_TOKEN_LENGTH} characters "
                            f"without spaces (e.g. from `openssl rand -hex 24`)")
        elif any(t.name == name for t in out):
            problems.append(f"{where}: the name {name} is given twice")
        else:
            digest = hashlib.sha256(token.encode()).digest()
            if any(t.digest == digest for t in out):
                problems.append(f"{where}: the token of {name} is also another name's token")
            else:
                out.append(AdminToken(name, digest))
    return tuple(out)
