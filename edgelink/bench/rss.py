"""Peak resident memory of a process over one measured step (Linux /proc), for benchmarks.

``clear_refs`` with "5" resets a process's high-water mark (VmHWM) to its current RSS, so the
peak read after a step is the step's own peak, not one left over from start-up or an earlier
step. Works for this process and for children of the same user.
"""

from __future__ import annotations

import os


def _status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def rss_bytes(pid: int | None = None) -> int:
    return _status(pid or os.getpid())["VmRSS"]


class PeakWatch:
    """``with PeakWatch(pid) as w: step()`` then ``w.base`` (RSS before) and ``w.peak`` (the
    high-water mark during the step). ``available`` is False where the kernel cannot reset it."""

    def __init__(self, pid: int | None = None):
        self.pid = pid or os.getpid()
        self.base = self.peak = 0
        self.available = True

    def __enter__(self) -> PeakWatch:
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            self.available = False
        self.base = rss_bytes(self.pid)
        return self

    def __exit__(self, *exc) -> None:
        st = _status(self.pid)
        self.peak = max(st["VmHWM"], st["VmRSS"]) if self.available else st["VmRSS"]

    @property
    def over_base(self) -> int:
        return max(0, self.peak - self.base)
