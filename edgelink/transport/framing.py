"""Frame layout shared by the byte-stream transports: a u64 little-endian length, then the bytes.

Also the two pieces every receiver needs: turning caller parts into flat byte views without
copying them, and a reusable receive buffer whose memory follows the bytes that arrive.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Protocol

from edgelink.errors import MessageTooLarge, TransportError
from edgelink.protocol.buffers import RecvBuffer
from edgelink.protocol.limits import describe_bytes

HEADER = struct.Struct("<Q")
HEADER_BYTES = HEADER.size

class FrameSink(Protocol):
    """Where a transport writes one frame's bytes, in order: ``start(length)`` gives the first
    buffer, ``filled()`` the next once that one is full (None when the frame is complete).
    The sink decides where bytes land (``protocol.reader.FrameReader`` puts each tensor where
    its consumer wants it); the transport only copies, and never reads what it copies."""

    def start(self, length: int) -> memoryview: ...

    def filled(self) -> memoryview | None: ...


def byte_views(parts: Iterable[object]) -> tuple[list[memoryview], int]:
    """Flat unsigned-byte views of ``parts`` (no copy) and their total length.

    A part can be anything exporting a C-contiguous buffer: bytes, bytearray, memoryview,
    a numpy array, an mmap.
    """
    views = []
    total = 0
    for i, part in enumerate(parts):
        try:
            view = memoryview(part)  # type: ignore[arg-type]
        except TypeError as exc:
            raise TransportError(f"frame part {i} is not a buffer: {type(part).__name__}") from exc
        if not view.c_contiguous:
            raise TransportError(f"frame part {i} is not C-contiguous; pass a contiguous copy")
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        views.append(view)
        total += view.nbytes
    return views, total


def check_length(length: int, max_bytes: int, where: str) -> None:
    """Raise MessageTooLarge for a declared length above the bound (call before allocating)."""
    if length > max_bytes:
        raise MessageTooLarge(
            f"{where}: a frame of {describe_bytes(length)} is more than this side accepts "
            f"({describe_bytes(max_bytes)}: protocol.max_message_bytes plus headers, or "
            "node.max_message_bytes on a node; 0 derives them from the model and n_ctx)"
        )




class WholeFrame:
    """The plainest frame sink: the whole frame, contiguous, in a reused ``RecvBuffer``."""

    def __init__(self, buf: RecvBuffer):
        self._buf = buf
        self.view = memoryview(b"")

    def start(self, length: int) -> memoryview:
        self.view = self._buf.view(length)
        return self.view

    def filled(self) -> None:
        return None


class Scatter:
    """Writes a frame's bytes, in order, into the buffers a sink hands out (see ``FrameSink``).

    ``room(n)`` is a view of the next ``n`` bytes when the sink's current buffer holds them, so
    a transport can decrypt or copy straight into place; ``write`` copies across buffers."""

    def __init__(self, sink: FrameSink, length: int):
        self._sink = sink
        self.remaining = length
        self._buf: memoryview | None = sink.start(length)
        self._pos = 0
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._buf is not None and self._pos == self._buf.nbytes:
            self._buf, self._pos = self._sink.filled(), 0

    def current(self) -> memoryview | None:
        """The rest of the sink's current buffer (None once the frame is complete)."""
        return None if self._buf is None else self._buf[self._pos:]

    def advance(self, n: int) -> None:
        self._pos += n
        self.remaining -= n
        self._skip_empty()

    def room(self, n: int) -> memoryview | None:
        if self._buf is not None and self._buf.nbytes - self._pos >= n:
            return self._buf[self._pos:self._pos + n]
        return None

    def write(self, data: memoryview) -> None:
        data = memoryview(data).cast("B")
        while data.nbytes:
            if self._buf is None:
                raise TransportError("frame sink took fewer bytes than the frame holds")
            k = min(data.nbytes, self._buf.nbytes - self._pos)
            self._buf[self._pos:self._pos + k] = data[:k]
            data = data[k:]
            self.advance(k)
