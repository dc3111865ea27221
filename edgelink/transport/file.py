"""File transport: frames written to and read back from a file, same framing as shared memory.

A file holds frames back to back, each a u64 little-endian length then that many bytes. The
writer never joins parts in memory; the reader reads each frame into one reusable buffer with
``readinto`` and hands out a memoryview of it (valid until the next ``recv``).
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from edgelink.errors import PeerGone, ProtocolError, TransportError, TruncatedMessage
from edgelink.files import FILE_MODE, commit, discard, new_temp
from edgelink.transport.framing import HEADER, HEADER_BYTES, RecvBuffer, byte_views, check_length


class FileChannelWriter:
    """Writes frames to ``path`` (``append=True`` adds to its end).

    A new file is written privately (0600) under a temporary name and appears under ``path``
    only at ``close()``, complete; leaving a ``with`` block on an error removes it and leaves
    whatever ``path`` held before. A device or pipe (``/dev/stdout``) is written in place."""

    def __init__(self, path: str | os.PathLike[str], *, append: bool = False):
        self.path = Path(path)
        self._tmp: Path | None = None
        try:
            if append or _special(self.path):
                flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
                if not _special(self.path):
                    flags |= os.O_NOFOLLOW
                fd = os.open(self.path, flags, FILE_MODE)
            else:
                self._tmp, fd = new_temp(self.path)
            # Unbuffered: parts are written straight from the caller's memory, never copied
            # into a Python-side buffer first.
            self._f = os.fdopen(fd, "ab" if append else "wb", buffering=0)
        except OSError as exc:
            raise TransportError(f"cannot open {self.path} for writing: {exc.strerror}") from exc
        self.frames = 0

    def send(self, *parts) -> None:
        """Append one frame made of ``parts`` (any C-contiguous buffers) to the file."""
        if self._f.closed:
            raise TransportError(f"{self.path}: writer is closed")
        views, total = byte_views(parts)
        try:
            self._write_all(memoryview(HEADER.pack(total)))
            for view in views:
                self._write_all(view)
        except OSError as exc:
            raise TransportError(f"cannot write to {self.path}: {exc.strerror}") from exc
        self.frames += 1

    def _write_all(self, view: memoryview) -> None:
        # A raw write may be short (signals, pipes, quotas): loop until it is all out.
        while view.nbytes:
            n = self._f.write(view)
            view = view[n:]

    def flush(self, fsync: bool = False) -> None:
        """Nothing is buffered in Python; ``fsync=True`` also forces the data to disk."""
        if fsync and not self._f.closed:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        """Close the file; a new one now appears under its name."""
        if self._f.closed:
            return
        self._f.close()
        if self._tmp is not None:
            try:
                commit(self._tmp, self.path)
            except OSError as exc:
                discard(self._tmp)
                raise TransportError(f"cannot write {self.path}: {exc.strerror}") from exc
            self._tmp = None

    def abort(self) -> None:
        """Close without keeping what was written (the old file, if any, stays)."""
        self._f.close()
        if self._tmp is not None:
            discard(self._tmp)
            self._tmp = None

    def __enter__(self) -> FileChannelWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _special(path: Path) -> bool:
    """A character device, pipe or socket (``/dev/stdout``, a FIFO): written in place."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def frame_bytes(*parts) -> bytes:
    """One frame made of ``parts`` as a file holds it (a message file in memory)."""
    views, total = byte_views(parts)
    return HEADER.pack(total) + b"".join(bytes(v) for v in views)


class FileChannelReader:
    """Reads frames from ``path`` (or from ``bytes`` holding a file's content) in order.

    ``recv`` raises MessageTooLarge (declared length above ``max_bytes``) or TruncatedMessage
    (the file ends inside a frame, or declares more than the file holds) before allocating,
    and PeerGone at a clean end of file: no more frames. Iterating yields frames until then.
    """

    def __init__(self, path: str | os.PathLike[str] | bytes, *, magic: bytes | None = None):
        """``magic``: the bytes every frame of this kind of file starts with (the caller's
        protocol knows them; this layer only compares). A file whose first frame does not start
        with them is refused at once as some other kind of file, instead of its first 8 bytes
        being read as an absurd frame length."""
        if isinstance(path, bytes):
            self.path = Path("<memory>")
            self._f: io.RawIOBase | io.BytesIO = io.BytesIO(path)
            self._size = len(path)
        else:
            self.path = Path(path)
            try:
                self._f = open(self.path, "rb", buffering=0)
            except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
                raise TransportError(f"cannot open {str(self.path)[:200]!r}: "
                                     f"{getattr(exc, 'strerror', None) or exc}") from None
            self._size = os.fstat(self._f.fileno()).st_size
        self._pos = 0
        if magic:
            self._check_magic(magic)
        self._hdr = bytearray(HEADER_BYTES)
        self._buf = RecvBuffer()
        self.frames = 0

    def recv(self, max_bytes: int, timeout: float | None = None) -> memoryview:
        """The next frame as a memoryview valid until the next call. ``timeout`` is unused:
        a file never makes the reader wait."""
        if self._f.closed:
            raise TransportError(f"{self.path}: reader is closed")
        got = self._read_into(memoryview(self._hdr))
        if got == 0:
            raise PeerGone(f"{self.path}: end of file after {self.frames} frame(s)")
        if got < HEADER_BYTES:
            raise TruncatedMessage(
                f"{self.path}: file ends inside the length of frame {self.frames} "
                f"({got} of {HEADER_BYTES} bytes)"
            )
        (length,) = HEADER.unpack(self._hdr)
        check_length(length, max_bytes, str(self.path))
        left = self._size - self._pos
        if length > left:
            # Checked before allocating: a corrupt length must not cost its size in memory.
            raise TruncatedMessage(
                f"{self.path}: frame {self.frames} declares {length} bytes, the file holds "
                f"only {left} more"
            )
        view = self._buf.view(length)
        got = self._read_into(view)
        if got < length:  # the file shrank under us
            raise TruncatedMessage(f"{self.path}: frame {self.frames} has {got} of {length} bytes")
        self.frames += 1
        return view

    def _check_magic(self, magic: bytes) -> None:
        want = HEADER_BYTES + len(magic)
        if isinstance(self._f, io.BytesIO):
            head = self._f.getvalue()[:want]
        else:
            try:
                head = os.pread(self._f.fileno(), want, 0)
            except OSError as exc:
                raise TransportError(f"cannot read {self.path}: {exc.strerror}") from exc
        found = head[HEADER_BYTES:]
        if found and not magic.startswith(found):  # shorter files: recv says they are truncated
            self.close()
            raise ProtocolError(
                f"{self.path} is not an edgelink message file (one that `edgelink export` or "
                "Snapshot.save writes): its first frame does not start with edgelink's magic bytes")

    def _read_into(self, view: memoryview) -> int:
        total = 0
        try:
            while total < view.nbytes:
                n = self._f.readinto(view[total:])
                if not n:
                    break
                total += n
        except OSError as exc:
            raise TransportError(f"cannot read {self.path}: {exc.strerror}") from exc
        self._pos += total
        return total

    def __iter__(self) -> Iterator[memoryview]:
        """Frames until a clean end of file, with no size bound beyond the file itself."""
        while True:
            try:
                yield self.recv(self._size)
            except PeerGone:
                return

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> FileChannelReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
