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
from pathlib import Path

from edgelink.errors import ConfigError

# runtime.omp_wait values: what each puts in the environment before llama.cpp loads.
_WAITS = {"spin": {"GOMP_SPINCOUNT": "300000"}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
          "active": {"OMP_WAIT_POLICY": "ACTIVE"}}


# libgomp's spin before a waiting thread sleeps, in iterations (its default: 300,000). Measured
# with `edgelink bench threads` (docs/benchmarks.md): short enough that a waiting thread gives
# its core back to another process within microseconds, long enough that an idle machine's
# barriers stay as fast as with the default.
SPIN_DEFAULT = "1000"


def default_wait_policy() -> bool:
    """Put SPIN_DEFAULT in the environment unless the user chose a policy; it takes effect only if
    libgomp is not loaded yet (``import edgelink`` before ``import llama_cpp``). Returns whether
    the environment now holds edgelink's default."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return os.environ.get("GOMP_SPINCOUNT") == SPIN_DEFAULT and "OMP_WAIT_POLICY" not in os.environ
    if llama_loaded():
        return False
    os.environ["GOMP_SPINCOUNT"] = SPIN_DEFAULT
    return True


def wait_policy() -> str:
    """How llama.cpp's OpenMP threads wait in this process, as the environment says."""
    if "OMP_WAIT_POLICY" in os.environ:
        return f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    spin = os.environ.get("GOMP_SPINCOUNT")
    if spin is None:
        return "libgomp's default spin (300,000)"
    return f"GOMP_SPINCOUNT={spin}" + (" (edgelink's default)" if spin == SPIN_DEFAULT else "")


def omp_env(wait: str) -> dict[str, str]:
    """The environment for a wait policy: ``spin`` (libgomp's default), ``passive``, ``active``,
    or ``spin=N`` (spin N iterations, then sleep)."""

    if wait in _WAITS:
        return dict(_WAITS[wait])
    name, _, n = wait.partition("=")
    if name == "spin" and n.isdigit():
        return {"GOMP_SPINCOUNT": n}
    raise ConfigError(f"runtime.omp_wait must be auto, spin, passive, active or spin=N, not {wait!r}")


def cpu_count() -> int:
    """The cores this process may run on (its affinity mask, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def others_running() -> int | None:
    """Tasks of other processes running or runnable on this machine at this instant (the
    kernel's count in /proc/loadavg, less this process's own running threads); None where
    the kernel does not say (macOS, Windows)."""
    try:
        total = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None
    own = 0
    try:
        for task in os.scandir("/proc/self/task"):
            try:
                stat = Path(task.path, "stat").read_text()
            except OSError:
                continue
            if stat[stat.rfind(")") + 2:stat.rfind(")") + 3] == "R":
                own += 1
    except OSError:
        own = 1
    return max(0, total - max(own, 1))


@dataclasses.dataclass(frozen=True)
class ThreadPlan:
    """Threads for decoding one token and for a prefill batch, and why. ``adaptive``: the
    counts are upper bounds, lowered before each prefill or generation while other processes
    keep cores busy (``runtime.n_threads = 0``)."""

    threads: int
    threads_batch: int
    reason: str
    adaptive: bool = False

    def describe(self) -> str:
        if self.adaptive:
            return (f"up to {self.threads} thread(s), fewer while other processes keep cores busy "
                    f"({self.reason})")
        return f"{self.threads} decode / {self.threads_batch} prefill thread(s) ({self.reason})"

    def now(self, batch: bool = False) -> int:
        """The threads to use for the next call: the plan's, less one per task of another
        process that is running right now (never fewer than one)."""
        most = self.threads_batch if batch else self.threads
        if not self.adaptive:
            return most
        others = others_running()
        return most if others is None else max(1, min(most, self.threads_batch - others))


def thread_plan(rc, cores: int | None = None) -> ThreadPlan:
    """``runtime.n_threads`` / ``n_threads_batch`` resolved for this machine (0 = derived)."""
    n = cores or cpu_count()
    if rc.n_threads and rc.n_threads_batch:
        return ThreadPlan(rc.n_threads, rc.n_threads_batch, "runtime.n_threads, runtime.n_threads_batch")
    if rc.n_threads:
        return ThreadPlan(rc.n_threads, rc.n_threads, "runtime.n_threads")
    if rc.n_threads_batch:
        return ThreadPlan(n, rc.n_threads_batch, f"all {n} cores; runtime.n_threads_batch")
    return ThreadPlan(n, n, f"{n} cores, runtime.n_threads = 0", adaptive=True)


def llama_loaded() -> bool:
    return "llama_cpp" in sys.modules
