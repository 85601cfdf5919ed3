"""The relaywatch command line.

    relaywatch serve -c FILE
    relaywatch config check -c FILE
    relaywatch queue list|show|retry|hold|release|delete|bounce
    relaywatch errors [CODE]
    relaywatch reload -c FILE
    relaywatch dkim keygen DOMAIN
    relaywatch tls-report show [--date DAY] [--json]   (cli_tls_report.py)

Queue commands open the store of a (possibly running) server directly; SQLite
locking makes that safe, and the server sees changes within a second.
JSON output (``--json``) is documented in docs/json.md and kept stable.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import sys
import time
from pathlib import Path

import click

from relaywatch import events, views
from relaywatch.classify.catalog import AUDIENCES, CATALOG, lookup_all
from relaywatch.config import Config, format_hostport, load_config
from relaywatch.console.api import ROUTE_KINDS, BadInput, queue_page as api_queue_page, trace_search as api_trace_search
from relaywatch.dsn_params import mail_params, rcpt_params
from relaywatch.errors import ConfigError, RelaywatchError
from relaywatch.idn import address_to_unicode, to_unicode
from relaywatch.model import Entry, dest_label, iso
from relaywatch.runtime import control
from relaywatch.store.base import QueueQuery, Selector
from relaywatch.store import open_store
from relaywatch.watch.model import Incident

DEFAULT_CONFIG = "/etc/relaywatch/relaywatch.toml"
STATUSES = ("queued", "deferred", "held", "active")

def _rich():
    """rich's Console and Table, imported on first use: JSON output and the server never
    need them, and importing them is a sixth of the CLI's start-up."""
    from rich.console import Console
    from rich.table import Table
    return Console(highlight=False), Table


def _fail(message: str, code: int = 1):
    click.echo(f"relaywatch: {message}", err=True)
    sys.exit(code)


def _fail_config(problems: list[str]):
    """One line per problem, each naming the file and the key (exit 2)."""
    for problem in problems:
        click.echo(f"relaywatch: {problem}", err=True)
    sys.exit(2)


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        _fail_config(exc.problems)


config_option = click.option("-c", "--config", "config_path", envvar="RELAYWATCH_CONFIG",
                             default=DEFAULT_CONFIG, show_default=True, help="Config file (TOML).")


