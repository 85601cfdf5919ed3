"""relaywatch errors [CODE]: the catalog's causes and fixes, and the replies to clients."""

from __future__ import annotations

import click

from relaywatch import views
from relaywatch.classify.catalog import CATALOG, CLIENT_CATALOG, lookup_all, lookup_client
from relaywatch.cli.common import echo_json, fail, rich

CLIENT_HEADING = "Replies relaywatch's SMTP server sends to clients"


@click.command()
@click.argument("code", required=False)
@click.option("--json", "as_json", is_flag=True)
def errors(code, as_json):
    """Explain error codes: delivery failures (causes and fixes) and the replies relaywatch sends to clients."""
    entries, replies = list(CATALOG.values()), list(CLIENT_CATALOG.values())
    if code:
        entries, replies = lookup_all(code), lookup_client(code)
        if not entries and not replies:
            known = dict.fromkeys(e.code for e in (*CATALOG.values(), *CLIENT_CATALOG.values()))
            fail(f"unknown code {code!r}; known: {', '.join(known)}")
    if as_json:
        echo_json(views.catalog_json(entries) + views.client_catalog_json(replies))
        return
    console = rich()[0]
    if entries and replies:
        console.print("[bold underline]Delivery: what a destination answered relaywatch[/bold underline]\n")
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
    if replies:
        if entries:
            click.echo("")
        console.print(f"[bold underline]{CLIENT_HEADING}[/bold underline]\n")
    for i, r in enumerate(replies):
        if i:
            click.echo("")
        console.print(f"[bold]{r.smtp_code} {r.code}  {r.title}[/bold]  ({r.id})")
        click.echo("  relaywatch replies:")
        for text in r.replies:
            click.echo(f"    {text}")
        click.echo(f"  When: {r.when}")
        click.echo("  The client's admin:")
        for line in r.client:
            click.echo(f"    - {line}")
        click.echo("  The relay's admin:")
        for line in r.relay:
            click.echo(f"    - {line}")
