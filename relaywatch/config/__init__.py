"""Configuration: a TOML file read into frozen dataclasses.

Validation is ours rather than a schema library's so that every error names the
TOML key the admin has to edit (``connectors[1].tls``) and says what is wrong
with it in one sentence.  All errors are collected and reported together.

The package is cut by job:

- ``model.py``: the frozen dataclasses (``Config`` and one per section) with
  their defaults; what the rest of relaywatch reads.
- ``values.py``: the value parsers (durations, sizes, host:port, domains, ...)
  and ``Reader``, which applies them to a table and collects the problems.
- ``pem.py``: checks of the certificate, CRL and key files a section names.
- one module per section, each with ``parse_<section>(r, table, ...)``:
  ``server.py`` ``[server]`` (listeners, TLS, AUTH, store, node, postmaster),
  ``delivery.py`` ``[queue]``, ``[dns]``, ``[delivery]``, ``[mta_sts]``,
  ``routes.py`` ``[[domains]]``, ``[[connectors]]``, ``[verify]``,
  ``tls_reporting.py`` ``[tls_reporting]``, ``alerts.py`` ``[alerts]``, ``dkim.py`` ``[[dkim]]``,
  ``http.py`` ``[http]``.
- ``load.py``: the file itself (TOML errors with line and column, environment
  overrides) and ``parse_config``, which calls the sections in order and holds
  the checks between sections.
- ``overrides.py``: the running config, the file's with Fix-now overrides on top.

Everything callers use is imported here: ``from relaywatch.config import X``.
"""

from relaywatch.config.load import load_config, parse_config
from relaywatch.config.model import (
    AdminToken, AlertsConfig, Config, Connector, DeliveryConfig, DkimSigning, DnsConfig, Domain, HttpConfig,
    MtaStsConfig, QueueConfig, ServerConfig, TlsReportingConfig, VerifyConfig, default_node_name, domain_matches)
from relaywatch.config.overrides import apply_overrides
from relaywatch.config.values import (
    format_hostport, is_loopback, parse_domain, parse_duration, parse_hostport, parse_selector, parse_size)
from relaywatch.errors import ConfigError

__all__ = [
    "AdminToken", "AlertsConfig", "Config", "ConfigError", "Connector", "DeliveryConfig", "DkimSigning", "DnsConfig",
    "Domain", "HttpConfig", "MtaStsConfig", "QueueConfig", "ServerConfig", "TlsReportingConfig", "VerifyConfig",
    "apply_overrides", "default_node_name", "domain_matches", "format_hostport", "is_loopback", "load_config",
    "parse_config", "parse_domain", "parse_duration", "parse_hostport", "parse_selector", "parse_size",
]
