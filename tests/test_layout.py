"""DESIGN.md's layout: dependencies point one way. Checked from the imports in the source."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = {"egress", "tagging", "db", "cli", "tests"}

# package (or module) -> the packages of ours it may import
ALLOWED = {
    "egress/records.py": set(),
    "egress": {"egress", "tagging"},
    "tagging": {"tagging", "egress.records"},
    "db": {"db", "egress.records", "tagging"},
    "cli": OURS - {"tests"},
}


def imports(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def rule_for(rel: str):
    return ALLOWED.get(rel, ALLOWED[rel.split("/")[0]])


SOURCES = [p for top in ("egress", "tagging", "db", "cli") for p in (ROOT / top).rglob("*.py")]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_one_way(path):
    rel = str(path.relative_to(ROOT))
    allowed = rule_for(rel)
    for name in imports(path):
        if name.split(".")[0] not in OURS:
            continue
        ok = any(name == a or name.startswith(a + ".") for a in allowed)
        assert ok, f"{rel} imports {name}; it may import only {sorted(allowed) or 'nothing of ours'}"


def test_egress_init_has_no_engine_imports():
    # KERNEL.md: importing egress.records runs egress/__init__.py first.
    assert not list(imports(ROOT / "egress" / "__init__.py"))
