"""Imports run with the flow (receive -> store -> schedule -> deliver -> classify -> notify -> watch):
the back edges the architecture review found stay gone (an AST scan, no imports run).

Two guards.  RULES: the hand-written rules of the review (the pure parts stay pure,
the queue changes through one entry point).  STAGES: every module has a stage, the
stages are layers, and a module imports only its own stage, the kernel and the
stages below its own; each edge that breaks this today is in ALLOWED with why.
docs/architecture.md explains the layers and lists the same edges as known debts."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "relaywatch"


def imports(path: Path) -> set[str]:
    """Every relaywatch module ``path`` imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("relaywatch"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("relaywatch"))
    return out


def modules(*folders: str) -> list[Path]:
    return [p for f in folders for p in sorted((PACKAGE / f).glob("*.py"))]


# (modules, what none of them may import)
RULES = [
    # the queue manager and what it drives: nothing of receiving or of the watch
    (["deliver/scheduler.py", "deliver/connector.py", "deliver/record.py", "deliver/queue_actions.py"],
     ("relaywatch.receive", "relaywatch.watch", "relaywatch.cli", "relaywatch.app")),
    # a delivery visits classify/ once: the connector observes, deliver/record.py classifies
    (["deliver/connector.py"], ("relaywatch.classify.classify", "relaywatch.classify.retry")),
    # the retry decision and the classifier: pure, below delivery and notices
    (modules("classify"), ("relaywatch.deliver", "relaywatch.notify", "relaywatch.watch", "relaywatch.receive",
                           "relaywatch.store")),
    # notices: built from facts, never by reaching back into delivery or the store
    (modules("notify"), ("relaywatch.deliver", "relaywatch.watch", "relaywatch.receive", "relaywatch.store")),
    # the watch and Fix now change the queue through deliver/queue_actions.py, not the scheduler's internals
    (modules("watch"), ("relaywatch.deliver.scheduler", "relaywatch.deliver.record")),
    # the CLI and the console: the same entry point; queue bounce is a queue action, not a fix
    (modules("cli"), ("relaywatch.deliver.scheduler", "relaywatch.deliver.record")),
    (["actions.py"], ("relaywatch.watch", "relaywatch.deliver.scheduler", "relaywatch.deliver.record", "relaywatch.cli")),
    (modules("console"), ("relaywatch.cli", "relaywatch.deliver.scheduler", "relaywatch.deliver.record")),
]


@pytest.mark.parametrize("paths, forbidden", RULES)
def test_no_back_edges(paths, forbidden):
    found = {}
    for p in paths:
        path = p if isinstance(p, Path) else PACKAGE / p
        bad = sorted(m for m in imports(path) if m.startswith(forbidden))
        if bad:
            found[str(path.relative_to(PACKAGE))] = bad
    assert found == {}


# -- the stage order ------------------------------------------------------------------------
#
# The flow is the path of a message, not an import order: the scheduler *pulls* from the
# store, and the watch acts back on the queue.  So the stages are layers of who may call
# whom, bottom first; a module imports its own stage, the kernel, and stages below it.
# Receiving and delivering are the two sides of the queue (two processes): neither may
# import the other (SIDES).
LAYERS = [
    "kernel",     # model.py, tls_results.py, incident.py, incident_facts.py, watch_records.py, errors.py, events.py,
                  # meters.py, config/, route.py, idn.py, mime.py, dsn_params.py, clock.py, sentinel.py: facts and pure
                  # code everyone shares
    "store",      # store/: the queue and the watch's state behind store/base.py's interfaces; cluster/: the
                  # nodes and the leader lease kept there (store/base.py names its nouns)
    "classify",   # classify/: observations -> codes, the retry decision (pure)
    "notify",     # notify/: which notices an attempt calls for, and the NDRs themselves (pure)
    "deliver",    # deliver/ (but the three below), smtpclient/: one attempt at one destination
    "schedule",   # deliver/scheduler.py, record.py, queue_actions.py: lease -> dispatch -> record
    "receive",    # receive/: the SMTP server, the durable 250
    "watch",      # watch/: incidents over what was recorded, probes, alerts, Fix now
    "console",    # console/, actions.py, views.py: the operators' doors (HTTP and the CLI's shapes)
    "runtime",    # app.py, runtime/, cli/, preflight.py, __main__.py: wires every part; may import anything
]
RANK = {name: i for i, name in enumerate(LAYERS)}
SIDES = {("receive", "deliver"), ("receive", "schedule"), ("deliver", "receive"), ("schedule", "receive")}