def _version() -> str:
    """The installed distribution's version (what pip and pipx report), else the source tree's."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("relaywatch")
    except PackageNotFoundError:   # run from a checkout that was never installed
        from relaywatch import __version__
        return __version__


def _print_version(ctx: click.Context, _param, value: bool) -> None:
    if value:
        click.echo(f"relaywatch {_version()}")
        ctx.exit()


@click.group()
@click.option("--version", is_flag=True, is_eager=True, expose_value=False, callback=_print_version,
              help="Show the version and exit.")
def main():
    """relaywatch: an SMTP relay that tells you why mail is stuck."""


@main.command()
@config_option
@click.option("--role", type=click.Choice(["all", "receive", "deliver"]), hidden=True,
              help="Internal: run one half of the relay (serve starts the delivery half itself).")
@click.option("--wake-fd", type=int, hidden=True)
def serve(config_path, role, wake_fd):
    """Run the relay (SMTP server and delivery) in the foreground."""
    from relaywatch.app import Relaywatch, Role, default_role
    from relaywatch.preflight import start_problems
    config = _load(config_path)
    role = Role(role) if role else default_role(config)
    if role is not Role.DELIVER:   # the delivery process is started by a serve that has checked
        problems = start_problems(config, serving=True)
        if problems:
            _fail_config([f"{config.source}: {p}" for p in problems])
    events.configure(config.server.log_format)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(Relaywatch(config, role=role, wake_fd=wake_fd).serve_forever())
    except ConfigError as exc:   # e.g. a listen address taken between the check and the bind
        _fail_config([f"{config.source}: {p}" for p in exc.problems])
    except OSError as exc:
        _fail(f"cannot start: {exc.strerror or exc}")
    except RelaywatchError as exc:
        _fail(str(exc))


@main.command()
@config_option
def reload(config_path):
    """Tell the running server to re-read its config (SIGHUP)."""
    config = _load(config_path)
    try:
        pid = control.reload_server(config.server.data_dir)
    except control.NoServer as exc:
        _fail(str(exc))
    click.echo(f"asked relaywatch (pid {pid}) to reload {config_path}")


@main.group("config")
def config_group():
    """Check configuration."""


@config_group.command("check")
@config_option
def config_check(config_path):
    """Validate a config file; list every problem with its key.

    Also what serve needs from this machine: a writable data_dir, listen
    addresses of this machine that no other program holds."""
    from relaywatch.preflight import start_problems
    config = _load(config_path)
    problems = start_problems(config, serving=False)
    if problems:
        _fail_config([f"{config_path}: {p}" for p in problems])
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


# -- queue ------------------------------------------------------------------------

def _with_store(config: Config, fn):
    async def run():
        if config.server.store == "sqlite" and not config.store_path.exists():
            _fail(f"no queue at {config.store_path} (has relaywatch run with this config?)")
        store = open_store(config)
        await store.open()
        try:
            return await fn(store)
        finally:
            await store.close()
    try:
        return asyncio.run(run())
    except RelaywatchError as exc:
        _fail(str(exc))


def _with_queue(config: Config, fn):
    """Run ``fn(QueueActions)`` against the store: the CLI changes the queue
    the way every other caller does (deliver/queue_actions.py)."""
    from relaywatch.deliver.queue_actions import QueueActions
    return _with_store(config, lambda store: fn(QueueActions(store, lambda: config)))


def _wake_server(config: Config) -> None:
    """SIGUSR1 to a running server: look at the queue now (it polls every second anyway)."""
    control.wake_server(config.server.data_dir)


def _age(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    seconds = int(now - ts)
    sign = "" if seconds >= 0 else "in "
    seconds = abs(seconds)
    if seconds < 120:
        text = f"{seconds}s"
    elif seconds < 7200:
        text = f"{seconds // 60}m"
    elif seconds < 172800:
        text = f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    else:
        text = f"{seconds // 86400}d"
    return sign + text


@main.group()
def queue():
    """Inspect and act on queued mail."""


@queue.command("list")
@config_option
@click.option("--connector", help="Only this connector (or local / internet).")
@click.option("--status", type=click.Choice(STATUSES))
@click.option("--route", type=click.Choice(ROUTE_KINDS), help="Only mail routed this way (local, connector, MX).")
@click.option("--text", help="A substring (any case) of the sender, a recipient or a recipient's last reply.")
@click.option("--limit", default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/json.md).")
def queue_list(config_path, connector, status, route, text, limit, as_json):
    """List queued messages, oldest first."""
    config = _load(config_path)
    if route or text:   # the console's filters (GET /api/v1/queue), in id order
        try:
            page = api_queue_page({k: v for k, v in (("connector", connector), ("status", status), ("route", route),
                                                    ("text", text), ("limit", str(limit))) if v is not None})
        except BadInput as exc:
            _fail(f"--{exc.field}: {exc.message}")
        entries = _with_store(config, lambda s: s.queue_page(page, time.time()))
    else:
        entries = _with_store(config, lambda s: s.list(QueueQuery(connector, status, limit)))
    if as_json:
        click.echo(json.dumps({"messages": [views.message_json(e) for e in entries]}, indent=2))
        return
    if not entries:
        click.echo("The queue is empty." if not (connector or status or route or text) else "No messages match.")
        return
    now = time.time()
    console, Table = _rich()
    table = Table(box=None, pad_edge=False)
    for col in ("ID", "Status", "Connector", "Age", "Tries", "Next try", "Last error"):
        table.add_column(col, no_wrap=True)
    for col in ("From", "To"):
        table.add_column(col, overflow="fold")
    for e in entries:
        err = e.last_error
        pending = [r.address for r in e.recipients if not r.status.is_final]
        table.add_row(e.id, e.status.value, e.route.name + (f" ({e.route.domain})" if e.route.domain else ""),
                      _age(e.received_at, now), str(e.attempts),
                      "-" if e.status.value in ("held", "active") else _age(e.next_attempt_at, now),
                      f"{err.code} {err.subtype or ''}".strip() if err else "",
                      e.sender or "<>", ", ".join(pending[:3]) + (f" +{len(pending) - 3}" if len(pending) > 3 else ""))
    console.print(table)
    click.echo(f"{len(entries)} message(s); `relaywatch queue show ID` explains an error, "
               f"`relaywatch errors CODE` what to do about it")


@queue.command("show")
@config_option
@click.argument("entry_id")
@click.option("--json", "as_json", is_flag=True)
def queue_show(config_path, entry_id, as_json):
    """Everything about one message: recipients, errors, every attempt."""
    config = _load(config_path)
    entry = _with_store(config, lambda s: s.get(entry_id))
    if entry is None:
        _fail(f"no queued message with id {entry_id} (delivered, bounced or deleted messages leave the queue; "
              f"grep the log for the id)")
    if as_json:
        click.echo(json.dumps(views.message_detail_json(entry), indent=2))
        return
    _print_entry(entry, config)


@queue.command("trace")
@config_option
@click.argument("entry_id", required=False)
@click.option("--message-id", help="Every queue entry of this Message-ID (with or without <>).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/json.md TRACE).")
def queue_trace(config_path, entry_id, message_id, as_json):
    """Every event of one message: received, each attempt, actions and by whom, NDRs, how it ended.

    Works for queued messages and for those that left the queue within queue.trace_retention."""
    if (entry_id is None) == (message_id is None):
        _fail("give a queue id or --message-id (one of them)")
    config = _load(config_path)
    if message_id is not None:
        found = _with_store(config, lambda s: api_trace_search(s, message_id))
        if as_json:
            click.echo(json.dumps(found, indent=2))
            return
        if not found["traces"]:
            _fail(f"no queued or kept message has the Message-ID {message_id}")
        traces = found["traces"]
    else:
        record = _with_store(config, lambda s: s.trace(entry_id))
        if record is None:
            kept = f"{config.queue.trace_retention:g}s" if config.queue.trace_retention else "off"
            _fail(f"no message with id {entry_id} in the queue or in the kept traces (queue.trace_retention: {kept})")
        if as_json:
            click.echo(json.dumps(views.trace_json(record), indent=2))
            return
        traces = [views.trace_json(record)]
    for t in traces:
        click.echo(f"{t['id']}  {t['status']}  {t['connector']}  {t['message_id'] or '(no Message-ID)'}")
        for ev in t["events"]:
            click.echo(f"  {ev['at']}  {ev['event']:<17} {_trace_detail(ev)}".rstrip())


def _trace_detail(ev: dict) -> str:
    """One trace event in a line (the JSON has every field)."""
    if ev["event"] == "received":
        return (f"from {ev['client'] or '-'} helo={ev['helo'] or '-'} auth={ev['auth_user'] or '-'} "
                f"<{ev['sender']}> -> {', '.join(ev['recipients'])}")
    if ev["event"] == "attempt":
        rcpts = "; ".join(f"{r['address']} {r['status']}" + (f" {r['code']}" if r["code"] else "")
                          + (f" \"{r['reply']}\"" if r["reply"] else "") for r in ev["recipients"])
        return f"#{ev['n']} {ev['host'] or '-'}[{ev['ip'] or '-'}] {ev['duration']:.2f}s: {rcpts}"
    if ev["event"] == "action":
        return f"{ev['action']} by {ev['who']}" + (f": {ev['reason']}" if ev["reason"] else "")
    if ev["event"] in ("ndr_sent", "delay_notice_sent"):
        return " ".join(ev["ids"])
    return f"to {ev['moved_to']}" if ev.get("moved_to") else ""


def _domain_for_people(domain: str) -> str:
    """An IDN as U-labels, with the A-labels DNS uses after it: ``παράδειγμα.test = xn--...test``."""
    shown = to_unicode(domain)
    return shown if shown == domain else f"{shown} = {domain}"


def _print_entry(e: Entry, config: Config) -> None:
    now = time.time()
    click.echo(f"Message {e.id}  ({e.status.value})")
    click.echo(f"  From:        {address_to_unicode(e.sender) if e.sender else '<>'}")   # IDN as U-labels
    click.echo(f"  Message-ID:  {e.message_id or '-'}")
    click.echo(f"  Route:       {e.route.kind.value} {e.route.name}"
               + (f" ({_domain_for_people(e.route.domain)})" if e.route.domain else ""))
    click.echo(f"  Received:    {iso(e.received_at)} ({_age(e.received_at, now)} ago), {e.size} bytes")
    click.echo(f"  Expires:     {iso(e.expires_at)} ({_age(e.expires_at, now)})")
    if e.status.value not in ("held", "active"):
        click.echo(f"  Next try:    {iso(e.next_attempt_at)} ({_age(e.next_attempt_at, now)})")
    click.echo(f"  Attempts:    {e.attempts}" + (f", failing since {iso(e.first_failure_at)}" if e.first_failure_at else ""))
    if e.dsn:
        click.echo(f"  DSN:        {mail_params(e.dsn)}")     # as the client sent them (RFC 3461)
    click.echo("  Recipients:")
    for r in e.recipients:
        click.echo(f"    {address_to_unicode(r.address)}  {r.status.value}{rcpt_params(r.dsn)}")
        if r.last_error:
            f = r.last_error
            click.echo(f"      {f.smtp_code} {f.code} {f.title}" + (f" [{f.subtype}]" if f.subtype else ""))
            click.echo(f"      {f.detail}")
    last = e.last_error
    if last is not None and e.pending:
        entry = CATALOG.get(last.kind)
        connector = config.connector(e.route.name)
        if entry is not None:
            click.echo(f"  What to do ({connector.type if connector else 'internet'}):")
            for fix in entry.fixes_for(connector.type if connector else None)[:3]:
                click.echo(f"    - {fix}")
            click.echo(f"    (all causes and fixes: relaywatch errors {entry.code})")
    if e.history:
        click.echo("  Attempts (oldest first):")
    for n, a in enumerate(e.history, 1):
        click.echo(f"   #{n} {iso(a['at'])} {dest_label(a.get('destination'))} ({a['duration']:.2f}s)")
        # Recipients that failed the same way are shown once.
        groups: dict[str, list[dict]] = {}
        for r in a["recipients"]:
            err = r.get("error")
            key = json.dumps(err, sort_keys=True) if err else f"ok {r['status']} {r.get('reply')}"
            groups.setdefault(key, []).append(r)
        for rs in groups.values():
            names = ", ".join(r["address"] for r in rs)
            err = rs[0].get("error")
            if not err:
                click.echo(f"      {names}: {rs[0]['status']} {rs[0].get('reply') or ''}")
                continue
            click.echo(f"      {names}: {err['code']} {err['title']} [{err.get('subtype') or '-'}] phase={err['phase']}")
            click.echo(f"        {err['detail']}")
            for key in ("reply", "errno"):
                if err.get(key):
                    click.echo(f"        {key}: {err[key]}")
            if err.get("dns"):
                d = err["dns"]
                click.echo(f"        dns: {d.get('name')} {d.get('type')} rcode={d.get('rcode')} "
                           f"nameserver={d.get('nameserver')}")
            if err.get("tls"):
                t = err["tls"]
                click.echo(f"        certificate: subject={t.get('subject')} names={','.join(t.get('sans') or [])} "
                           f"issuer={t.get('issuer')}")
                click.echo(f"          valid {t.get('not_before')} .. {t.get('not_after')}; expected name "
                           f"{t.get('expected_name')}; OpenSSL verify code {t.get('verify_code')}")
        for f in a.get("hosts_tried", []):
            click.echo(f"      also tried {dest_label(f.get('destination'))}: {f['code']} {f['detail']}")


def _selector(ids, connector, all_) -> Selector:
    chosen = sum(bool(x) for x in (ids, connector, all_))
    if chosen != 1:
        _fail("name message ids, or --connector NAME, or --all (exactly one of them)")
    return Selector(ids=tuple(ids), connector=connector, all=all_)


@queue.command("retry")
@config_option
@click.argument("ids", nargs=-1)
@click.option("--connector")
@click.option("--all", "all_", is_flag=True)
def queue_retry(config_path, ids, connector, all_):
    """Make messages due now (the server tries them within a second)."""
    config = _load(config_path)
    sel = _selector(ids, connector, all_)
    n = _with_queue(config, lambda q: q.retry_now(sel))
    _wake_server(config)
    click.echo(f"{n} message(s) will be tried now")
    if ids and n < len(ids):
        sys.exit(1)


def _queue_action(config_path: str, action: str, entry_id: str, wake: bool = False) -> None:
    """One message: the same code (and audit record) as the HTTP API's POST /api/v1/queue/ID/ACTION."""
    from relaywatch.actions import queue_action
    config = _load(config_path)
    result = _with_store(config, lambda s: queue_action(s, config, action, entry_id, _operator(), None))
    if not result.done:
        _fail(result.text)
    if wake:
        _wake_server(config)
    click.echo(result.text)


