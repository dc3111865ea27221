"""Every file path and dotted name that the docs, docstrings and comments quote still exists, so a
moved module cannot leave a stale pointer behind (they rotted silently before this test)."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import edgelink
from edgelink.config import config_keys

PKG = Path(edgelink.__file__).parent
REPO = PKG.parent
LAYERS = {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()}
CONFIG_KEYS = set(config_keys())
MODULE_FILES = {p.stem for p in PKG.rglob("*.py") if p.stem != "__init__"}

# A path from the repository's top: edgelink/roles/sender.py, tests/test_x.py, docs/...
TOP_PATH = re.compile(r"(?<![\w/.-])((?:edgelink|tests|tools|docs|native)/[\w/.-]*\w)")
# edgelink.roles.sender.Sender
FULL_NAME = re.compile(r"(?<![\w.])(edgelink(?:\.\w+)+)")
QUOTED = re.compile(r"`([^`\s]+)`")


def _texts() -> list[tuple[str, str]]:
    out = [(str(p.relative_to(REPO)), p.read_text()) for p in
           [*REPO.glob("docs/*.md"), REPO / "README.md", *REPO.glob("bridges/*.md")]]
    for p in PKG.rglob("*.py"):
        where = str(p.relative_to(REPO))
        source = p.read_text()
        for n in ast.walk(ast.parse(source)):
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(n, clean=False)
                if doc:
                    out.append((f"{where}:{getattr(n, 'lineno', 1)}", doc))
        for i, line in enumerate(source.splitlines(), 1):
            if "#" in line:
                out.append((f"{where}:{i}", line[line.index("#"):]))
    return out


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def _is_module(layer: str, name: str) -> bool:
    return (PKG / layer / f"{name}.py").is_file() or (PKG / layer / name / "__init__.py").is_file()


def _stale(where: str, text: str) -> list[str]:
    bad = []
    for m in TOP_PATH.finditer(text):
        ref = m.group(1)
        if not (REPO / ref).exists():
            bad.append(f"{where}: {ref}")
    for m in FULL_NAME.finditer(text):
        name = m.group(1)
        if not name.endswith((".py", ".md", ".cfg", ".toml")) and not _resolves(name):
            bad.append(f"{where}: {name}")
    for m in QUOTED.finditer(text):
        tok = re.sub(r"\(.*$", "", m.group(1)).rstrip(".,:;")
        if re.fullmatch(r"(\w+/)+\w+\.py", tok):  # a path inside the package, or from the top
            if not ((REPO / tok).exists() or (PKG / tok).exists()):
                bad.append(f"{where}: {tok}")
        elif re.fullmatch(r"\w+(\.\w+)+", tok) and tok not in CONFIG_KEYS:
            parts = tok.split(".")
            # `roles.sender.Sender`, `api.Model`, `kinds.x.y`: a layer, then one of its modules,
            # a class, or a longer path (`bridge.source_layer` is an attribute, left alone)
            if parts[0] in LAYERS and (_is_module(*parts[:2]) or parts[1][:1].isupper() or len(parts) > 2) \
                    and not _resolves(f"edgelink.{tok}"):
                bad.append(f"{where}: {tok}")
            elif parts[0] not in LAYERS and parts[0].islower() and len(parts[0]) > 2 \
                    and parts[1] in MODULE_FILES and not _importable(parts[0]):
                bad.append(f"{where}: {tok}")  # one of our modules under a folder that is gone
    return bad


def _importable(top: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def test_quoted_paths_and_names_exist():
    bad = [b for where, text in _texts() for b in _stale(where, text)]
    assert bad == [], "stale references (fix the text, or the name it points at):\n" + "\n".join(bad)


def test_the_check_catches_a_stale_reference():
    assert _stale("x", "see edgelink/latent/bridged.py and `kinds.receive.register_latent`") == [
        "x: edgelink/latent/bridged.py", "x: kinds.receive.register_latent"]
    assert _stale("x", "``edgelink.net.crypto.e2e``, `roles.Sender`, `cache.peers`") == [
        "x: edgelink.net.crypto.e2e", "x: roles.Sender"]
    assert _stale("x", "`roles.sender.Sender`, edgelink/kinds/specs.py, `api.model.Model.restore`") == []
    assert _stale("x", "``latent.bridged.bridge_claim``, `libp2p.relay.circuit_v2`") == [
        "x: latent.bridged.bridge_claim"]
