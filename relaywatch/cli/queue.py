"""relaywatch queue list|show|trace|retry|hold|release|delete|bounce: inspect and act on queued mail.

The commands open the store of a (possibly running) server directly; SQLite locking
makes that safe, and the server sees changes within a second (sooner: wake_server)."""

from __future__ import annotations

import json
import sys
import time

import click

from relaywatch import views
from relaywatch.classify.catalog import CATALOG
from relaywatch.cli.common import (age, config_option, echo_json, fail, operator_name, read_config, rich, wake_server,
                                   with_store)
from relaywatch.config import Config
from relaywatch.console.api_input import ROUTE_KINDS, BadInput, queue_page as api_queue_page
from relaywatch.dsn_params import mail_params, rcpt_params
from relaywatch.idn import address_to_unicode, domain_both_ways, to_unicode
from relaywatch.model import Entry, dest_label, iso
from relaywatch.store.base import QueryPage, QueueQuery, Selector

# A command line that cannot be run exits 2, as click itself does for what it checks (an unknown
# option, a missing argument); 1 means the command ran and something failed.
USAGE = 2

STATUSES = ("queued", "deferred", "held", "active")


@click.group()
def queue():
    """Inspect and act on queued mail."""


def filter_options(fn):
    """The queue's filters, as GET /api/v1/queue takes them (and the same checks: console/api_input.py)."""
    for option in reversed((
            click.option("--connector", help="Only this connector (or local / internet)."),
            click.option("--status", help=f"Only entries in this status: {', '.join(STATUSES)}."),
            click.option("--route", help=f"Only mail routed this way: {', '.join(ROUTE_KINDS)} (MX)."),
            click.option("--code", help="The latest deferral's code: exact (4.4.316), a class (4, 4.4, 4.4.*) or a "
                                        "catalog id (connect.refused)."),
            click.option("--sender", help="The envelope sender, exact (any case); \"\": the null sender <>."),
            click.option("--recipient", help="A recipient address, exact (any case)."),
            click.option("--domain", help="A recipient's domain."),
            click.option("--older-than", "older_than", metavar="DURATION", help="Received longer ago than this (1h, 2d)."),
            click.option("--text", help="A substring (any case) of the sender, a recipient or a recipient's last reply; "
                                        "<id@host>, in angle brackets: that Message-ID."))):
        fn = option(fn)
    return fn


FILTERS = ("connector", "status", "route", "code", "sender", "recipient", "domain", "older_than", "text")


def _filter(kwargs: dict) -> dict[str, str]:
    """The filter options given, as the API's filter object ({"older_than": "1h", ...})."""
    return {name: kwargs.pop(name) for name in FILTERS if kwargs.get(name) is not None}


def _page(args: dict[str, str]) -> QueryPage:
    """``args`` checked by the API's own parser; a problem names the option (--older-than: ...)."""
    try:
        return api_queue_page(args)
    except BadInput as exc:
        fail(f"--{exc.field.replace('_', '-')}: {exc.message}", USAGE)


@queue.command("list")
@config_option
@filter_options
@click.option("--after", metavar="ID", help="The next page: entries after this id (the previous page's next_after).")
@click.option("--limit", default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/json.md).")
def queue_list(config_path, after, limit, as_json, **kwargs):
    """List queued messages, oldest first."""
    config = read_config(config_path)
    args = _filter(kwargs)
    if set(args) - {"connector", "status"} or after is not None:   # the API's filters and pages, in id order
        page = _page(dict(args, limit=str(limit), **({"after": after} if after is not None else {})))
        entries = with_store(config, lambda s: s.queue_page(page, time.time()))
    else:
        if args.get("status") not in (None, *STATUSES):
            _page(args)                                            # the API's words for a bad status
        entries = with_store(config, lambda s: s.list(QueueQuery(args.get("connector"), args.get("status"), limit)))
    # Ids start with the time received, so "oldest first" is id order and a full page's last id the next cursor.
    next_after = entries[-1].id if entries and len(entries) == limit else None
    if as_json:
        echo_json(dict(views.message_list_json(entries), next_after=next_after))
        return
    if not entries:
        click.echo("The queue is empty." if not args and after is None else "No messages match.")
        return
    now = time.time()
    console, Table = rich()
    table = Table(box=None, pad_edge=False)
    for col in ("ID", "Status", "Connector", "Age", "Tries", "Next try", "Last error"):
        table.add_column(col, no_wrap=True)
    for col in ("From", "To"):
        table.add_column(col, overflow="fold")
    for e in entries:
        err = e.last_error
        pending = [address_to_unicode(r.address) for r in e.recipients if not r.status.is_final]   # IDN: U-labels
        table.add_row(e.id, e.status.value, e.route.name + (f" ({to_unicode(e.route.domain)})" if e.route.domain else ""),
                      age(e.received_at, now), str(e.attempts),
                      "-" if e.status.value in ("held", "active") else age(e.next_attempt_at, now),
                      f"{err.code} {err.subtype or ''}".strip() if err else "",
                      address_to_unicode(e.sender) if e.sender else "<>", ", ".join(pending[:3]) + (f" +{len(pending) - 3}" if len(pending) > 3 else ""))
    console.print(table)
    click.echo(f"{len(entries)} message(s); `relaywatch queue show ID` explains an error, "
               f"`relaywatch errors CODE` what to do about it")
    if next_after:
        click.echo(f"More: the next page is --after {next_after}")


