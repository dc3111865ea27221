"""The one way edgelink writes a file: private and atomic, whatever the umask or the directory.

A prompt's KV state, cache chunks, exports and keys are as secret as the prompt. Every file
edgelink creates is therefore 0600 and every directory 0700 (under a umask of 022 as much as
077), and a file appears under its name only when it is complete: it is written to a temporary
name in the same directory, opened with ``O_CREAT | O_EXCL | O_NOFOLLOW`` under a random name,
so a symbolic link or file that another local user planted in a shared directory is never
followed or overwritten, and then renamed over the target.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: str | Path) -> Path:
    """``path`` as a directory, created (with its missing parents) 0700. An existing
    directory is left as it is: it may be one the user shares on purpose."""
    path = Path(path)
    if not path.is_dir():
        missing = []
        p = path
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        for p in missing:
            with contextlib.suppress(OSError):
                os.chmod(p, DIR_MODE)  # mkdir's mode is reduced by the umask; this is not
    return path


def _open_new(path: Path, mode: int) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    os.fchmod(fd, mode)
    return fd


def new_temp(path: str | Path, mode: int = FILE_MODE) -> tuple[Path, int]:
    """A new private file beside ``path`` under a random name: (its path, a writable fd).
    ``commit`` renames it over ``path``; ``discard`` removes it."""
    path = Path(path)
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    return tmp, _open_new(tmp, mode)


def commit(tmp: Path, path: str | Path) -> None:
    os.replace(tmp, path)


def discard(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp)


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: int = FILE_MODE) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new contents to; on a clean exit it replaces ``path``
    at once, on an error nothing changes and the temporary file is removed."""
    tmp, fd = new_temp(path, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        commit(tmp, path)
    except BaseException:
        discard(tmp)
        raise


def write_atomic(path: str | Path, data: bytes | memoryview | Iterable[bytes | memoryview],
                 mode: int = FILE_MODE) -> int:
    """Write ``data`` (bytes, or an iterable of buffers) to ``path`` privately and atomically;
    returns the bytes written."""
    parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    n = 0
    with atomic_writer(path, mode) as f:
        for part in parts:
            n += f.write(part)
    return n


def create_private(path: str | Path, data: bytes, mode: int = FILE_MODE) -> bool:
    """Create ``path`` with ``data`` unless it exists (no link followed, nothing replaced);
    True when this call created it. For a file that must never change once made (a key)."""
    path = Path(path)
    private_dir(path.parent)
    try:
        fd = _open_new(path, mode)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True
