"""A content-addressed store of KV chunks in two bounded tiers: RAM (this process) and a disk
directory (shared by every process that names it). Values are opaque verified message files
(``cache/prefix.py`` makes and reads them); this module only keeps, finds and evicts bytes.

Disk: one file per key, ``<dir>/<key[:2]>/<key>.elk``. Written to a unique temporary name and
renamed into place, so a reader sees a whole file or none, and several processes may share the
directory: a file another process evicts between listing and reading is simply a miss. A file's
modification time is its last use (touched on each hit), which is what eviction goes by. Bytes
read back are never trusted here: the prefix cache verifies every chunk before it is applied,
and drops the file when it does not verify.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

from edgelink.errors import ConfigError
from edgelink.files import private_dir, write_atomic

_KEY = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass
class TierStats:
    """One tier's contents and traffic since this process started."""

    entries: int = 0
    bytes: int = 0
    capacity: int = 0
    hits: int = 0
    misses: int = 0
    evicted: int = 0


class ChunkStore:
    """RAM and disk tiers of chunk bytes, each bounded (``ram_bytes``, ``disk_bytes``; 0 turns
    a tier off), least recently used evicted first."""

    def __init__(self, directory: Path | None, ram_bytes: int, disk_bytes: int):
        if ram_bytes < 0 or disk_bytes < 0:
            raise ConfigError("cache.ram_bytes and cache.disk_bytes must be 0 or more")
        self.dir = Path(directory) if directory is not None and disk_bytes > 0 else None
        self.ram_cap, self.disk_cap = ram_bytes, disk_bytes
        self._ram: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._ram_bytes = 0
        self._lock = threading.Lock()
        self.ram_stats = TierStats(capacity=ram_bytes)
        self.disk_stats = TierStats(capacity=disk_bytes)
        # Called with each key put here (a node announces its new chunks to the DHT).
        self.on_put: list[Callable[[str], None]] = []
        if self.dir is not None:
            try:
                private_dir(self.dir)
            except OSError as exc:
                raise ConfigError(f"cannot create the cache directory {self.dir}: {exc.strerror} "
                                  "(set cache.dir)") from None

    # ------------------------------------------------------------------ lookups

    def get(self, key: str) -> tuple[bytes, str] | None:
        """(bytes, tier) for ``key``, RAM first; a disk hit is promoted to RAM."""
        with self._lock:
            data = self._ram.get(key)
            if data is not None:
                self._ram.move_to_end(key)
                self.ram_stats.hits += 1
                return data, "ram"
            self.ram_stats.misses += 1
        path = self._path(key)
        if path is None:
            return None
        try:
            data = path.read_bytes()
            os.utime(path)  # last use, for eviction
        except OSError:
            self.disk_stats.misses += 1
            return None
        self.disk_stats.hits += 1
        self._put_ram(key, data)
        return data, "disk"

    def has(self, key: str) -> bool:
        with self._lock:
            if key in self._ram:
                return True
        path = self._path(key)
        return path is not None and path.is_file()

    # ------------------------------------------------------------------ writes

    def put(self, key: str, data: bytes) -> None:
        """Keep ``data`` under ``key`` in both tiers (each evicting what it must)."""
        self._keep(key, data)
        for listener in self.on_put:
            listener(key)

    def _keep(self, key: str, data: bytes) -> None:
        self._put_ram(key, data)
        path = self._path(key)
        if path is None or len(data) > self.disk_cap or path.exists():
            return
        try:
            write_atomic(path, data)
        except OSError:
            return  # a full disk costs the cache, never the caller
        self._evict_disk()

    def drop(self, key: str) -> None:
        """Forget ``key`` everywhere (a chunk that did not verify)."""
        with self._lock:
            data = self._ram.pop(key, None)
            if data is not None:
                self._ram_bytes -= len(data)
        path = self._path(key)
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()

    def clear_ram(self) -> None:
        """Empty the RAM tier (the disk tier stays)."""
        with self._lock:
            self._ram.clear()
            self._ram_bytes = 0

    def clear(self) -> int:
        """Remove every chunk of both tiers; returns how many disk files went."""
        with self._lock:
            self._ram.clear()
            self._ram_bytes = 0
        removed = 0
        for path, _, _ in self._disk_files():
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
        return removed

    # ------------------------------------------------------------------ state

    def stats(self) -> dict[str, TierStats]:
        with self._lock:
            self.ram_stats.entries, self.ram_stats.bytes = len(self._ram), self._ram_bytes
        files = self._disk_files()
        self.disk_stats.entries, self.disk_stats.bytes = len(files), sum(size for _, size, _ in files)
        return {"ram": self.ram_stats, "disk": self.disk_stats}

    def keys(self) -> list[str]:
        """Every key held in either tier."""
        with self._lock:
            ram = list(self._ram)
        return sorted(set(ram) | {k for k, _, _ in self.disk_keys()})

    def disk_keys(self) -> list[tuple[str, int, float]]:
        """(key, bytes, last use) of every chunk on disk, most recently used first."""
        return [(p.stem, size, used) for p, size, used in sorted(self._disk_files(), key=lambda f: -f[2])]

    def _path(self, key: str) -> Path | None:
        if self.dir is None or not _KEY.fullmatch(key):
            return None
        return self.dir / key[:2] / f"{key}.elk"

    def _disk_files(self) -> list[tuple[Path, int, float]]:
        if self.dir is None:
            return []
        out = []
        for path in self.dir.glob("??/*.elk"):
            try:
                st = path.stat()
            except OSError:
                continue  # evicted by another process meanwhile
            out.append((path, st.st_size, st.st_mtime))
        return out

    def _put_ram(self, key: str, data: bytes) -> None:
        if len(data) > self.ram_cap:
            return
        with self._lock:
            old = self._ram.pop(key, None)
            if old is not None:
                self._ram_bytes -= len(old)
            self._ram[key] = data
            self._ram_bytes += len(data)
            while self._ram_bytes > self.ram_cap:
                _, gone = self._ram.popitem(last=False)
                self._ram_bytes -= len(gone)
                self.ram_stats.evicted += 1

    def _evict_disk(self) -> None:
        files = self._disk_files()
        total = sum(size for _, size, _ in files)
        if total <= self.disk_cap:
            return
        for path, size, _ in sorted(files, key=lambda f: f[2]):
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size
                self.disk_stats.evicted += 1
            if total <= self.disk_cap:
                break

