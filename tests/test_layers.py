"""The packages point one way (miner -> backends -> models) and the engine's rooms import no other room, read
from the code's own imports with ast: a newcomer can read models/ alone, backends/ with models/, and each
engine room with work.py."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"models": set(), "backends": {"models"}, "miner": {"backends", "models"}}
ROOMS = {"admission", "kv", "sampling"}


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth of its code (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_no_package_imports_one_above_it():
    wrong = []
    for package, allowed in LAYERS.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in imports(path):
                top = name.split(".")[0]
                if top in LAYERS and top != package and top not in allowed:
                    wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_the_engines_rooms_import_no_other_room():
    wrong = []
    for room in sorted(ROOMS):
        for name in imports(ROOT / "backends" / "engine" / f"{room}.py"):
            parts = name.split(".")
            if parts[:2] == ["backends", "engine"] and len(parts) > 2 and parts[2] in ROOMS - {room}:
                wrong.append(f"{room}.py imports {name}")
    assert not wrong, "\n".join(wrong)
