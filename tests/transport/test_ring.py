"""The SPSC ring and its native helpers, across real processes and real shared memory."""

from __future__ import annotations

import hashlib
import itertools
import mmap
import multiprocessing
import os
import random
import time
import uuid
from pathlib import Path

import pytest

from edgelink.errors import PeerGone, TransportTimeout
from edgelink.transport import ring as ringmod
from edgelink.transport.ring import Ring, footprint, pid_alive

nat = ringmod.native()
CTX = multiprocessing.get_context("spawn")
TIMEOUT = 10.0


@pytest.fixture
def seg():
    """A fresh file in /dev/shm big enough for one ring; removed afterwards."""
    path = Path("/dev/shm") / f"edgelink-test-ring-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield path
    path.unlink(missing_ok=True)


def _map(path: Path, size: int | None = None) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if size is not None:
            os.ftruncate(fd, size)
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _stream(seed: int, total: int, max_piece: int):
    """Deterministic random pieces (as lists of parts) adding up to ``total`` bytes."""
    rng = random.Random(seed)
    left = total
    while left:
        n = min(left, rng.randint(1, max_piece))
        left -= n
        data = rng.randbytes(n)
        cuts = sorted(rng.sample(range(n + 1), min(n + 1, rng.randint(0, 3))))
        bounds = [0, *cuts, n]
        yield [memoryview(data)[a:b] for a, b in itertools.pairwise(bounds)]


def _writer(path: str, parent: int, seed: int, total: int, max_piece: int, chunk: int,
            window: int | None, q) -> None:
    mm = _map(Path(path))
    ring = Ring(mm, 0, peer_alive=lambda: pid_alive(parent), timeout_s=TIMEOUT,
                chunk_bytes=chunk, window_bytes=window, name="test")
    digest = hashlib.blake2b()
    for parts in _stream(seed, total, max_piece):
        ring.write(parts)
        for p in parts:
            digest.update(p)
    q.put(digest.hexdigest())


def _start_writer(seg: Path, *, seed=1, total, max_piece, chunk=4096, window=None):
    q = CTX.Queue()
    proc = CTX.Process(target=_writer, daemon=True,
                       args=(str(seg), os.getpid(), seed, total, max_piece, chunk, window, q))
    proc.start()
    return proc, q


def _reader_ring(mm, proc, **kw) -> Ring:
    return Ring(mm, 0, peer_alive=lambda: pid_alive(proc.pid), timeout_s=TIMEOUT,
                liveness_interval_s=0.05, name="test", **kw)