@queue.command("hold")
@config_option
@click.argument("entry_id")
def queue_hold(config_path, entry_id):
    """Stop delivery attempts for a message until released."""
    _queue_action(config_path, "hold", entry_id)


@queue.command("release")
@config_option
@click.argument("entry_id")
def queue_release(config_path, entry_id):
    """Release a held message; it is tried at once."""
    _queue_action(config_path, "release", entry_id, wake=True)


@queue.command("delete")
@config_option
@click.argument("entry_id")
def queue_delete(config_path, entry_id):
    """Remove a message without telling the sender."""
    _queue_action(config_path, "delete", entry_id)


@queue.command("bounce")
@config_option
@click.argument("entry_id")
def queue_bounce(config_path, entry_id):
    """Give up on a message now: NDR to the sender, then remove it."""
    _queue_action(config_path, "bounce", entry_id)


# -- incidents -------------------------------------------------------------------------------

def _effective(config: Config):
    from relaywatch.config import apply_overrides

    async def run(store):
        return apply_overrides(config, await store.overrides()), await store.overrides()
    return run


@main.group()
def incidents():
    """Mail flow incidents: what is wrong per connector, and Fix now."""


def _operator() -> str:
    """Who acts, for the audit log."""
    return os.environ.get("SUDO_USER") or os.environ.get("USER") or f"uid {os.getuid()}"