# A name here is a top-level module or a package (config/: every module in it is kernel; what
# config check loads, the users file and the DKIM keys, is parsed inside it).
KERNEL = {"model", "tls_results", "incident", "incident_facts", "watch_records", "errors", "events", "meters", "config", "route",
          "idn", "mime", "dsn_params", "clock", "sentinel", "__init__"}
SCHEDULE = {"scheduler", "record", "queue_actions"}
PACKAGES = {"store": "store", "cluster": "store", "classify": "classify", "notify": "notify", "deliver": "deliver",
            "smtpclient": "deliver", "receive": "receive", "watch": "watch", "console": "console",
            "runtime": "runtime", "cli": "runtime"}
TOP = {"actions": "console", "views": "console", "app": "runtime", "preflight": "runtime", "__main__": "runtime"}


def stage(module: str) -> str | None:
    """The stage of a relaywatch module, by its dotted name (``relaywatch.deliver.record``);
    None for a new top-level module or package nobody has placed yet (give it a stage above)."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in KERNEL:
        return "kernel"
    if parts[0] in TOP:
        return TOP[parts[0]]
    if parts[0] == "deliver" and len(parts) > 1 and parts[1] in SCHEDULE:
        return "schedule"
    return PACKAGES.get(parts[0])


def _is_module(name: str) -> bool:
    parts = name.split(".")
    return (PACKAGE.parent.joinpath(*parts).with_suffix(".py").exists()
            or PACKAGE.parent.joinpath(*parts, "__init__.py").exists())


def imported_modules(path: Path) -> set[str]:
    """The relaywatch modules ``path`` imports: ``from a import b`` is ``a.b`` if b is a module, else ``a``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("relaywatch"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if _is_module(full) else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("relaywatch"))
    return out


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(rel.parts)


def against_the_flow() -> set[tuple[str, str]]:
    """Every (importing file, imported module) that imports a stage above its own, or the other side."""
    edges = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        own = stage(module_name(path))
        for target in imported_modules(path):
            theirs = stage(target)
            if own is None or theirs is None:
                continue   # test_every_module_has_a_stage names it
            if RANK[theirs] > RANK[own] or (own, theirs) in SIDES:
                edges.add((str(path.relative_to(PACKAGE)), target))
    return edges


# Edges against the flow that exist today.  Each is a known debt (docs/architecture.md,
# "Known debts"): pay it by moving the shared thing down, then delete its line here.
ALLOWED: dict[tuple[str, str], str] = {}     # none today


def test_stage_order():
    found = against_the_flow()
    unexplained = sorted(found - ALLOWED.keys())
    assert unexplained == [], "imports against the flow (docs/architecture.md, 'Layers'): " + repr(unexplained)


def test_allowed_edges_still_exist():
    """A debt paid is deleted from ALLOWED, so the list stays the truth."""
    assert sorted(ALLOWED.keys() - against_the_flow()) == []


def test_the_config_package_is_kernel():
    """config/ is split by section; every part of it stays shared by all, importing no stage."""
    names = [module_name(p) for p in sorted((PACKAGE / "config").glob("*.py"))]
    assert "relaywatch.config.load" in names
    assert {n: stage(n) for n in names} == {n: "kernel" for n in names}
    assert {(src, dst) for src, dst in against_the_flow() if src.startswith("config")} == set()


def test_every_module_has_a_stage():
    unplaced = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if stage(module_name(p)) is None)
    assert unplaced == [], "give these modules a stage (KERNEL, TOP or PACKAGES above)"


# -- the queue changes in one place ---------------------------------------------------------
#
# An import rule cannot see a call: a module that holds the store could change the queue
# past QueueActions.  So a text scan: the store's queue-changing operations are called only by
# the scheduler's side (delivering) and deliver/queue_actions.py (everything else).
QUEUE_CHANGES = re.compile(r"\bstore\.(record|retry|hold|release|delete|move_recipients)\(")
CHANGES_THE_QUEUE = {"deliver/scheduler.py", "deliver/record.py", "deliver/queue_actions.py"}


def queue_changes_outside(root: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("store/") or rel in CHANGES_THE_QUEUE:
            continue
        found += [f"{rel}: store.{m}" for m in QUEUE_CHANGES.findall(path.read_text())]
    return found


def test_the_queue_changes_only_through_the_scheduler_and_queue_actions():
    assert queue_changes_outside() == [], "change the queue through deliver/queue_actions.py QueueActions"


def test_every_rule_still_names_real_modules():
    """A rule over files that moved, or against a module that was renamed, guards nothing."""
    for paths, forbidden in RULES:
        assert paths, f"a rule over no module: {forbidden}"
        for name in forbidden:
            assert _is_module(name), f"{name} is not a module any more: update RULES"
    for rel in CHANGES_THE_QUEUE:
        assert (PACKAGE / rel).exists(), rel
