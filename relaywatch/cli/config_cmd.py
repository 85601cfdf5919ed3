"""relaywatch config check (every problem, with its key; then warnings) and config show
(the running configuration with Fix now's overrides)."""

from __future__ import annotations

import ipaddress

import click

from relaywatch import views
from relaywatch.cli.common import config_option, echo_json, fail_config, read_config, with_store
from relaywatch.config import Config, format_hostport
from relaywatch.idn import domain_both_ways
from relaywatch.model import iso
from relaywatch.watch_records import Setting


@click.group("config")
def config_group():
    """Check configuration."""


@config_group.command("check")
@config_option
def config_check(config_path):
    """Validate a config file; list every problem with its key.

    Also what serve needs from this machine: a writable data_dir, listen
    addresses of this machine that no other program holds."""
    from relaywatch.preflight import start_problems
    config = read_config(config_path)
    problems = start_problems(config, serving=False)
    if problems:
        fail_config([f"{config_path}: {p}" for p in problems])
    listening = [format_hostport(h, p) for h, p in config.server.listen] + [
        f"{kind} {format_hostport(h, p)}" for kind, addrs in (("submission", config.server.submission_listen),
                                                              ("submissions", config.server.submissions_listen))
        for h, p in addrs]
    click.echo(f"{config_path}: OK ({len(config.domains)} domain(s), {len(config.connectors)} connector(s), "
               f"listening on {', '.join(listening)}"
               + (f"; console on {'https' if config.http.tls_cert else 'http'}://{format_hostport(*config.http.listen)}"
                  if config.http.listen else "") + ")")
    for warning in config_warnings(config):
        click.echo(f"warning: {warning}")


def config_warnings(config: Config) -> list[str]:
    """Valid, but likely to hurt when it matters."""
    from relaywatch.config import domain_matches
    from relaywatch.route import decide
    out = []
    if config.alerts.notify and config.alerts.smtp is None:
        for address in config.alerts.notify:
            route = decide(config, address).route
            if route is not None and route.kind.value == "connector":
                out.append(f"alerts.notify: {address} is delivered through connector {route.name}; set alerts.smtp "
                           f"so that alerts still arrive when {route.name} is the one failing")
    for net in config.server.trusted_networks:
        if net.prefixlen == 0:
            out.append(f"server.trusted_networks: {net} lets every address relay to any domain (an open relay)")
    for i, c in enumerate(config.connectors):
        if c.type == "on_premises" and not c.smart_hosts:
            out.append(f"connectors[{i}].smart_hosts: none, so {c.name} delivers by the domains' MX, which for an "
                       f"on-premises domain is usually this relay; name the on-premises server")
        for pattern in c.domains:
            # The first enabled connector that matches wins (route.py): a pattern an
            # earlier one covers never routes here (unless a Fix now disables that one).
            earlier = next((e for e in config.connectors[:i] if e.enabled and any(
                p == pattern or (p.startswith("*.") and domain_matches(p, pattern.removeprefix("*.")))
                for p in e.domains)), None)
            if c.enabled and earlier is not None:
                out.append(f"connectors[{i}].domains: {pattern} is already served by connector {earlier.name}, "
                           f"listed earlier, so {c.name} gets none of its mail")
            accepted = config.domain(pattern)
            if accepted is not None and accepted.type == "authoritative":
                out.append(f"connectors[{i}].domains: {pattern} is an authoritative domain, so its unknown recipients "
                           f"are rejected and {c.name} never gets its mail; make it internal_relay")
    remote = [h for h, _ in config.dns.nameservers if not ipaddress.ip_address(h).is_loopback]
    if remote and (config.delivery.dane != "off" or any(c.dane != "off" for c in config.connectors)):
        out.append(f"dns.nameservers: DANE trusts the AD bit of {', '.join(remote)}, which is not on this machine, "
                   f"and anyone on the network path can set it; use a validating resolver on loopback")
    if config.dkim:
        from relaywatch.receive.dkim import loose_key_warnings
        out += loose_key_warnings(config.dkim)
    return out


def effective_config(config: Config):
    from relaywatch.config import apply_overrides

    async def run(store):
        overrides = await store.overrides()
        return apply_overrides(config, overrides), overrides
    return run


@config_group.command("show")
@config_option
@click.option("--json", "as_json", is_flag=True)
def config_show(config_path, as_json):
    """The running configuration: the file plus Fix now overrides (marked)."""
    config = read_config(config_path)
    if config.server.store != "sqlite" or config.store_path.exists():
        effective, overrides = with_store(config, effective_config(config))
    else:
        effective, overrides = config, {}
    if as_json:
        echo_json(views.config_json(config, effective, overrides))
        return
    click.echo(f"# {config.source}" + (" with overrides from Fix now actions" if overrides else ""))

    def mark(setting: Setting, name: str) -> str:
        o = overrides.get(setting.of(name))
        return f"   # override since {iso(o.set_at)} (incident {o.incident_id}; undo: relaywatch incidents undo {o.incident_id})" if o else ""
    for d in effective.domains:
        click.echo(f"domain {domain_both_ways(d.name)}: {d.type}{mark(Setting.DOMAIN_TYPE, d.name)}; mailboxes {', '.join(sorted(d.mailboxes)) or '-'}")
    for c in effective.connectors:
        hosts = ", ".join(f"{h}:{p}" for h, p in c.smart_hosts) or "MX"
        click.echo(f"connector {c.name} ({c.type}) -> {hosts}; domains {', '.join(map(domain_both_ways, c.domains))}; tls {c.tls}/{c.tls_verify}")
        click.echo(f"  enabled = {str(c.enabled).lower()}{mark(Setting.CONNECTOR_ENABLED, c.name)}")
        if c.paused or Setting.CONNECTOR_PAUSED.of(c.name) in overrides:
            click.echo(f"  paused = {str(c.paused).lower()}{mark(Setting.CONNECTOR_PAUSED, c.name)}")
    for s in effective.dkim:
        subs = " and its subdomains" if s.sub_domains else ""
        click.echo(f"dkim {domain_both_ways(s.domain)}{subs}: s={s.selector} {s.algorithm} ({s.key.bits} bits), c={s.canonicalization}, "
                   f"key {s.key_file}")
