"""The one timing rule every benchmark here follows: the median wall time of repeated calls,
after optional untimed warm-up calls (buffers allocated, pages faulted, connections made)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_seconds(fn: Callable[[], Any], repeats: int, *, warmup: int = 0) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)
