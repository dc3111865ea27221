"""A single-producer single-consumer byte ring inside a shared mapping (mmap of a shm file).

Layout at ``offset`` (each side's hot fields on its own 64-byte line, so the writer updating its
index never invalidates the line the reader updates):

    +0    magic u64, version u64, capacity u64                     constant after create
    +64   write index u64   (total bytes ever written; store-release by the writer)
    +72   data seq u32      (writer bumps after publishing: "data available")
    +80   writer closed u64
    +88   jump index u64    (see "Hot window" below; all ones when none)
    +128  read index u64    (total bytes ever consumed; store-release by the reader)
    +136  space seq u32     (reader bumps after consuming: "space available")
    +144  reader closed u64
    +256  data, ``capacity`` bytes; byte i of the stream lives at data[i % capacity]

Indices grow monotonically (u64 never wraps in practice), so ``write - read`` is the fill level
and no slot is sacrificed to tell full from empty. Data moves with the native ``copy`` (one copy
caller -> ring, one copy ring -> reader's buffer), published in chunks so that a large transfer
pipelines: the reader drains chunk k while the writer fills chunk k+1.

Hot window: copying through a ring costs two memory passes. When the 64 MiB ring is walked end
to end, every ring line is cold (DRAM) for the writer and evicted again after the reader, so a
transfer moves twice the DRAM traffic of a memcpy. While the reader keeps up, the writer
therefore wraps early: at a position past ``window_bytes`` it records ``jump index = w`` and
skips to the start of the next lap (the skipped bytes count as used until the reader, arriving
at the jump index, skips them too). The ring then behaves like a small, cache-resident one. When
the reader is absent or far behind, the writer never jumps and the full capacity buffers data.

Blocking is a wait on the peer's sequence word (a futex on Linux, polling with back-off
elsewhere or with ``shm.wait = poll``: see ``waiter``), sliced by ``liveness_interval_s``: after
each empty slice the ``peer_alive`` callback is asked whether the peer still exists, which turns
a crashed peer into PeerGone within one interval instead of a hang.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from edgelink.errors import PeerGone, TransportError, TransportTimeout

try:
    from edgelink import _native
except ImportError as _exc:  # pragma: no cover - exercised only on a broken install
    _native = None
    _NATIVE_ERROR: ImportError | None = _exc
else:
    _NATIVE_ERROR = None

MAGIC = 0x3147_4E49_524C_4745  # b"EGLRING1" little-endian
VERSION = 1
HEADER_BYTES = 256
ALIGN = 64

_OFF_MAGIC = 0
_OFF_VERSION = 8
_OFF_CAPACITY = 16
_OFF_WRITE = 64
_OFF_DATA_SEQ = 72
_OFF_WRITER_CLOSED = 80
_OFF_JUMP = 88
_OFF_READ = 128
_OFF_SPACE_SEQ = 136
_OFF_READER_CLOSED = 144

# Bytes copied (and published) per step. Smaller steps let the reader start sooner; larger ones
# cost fewer wake-ups and Python calls. 512 KiB-1 MiB measured best for 24 MB frames through a
# 64 MiB ring with a 2-4 MiB hot window (bench_shm, 2-core VM); 256 KiB was clearly slower.
DEFAULT_CHUNK = 1 << 20
# Re-checks of the peer's index before sleeping on the sequence word; the wait itself is the
# normal path (spinning measured slower on a loaded 2-core machine).
SPINS = 4
# Hot window of large rings (see the module docstring); rings under 4x this never jump.
DEFAULT_WINDOW = 4 << 20
_NO_JUMP = 2**64 - 1
_WAKE_ONE = 1
_WAKE_ALL = 2**31 - 1


def native():
    """The compiled helper, or a TransportError saying how to build it."""
    if _native is None:
        raise TransportError(
            "edgelink._native is not built (shared memory needs it): run "
            "`pip install -e . --no-deps --no-build-isolation` or "
            f"`python setup.py build_ext --inplace` ({_NATIVE_ERROR})"
        )
    return _native


WAIT_MODES = ("auto", "futex", "poll")


def waiter(mode: str = "auto") -> Callable[..., bool]:
    """The native wait for ``shm.wait``: ``futex`` (Linux builds), ``poll`` (the portable path,
    what macOS and other POSIX systems use, available in every build) or ``auto`` (the best
    this build has). Wakers always call ``wake_u32``, so a futex waiter and a polling one can
    share a ring."""
    nat = native()
    if mode not in WAIT_MODES:
        raise TransportError(f"shm.wait must be one of {', '.join(WAIT_MODES)}, not {mode!r}")
    if mode == "futex" and nat.WAIT_BACKEND != "futex":
        raise TransportError(
            "shm.wait = futex, but this build of edgelink._native has no futex wait "
            f"(it waits by {nat.WAIT_BACKEND}): use shm.wait = auto or poll"
        )
    return nat.poll_u32 if mode == "poll" else nat.wait_u32


def wait_backend(mode: str = "auto") -> str:
    """What ``waiter(mode)`` waits with: "futex" or "poll"."""
    return "poll" if mode == "poll" else native().WAIT_BACKEND


# --- peer liveness -------------------------------------------------------------------------


def process_start_ticks(pid: int) -> int:
    """The kernel's start time of ``pid`` (clock ticks since boot), 0 if unknown.

    Stored next to a pid so a recycled pid is not mistaken for the original process.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    # The command name (field 2) may contain spaces and parentheses: parse after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 overall: starttime
    except (IndexError, ValueError):
        return 0


