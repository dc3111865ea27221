"""A reusable receive buffer whose memory follows the bytes that arrive."""

from __future__ import annotations

import mmap

import numpy as np

# Receive buffers grow in steps of this size so a stream of slightly growing frames does not
# reallocate (and re-fault) on every frame.
GROW_STEP = 1 << 20


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

    def array(self, n: int) -> np.ndarray:
        """The first ``n`` bytes as a uint8 array (grown first if needed)."""
        if n > self._arr.nbytes:
            self._grow(n)
        return self._arr[:n]

    def release(self) -> None:
        """Give the memory back (views handed out keep theirs alive until they are dropped)."""
        self._arr = np.empty(0, dtype=np.uint8)

    def view(self, n: int) -> memoryview:
        return memoryview(self.array(n))
