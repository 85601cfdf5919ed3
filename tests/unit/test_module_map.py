"""docs/architecture.md's module map stays true to the tree: every module of relaywatch/ is
named there, and every module it names exists (a text scan, nothing imported).

A module counts as named by its path (``store/queue.py``, ``relaywatch/incident.py``) anywhere
in the document, or by its bare name (``queue.py``) in a paragraph that names its folder
(``store/``): the stage paragraphs name their folder once and their modules bare."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "relaywatch"
DOC = ROOT / "docs" / "architecture.md"

# Names of modules that are gone, kept on purpose as history (what a debt was).
HISTORY = {"cli.py": "debt 6: the module the cli/ package replaced"}

PY_NAME = re.compile(r"[\w./]*\w\.py\b")


def paragraphs() -> list[str]:
    return re.split(r"\n\s*\n", DOC.read_text())


def modules() -> list[str]:
    """Every module of the package, as ``folder/name.py`` (``model.py`` at the top)."""
    return sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def is_named(module: str, text: str, paras: list[str]) -> bool:
    if module in PY_NAME.findall(text) or f"relaywatch/{module}" in PY_NAME.findall(text):
        return True
    folder, _, name = module.rpartition("/")
    return any(name in PY_NAME.findall(p) for p in paras if not folder or f"{folder}/" in p)


def test_every_module_is_in_the_map():
    text, paras = DOC.read_text(), paragraphs()
    unnamed = [m for m in modules() if not is_named(m, text, paras)]
    assert unnamed == [], "name these modules in docs/architecture.md (their stage's paragraph)"


def test_every_module_the_map_names_exists():
    known = {p.name for p in PACKAGE.rglob("*.py")}
    missing = []
    for name in sorted(set(PY_NAME.findall(DOC.read_text()))):
        path = name.removeprefix("relaywatch/")
        if name in HISTORY:
            continue
        if "/" in path:
            found = (PACKAGE / path).exists() or (ROOT / name).exists()
        else:
            found = (path in known or (ROOT / path).exists()
                     or any(any((ROOT / d).rglob(path)) for d in ("tests", "bench")))
        if not found:
            missing.append(name)
    assert missing == [], "docs/architecture.md names modules that do not exist"


def test_history_is_history():
    """A name kept as history is really gone (else it is a module and must be mapped)."""
    assert [n for n in HISTORY if (PACKAGE / n).exists()] == []


def test_every_module_says_its_job():
    """A docstring first in every module and package (STYLE: one module per job, its job said)."""
    import ast
    silent = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                    if not ast.get_docstring(ast.parse(p.read_text())))
    assert silent == []
