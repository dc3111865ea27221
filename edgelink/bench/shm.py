"""How fast one large frame crosses the shared-memory transport, next to a plain memcpy.

A spawned client process sends one frame of ``nbytes`` (from a pre-allocated buffer) each time
the parent asks; the parent times from the request to the frame being complete in its receive
buffer. That includes a small request round trip, the copy into the ring, the copy out and
every wake-up in between: what a real handoff pays. The baseline is ``np.copyto`` between two
pre-faulted arrays of the same size in one process.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
import uuid

import numpy as np

from edgelink.bench.timing import median_seconds
from edgelink.config import Config
from edgelink.errors import TransportError, TransportTimeout
from edgelink.transport.shm import ShmListener, connect

_GO = b"go"
_STOP = b"stop"
_WARMUP = 1


def _pattern(nbytes: int) -> np.ndarray:
    """i % 251 for every byte, built without an 8-bytes-per-element temporary (16x the frame
    at a gigabyte, which is what real model states reach)."""
    cycle = np.arange(251, dtype=np.uint8)
    return np.tile(cycle, -(-nbytes // 251))[:nbytes].copy()


def _client(name: str, cfg: Config, nbytes: int, chunk_bytes: int | None) -> None:
    buf = _pattern(nbytes)  # pre-allocated and faulted once, reused for every send
    with connect(name, cfg, timeout=cfg.shm.connect_timeout_s, chunk_bytes=chunk_bytes) as chan:
        while bytes(chan.recv(16, timeout=cfg.shm.timeout_s)) == _GO:
            chan.send(buf)


def _median_memcpy(nbytes: int, repeats: int) -> float:
    src = _pattern(nbytes)
    dst = np.empty(nbytes, dtype=np.uint8)
    dst[:: os.sysconf("SC_PAGE_SIZE")] = 0
    return median_seconds(lambda: np.copyto(dst, src), repeats, warmup=1)


def _accept_from(listener: ShmListener, proc, limit: float):
    # Spawning an interpreter and importing numpy can take seconds on a cold machine; keep
    # waiting while the client process lives, fail fast if it died before connecting.
    deadline = time.monotonic() + limit
    while True:
        try:
            return listener.accept(timeout=0.2)
        except TransportTimeout:
            if not proc.is_alive():
                raise TransportError(
                    f"bench client exited with status {proc.exitcode} before connecting"
                ) from None
            if time.monotonic() > deadline:
                raise


def measure_shm_throughput(nbytes: int, cfg: Config, repeats: int,
                           chunk_bytes: int | None = None) -> dict:
    """Median seconds and GB/s for one ``nbytes`` frame over shm and for a memcpy of it.

    Returns a dict with ``nbytes``, ``repeats``, ``ring_bytes``, ``shm_s``, ``shm_gbps``,
    ``memcpy_s``, ``memcpy_gbps``, ``ratio`` (shm GB/s over memcpy GB/s) and ``shm_samples``.
    One untimed warm-up transfer runs first and its bytes are verified.
    """
    if nbytes <= 0 or repeats <= 0:
        raise ValueError("nbytes and repeats must be positive")
    name = f"bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    ctx = multiprocessing.get_context("spawn")
    samples: list[float] = []
    with ShmListener(name, cfg, chunk_bytes=chunk_bytes) as listener:
        proc = ctx.Process(target=_client, args=(name, cfg, nbytes, chunk_bytes), daemon=True)
        proc.start()
        try:
            chan = _accept_from(listener, proc, cfg.shm.connect_timeout_s + 60)
            for i in range(_WARMUP + repeats):
                t0 = time.perf_counter()
                chan.send(_GO)
                view = chan.recv(nbytes)
                elapsed = time.perf_counter() - t0
                if len(view) != nbytes:
                    raise TransportError(f"bench: got {len(view)} bytes, expected {nbytes}")
                if i < _WARMUP:
                    if not np.array_equal(np.frombuffer(view, dtype=np.uint8), _pattern(nbytes)):
                        raise TransportError("bench: received bytes differ from those sent")
                else:
                    samples.append(elapsed)
            chan.send(_STOP)
            chan.close()
            proc.join(timeout=cfg.shm.timeout_s)
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join()
    memcpy_s = _median_memcpy(nbytes, repeats)
    shm_s = statistics.median(samples)
    return {
        "nbytes": nbytes,
        "repeats": repeats,
        "ring_bytes": cfg.shm.ring_bytes,
        "shm_s": shm_s,
        "shm_gbps": nbytes / shm_s / 1e9,
        "memcpy_s": memcpy_s,
        "memcpy_gbps": nbytes / memcpy_s / 1e9,
        "ratio": memcpy_s / shm_s,
        "shm_samples": samples,
    }


if __name__ == "__main__":  # python -m edgelink.bench.shm [NBYTES] [REPEATS]
    import json
    import sys

    from edgelink.config import load_config

    size = int(sys.argv[1]) if len(sys.argv) > 1 else 24_000_000
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    print(json.dumps(measure_shm_throughput(size, load_config(), reps), indent=2))