@incidents.command("list")
@config_option
@click.option("--all", "all_", is_flag=True, help="Include resolved incidents.")
@click.option("--json", "as_json", is_flag=True)
def incidents_list(config_path, all_, as_json):
    """Open incidents (with --all, the history too)."""
    config = _load(config_path)
    found = _with_store(config, lambda s: s.incidents(include_resolved=all_))
    if as_json:
        click.echo(json.dumps({"incidents": [views.incident_json(i) for i in found]}, indent=2))
        return
    if not found:
        click.echo("No open incidents: mail is flowing." if not all_ else "No incidents recorded.")
        return
    now = time.time()
    console, Table = _rich()
    table = Table(box=None, pad_edge=False)
    for col in ("ID", "State", "Connector", "Code", "What", "Messages", "Since", "NDRs in"):
        table.add_column(col, no_wrap=col != "What")
    for i in found:
        state = i["state"] if i["state"] != "open" else ("critical" if i.get("severity") == "critical" else "open")
        cliff = _age(now, i["first_expires_at"]) if i["state"] == "open" and i.get("messages") else "-"
        kind = Incident.from_dict(i).kind
        code = kind.value if kind.code else i["code"]     # the watch's warnings: by their kind
        table.add_row(str(i["id"]), state, i["connector"], code, i["title"],
                      str(i.get("messages", 0)), _age(i["opened_at"], now), cliff)
    console.print(table)
    click.echo("`relaywatch incidents show ID` explains one and lists its Fix now actions")


