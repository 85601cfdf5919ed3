"""The running configuration as frozen dataclasses: one per TOML section, and ``Config``.

Defaults live here, on the fields; parsing and validation are in the section
modules (``server.py``, ``delivery.py``, ...), so this file is the shape every
other part of relaywatch reads.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
    store_prepared_statements: bool = True   # PostgreSQL: off for a pooler without them (pgbouncer < 1.21)
    # The delivering process's commits (leases, outcomes) wait for the disk too; off: a crash
    # may forget a delivery just made, which is then made again (a duplicate, never a loss).
    delivery_sync_commits: bool = False
    # Several nodes on one queue (relaywatch/cluster/): this node's name (by default
    # the machine's host name), how often it beats, and how old a heartbeat makes it dead.
    node_name: str = field(default_factory=lambda: default_node_name())
    heartbeat_interval: float = 5.0
    node_lapse: float = 30.0
    # Where mail for postmaster goes (RFC 5321 4.5.1); config/server.py postmaster fills
    # in the default: the first [alerts] notify address, else postmaster@<hostname> in a Maildir.
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


def default_node_name() -> str:
    """The machine's host name, as a node name."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).lstrip("._-")[:63]
    return name or "relaywatch"


@dataclass(frozen=True)
class QueueConfig:
    message_expiration: float = 24 * 3600.0
    retry_intervals: tuple[float, ...] = (60.0, 300.0, 600.0, 900.0, 1800.0, 3600.0)
    lease_time: float = 600.0
    trace_retention: float = 7 * 86400.0   # a message that left the queue can be traced this long; 0 = off
    # RET=FULL: an NDR returns the whole original up to this size, else its headers (notify/report.py).
    ndr_return_limit: int = 64 * 1024


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
    probe_interval: float = 30.0                   # the longest gap between probes of a failing connector
    probe_min_interval: float = 2.0                # the shortest (watch/probe_schedule.py)
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
    """One ``[[dkim]]`` entry: mail From this domain is signed with this key (receive/dkim_sign.py)."""
    domain: str
    selector: str
    key_file: Path
    algorithm: str = ""                       # rsa-sha256 or ed25519-sha256; the key's
    sub_domains: bool = False
    headers: tuple[str, ...] = ()             # default: config/dkim.py DEFAULT_HEADERS
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
