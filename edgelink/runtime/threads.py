"""How many CPU threads a llama.cpp context takes, and how its OpenMP threads wait.

llama.cpp's CPU backend (an OpenMP build, as llama-cpp-python compiles it) runs each graph on a
team of threads that meet at a barrier after every node, several hundred times per token. A
thread that reaches a barrier first spins before it sleeps (libgomp: ``GOMP_SPINCOUNT``, 300,000
iterations by default). On an idle machine that makes barriers cheap; when another llama.cpp
process shares the cores (the receiver of a handoff on the same machine, a second pair), a
spinning thread holds a core that the thread it waits for needs, and every barrier costs up to a
scheduler time slice: the 30-60x slowdown that issue 24 measured. This module is not allowed to
import llama_cpp: the wait policy must be in the environment before libgomp is loaded.
"""

from __future__ import annotations

import dataclasses
import os
import sys

# runtime.omp_wait values: what each puts in the environment before llama.cpp loads.
_WAITS = {"spin": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "active": {"OMP_WAIT_POLICY": "ACTIVE"}}


def omp_env(wait: str) -> dict[str, str]:
    """The environment for a wait policy: ``spin`` (libgomp's default), ``passive``, ``active``,
    or ``spin=N`` (spin N iterations, then sleep)."""
    from edgelink.errors import ConfigError

    if wait in _WAITS:
        return dict(_WAITS[wait])
    name, _, n = wait.partition("=")
    if name == "spin" and n.isdigit():
        return {"GOMP_SPINCOUNT": n}
    raise ConfigError(f"runtime.omp_wait must be auto, spin, passive, active or spin=N, not {wait!r}")


def cpu_count() -> int:
    """The cores this process may run on (its affinity mask, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class ThreadPlan:
    """Threads for decoding one token and for a prefill batch, and why."""

    threads: int
    threads_batch: int
    reason: str

    def describe(self) -> str:
        return f"{self.threads} decode / {self.threads_batch} prefill thread(s) ({self.reason})"


def thread_plan(rc, cores: int | None = None) -> ThreadPlan:
    """``runtime.n_threads`` / ``n_threads_batch`` resolved for this machine (0 = derived)."""
    n = cores or cpu_count()
    if rc.n_threads and rc.n_threads_batch:
        return ThreadPlan(rc.n_threads, rc.n_threads_batch, "runtime.n_threads, runtime.n_threads_batch")
    if rc.n_threads:
        return ThreadPlan(rc.n_threads, rc.n_threads, "runtime.n_threads")
    return ThreadPlan(n, rc.n_threads_batch or n, f"all {n} cores")


def llama_loaded() -> bool:
    return "llama_cpp" in sys.modules