@incidents.command("show")
@config_option
@click.argument("incident_id", type=int)
@click.option("--json", "as_json", is_flag=True)
def incidents_show(config_path, incident_id, as_json):
    """One incident: evidence, likely cause, what to do, actions, notifications."""
    from relaywatch.watch.alerts import incident_text
    config = _load(config_path)
    inc = _with_store(config, lambda s: s.incident(incident_id))
    if inc is None:
        _fail(f"no incident {incident_id}")
    if as_json:
        click.echo(json.dumps(views.incident_json(inc), indent=2))
        return
    click.echo(f"Incident {inc['id']}  " + incident_text(Incident.from_dict(inc), time.time()))
    probe = inc.get("probe")
    if probe:
        click.echo(f"Last probe ({iso(probe['at'])}): {'passed' if probe['ok'] else 'failed'}")
        _print_steps(probe["steps"])
    for n in inc.get("notifications", []):
        click.echo(f"Notified {n['transition']} by {n['channel']}: {n['state']}"
                   + (f" at {iso(n['sent_at'])}" if n["sent_at"] else "")
                   + (f" (last error: {n['last_error']})" if n["last_error"] and n["state"] != "sent" else ""))
    for a in inc.get("audit", []):
        click.echo(f"Action {a['action']} by {a['who']} at {iso(a['at'])}" + (" (undone)" if a["undone_at"] else ""))


