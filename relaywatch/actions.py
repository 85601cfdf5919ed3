"""Operator actions on one queued message, for every surface.

``relaywatch queue hold|release|delete|bounce|retry`` and the HTTP API
(``POST /api/v1/queue/{id}/<action>``) both call ``queue_action``: the same
queue change (deliver/queue_actions.py, the one entry point every caller
uses), the same refusal when it does not apply, and one audit record (who,
when, what, why) in the audit log of Fix now.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from relaywatch.config import Config
from relaywatch.deliver.queue_actions import QueueActions
from relaywatch.store.base import Selector

QUEUE_ACTIONS = ("retry", "hold", "release", "bounce", "delete")


@dataclass(frozen=True)
class ActionResult:
    done: bool
    text: str          # one sentence: what happened, or why nothing did


async def queue_action(store, config: Config, action: str, entry_id: str, who: str, reason: str | None,
                       now: float | None = None, audit: bool = True) -> ActionResult:
    """Apply ``action`` to queue entry ``entry_id``; audit it if it did something
    (``audit=False``: a bulk action, audited once for all, console/jobs.py).

    Raises StoreError when the store refuses (e.g. the message is being
    delivered right now); an unknown id is ``done=False``."""
    if action not in QUEUE_ACTIONS:
        raise ValueError(f"unknown queue action {action!r}")
    now = time.time() if now is None else now
    entry_id = entry_id.upper()
    queue = QueueActions(store, lambda: config)
    if action == "retry":
        done = await queue.retry_now(Selector(ids=(entry_id,)), now) == 1
        result = ActionResult(done, f"{entry_id} will be tried now" if done else
                              f"{entry_id} is not waiting for a retry (unknown, held or being delivered)")
    elif action == "hold":
        done = await queue.hold(entry_id)
        result = ActionResult(done, f"{entry_id} is held" if done else f"no queued message with id {entry_id}")
    elif action == "release":
        done = await queue.release_held(entry_id, now)
        result = ActionResult(done, f"{entry_id} released" if done else f"no held message with id {entry_id}")
    elif action == "delete":
        done = await queue.delete(entry_id)
        result = ActionResult(done, f"{entry_id} deleted" if done else f"no queued message with id {entry_id}")
    else:
        entry = await store.get(entry_id)
        done = entry is not None and await queue.expire([entry_id]) == 1
        result = ActionResult(done, (f"{entry_id} returned to {entry.sender or '<> (no NDR for a bounce)'}"
                                     if done else f"no queued message with id {entry_id} still waiting for delivery"))
    if result.done and audit:
        await store.apply_fix(who, f"queue {action}", None, {"id": entry_id, "reason": reason, "result": result.text},
                              {}, (), now)
    return result
