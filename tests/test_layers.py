"""The import rules of docs/architecture.md that hold today, checked from the source (no imports run)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

RAYDC = Path(__file__).resolve().parents[1] / "raydc"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


def _under(module: str, roots: tuple[str, ...]) -> bool:
    return any(module == r or module.startswith(r + ".") for r in roots)


@pytest.mark.parametrize("files, forbidden", [
    (sorted((RAYDC / "core").glob("*.py")), ("ray", "raydc.engine", "raydc.methods", "raydc.sweep")),
    ([RAYDC / "plots.py"], ("ray", "raydc")),
    # a method is handed typed contexts (raydc.methods.api): it never reaches into the engine, nor into Ray
    (sorted((RAYDC / "methods").glob("*.py")), ("ray", "raydc.engine", "raydc.sweep")),
])
def test_layers_do_not_import_what_they_must_not(files, forbidden):
    bad = {f"{p.relative_to(RAYDC.parent)}: {m}" for p in files for m in imported_modules(p) if _under(m, forbidden)}
    assert not bad, sorted(bad)


def test_the_check_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\ndef g():\n    import ray.train\n    from raydc.engine import loop\n")
    assert imported_modules(f) == {"os", "ray.train", "raydc.engine"}