@incidents.command("fix")
@config_option
@click.argument("incident_id", type=int)
@click.argument("action", type=click.Choice(["decommission", "retry-now", "pause", "expire"]))
@click.option("--dry-run", is_flag=True, help="Show what would be done, change nothing.")
@click.option("--reason", help="Why (kept in the audit log).")
def incidents_fix(config_path, incident_id, action, dry_run, reason):
    """Fix now: act on an incident (see `incidents show` for the actions offered)."""
    from relaywatch.watch import fixes
    config = _load(config_path)
    who = _operator()

    async def run(store):
        inc = await store.incident(incident_id)
        if inc is None:
            _fail(f"no incident {incident_id}")
        try:
            p = fixes.plan(action, Incident.from_dict(inc), config, await store.overrides())
        except fixes.FixError as exc:
            _fail(str(exc))
        click.echo(f"{'Would' if dry_run else 'Will'} {action} for incident {incident_id} "
                   f"({inc['code']} on connector {inc['connector']}):")
        for step in p.steps:
            click.echo(f"  - {step}")
        if dry_run:
            click.echo("Dry run: nothing changed.")
            return
        for line in await fixes.apply(store, config, Incident.from_dict(inc), p, who, reason):
            click.echo(f"  done: {line}")
        click.echo(f"Undo with: relaywatch incidents undo {incident_id}" if p.undo else f"({p.undo_note})")
    _with_store(config, run)
    _wake_server(config)


@incidents.command("undo")
@config_option
@click.argument("incident_id", type=int)
def incidents_undo(config_path, incident_id):
    """Undo the last Fix now action taken on an incident."""
    from relaywatch.watch import fixes
    config = _load(config_path)
    who = _operator()

    async def run(store):
        inc = await store.incident(incident_id)
        if inc is None:
            _fail(f"no incident {incident_id}")
        try:
            for line in await fixes.undo(store, Incident.from_dict(inc), who):
                click.echo(line)
        except fixes.FixError as exc:
            _fail(str(exc))
    _with_store(config, run)


# -- connectors and the running config --------------------------------------------------------------

@main.group()
def connector():
    """Connectors: test the path to a destination."""


@connector.command("test")
@config_option
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def connector_test(config_path, name, as_json):
    """Walk the whole path (DNS, TCP, greeting, EHLO, STARTTLS, certificate, MAIL/RCPT) without sending mail."""
    from relaywatch.deliver.resolver import Resolver
    from relaywatch.deliver.smtp import SmtpRoutes
    from relaywatch.watch.probe import probe_connector
    config = _load(config_path)
    spec = config.connector(name)
    if spec is None:
        _fail(f"no connector {name!r}; configured: {', '.join(c.name for c in config.connectors) or 'none'}")
    routes = SmtpRoutes(lambda: config, Resolver(config.dns))
    result = asyncio.run(probe_connector(config, routes, spec)).to_dict()
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"Connector {name} ({spec.type}), test address {result['test_address']}:")
        _print_steps(result["steps"])
        if result["error"]:
            e = result["error"]
            click.echo(f"Failed: {e['smtp_code']} {e['code']} {e['title']}" + (f" [{e['subtype']}]" if e["subtype"] else ""))
            click.echo(f"  relaywatch errors {e['code']}  explains causes and fixes")
        else:
            click.echo("Passed: mail can flow through this connector.")
    sys.exit(0 if result["ok"] else 1)


def _print_steps(steps: list[dict]) -> None:
    for st in steps:
        click.echo(f"  {'ok  ' if st['ok'] else 'FAIL'} {st['step']:<11} {st['ms']:>7.1f} ms  {st['detail']}")


