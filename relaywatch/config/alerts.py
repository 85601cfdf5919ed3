"""``[alerts]``: who hears of incidents (mail, webhook) and when an incident opens."""

from __future__ import annotations

import urllib.parse

from relaywatch.config.model import AlertsConfig, ServerConfig
from relaywatch.config.values import (
    Reader, email_address, file_keys, non_negative_int, parse_duration, parse_hostport, positive_duration,
    positive_int, string, string_list)


def parse_alerts(r: Reader, a: dict, server: ServerConfig) -> AlertsConfig:
    d = AlertsConfig()
    r.unknown(a, file_keys(AlertsConfig, spelled={"sender": "from"}), "alerts")

    def addresses(v):
        return tuple(email_address(x) for x in string_list(v))

    def url(v):
        v = string(v)
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

    def days(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ValueError(f"must be a number of days (got {v!r})")
        return float(v)

    alerts = AlertsConfig(
        notify=r.get(a, "notify", "alerts", addresses, d.notify),
        smtp=r.get(a, "smtp", "alerts", lambda v: parse_hostport(string(v), 25), d.smtp),
        sender=r.get(a, "from", "alerts", lambda v: email_address(string(v)), f"relaywatch@{server.hostname}"),
        webhook_url=r.get(a, "webhook_url", "alerts", url, d.webhook_url),
        webhook_secret=r.get(a, "webhook_secret", "alerts", string, d.webhook_secret),
        open_after=r.get(a, "open_after", "alerts", parse_duration, d.open_after),
        min_messages=r.get(a, "min_messages", "alerts", positive_int, d.min_messages),
        escalate_before_expiry=r.get(a, "escalate_before_expiry", "alerts", parse_duration, d.escalate_before_expiry),
        escalate_steps=r.get(a, "escalate_steps", "alerts", steps, d.escalate_steps),
        probe_interval=r.get(a, "probe_interval", "alerts", positive_duration, d.probe_interval),
        probe_min_interval=r.get(a, "probe_min_interval", "alerts", positive_duration, d.probe_min_interval),
        cert_probe_interval=r.get(a, "cert_probe_interval", "alerts", positive_duration, d.cert_probe_interval),
        cert_warning_days=r.get(a, "cert_warning_days", "alerts", days, d.cert_warning_days),
        invalid_recipient_quota=r.get(a, "invalid_recipient_quota", "alerts", non_negative_int,
                                      d.invalid_recipient_quota),
        evaluate_interval=r.get(a, "evaluate_interval", "alerts", positive_duration, d.evaluate_interval),
    )
    if "webhook_secret" in a and "webhook_url" not in a:
        r.problems.append("alerts.webhook_secret: set, but there is no alerts.webhook_url to sign requests for")
    return alerts
