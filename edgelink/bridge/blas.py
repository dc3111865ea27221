"""Keep numpy's OpenBLAS to a given number of threads around small matrix work.

A bridge's matmuls are tiny (tens of rows). With more than one OpenBLAS thread they are slower,
and the workers keep spinning after each call and steal the cores llama.cpp needs next.
Measured on this 2-core machine, sender loop of capture + ``Bridge.apply``: apply 8-9 ms and
capture 77-107 ms with numpy's default threads, 1.5 ms and 40 ms with one thread.

The libraries are found once, from the shared objects mapped into this process (Linux); where
none is found (another BLAS, another OS) the limit is a no-op.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@functools.cache
def openblas_controls() -> tuple[tuple[Any, Any], ...]:
    """(set_num_threads, get_num_threads) of every OpenBLAS loaded in this process."""
    import numpy  # noqa: F401  (make sure numpy's BLAS is loaded before looking)

    found = []
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return ()
    paths = {ln.split()[-1] for ln in maps if "openblas" in ln.lower() and ln.split()[-1].startswith("/")}
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                get_ = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                if set_ is not None and get_ is not None:
                    found.append((set_, get_))
                    break
            else:
                continue
            break
    return tuple(found)


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Run the block with numpy's OpenBLAS limited to ``n`` threads, then restore."""
    libs = openblas_controls()
    before = [int(get_()) for _, get_ in libs]
    for set_, _ in libs:
        set_(int(n))
    try:
        yield
    finally:
        for (set_, _), k in zip(libs, before, strict=True):
            set_(k)


def blas_thread_count() -> int | None:
    """OpenBLAS's current thread count (None: no OpenBLAS found)."""
    libs = openblas_controls()
    return int(libs[0][1]()) if libs else None