@config_group.command("show")
@config_option
@click.option("--json", "as_json", is_flag=True)
def config_show(config_path, as_json):
    """The running configuration: the file plus Fix now overrides (marked)."""
    config = _load(config_path)
    if config.server.store != "sqlite" or config.store_path.exists():
        effective, overrides = _with_store(config, _effective(config))
    else:
        effective, overrides = config, {}
    if as_json:
        click.echo(json.dumps(views.config_json(config, effective, overrides), indent=2))
        return
    click.echo(f"# {config.source}" + (" with overrides from Fix now actions" if overrides else ""))

    def mark(key: str) -> str:
        o = overrides.get(key)
        return f"   # override since {iso(o['set_at'])} (incident {o['incident_id']}; undo: relaywatch incidents undo {o['incident_id']})" if o else ""
    for d in effective.domains:
        click.echo(f"domain {d.name}: {d.type}{mark(f'domain:{d.name}:type')}; mailboxes {', '.join(sorted(d.mailboxes)) or '-'}")
    for c in effective.connectors:
        hosts = ", ".join(f"{h}:{p}" for h, p in c.smart_hosts) or "MX"
        click.echo(f"connector {c.name} ({c.type}) -> {hosts}; domains {', '.join(c.domains)}; tls {c.tls}/{c.tls_verify}")
        click.echo(f"  enabled = {str(c.enabled).lower()}{mark(f'connector:{c.name}:enabled')}")
        if c.paused or f"connector:{c.name}:paused" in overrides:
            click.echo(f"  paused = {str(c.paused).lower()}{mark(f'connector:{c.name}:paused')}")
    for s in effective.dkim:
        subs = " and its subdomains" if s.sub_domains else ""
        click.echo(f"dkim {s.domain}{subs}: s={s.selector} {s.algorithm} ({s.key.bits} bits), c={s.canonicalization}, "
                   f"key {s.key_file}")


# -- DKIM --------------------------------------------------------------------------------

@main.group()
def dkim():
    """DKIM signing keys ([[dkim]] in the config)."""


@dkim.command("keygen")
@click.argument("domain")
@click.option("--selector", help="The DNS selector (default: ALGORITHM-YYYYMM, e.g. rsa-202612).")
@click.option("--algorithm", type=click.Choice(["rsa", "ed25519"]), default="rsa", show_default=True)
@click.option("--bits", type=click.IntRange(1024, 8192), default=2048, show_default=True, help="RSA key size.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Directory for the private key (DOMAIN.SELECTOR.key, mode 0600).")
def dkim_keygen(domain, selector, algorithm, bits, out_dir):
    """Create a signing key; print its DNS TXT record and the config to add."""
    from relaywatch.config import _domain_name, _selector
    from relaywatch.receive.dkim import ALGORITHMS, KeyProblem, default_selector, keygen
    algorithm = next(a for a in ALGORITHMS if a.startswith(algorithm))
    try:
        domain = _domain_name(domain)
        selector = _selector(selector or default_selector(algorithm))
        click.echo(keygen(domain, selector, algorithm, bits, Path(out_dir)), nl=False)
    except (KeyProblem, ValueError) as exc:
        _fail(str(exc))


# -- the catalog --------------------------------------------------------------------------

@main.command()
@click.argument("code", required=False)
@click.option("--json", "as_json", is_flag=True)
def errors(code, as_json):
    """Explain delivery error codes: causes and fixes."""
    entries = list(CATALOG.values())
    if code:
        found = lookup_all(code)
        if not found:
            _fail(f"unknown code {code!r}; known: {', '.join(e.code for e in entries)}")
        entries = found
    if as_json:
        click.echo(json.dumps([{"id": e.id, "code": e.code, "smtp_code": e.smtp_code, "title": e.title,
                                "permanent": e.permanent, "explanation": e.explanation,
                                "causes": {a: list(e.causes[a]) for a in AUDIENCES},
                                "fixes": {a: list(e.fixes[a]) for a in AUDIENCES}} for e in entries], indent=2))
        return
    console = _rich()[0]
    for i, e in enumerate(entries):
        if i:
            click.echo("")
        console.print(f"[bold]{f'{e.smtp_code} ' if e.smtp_code else ''}{e.code}  {e.title}[/bold]  ({e.id})")
        click.echo(f"  {e.explanation}")
        for audience, label in (("on_premises", "your own server (on_premises)"),
                                ("partner", "a partner or the internet (partner)")):
            click.echo(f"  Likely causes, {label}:")
            for c in e.causes[audience]:
                click.echo(f"    - {c}")
            click.echo("  What to do:")
            for f in e.fixes[audience]:
                click.echo(f"    - {f}")


@main.group()
def user():
    """Users that may authenticate (server.users_file)."""


