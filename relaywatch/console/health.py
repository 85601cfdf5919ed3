"""/healthz and /readyz, for load balancers and systemd.

/healthz: the process is up (it answered).  /readyz: the relay can do its
job now: the store answers a read, the SMTP listener is open, and the
delivery side is alive (the delivery process when there is one, else the
scheduler task).  Not ready is 503 with the reasons.
"""

from __future__ import annotations

import asyncio

STORE_TIMEOUT = 2.0


def readiness(checks: dict[str, str | None]) -> tuple[int, dict]:
    """(status, body) from named checks, each None (fine) or why not (pure)."""
    reasons = [f"{name}: {why}" for name, why in checks.items() if why is not None]
    body = {"status": "not ready" if reasons else "ready",
            "checks": {name: why or "ok" for name, why in checks.items()}}
    if reasons:
        body["reasons"] = reasons
    return (503 if reasons else 200), body


async def check_store(store) -> str | None:
    try:
        # A read of a small table, not of the queue: cheap with a million queued.
        await asyncio.wait_for(store.overrides_version(), STORE_TIMEOUT)
    except asyncio.TimeoutError:
        return f"the queue store did not answer a read within {STORE_TIMEOUT:g}s"
    except Exception as exc:   # StoreError, or whatever the driver says
        return f"the queue store failed a read: {exc}"
    return None


def check_draining(app) -> str | None:
    if getattr(app, "draining", False):
        return "this node is draining (relaywatch node drain or SIGTERM): finishing its deliveries, accepting nothing"
    return None


def check_smtp(app) -> str | None:
    receiver = app.receiver
    if receiver is None or not receiver.servers or not all(s.is_serving() for s in receiver.servers):
        return "the SMTP listener is not open"
    return None


def check_delivery(app) -> str | None:
    child = app.child
    if child is not None:
        code = child.process.poll()
        return None if code is None else f"the delivery process exited ({code}); it is being restarted"
    task = app.part_task("scheduler")
    if app.scheduler is not None:
        return None if task is not None and not task.done() else "the scheduler is not running"
    return "no delivery process is running"
