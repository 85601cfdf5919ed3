""""Fix now": remediation actions on an incident, audited and undoable.

Each action first builds a plan (what it will do, in words), which
``--dry-run`` prints and stops at.  Applying it writes overrides (never the
TOML file) and an audit record in one transaction, then acts on the queue
through deliver/queue_actions.py, as every change to the queue does.
``undo`` reverses the overrides of the last action; mail already delivered or
returned stays so, and the undo says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from relaywatch.classify.catalog import CATALOG
from relaywatch.config import Config, apply_overrides
from relaywatch.deliver.queue_actions import QueueActions
from relaywatch.errors import RelaywatchError
from relaywatch.model import Failure
from relaywatch.route import LOCAL, split_address
from relaywatch.store.base import Selector, Store
from relaywatch.incident import Incident
from relaywatch.watch_records import Override, OverrideKey, Setting

ACTIONS = ("decommission", "retry-now", "pause", "expire")


class FixError(RelaywatchError):
    pass


@dataclass(frozen=True)
class Plan:
    action: str
    steps: list[str]
    set_overrides: Mapping[OverrideKey, Any] = field(default_factory=dict)
    clear_overrides: tuple[OverrideKey, ...] = ()
    undo: Mapping[OverrideKey, Any] = field(default_factory=dict)   # to restore on undo: the value, or None to clear
    undo_note: str = ""


def plan(action: str, incident: Incident, config: Config, overrides: Mapping[OverrideKey, Override]) -> Plan:
    if not incident.is_open:
        raise FixError(f"incident {incident.id} is resolved; there is nothing to fix")
    if action not in incident.actions:
        raise FixError(f"{action!r} is not offered for incident {incident.id}; "
                       f"choose one of: {', '.join(incident.actions) or 'none'}")
    name = incident.connector
    connector = config.connector(name)

    def previous(key: OverrideKey) -> Any:
        return overrides[key].value if key in overrides else None

    if action == "retry-now":
        return Plan(action, [f"Make every deferred message for connector {name} due now."],
                    undo_note="nothing to undo: the messages are simply tried again")
    if action == "pause":
        key = Setting.CONNECTOR_PAUSED.of(name)
        return Plan(action, [f"Pause delivery through connector {name}: mail is still accepted and kept, "
                             "but no attempts are made until undone."],
                    set_overrides={key: True}, undo={key: previous(key)})
    if action == "expire":
        return Plan(action, [f"Return every message deferred with {incident.code} on connector {name} to its "
                             f"sender now (NDR), and remove it from the queue ({incident.messages} message(s))."],
                    undo_note="returned messages cannot be taken back")
    if action == "decommission":
        if connector is None or connector.type != "on_premises":
            raise FixError("decommission applies to an on_premises connector only")
        domains = [d for d in config.domains if d.type == "internal_relay" and connector.serves(d.name)]
        steps = [f"Disable connector {name} (it stops being used for routing)."]
        enabled = Setting.CONNECTOR_ENABLED.of(name)
        sets: dict[OverrideKey, Any] = {enabled: False}
        undo = {enabled: previous(enabled)}
        for d in domains:
            key = Setting.DOMAIN_TYPE.of(d.name)
            steps.append(f"Make {d.name} authoritative: only its listed mailboxes "
                         f"({', '.join(sorted(d.mailboxes)) or 'none'}) exist; other recipients are rejected at "
                         "RCPT with 550 5.1.10.")
            sets[key] = "authoritative"
            undo[key] = previous(key)
        steps.append(f"Queued mail for connector {name}: recipients with a listed mailbox are delivered to it "
                     "now; all others are returned to their senders (5.1.10).")
        return Plan(action, steps, set_overrides=sets, undo=undo,
                    undo_note="mail already delivered locally or returned stays so")
    raise FixError(f"unknown action {action!r}; choose one of: {', '.join(ACTIONS)}")


async def apply(store: Store, config: Config, incident: Incident, p: Plan, who: str, reason: str | None) -> list[str]:
    """Do it; return what was done, line by line."""
    now = time.time()
    done: list[str] = []
    # The audit keeps the undo as JSON, the keys as they are stored (watch_records.py OverrideKey).
    undo_json = {str(key): value for key, value in p.undo.items()}
    audit_id = await store.apply_fix(who, p.action, incident.id,
                                     {"steps": p.steps, "undo": undo_json, "reason": reason, "undo_note": p.undo_note},
                                     p.set_overrides, p.clear_overrides, now)
    done.append(f"recorded as audit entry {audit_id} by {who}")
    name = incident.connector
    effective = apply_overrides(config, await store.overrides())
    queue = QueueActions(store, lambda: effective)
    if p.action == "retry-now":
        n = await queue.retry_now(Selector(connector=name))
        done.append(f"{n} message(s) due now")
    elif p.action == "pause":
        done.append(f"connector {name} paused")
    elif p.action == "expire":
        n = await queue.expire(await store.entry_ids(name, incident.code))
        done.append(f"{n} message(s) returned to their senders")
    elif p.action == "decommission":
        moved = returned = 0
        for entry_id in await store.entry_ids(name, None, status="deferred") + await store.entry_ids(name, None, status="queued"):
            entry = await queue.unleased(entry_id)
            if entry is None:
                continue
            local = [r.address for r in entry.pending if _has_mailbox(effective, r.address)]
            if local:
                await queue.reroute(entry_id, local, LOCAL)
                moved += len(local)
            returned += await queue.bounce(entry_id, _not_found_failure(time.time()))
        done.append(f"{moved} recipient(s) moved to their local mailboxes; {returned} message(s) returned (5.1.10)")
    return done


async def undo(store: Store, incident: Incident, who: str, reason: str | None = None) -> list[str]:
    last = await store.last_undoable(incident.id)
    if last is None:
        raise FixError(f"incident {incident.id} has no action to undo")
    restore = _undo_of(last.detail)
    sets = {k: v for k, v in restore.items() if v is not None}
    clears = [k for k, v in restore.items() if v is None]
    now = time.time()
    await store.apply_fix(who, f"undo {last.action}", incident.id, {"undoes": last.id, "reason": reason},
                          sets, clears, now)
    await store.mark_undone(last.id, now)
    lines = [f"undid {last.action} (audit entry {last.id})"]
    lines += [f"restored {k}" for k in restore] or ["no settings to restore"]
    if last.detail.get("undo_note"):
        lines.append(f"note: {last.detail['undo_note']}")
    return lines


def _undo_of(detail: Mapping[str, Any]) -> dict[OverrideKey, Any]:
    """The overrides a fix's audit detail says to restore; a key this version does not know is left alone."""
    stored = detail.get("undo")
    keys = {text: OverrideKey.parse(text) for text in stored} if isinstance(stored, dict) else {}
    return {key: stored[text] for text, key in keys.items() if key is not None}


def _has_mailbox(config: Config, address: str) -> bool:
    local, domain = split_address(address)
    d = config.domain(domain)
    return d is not None and d.has_mailbox(local)


def _not_found_failure(now: float) -> Failure:
    e = CATALOG["recipient.not_found"]
    return Failure(code=e.code, smtp_code=e.smtp_code, title=e.title, subtype="decommissioned",
                   detail="The recipient's server was decommissioned and the domain is now authoritative; "
                          "there is no such mailbox.", phase="rcpt", permanent=True, at=now, kind=e.id)