def _users_file(config_path: str, users_file: str | None) -> Path:
    """--users-file, else the config's server.users_file (read without checking the rest: the
    file may not exist yet, and config check refuses a missing one)."""
    if users_file:
        return Path(users_file)
    import tomllib
    try:
        raw = tomllib.loads(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        _fail(f"{config_path}: cannot read server.users_file from it ({exc}); or give --users-file")
    value = raw.get("server", {}).get("users_file") if isinstance(raw.get("server"), dict) else None
    if not isinstance(value, str) or not value:
        _fail(f"{config_path}: server.users_file is not set; set it, or give --users-file")
    path = Path(value)
    return path if path.is_absolute() else Path(config_path).parent / path


@user.command("add")
@config_option
@click.argument("name")
@click.option("--users-file", help="The users file (default: the config's server.users_file).")
@click.option("--senders", help="MAIL FROM addresses and @domains the user may send as, comma-separated "
                                "(default: any).")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
def user_add(config_path, name, users_file, senders, password_stdin):
    """Add a user (or set a user's password and senders anew)."""
    from relaywatch.receive.auth import User, UsersFileError, hash_password, parse_senders, valid_name, write_user
    if not valid_name(name):
        _fail(f"{name!r} is not a user name (letters, digits, . _ @ + -; at most 128)")
    try:
        allowed = parse_senders(senders) if senders else None
    except ValueError as exc:
        _fail(f"--senders: {exc}")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not password:
        _fail("the password is empty")
    path = _users_file(config_path, users_file)
    try:
        new = write_user(path, User(name, hash_password(password), allowed))
    except UsersFileError as exc:
        _fail(f"{exc}; fix the file first")
    except OSError as exc:
        _fail(f"cannot write {path}: {exc.strerror}")
    click.echo(f"{'added' if new else 'updated'} user {name} in {path}")


# -- nodes ------------------------------------------------------------------------

@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/json.md).")
def nodes(config_path, as_json):
    """The relaywatch nodes sharing this queue: alive, dead or stopped, and which one leads."""
    from relaywatch.cluster.decisions import Timing
    config = _load(config_path)

    async def read(store):
        return await store.nodes(), await store.leader()
    beats, lease = _with_store(config, read)
    now = time.time()
    timing = Timing(config.server.heartbeat_interval, config.server.node_lapse)
    out = views.nodes_json(beats, lease, timing, now)
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    shown = out["nodes"]
    leading = any(n["leader"] for n in shown)
    if not shown:
        click.echo("No node has registered with this queue (has relaywatch serve run with this config?).")
        return
    console, Table = _rich()
    table = Table(box=None, pad_edge=False)
    for col in ("Name", "Address", "Role", "Version", "Started", "Heartbeat", "Leases", "Received", "Delivered",
                "State", "Leader"):
        table.add_column(col, no_wrap=True)
    for n in shown:
        state = {"alive": "[green]alive[/green]", "dead": "[red]dead[/red]"}.get(n["state"], n["state"])
        table.add_row(n["name"], n["address"], n["role"], n["version"], _age(n["started_at"], now) + " ago",
                      _age(n["heartbeat_at"], now) + " ago", str(n["leases"]), str(n["received"]),
                      str(n["delivered"]), state,
                      f"yes (term {lease.term})" if n["leader"] else "")
    console.print(table)
    dead = sum(1 for n in shown if n["state"] == "dead")
    click.echo(f"{len(shown)} node(s), {dead} dead (no heartbeat for {timing.lapse:g}s)"
               + ("" if leading else "; no leader now (one takes over within the lapse)"))


@main.group("node")
def node_group():
    """This node of the cluster."""


@node_group.command("drain")
@config_option
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the node has stopped.")
def node_drain(config_path, wait):
    """Stop this node cleanly (as SIGTERM does): /readyz answers 503, no new mail is accepted,
    deliveries in flight finish within server.shutdown_grace and the rest of its leases go
    back to the queue for the other nodes; the watch moves to another node at once."""
    import signal
    config = _load(config_path)
    pid = control.running_server(config.server.data_dir)
    try:
        if pid is None:
            raise OSError
        os.kill(pid, signal.SIGTERM)
    except OSError:
        _fail(str(control.NoServer(control.pid_file(config.server.data_dir))))
    click.echo(f"draining relaywatch node {config.server.node_name} (pid {pid})")
    if not wait:
        return
    deadline = time.monotonic() + config.server.shutdown_grace + 30
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _running(pid):
        _fail(f"node {config.server.node_name} (pid {pid}) has not stopped yet; it is still finishing")
    click.echo(f"node {config.server.node_name} stopped; what it had not delivered is back in the queue")


def _running(pid: int) -> bool:
    """The process exists and has not exited (a zombie waiting for its parent has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


from relaywatch import cli_tls_report  # noqa: E402,F401  (its commands join main's groups)

if __name__ == "__main__":
    main()
