"""db imports only the vocabulary and tagging (DESIGN.md's layout)."""

import ast
from pathlib import Path

import db

ALLOWED = {"db", "egress.records", "tagging"}
OURS = {"db", "egress", "tagging", "cli", "tests"}


def test_db_imports_only_records_and_tagging():
    root = Path(db.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in OURS:
                    assert any(name == a or name.startswith(a + ".") for a in ALLOWED), \
                        f"{path.relative_to(root.parent)} imports {name}"
