"""The package layout stays readable: modules live in folders that name their layer or role,
every import follows the layer table in docs/architecture.md (the one place that rule lives),
and no module imports another that (directly or through others) imports it back, not even
inside a function."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import edgelink

ROOT = Path(edgelink.__file__).parent
TOP_LEVEL = {"__init__", "__main__", "config", "errors", "files"}
ARCHITECTURE = ROOT.parent / "docs" / "architecture.md"


def _layer_table() -> tuple[dict[str, str], dict[str, set[str]]]:
    """docs/architecture.md's table: which layer each module belongs to, and which layers each
    layer may import (besides its own modules)."""
    text = ARCHITECTURE.read_text()
    block = text[text.index("| layer | modules |"):]
    block = block[: block.index("\n\n")]
    owner: dict[str, str] = {}
    rows: dict[str, list[str]] = {}
    for line in block.splitlines()[2:]:
        layer, modules, _owns, imports, _outside = (c.strip() for c in line.strip("|").split("|"))
        for m in re.findall(r"`([a-z_]+)(?:/|\.py)`", modules):
            owner[m] = layer
        rows[layer] = [w.strip() for w in imports.split(",")]
    everything = set(rows)
    allowed = {}
    for layer, names in rows.items():
        if names == ["everything"]:
            allowed[layer] = everything
        elif names == ["everything but cli"]:
            allowed[layer] = everything - {"cli", "front"}
        elif names == ["—"]:
            allowed[layer] = set()
        else:
            unknown = set(names) - everything
            assert not unknown, f"docs/architecture.md names layers that have no row: {unknown}"
            allowed[layer] = set(names)
        allowed[layer] |= {layer}
    return owner, allowed


def _layer_of(module: str, owner: dict[str, str]) -> str:
    parts = module.split(".")
    return owner.get(parts[1] if len(parts) > 1 else "__init__", "")


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        name = ".".join(("edgelink", *p.relative_to(ROOT).with_suffix("").parts))
        out[name.removesuffix(".__init__")] = p
    return out


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Every edgelink module ``path`` imports, at its top or inside functions; imports under
    ``if TYPE_CHECKING:`` cost nothing at run time and are left out."""
    tree = ast.parse(path.read_text())
    typing_only = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.dump(n.test):
            typing_only.update(id(x) for b in n.body for x in ast.walk(b))
    out = set()
    for n in ast.walk(tree):
        if id(n) in typing_only:
            continue
        assert not (isinstance(n, ast.ImportFrom) and n.level), f"{path}: use absolute imports"
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


def test_every_import_follows_the_layer_table():
    owner, allowed = _layer_table()
    mods = _modules()
    unowned = sorted(m for m in mods if not _layer_of(m, owner))
    assert unowned == [], f"give these a row in docs/architecture.md's layer table: {unowned}"
    wrong = []
    for m, p in sorted(mods.items()):
        mine = _layer_of(m, owner)
        for d in sorted(_imports(p, mods)):
            if d == "edgelink":
                continue  # the package itself: only __version__ is read this way (checked below)
            theirs = _layer_of(d, owner)
            if theirs not in allowed[mine]:
                wrong.append(f"{m} ({mine}) imports {d} ({theirs})")
    assert wrong == [], "imports against docs/architecture.md's layer table:\n" + "\n".join(wrong)


def test_low_layers_read_only_the_version_from_the_package_top():
    """``from edgelink import load`` inside a low layer would be an upward import in disguise."""
    owner, _ = _layer_table()
    mods = _modules()
    native = {p.name.split(".")[0] for p in ROOT.glob("_*.so")} | {"_native", "_evalhook"}
    bad = []
    for m, p in mods.items():
        if _layer_of(m, owner) in ("front", "cli", "bench"):
            continue
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.ImportFrom) and n.module == "edgelink" and not n.level:
                bad += [f"{m}: {a.name}" for a in n.names
                        if a.name != "__version__" and f"edgelink.{a.name}" not in mods
                        and a.name not in native]
    assert bad == [], f"import these from their own modules: {bad}"


# Private names of objects edgelink does not own, read on purpose (each with its reason).
FOREIGN_PRIVATES = {
    # from_llama adopts a llama_cpp.Llama's model and context: they are only reachable there.
    ("edgelink.api.interop", "_model"), ("edgelink.api.interop", "_ctx"),
}


def test_private_names_stay_in_the_module_that_defines_them():
    """A module reads another's ``_name`` only through a public name: then the owner can change
    its insides without breaking a layer it does not know about."""
    mods = _modules()
    trees = {m: ast.parse(p.read_text()) for m, p in mods.items()}
    defined: dict[str, set[str]] = {}
    for m, tree in trees.items():
        names = set()
        for n in ast.walk(tree):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(n.name)
            elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
                names.add(n.attr)
            elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                names.add(n.id)
            elif isinstance(n, ast.arg):
                names.add(n.arg)
        defined[m] = names
    ours = set().union(*defined.values())
    bad = []
    for m, tree in trees.items():
        for n in ast.walk(tree):
            if not (isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")):
                continue
            if isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"):
                continue
            if n.attr in defined[m] or n.attr not in ours or (m, n.attr) in FOREIGN_PRIVATES:
                continue
            bad.append(f"{mods[m].relative_to(ROOT.parent)}:{n.lineno}: {ast.unparse(n)}")
    assert bad == [], "give these a public name in the module that owns them:\n" + "\n".join(bad)
