"""Every module the project imports is declared in pyproject.toml.

A module that arrives only as another package's dependency (trio and multiaddr through
libp2p) or was installed by hand once (zstandard) works on the machine that has it and breaks a
fresh install; this reads every import in the tree and maps it to the distribution that
provides it in this environment.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = {"edgelink", "tests", "conftest", "gguf_variants"}
if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> dict[str, str]:
    """Normalized distribution name -> where pyproject declares it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {}
    for req in project["dependencies"]:
        out[_norm(re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0])] = "dependencies"
    for extra, reqs in project.get("optional-dependencies", {}).items():
        for req in reqs:
            out.setdefault(_norm(re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0]), f"[{extra}]")
    return out


def _imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for folder in ("edgelink", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_import_is_declared():
    declared = _declared()
    providers = importlib.metadata.packages_distributions()
    problems = []
    for module, where in sorted(_imports().items()):
        if module in sys.stdlib_module_names or module in FIRST_PARTY or module == "__future__":
            continue
        dists = {_norm(d) for d in providers.get(module, [])}
        if not dists and _norm(module) in declared:
            continue  # an extra (or a backport) not installed here, declared under its own name
        if not dists:
            problems.append(f"{module} (imported by {sorted(where)[0]}) is not installed, "
                            "so its distribution cannot be checked")
            continue
        if not dists & declared.keys():
            problems.append(f"{module} (from {', '.join(sorted(dists))}; imported by "
                            f"{', '.join(sorted(where)[:3])}) is not declared in pyproject.toml")
    assert not problems, "\n".join(problems)