@queue.command("show")
@config_option
@click.argument("entry_id")
@click.option("--json", "as_json", is_flag=True)
def queue_show(config_path, entry_id, as_json):
    """Everything about one message: recipients, errors, every attempt."""
    config = read_config(config_path)
    entry = with_store(config, lambda s: s.get(entry_id))
    if entry is None:
        fail(f"no queued message with id {entry_id} (delivered, bounced or deleted messages leave the queue; "
             f"grep the log for the id)")
    if as_json:
        echo_json(views.message_detail_json(entry))
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
        fail("give a queue id or --message-id (one of them)")
    config = read_config(config_path)
    if message_id is not None:
        from relaywatch.console.api import trace_search   # the console's imports: only for this
        found = with_store(config, lambda s: trace_search(s, message_id))
        if as_json:
            echo_json(found)
            return
        if not found["traces"]:
            fail(f"no queued or kept message has the Message-ID {message_id}")
        traces = found["traces"]
    else:
        record = with_store(config, lambda s: s.trace(entry_id))
        if record is None:
            kept = f"{config.queue.trace_retention:g}s" if config.queue.trace_retention else "off"
            fail(f"no message with id {entry_id} in the queue or in the kept traces (queue.trace_retention: {kept})")
        if as_json:
            echo_json(views.trace_json(record))
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
                f"<{address_to_unicode(ev['sender'])}> -> {', '.join(map(address_to_unicode, ev['recipients']))}")
    if ev["event"] == "attempt":
        rcpts = "; ".join(f"{address_to_unicode(r['address'])} {r['status']}" + (f" {r['code']}" if r["code"] else "")
                          + (f" \"{r['reply']}\"" if r["reply"] else "") for r in ev["recipients"])
        return f"#{ev['n']} {ev['host'] or '-'}[{ev['ip'] or '-'}] {ev['duration']:.2f}s: {rcpts}"
    if ev["event"] == "action":
        return (f"{ev['action']} by {ev['who']}" + (f" (job {ev['job']})" if ev["job"] else "")
                + (f": {ev['reason']}" if ev["reason"] else ""))
    if ev["event"] in ("ndr_sent", "delay_notice_sent"):
        return " ".join(ev["ids"])
    return f"to {ev['moved_to']}" if ev.get("moved_to") else ""


def _marks(e: Entry) -> list[str]:
    """What the entry is, beyond its envelope: the flags MESSAGE has (docs/json.md), in words."""
    marks = []
    if e.is_dsn:
        marks.append("a delivery status notice of ours (null sender, never bounced)")
    if e.is_tls_report:
        marks.append("our TLS report (RFC 8460): opportunistic TLS, the rua domain's MTA-STS/DANE not applied")
    if e.needs_smtputf8 or e.utf8_headers:
        why = ", ".join(w for w, on in (("a UTF-8 address", e.needs_smtputf8), ("UTF-8 headers", e.utf8_headers)) if on)
        marks.append(f"needs SMTPUTF8 ({why}): a destination without it fails it (RFC 6531)")
    return marks


def _print_entry(e: Entry, config: Config) -> None:
    now = time.time()
    click.echo(f"Message {e.id}  ({e.status.value})")
    click.echo(f"  From:        {address_to_unicode(e.sender) if e.sender else '<>'}")   # IDN as U-labels
    click.echo(f"  Message-ID:  {e.message_id or '-'}")
    click.echo(f"  Route:       {e.route.kind.value} {e.route.name}"
               + (f" ({domain_both_ways(e.route.domain)})" if e.route.domain else ""))
    click.echo(f"  Received:    {iso(e.received_at)} ({age(e.received_at, now)} ago), {e.size} bytes")
    click.echo(f"  Expires:     {iso(e.expires_at)} ({age(e.expires_at, now)})")
    if e.status.value not in ("held", "active"):
        click.echo(f"  Next try:    {iso(e.next_attempt_at)} ({age(e.next_attempt_at, now)})")
    click.echo(f"  Attempts:    {e.attempts}" + (f", failing since {iso(e.first_failure_at)}" if e.first_failure_at else ""))
    if e.dsn:
        click.echo(f"  DSN:        {mail_params(e.dsn)}")     # as the client sent them (RFC 3461)
    marks = _marks(e)
    if marks:
        click.echo(f"  Marks:       {'; '.join(marks)}")
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


def with_queue(config: Config, fn):
    """Run ``fn(QueueActions)`` against the store: the CLI changes the queue
    the way every other caller does (deliver/queue_actions.py)."""
    from relaywatch.deliver.queue_actions import QueueActions
    return with_store(config, lambda store: fn(QueueActions(store, lambda: config)))


