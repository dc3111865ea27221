"""Frame layout shared by the byte-stream transports: a u64 little-endian length, then the bytes.

Also the two pieces every receiver needs: turning caller parts into flat byte views without
copying them, and a reusable receive buffer whose memory follows the bytes that arrive.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterable

import numpy as np

from edgelink.errors import MessageTooLarge, TransportError
from edgelink.protocol.limits import describe_bytes

HEADER = struct.Struct("<Q")
HEADER_BYTES = HEADER.size
# Receive buffers grow in steps of this size so a stream of slightly growing frames does not
# reallocate (and re-fault) on every frame.
GROW_STEP = 1 << 20


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


class RecvBuffer:
    """A receive buffer reused across frames; ``view(n)`` is valid until the next ``view``.

    A frame's length is only a claim until its bytes arrive, so a larger buffer is reserved as
    anonymous memory that the kernel commits page by page as the transport writes into it:
    a bare length of a gigabyte costs address space, not memory, and memory follows the bytes
    actually received. Once grown, the buffer is reused (already faulted) for later frames;
    views handed out earlier keep the old memory alive until they are dropped.
    """

    def __init__(self, initial: int = 0):
        self._arr = np.empty(0, dtype=np.uint8)
        if initial:
            self._grow(initial)

    @property
    def capacity(self) -> int:
        return int(self._arr.nbytes)

    def _grow(self, n: int) -> None:
        size = -(-n // GROW_STEP) * GROW_STEP
        self._arr = np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8)

    def view(self, n: int) -> memoryview:
        if n > self._arr.nbytes:
            self._grow(n)
        return memoryview(self._arr)[:n]
