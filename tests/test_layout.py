"""The package layout stays readable: modules live in folders that name their layer or role,
and no module imports another that (directly or through others) imports it back, not even
inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import edgelink

ROOT = Path(edgelink.__file__).parent
TOP_LEVEL = {"__init__", "__main__", "config", "errors", "files"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        name = ".".join(("edgelink", *p.relative_to(ROOT).with_suffix("").parts))
        out[name.removesuffix(".__init__")] = p
    return out


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text())
    typing_only = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.dump(n.test):
            typing_only.update(id(x) for b in n.body for x in ast.walk(b))
    out = set()
    for n in ast.walk(tree):
        if id(n) in typing_only:
            continue
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("edgelink"):
            for a in n.names:
                full = f"{n.module}.{a.name}"
                out.add(full if full in known else n.module)
        elif isinstance(n, ast.Import):
            out.update(a.name for a in n.names if a.name.startswith("edgelink"))
    return {m for m in out if m in known}


def test_no_import_cycles_even_inside_functions():
    mods = _modules()
    graph = {m: _imports(p, mods) - {m} for m, p in mods.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_modules_live_in_folders_that_name_their_layer():
    loose = sorted(p.stem for p in ROOT.glob("*.py") if p.stem not in TOP_LEVEL)
    assert loose == [], f"put these in a layer's folder (docs/architecture.md): {loose}"