@pytest.mark.parametrize("window", [None, 24_000], ids=["plain", "hot-window"])
def test_wraparound_random_sizes_two_processes(seg, window):
    cap = 100_003  # deliberately not a power of two, nor a multiple of 8
    mm = _map(seg, footprint(cap))
    Ring.create(mm, 0, cap)
    total = 3_000_000
    proc, q = _start_writer(seg, total=total, max_piece=cap // 3, window=window)
    ring = _reader_ring(mm, proc, chunk_bytes=4096)
    rng = random.Random(2)
    digest = hashlib.blake2b()
    got = 0
    while got < total:
        buf = bytearray(min(total - got, rng.randint(1, cap // 2)))
        ring.read_into(memoryview(buf))
        digest.update(buf)
        got += len(buf)
    assert q.get(timeout=TIMEOUT) == digest.hexdigest()
    proc.join(TIMEOUT)
    assert proc.exitcode == 0
    assert ring.readable() == 0
    assert ring.write_index >= total  # jumped-over tails count in the indices
    if window is None:
        assert ring.jump_index is None and ring.write_index == total
    else:
        assert ring.jump_index is not None, "the writer never used the hot window"


def test_frames_larger_than_the_ring(seg):
    cap = 65_536
    mm = _map(seg, footprint(cap))
    Ring.create(mm, 0, cap)
    total = 10 * cap + 123  # one write, one read, both ten times the ring
    proc, q = _start_writer(seg, total=total, max_piece=total, chunk=16_384)
    ring = _reader_ring(mm, proc, chunk_bytes=16_384)
    buf = bytearray(total)
    ring.read_into(memoryview(buf))
    assert hashlib.blake2b(buf).hexdigest() == q.get(timeout=TIMEOUT)
    proc.join(TIMEOUT)
    assert proc.exitcode == 0


def _wait_published(ring: Ring, target: int) -> None:
    """Block on the ring's own data futex until the write index reaches ``target``."""
    seq_at = ring._off + ringmod._OFF_DATA_SEQ
    deadline = time.monotonic() + TIMEOUT
    while True:
        seq = nat.load_acquire_u32(ring._buf, seq_at)
        if ring.write_index >= target:
            return
        assert time.monotonic() < deadline, "writer never filled the ring"
        nat.wait_u32(ring._buf, seq_at, seq, 0.5)


def _proc_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return stat[stat.rfind(b")") + 2 :].split()[0].decode()


def test_writer_blocks_when_full_and_resumes(seg):
    cap = 65_536
    mm = _map(seg, footprint(cap))
    Ring.create(mm, 0, cap)
    total = cap + 5_000
    proc, q = _start_writer(seg, total=total, max_piece=total)
    ring = _reader_ring(mm, proc)
    _wait_published(ring, cap)
    # Full: the writer has published exactly the capacity and sleeps in the kernel (a
    # busy-spinning writer would show as running, "R").
    deadline = time.monotonic() + TIMEOUT
    while _proc_state(proc.pid) != "S":
        assert time.monotonic() < deadline, "writer is not sleeping while the ring is full"
    assert ring.write_index == cap and ring.readable() == cap
    assert q.empty() and proc.is_alive()
    buf = bytearray(total)
    ring.read_into(memoryview(buf))
    assert hashlib.blake2b(buf).hexdigest() == q.get(timeout=TIMEOUT)
    proc.join(TIMEOUT)


def test_reader_timeout_and_dead_peer(seg):
    cap = 4096
    mm = _map(seg, footprint(cap))
    Ring.create(mm, 0, cap)
    ring = Ring(mm, 0, peer_alive=lambda: True, liveness_interval_s=0.02, name="test")
    t0 = time.monotonic()
    with pytest.raises(TransportTimeout):
        ring.read_into(memoryview(bytearray(10)), timeout=0.1)
    assert time.monotonic() - t0 < 2
    ring.peer_alive = lambda: False
    with pytest.raises(PeerGone, match="died"):
        ring.read_into(memoryview(bytearray(10)), timeout=5)
    ring.close_writer()
    with pytest.raises(PeerGone, match="closed"):
        ring.read_into(memoryview(bytearray(10)), timeout=5)


def test_closed_reader_stops_writer(seg):
    cap = 4096
    mm = _map(seg, footprint(cap))
    ring = Ring.create(mm, 0, cap, liveness_interval_s=0.02)
    ring.close_reader()
    with pytest.raises(PeerGone):
        ring.write([memoryview(b"x")])
    ring.reset()
    ring.write([memoryview(b"abc")])
    out = bytearray(3)
    ring.read_into(memoryview(out))
    assert out == b"abc"


def test_native_checks_bounds_and_alignment(seg):
    mm = _map(seg, 4096)
    with pytest.raises(ValueError, match="aligned"):
        nat.load_acquire_u64(mm, 4)
    with pytest.raises(ValueError, match="outside"):
        nat.store_release_u64(mm, 4096, 1)
    with pytest.raises(ValueError, match="outside"):
        nat.copy(mm, 4000, b"x" * 200, 0, 200)
    with pytest.raises(ValueError):
        nat.copy(mm, 0, b"x" * 10, 5, 10)
    with pytest.raises(OverflowError):
        nat.store_release_u64(mm, 0, -1)
    with pytest.raises(BufferError):
        nat.store_release_u64(b"read-only", 0, 1)
    nat.store_release_u64(mm, 8, 2**64 - 1)
    assert nat.load_acquire_u64(mm, 8) == 2**64 - 1
    assert nat.cas_u64(mm, 8, 2**64 - 1, 7) and not nat.cas_u64(mm, 8, 0, 9)
    assert nat.load_acquire_u64(mm, 8) == 7
    assert nat.fetch_add_u32(mm, 16, 1) == 0 and nat.load_acquire_u32(mm, 16) == 1
    assert nat.wait_u32(mm, 16, 0, 1.0) is True  # value differs: returns at once
    assert nat.wait_u32(mm, 16, 1, 0.01) is False  # nobody wakes: times out
    assert nat.wake_u32(mm, 16, 1) == 0
    assert nat.poll_u32(mm, 16, 0, 1.0) is True  # the portable wait, in every build
    t0 = time.monotonic()
    assert nat.poll_u32(mm, 16, 1, 0.05) is False
    assert 0.05 <= time.monotonic() - t0 < 1.0
    nat.copy(mm, 100, b"hello", 1, 4)
    assert mm[100:104] == b"ello"
