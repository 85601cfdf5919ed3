"""The running config: the file's, with the store's "Fix now" overrides on top."""

from __future__ import annotations

from dataclasses import replace

from relaywatch.config.model import Config


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
