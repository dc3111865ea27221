"""A slower machine, emulated: a CPU cgroup with a quota (cgroup v2 ``cpu.max``, or v1's
``cpu.cfs_quota_us``) that a child process joins before it execs. Root only; benchmarks only."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from edgelink.errors import ConfigError

PERIOD_US = 100_000


def _v2_root() -> Path | None:
    for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if (root / "cgroup.controllers").is_file() and "cpu" in (root / "cgroup.controllers").read_text().split():
            return root
    return None


@contextlib.contextmanager
def cpu_limited(cores: float) -> Iterator[Path]:
    """A new cgroup whose processes share ``cores`` CPUs' worth of time (0.25: a quarter of one
    core); yields the file a process writes its pid to in order to join. Removed afterwards."""
    if cores <= 0:
        raise ConfigError(f"a CPU limit of {cores} cores")
    quota = max(1000, int(cores * PERIOD_US))
    name = f"edgelink-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    v2 = _v2_root()
    if v2 is not None:
        group = v2 / name
        group.mkdir()
        (group / "cpu.max").write_text(f"{quota} {PERIOD_US}\n")
        join = group / "cgroup.procs"
    else:
        base = Path("/sys/fs/cgroup/cpu")
        if not (base / "cpu.cfs_quota_us").exists():
            raise ConfigError("no CPU cgroup controller here (cgroup v2 cpu.max or v1 cpu): cannot limit the CPU")
        group = base / name
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text(f"{PERIOD_US}\n")
        (group / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        join = group / "tasks"
    try:
        yield join
    finally:
        parent = group.parent / ("cgroup.procs" if v2 is not None else "tasks")
        with contextlib.suppress(OSError):
            for pid in (group / join.name).read_text().split():
                with contextlib.suppress(OSError):
                    parent.write_text(pid + "\n")
        with contextlib.suppress(OSError):
            group.rmdir()


def joiner(join: Path):
    """A ``preexec_fn`` that moves the child into the cgroup before it execs (its threads follow)."""
    def run() -> None:
        join.write_text(f"{os.getpid()}\n")
    return run
