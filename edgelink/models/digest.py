"""Weights digest: the blake3 hash of a whole model file, cached in a JSON sidecar.

Two peers may exchange internal state only when they run byte-identical weights; the digest is
how they prove it. Hashing a large file costs seconds, so digests are remembered in
``<cache_dir>/digests.json`` keyed by absolute path, together with the file's size and mtime_ns:
a change to either invalidates the entry.

A file modified within the last :data:`RACY_WINDOW_NS` of being hashed is not cached: a second
write in the same timestamp tick with the same size would otherwise go unnoticed (the "racy
git" problem), and tests rewrite tiny models in place within milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3

from edgelink.errors import ModelError

if TYPE_CHECKING:
    from edgelink.config import Config

SIDECAR_NAME = "digests.json"
SIDECAR_VERSION = 1
READ_BLOCK = 4 << 20
RACY_WINDOW_NS = 2_000_000_000


def sidecar_path(cfg: Config) -> Path:
    return cfg.paths.cache_dir / SIDECAR_NAME


def hash_file(path: str | os.PathLike[str]) -> str:
    """blake3 hex digest of a whole file, multi-threaded and memory-mapped when supported."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    update_mmap = getattr(hasher, "update_mmap", None)
    if update_mmap is not None:
        update_mmap(os.fspath(path))
    else:  # pragma: no cover - blake3 < 0.4
        with open(path, "rb") as fh:
            while block := fh.read(READ_BLOCK):
                hasher.update(block)
    return hasher.hexdigest()


def weights_digest(path: str | os.PathLike[str], cfg: Config) -> str:
    """blake3 hex (64 chars) of the file at ``path``, from the sidecar cache when still valid."""
    key = str(Path(path).expanduser().resolve())
    try:
        before = os.stat(key)
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    sidecar = sidecar_path(cfg)
    hit = _load(sidecar).get(key)
    if (isinstance(hit, dict) and hit.get("size") == before.st_size
            and hit.get("mtime_ns") == before.st_mtime_ns and _is_hex(hit.get("blake3"))):
        return hit["blake3"]

    started_ns = time.time_ns()
    try:
        digest = hash_file(key)
        after = os.stat(key)
    except OSError as exc:
        raise ModelError(f"cannot hash model file {path}: {exc.strerror or exc}") from exc
    stable = (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    racy = started_ns - before.st_mtime_ns < RACY_WINDOW_NS
    if stable and not racy:
        _store(sidecar, key, {"size": before.st_size, "mtime_ns": before.st_mtime_ns,
                              "blake3": digest})
    return digest


def _is_hex(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _load(sidecar: Path) -> dict[str, Any]:
    """The entries of the sidecar; missing, unreadable or corrupt means empty."""
    try:
        with open(sidecar, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != SIDECAR_VERSION:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _store(sidecar: Path, key: str, value: dict[str, Any]) -> None:
    """Add one entry: re-read, merge, drop entries of vanished files, write atomically.

    The cache is an optimization; failing to write it is not an error.
    """
    entries = _load(sidecar)  # re-read just before writing, to keep concurrent writers' entries
    entries = {k: v for k, v in entries.items() if k != key and os.path.exists(k)}
    entries[key] = value
    payload = json.dumps({"version": SIDECAR_VERSION, "entries": entries}, indent=1, sort_keys=True)
    try:
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{sidecar.name}.", suffix=".tmp", dir=sidecar.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(payload)
        os.replace(tmp, sidecar)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