def _bulk(config: Config, action: str, args: dict[str, str], dry_run: bool, reason: str | None) -> None:
    """``queue ACTION --FILTER...``: what POST /api/v1/queue/actions does, run here to the end: the
    ids matching now, one audit record starting the job, then the job's batches (console/jobs.py)."""
    from relaywatch.console.jobs import BATCH, Job, begin_bulk, matching_ids, run_bulk
    page = _page(args)
    if not dry_run and not (reason and reason.strip()):
        fail("--reason is required with filter options or --all: say why (kept in the audit log)", USAGE)

    def progress(job: Job) -> None:
        click.echo(f"{action}: {job.done + job.skipped + job.failed}/{job.matched}", err=True)

    async def run(store):
        now = time.time()
        ids = await matching_ids(store, page, now)
        if dry_run:
            return len(ids), ids[:10], None
        who = operator_name()
        job = Job(await begin_bulk(store, who, action, args, len(ids), reason.strip(), now), action, args, who,
                  reason.strip(), matched=len(ids))
        await run_bulk(job, store, config, ids, progress if len(ids) > BATCH else None)
        return len(ids), ids[:10], job
    matched, sample, job = with_store(config, run)
    if job is None:
        click.echo(f"{matched} message(s) match" + (f" ({', '.join(sample)}{', ...' if matched > 10 else ''})"
                                                   if sample else "") + "; nothing changed (--dry-run)")
        return
    if action in ("retry", "release") and job.done:
        wake_server(config)
    click.echo(f"job {job.id}: {action} {matched} matched, {job.done} done, {job.skipped} skipped, "
               f"{job.failed} failed ({job.state})")
    for error in job.errors:
        click.echo(f"  {error}", err=True)
    if job.state != "done" or job.failed:
        sys.exit(1)


def _by_filter(ids, args: dict, all_: bool, dry_run: bool) -> bool:
    """Whether the command acts by filter (or --all); refuses ids mixed with filters, and nothing at all."""
    if ids and (args or all_):
        fail("name message ids, or filter options (or --all), not both", USAGE)
    if not ids and not args and not all_:
        fail("name message ids, or filter options, or --all for every queued message", USAGE)
    if ids and dry_run:
        fail("--dry-run counts what filter options match; with message ids there is nothing to count", USAGE)
    return not ids


def _bulk_options(fn):
    for option in reversed((
            click.option("--all", "all_", is_flag=True, help="Every queued message (with no filter option)."),
            click.option("--dry-run", is_flag=True, help="Only say how many messages match; change nothing."),
            click.option("--reason", help="Why (kept in the audit log); required with filter options or --all."))):
        fn = option(fn)
    return fn


@queue.command("retry")
@config_option
@click.argument("ids", nargs=-1)
@filter_options
@_bulk_options
def queue_retry(config_path, ids, all_, dry_run, reason, **kwargs):
    """Make messages due now (the server tries them within a second).

    IDs, or filter options with --reason (audited, as the API's bulk action); `--connector NAME` or
    `--all` alone, without --reason, just makes them due now."""
    config = read_config(config_path)
    args = _filter(kwargs)
    by_filter = _by_filter(ids, args, all_, dry_run)
    if by_filter and (dry_run or reason is not None or set(args) - {"connector"} or (all_ and args)):
        _bulk(config, "retry", args, dry_run, reason)
        return
    sel = Selector(ids=tuple(ids), connector=args.get("connector"), all=all_)
    n = with_queue(config, lambda q: q.retry_now(sel))
    wake_server(config)
    click.echo(f"{n} message(s) will be tried now")
    if ids and n < len(ids):
        sys.exit(1)


def _message_command(action: str, help_text: str, wake: bool = False) -> click.Command:
    """``queue ACTION ID...``: the same code (and audit record) as the HTTP API's POST /api/v1/queue/ID/ACTION;
    ``queue ACTION --FILTER... --reason R``: its POST /api/v1/queue/actions."""
    @queue.command(action, help=help_text + " IDs, or filter options (--dry-run first) with --reason.")
    @config_option
    @click.argument("ids", nargs=-1)
    @filter_options
    @_bulk_options
    def command(config_path, ids, all_, dry_run, reason, **kwargs):
        from relaywatch.actions import queue_action
        config = read_config(config_path)
        args = _filter(kwargs)
        if _by_filter(ids, args, all_, dry_run):
            _bulk(config, action, args, dry_run, reason)
            return
        async def each(store):
            return [await queue_action(store, config, action, entry_id, operator_name(),
                                       reason.strip() if reason else None) for entry_id in ids]
        results = with_store(config, each)
        for result in results:
            click.echo(result.text if result.done else f"relaywatch: {result.text}", err=not result.done)
        failed = not all(r.done for r in results)
        if wake:
            wake_server(config)
        if failed:
            sys.exit(1)
    return command


queue_hold = _message_command("hold", "Stop delivery attempts for messages until released.")
queue_release = _message_command("release", "Release held messages; they are tried at once.", wake=True)
queue_delete = _message_command("delete", "Remove messages without telling the sender.")
queue_bounce = _message_command("bounce", "Give up on messages now: NDR to the sender, then remove them.")
