"""How mail leaves: ``[queue]`` (expiry, retries), ``[dns]``, ``[delivery]`` (limits, timeouts) and ``[mta_sts]``."""

from __future__ import annotations

import ipaddress
from dataclasses import fields
from pathlib import Path
from typing import Any

from relaywatch.config.model import DeliveryConfig, DnsConfig, MtaStsConfig, QueueConfig
from relaywatch.config.pem import pem_problem
from relaywatch.config.values import (
    Reader, boolean, choice, durations, file_keys, hostport_list, parse_size, port_number, positive_duration,
    positive_int, string)

DELIVERY_DANE = ("off", "on")                    # delivery.dane (the internet route)


def parse_queue(r: Reader, q: dict) -> QueueConfig:
    r.unknown(q, file_keys(QueueConfig), "queue")
    d = QueueConfig()
    return QueueConfig(
        message_expiration=r.get(q, "message_expiration", "queue", positive_duration, d.message_expiration),
        retry_intervals=r.get(q, "retry_intervals", "queue", durations, d.retry_intervals),
        lease_time=r.get(q, "lease_time", "queue", positive_duration, d.lease_time),
        trace_retention=r.get(q, "trace_retention", "queue", _retention, d.trace_retention),
        ndr_return_limit=r.get(q, "ndr_return_limit", "queue", _return_limit, d.ndr_return_limit),
    )


NDR_RETURN_CAP = 16 * 1024 * 1024   # the NDR is built in memory, the original in it: bounded as the notice is


def _return_limit(value: Any) -> int:
    """A size up to NDR_RETURN_CAP: how much of an original RET=FULL returns."""
    size = parse_size(value)
    if size > NDR_RETURN_CAP:
        raise ValueError(f"{value!r} is more than the 16MiB an NDR may carry (a notice is built in memory; "
                         f"larger originals return their headers)")
    return size


def _retention(value: Any) -> float:
    """A positive duration, or "off" (0: keep nothing)."""
    if value == "off":
        return 0.0
    try:
        return positive_duration(value)
    except ValueError as exc:
        raise ValueError(f'{exc} (or "off" to keep no trace of messages that left the queue)') from None


def parse_dns(r: Reader, n: dict) -> DnsConfig:
    r.unknown(n, file_keys(DnsConfig), "dns")
    dns = DnsConfig(
        nameservers=r.get(n, "nameservers", "dns", hostport_list(53), ()),
        timeout=r.get(n, "timeout", "dns", positive_duration, DnsConfig.timeout),
    )
    for host, _ in dns.nameservers:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            r.problems.append(f"dns.nameservers: {host!r} must be an IP address, not a name")
    return dns


def parse_delivery(r: Reader, v: dict) -> DeliveryConfig:
    """Every key a duration, but the counts and the port named here."""
    r.unknown(v, file_keys(DeliveryConfig), "delivery")
    d = DeliveryConfig()
    convert = {"concurrency": positive_int, "per_destination": positive_int,
               "messages_per_connection": positive_int, "smtp_port": port_number, "dane": choice(DELIVERY_DANE)}
    return DeliveryConfig(**{
        f.name: r.get(v, f.name, "delivery", convert.get(f.name, positive_duration), getattr(d, f.name))
        for f in fields(DeliveryConfig)
    })


def parse_mta_sts(r: Reader, t: dict, rel) -> MtaStsConfig:
    """The cache path stays relative here; ``load.py`` puts it under server.data_dir."""
    r.unknown(t, file_keys(MtaStsConfig), "mta_sts")
    d = MtaStsConfig()
    ca_file = r.get(t, "ca_file", "mta_sts", rel, None)
    if ca_file is not None:
        if not ca_file.is_file():
            r.problems.append(f"mta_sts.ca_file: file {ca_file} does not exist")
        elif problem := pem_problem(ca_file, "certificate"):
            r.problems.append(f"mta_sts.ca_file: {problem}")
    return MtaStsConfig(
        enabled=r.get(t, "enabled", "mta_sts", boolean, d.enabled),
        cache=r.get(t, "cache", "mta_sts", lambda v: Path(string(v)), d.cache),
        fetch_timeout=r.get(t, "fetch_timeout", "mta_sts", positive_duration, d.fetch_timeout),
        ca_file=ca_file,
        https_port=r.get(t, "https_port", "mta_sts", port_number, d.https_port),
    )
