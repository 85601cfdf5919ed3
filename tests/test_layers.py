"""Imports run with the flow (receive -> store -> schedule -> deliver -> classify -> notify -> watch):
the back edges the architecture review found stay gone (an AST scan, no imports run)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "relaywatch"


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
    # the retry decision and the classifier: pure, below delivery and notices
    (modules("classify"), ("relaywatch.deliver", "relaywatch.notify", "relaywatch.watch", "relaywatch.receive",
                           "relaywatch.store")),
    # notices: built from facts, never by reaching back into delivery or the store
    (modules("notify"), ("relaywatch.deliver", "relaywatch.watch", "relaywatch.receive", "relaywatch.store")),
    # the watch and Fix now change the queue through deliver/queue_actions.py, not the scheduler's internals
    (modules("watch"), ("relaywatch.deliver.scheduler", "relaywatch.deliver.record")),
    # the CLI and the console: the same entry point; queue bounce is a queue action, not a fix
    (["cli.py"], ("relaywatch.deliver.scheduler", "relaywatch.deliver.record")),
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
