"""`edgelink bench report`: `edgelink bench handoff` for several models, as docs/benchmarks.md's tables.

    edgelink bench report smollm2-135m gemma3-270m > /tmp/bench.md
"""

from __future__ import annotations

import datetime
import platform
from collections.abc import Callable

from edgelink.bench import run_handoff_bench
from edgelink.config import Config
from edgelink.runtime.system import cpu_model


def handoff_report(models: list[str], cfg: Config, log: Callable[[str], None] | None = None) -> str:
    """A markdown section per model: re-prefill vs shm and p2p handoff vs memcpy, per length."""
    lines = [f"Measured {datetime.date.today()} on {cpu_model()}, {platform.system()} {platform.release()}; "
             f"median of {cfg.bench.repeats} after one warm-up message.", ""]
    for model in models:
        rep = run_handoff_bench(model, cfg, log=log)
        lines += [f"### {model}", "",
                  "| tokens | state MB | re-prefill ms | shm handoff ms | speedup | first handoff ms "
                  "| shm GB/s | memcpy GB/s | shm / memcpy | p2p handoff ms | p2p speedup | p2p MB/s |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        nan = float("nan")
        lines += [f"| {r['tokens']} | {r['payload_bytes'] / 1e6:.2f} | {r['reprefill_ms']:.0f} "
                  f"| {r['handoff_ms']:.1f} | {r['speedup_vs_reprefill']:.0f}x "
                  f"| {r['first_handoff_ms']:.1f} | {r['shm_gbps']:.2f} | {r['memcpy_gbps']:.2f} "
                  f"| {r['shm_vs_memcpy']:.0%} | {r.get('p2p_handoff_ms', nan):.0f} "
                  f"| {r.get('p2p_speedup_vs_reprefill', nan):.0f}x | {r.get('p2p_mbps', nan):.0f} |"
                  for r in rep["rows"]]
        lines.append("")
    return "\n".join(lines)
