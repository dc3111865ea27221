#!/usr/bin/env python3
"""Run `edgelink bench handoff` for the given models and print docs/benchmarks.md's tables.

    python tools/bench_report.py smollm2-135m gemma3-270m > /tmp/bench.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys

from edgelink.bench import run_handoff_bench
from edgelink.config import load_config


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--tokens", default=None)
    ap.add_argument("--repeats", default=None)
    args = ap.parse_args()
    cfg = load_config(bench_tokens=args.tokens, bench_repeats=args.repeats)
    print(f"Measured {datetime.date.today()} on {cpu_name()}, {platform.system()} "
          f"{platform.release()}; median of {cfg.bench.repeats} after one warm-up message.\n")
    for model in args.models:
        rep = run_handoff_bench(model, cfg, log=lambda s: print(s, file=sys.stderr))
        print(f"### {model}\n")
        print("| tokens | state MB | re-prefill ms | shm handoff ms | speedup | first handoff ms "
              "| shm GB/s | memcpy GB/s | shm / memcpy | p2p handoff ms | p2p speedup | p2p MB/s |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rep["rows"]:
            print(f"| {r['tokens']} | {r['payload_bytes'] / 1e6:.2f} | {r['reprefill_ms']:.0f} "
                  f"| {r['handoff_ms']:.1f} | {r['speedup_vs_reprefill']:.0f}x "
                  f"| {r['first_handoff_ms']:.1f} | {r['shm_gbps']:.2f} | {r['memcpy_gbps']:.2f} "
                  f"| {r['shm_vs_memcpy']:.0%} | {r.get('p2p_handoff_ms', float('nan')):.0f} "
                  f"| {r.get('p2p_speedup_vs_reprefill', float('nan')):.0f}x "
                  f"| {r.get('p2p_mbps', float('nan')):.0f} |")
        print()


if __name__ == "__main__":
    main()
