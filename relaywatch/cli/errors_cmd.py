"""relaywatch errors [CODE]: the catalog's causes and fixes."""

from __future__ import annotations

import click

from relaywatch import views
from relaywatch.classify.catalog import CATALOG, lookup_all
from relaywatch.cli.common import echo_json, fail, rich


@click.command()
@click.argument("code", required=False)
@click.option("--json", "as_json", is_flag=True)
def errors(code, as_json):
    """Explain delivery error codes: causes and fixes."""
    entries = list(CATALOG.values())
    if code:
        found = lookup_all(code)
        if not found:
            fail(f"unknown code {code!r}; known: {', '.join(e.code for e in entries)}")
        entries = found
    if as_json:
        echo_json(views.catalog_json(entries))
        return
    console = rich()[0]
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