def pid_alive(pid: int, start_ticks: int = 0) -> bool:
    """Whether ``pid`` is a running process (and the same one, when ``start_ticks`` is known).

    ``os.kill(pid, 0)`` alone is not enough: a killed child that its parent has not reaped yet
    is a zombie and still "exists", so /proc is consulted for the zombie state too.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no /proc: trust os.kill
    fields = stat[stat.rfind(b")") + 2 :].split()
    if not fields or fields[0] in (b"Z", b"X"):
        return False
    if start_ticks:
        try:
            return int(fields[19]) == start_ticks
        except (IndexError, ValueError):
            return True
    return True


# --- the ring ------------------------------------------------------------------------------


def footprint(capacity: int) -> int:
    """Bytes a ring of ``capacity`` occupies, header included (a multiple of 64)."""
    return HEADER_BYTES + -(-capacity // ALIGN) * ALIGN


class Ring:
    """One direction of a channel. A process uses either the write side or the read side.

    ``buf`` is the shared mapping (an ``mmap``); the ring never keeps a memoryview of it, so
    the owner can close the mapping once no call is in progress.

    ``timeout_s`` bounds each stall (time without progress), not a whole transfer: a large
    frame streaming steadily never times out, a peer that stops consuming or producing does.
    A per-call ``timeout`` overrides it; ``math.inf`` waits for ever (liveness still checked).
    """

    def __init__(
        self,
        buf,
        offset: int,
        *,
        peer_alive: Callable[[], bool] | None = None,
        liveness_interval_s: float = 0.25,
        timeout_s: float = 30.0,
        chunk_bytes: int = DEFAULT_CHUNK,
        window_bytes: int | None = None,
        name: str = "ring",
        wait: str = "auto",
    ):
        nat = native()
        self._wait_u32 = waiter(wait)
        if offset % ALIGN:
            raise TransportError(f"{name}: ring offset {offset} is not {ALIGN}-byte aligned")
        if len(buf) < offset + HEADER_BYTES:
            raise TransportError(f"{name}: mapping too small for a ring header at {offset}")
        self._buf = buf
        self._off = offset
        self.name = name
        magic = nat.load_acquire_u64(buf, offset + _OFF_MAGIC)
        version = nat.load_acquire_u64(buf, offset + _OFF_VERSION)
        if magic != MAGIC:
            raise TransportError(f"{name}: no ring at offset {offset} (bad magic {magic:#x})")
        if version != VERSION:
            raise TransportError(f"{name}: ring version {version}, this edgelink speaks {VERSION}")
        self._cap = nat.load_acquire_u64(buf, offset + _OFF_CAPACITY)
        if self._cap <= 0 or len(buf) < offset + footprint(self._cap):
            raise TransportError(f"{name}: ring capacity {self._cap} does not fit the mapping")
        self._data = offset + HEADER_BYTES
        self.peer_alive = peer_alive
        self.liveness_interval_s = liveness_interval_s
        self.timeout_s = timeout_s
        self.chunk_bytes = max(4096, int(chunk_bytes))
        if window_bytes is None:
            window_bytes = DEFAULT_WINDOW if self._cap >= 4 * DEFAULT_WINDOW else 0
        # 0 disables jumping; a window is only useful well inside the capacity.
        self.window_bytes = int(window_bytes) if 0 < window_bytes < self._cap else 0

    @property
    def offset(self) -> int:
        """Where this ring's header starts in the shared buffer."""
        return self._off

    @classmethod
    def create(cls, buf, offset: int, capacity: int, **kwargs) -> Ring:
        """Initialise an empty ring at ``offset`` (the mapping must be fresh or unused)."""
        nat = native()
        if capacity < 64:
            raise TransportError(f"ring capacity must be at least 64 bytes, got {capacity}")
        if len(buf) < offset + footprint(capacity):
            raise TransportError(
                f"mapping of {len(buf)} bytes cannot hold a {capacity}-byte ring at {offset}"
            )
        for off in (_OFF_WRITE, _OFF_WRITER_CLOSED, _OFF_READ, _OFF_READER_CLOSED):
            nat.store_release_u64(buf, offset + off, 0)
        nat.store_release_u64(buf, offset + _OFF_JUMP, _NO_JUMP)
        nat.store_release_u64(buf, offset + _OFF_CAPACITY, capacity)
        nat.store_release_u64(buf, offset + _OFF_VERSION, VERSION)
        # Magic last: an attacher that sees it sees a complete header.
        nat.store_release_u64(buf, offset + _OFF_MAGIC, MAGIC)
        return cls(buf, offset, **kwargs)

    # --- state ---

    @property
    def capacity(self) -> int:
        return self._cap

    @property
    def write_index(self) -> int:
        return _native.load_acquire_u64(self._buf, self._off + _OFF_WRITE)

    @property
    def read_index(self) -> int:
        return _native.load_acquire_u64(self._buf, self._off + _OFF_READ)

    @property
    def jump_index(self) -> int | None:
        """Where the writer last wrapped early (see "Hot window"), None if it never did."""
        jump = _native.load_acquire_u64(self._buf, self._off + _OFF_JUMP)
        return None if jump == _NO_JUMP else jump

    def readable(self) -> int:
        """Bytes published and not yet consumed (a pending jump's skipped bytes included)."""
        r = self.read_index
        return self.write_index - r

    @property
    def writer_closed(self) -> bool:
        return bool(_native.load_acquire_u64(self._buf, self._off + _OFF_WRITER_CLOSED))

    @property
    def reader_closed(self) -> bool:
        return bool(_native.load_acquire_u64(self._buf, self._off + _OFF_READER_CLOSED))

    def close_writer(self) -> None:
        """Mark the write side closed and wake a blocked reader (it then raises PeerGone)."""
        self._set_and_wake(_OFF_WRITER_CLOSED, _OFF_DATA_SEQ)

    def close_reader(self) -> None:
        """Mark the read side closed and wake a blocked writer (it then raises PeerGone)."""
        self._set_and_wake(_OFF_READER_CLOSED, _OFF_SPACE_SEQ)

    def _set_and_wake(self, flag_off: int, seq_off: int) -> None:
        nat = _native
        nat.store_release_u64(self._buf, self._off + flag_off, 1)
        nat.fetch_add_u32(self._buf, self._off + seq_off, 1)
        nat.wake_u32(self._buf, self._off + seq_off, _WAKE_ALL)

    def scrub(self) -> None:
        """Zero the bytes this ring has carried since its last reset, so that the next session
        on the segment cannot read the last one's state. Only while neither side is in use;
        costs what the session sent, up to the capacity."""
        used = min(self.write_index, self._cap)
        if used:
            np.frombuffer(self._buf, dtype=np.uint8, count=used, offset=self._data)[:] = 0

    def reset(self) -> None:
        """Empty the ring and clear both closed flags. Only while neither side is in use."""
        nat = _native
        for off in (_OFF_WRITE, _OFF_READ, _OFF_WRITER_CLOSED, _OFF_READER_CLOSED):
            nat.store_release_u64(self._buf, self._off + off, 0)
        nat.store_release_u64(self._buf, self._off + _OFF_JUMP, _NO_JUMP)
        for off in (_OFF_DATA_SEQ, _OFF_SPACE_SEQ):
            nat.fetch_add_u32(self._buf, self._off + off, 1)
            nat.wake_u32(self._buf, self._off + off, _WAKE_ALL)

    # --- waiting ---

    def _limit(self, timeout: float | None) -> float:
        limit = self.timeout_s if timeout is None else timeout
        return math.inf if limit is None else max(0.0, float(limit))

    def _wait(self, seq_off: int, ready: Callable[[], bool], closed_off: int, what: str,
              limit: float) -> None:
        """Block until ``ready()``; PeerGone if the peer closed or died, timeout after ``limit``."""
        nat = _native
        wait_u32 = self._wait_u32
        buf = self._buf
        seq_at = self._off + seq_off
        spins = SPINS
        deadline = time.monotonic() + limit
        while True:
            # Sample the sequence word before the condition: a publish between the two moves
            # the word, so the wait below returns at once instead of missing the wake.
            seq = nat.load_acquire_u32(buf, seq_at)
            if ready():
                return
            if nat.load_acquire_u64(buf, self._off + closed_off):
                raise PeerGone(f"{self.name}: peer closed while {what}")
            if spins:
                spins -= 1
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                if self.peer_alive is not None and not self.peer_alive():
                    raise PeerGone(f"{self.name}: peer process died while {what}")
                raise TransportTimeout(f"{self.name}: no progress for {limit:g}s while {what}")
            if not wait_u32(buf, seq_at, seq, min(self.liveness_interval_s, left)):
                if self.peer_alive is not None and not self.peer_alive():
                    raise PeerGone(f"{self.name}: peer process died while {what}")

    def wait_readable(self, timeout: float | None = None) -> None:
        """Block until data can be read, consuming nothing."""
        if self.readable() > 0:
            return
        self._wait(_OFF_DATA_SEQ, lambda: self.readable() > 0, _OFF_WRITER_CLOSED,
                   "waiting for data", self._limit(timeout))

    # --- moving bytes ---

    def write(self, parts: Sequence[memoryview], timeout: float | None = None) -> None:
        """Append every byte of ``parts`` (flat byte views), blocking while the ring is full.

        Streams: any amount of data passes through a ring of any capacity, published chunk by
        chunk. On PeerGone / TransportTimeout part of the data may have been published.
        """
        nat = _native
        copy, load, store = nat.copy, nat.load_acquire_u64, nat.store_release_u64
        buf, cap, data = self._buf, self._cap, self._data
        read_at = self._off + _OFF_READ
        jump_at = self._off + _OFF_JUMP
        chunk, window = self.chunk_bytes, self.window_bytes
        limit = self._limit(timeout)
        if load(buf, self._off + _OFF_READER_CLOSED):
            raise PeerGone(f"{self.name}: reader closed")
        w = load(buf, self._off + _OFF_WRITE)
        r = load(buf, read_at)
        jump = load(buf, jump_at)
        published = w
        try:
            for part in parts:
                n = part.nbytes
                pos = 0
                while pos < n:
                    want = min(n - pos, chunk)
                    at = w % cap
                    if window and at >= window:
                        # Past the hot window: wrap early if the reader passed the previous
                        # jump and is at least `want` into this lap (so the skipped tail fits
                        # in the free space).
                        r = load(buf, read_at)
                        pad = cap - at
                        if (w - r) + pad + want <= cap and not (r <= jump != _NO_JUMP):
                            store(buf, jump_at, w)
                            jump = w
                            w += pad
                            at = 0
                    free = cap - (w - r)
                    if free < want:
                        r = load(buf, read_at)  # our view of the reader may be stale
                        free = cap - (w - r)
                        if free <= 0:
                            if w != published:
                                self._publish(w)
                                published = w
                            self._wait(_OFF_SPACE_SEQ,
                                       lambda w=w: w - load(buf, read_at) < cap,
                                       _OFF_READER_CLOSED, "waiting for space", limit)
                            r = load(buf, read_at)
                            continue
                    k = min(want, free)
                    first = min(k, cap - at)
                    copy(buf, data + at, part, pos, first)
                    if k > first:
                        copy(buf, data, part, pos + first, k - first)
                    w += k
                    pos += k
                    if w - published >= chunk:
                        self._publish(w)
                        published = w
        finally:
            if w != published:
                self._publish(w)

    def _publish(self, w: int) -> None:
        nat = _native
        nat.store_release_u64(self._buf, self._off + _OFF_WRITE, w)
        nat.fetch_add_u32(self._buf, self._off + _OFF_DATA_SEQ, 1)
        nat.wake_u32(self._buf, self._off + _OFF_DATA_SEQ, _WAKE_ONE)

    def read_into(self, dst: memoryview, timeout: float | None = None) -> None:
        """Fill all of ``dst`` (a writable flat byte view) from the ring, blocking while empty.

        On PeerGone / TransportTimeout the bytes already copied into ``dst`` stay consumed.
        """
        nat = _native
        copy, load = nat.copy, nat.load_acquire_u64
        buf, cap, data = self._buf, self._cap, self._data
        write_at = self._off + _OFF_WRITE
        jump_at = self._off + _OFF_JUMP
        chunk = self.chunk_bytes
        limit = self._limit(timeout)
        n = dst.nbytes
        r = load(buf, self._off + _OFF_READ)
        # Load order matters: the writer stores the jump index before publishing the write
        # index past it, so a jump loaded after `w` is at least as new as `w`.
        w = load(buf, write_at)
        jump = load(buf, jump_at)
        released = r
        pos = 0
        try:
            while pos < n:
                if r == jump and w > jump:
                    r = (r // cap + 1) * cap  # skip the tail the writer jumped over
                want = min(n - pos, chunk)
                # Data ends at the jump index when one lies ahead of us.
                avail = (jump if r < jump < w else w) - r
                if avail < want:
                    w = load(buf, write_at)
                    jump = load(buf, jump_at)
                    if r == jump and w > jump:
                        continue
                    avail = (jump if r < jump < w else w) - r
                    if avail <= 0:
                        if r != released:
                            self._release(r)
                            released = r
                        self._wait(_OFF_DATA_SEQ, lambda r=r: load(buf, write_at) > r,
                                   _OFF_WRITER_CLOSED, "waiting for data", limit)
                        w = load(buf, write_at)
                        jump = load(buf, jump_at)
                        continue
                k = min(want, avail)
                at = r % cap
                first = min(k, cap - at)
                copy(dst, pos, buf, data + at, first)
                if k > first:
                    copy(dst, pos + first, buf, data, k - first)
                r += k
                pos += k
                if r - released >= chunk:
                    self._release(r)
                    released = r
        finally:
            if r != released:
                self._release(r)

    def _release(self, r: int) -> None:
        nat = _native
        nat.store_release_u64(self._buf, self._off + _OFF_READ, r)
        nat.fetch_add_u32(self._buf, self._off + _OFF_SPACE_SEQ, 1)
        nat.wake_u32(self._buf, self._off + _OFF_SPACE_SEQ, _WAKE_ONE)
