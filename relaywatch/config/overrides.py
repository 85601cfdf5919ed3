"""The running config: the file's, with the store's "Fix now" overrides on top."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from relaywatch.config.model import Config
from relaywatch.watch_records import Override, OverrideKey, Setting


def apply_overrides(config: Config, overrides: Mapping[OverrideKey, Override]) -> Config:
    """The running config: the file's, with the store's "Fix now" overrides on top
    (watch_records.py ``Setting``: a connector's enabled and paused, a domain's type).
    Overrides for names no longer in the file are ignored.
    """
    if not overrides:
        return config

    def value(setting: Setting, name: str, default: Any) -> Any:
        found = overrides.get(setting.of(name))
        return found.value if found is not None else default

    connectors = tuple(
        replace(c, enabled=value(Setting.CONNECTOR_ENABLED, c.name, c.enabled),
                paused=value(Setting.CONNECTOR_PAUSED, c.name, c.paused))
        for c in config.connectors)
    domains = tuple(replace(d, type=value(Setting.DOMAIN_TYPE, d.name, d.type)) for d in config.domains)
    return replace(config, connectors=connectors, domains=domains)
