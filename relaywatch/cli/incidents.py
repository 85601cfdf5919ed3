"""relaywatch incidents list|show|fix|undo: what is wrong per connector, and Fix now."""

from __future__ import annotations

import time

import click

from relaywatch import views
from relaywatch.cli.common import (age, config_option, echo_json, fail, operator_name, print_steps, read_config, rich,
                                   wake_server, with_store)
from relaywatch.model import iso
from relaywatch.incident import IncidentRecord, Severity
from relaywatch.watch_records import NotificationState


@click.group()
def incidents():
    """Mail flow incidents: what is wrong per connector, and Fix now."""


@incidents.command("list")
@config_option
@click.option("--all", "all_", is_flag=True, help="Include resolved incidents.")
@click.option("--json", "as_json", is_flag=True)
def incidents_list(config_path, all_, as_json):
    """Open incidents (with --all, the history too)."""
    config = read_config(config_path)
    found = with_store(config, lambda s: s.incidents(include_resolved=all_))
    if as_json:
        echo_json(views.incident_list_json(found))
        return
    if not found:
        click.echo("No open incidents: mail is flowing." if not all_ else "No incidents recorded.")
        return
    now = time.time()
    console, Table = rich()
    table = Table(box=None, pad_edge=False)
    for col in ("ID", "State", "Connector", "Code", "What", "Messages", "Since", "NDRs in"):
        table.add_column(col, no_wrap=col != "What")
    for i in found:
        state = i.state.value if not i.is_open else ("critical" if i.severity is Severity.CRITICAL else "open")
        cliff = age(now, i.first_expires_at) if i.is_open and i.messages else "-"
        code = i.kind.value if i.kind.code else i.code     # the watch's warnings: by their kind
        table.add_row(str(i.id), state, i.connector, code, i.title, str(i.messages), age(i.opened_at, now), cliff)
    console.print(table)
    click.echo("`relaywatch incidents show ID` explains one and lists its Fix now actions")


async def _incident(store, incident_id: int) -> IncidentRecord:
    """The stored incident (show, fix, undo), or exit naming the id."""
    inc = await store.incident(incident_id)
    if inc is None:
        fail(f"no incident {incident_id}")
    return inc


@incidents.command("show")
@config_option
@click.argument("incident_id", type=int)
@click.option("--json", "as_json", is_flag=True)
def incidents_show(config_path, incident_id, as_json):
    """One incident: evidence, likely cause, what to do, actions, notifications."""
    from relaywatch.watch.alerts import incident_text
    config = read_config(config_path)
    found = with_store(config, lambda s: _incident(s, incident_id))
    if as_json:
        echo_json(views.incident_json(found))
        return
    inc = found.incident
    click.echo(f"Incident {inc.id}  " + incident_text(inc, time.time()))
    if inc.probe:
        click.echo(f"Last probe ({iso(inc.probe.at)}): {'passed' if inc.probe.ok else 'failed'}")
        print_steps([s.to_dict() for s in inc.probe.steps])
    for n in found.notifications:
        click.echo(f"Notified {n.transition} by {n.channel}: {n.state.value}"
                   + (f" at {iso(n.sent_at)}" if n.sent_at else "")
                   + (f" (last error: {n.last_error})" if n.last_error and n.state is not NotificationState.SENT else ""))
    for a in found.audit:
        click.echo(f"Action {a.action} by {a.who} at {iso(a.at)}" + (" (undone)" if a.undone_at else ""))


@incidents.command("fix")
@config_option
@click.argument("incident_id", type=int)
@click.argument("action", type=click.Choice(["decommission", "retry-now", "pause", "expire"]))
@click.option("--dry-run", is_flag=True, help="Show what would be done, change nothing.")
@click.option("--reason", help="Why (kept in the audit log).")
def incidents_fix(config_path, incident_id, action, dry_run, reason):
    """Fix now: act on an incident (see `incidents show` for the actions offered)."""
    from relaywatch.watch import fixes
    config = read_config(config_path)
    who = operator_name()

    async def run(store):
        inc = (await _incident(store, incident_id)).incident
        try:
            p = fixes.plan(action, inc, config, await store.overrides())
        except fixes.FixError as exc:
            fail(str(exc))
        click.echo(f"{'Would' if dry_run else 'Will'} {action} for incident {incident_id} "
                   f"({inc.code} on connector {inc.connector}):")
        for step in p.steps:
            click.echo(f"  - {step}")
        if dry_run:
            click.echo("Dry run: nothing changed.")
            return
        for line in await fixes.apply(store, config, inc, p, who, reason):
            click.echo(f"  done: {line}")
        click.echo(f"Undo with: relaywatch incidents undo {incident_id}" if p.undo else f"({p.undo_note})")
    with_store(config, run)
    wake_server(config)


@incidents.command("undo")
@config_option
@click.argument("incident_id", type=int)
def incidents_undo(config_path, incident_id):
    """Undo the last Fix now action taken on an incident."""
    from relaywatch.watch import fixes
    config = read_config(config_path)
    who = operator_name()

    async def run(store):
        inc = (await _incident(store, incident_id)).incident
        try:
            for line in await fixes.undo(store, inc, who):
                click.echo(line)
        except fixes.FixError as exc:
            fail(str(exc))
    with_store(config, run)
