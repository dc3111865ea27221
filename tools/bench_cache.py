"""The prefix cache against prefilling: a long shared prefix, then a short question, time to
the first new token, side by side in one run.

    python -m tools.bench_cache --models smollm2-135m,gemma3-270m --prefix 2000 --question 50

Rows per model: no cache (a plain prefill, what a user does today); cold through the cache (the
same work plus storing the chunks); the first hit after it (from RAM, paying the page faults of
fresh buffers); a RAM hit and a disk hit in steady state (for the disk hit the RAM tier is
emptied first: the chunks are read, verified and imported from the directory). Each hit must continue exactly as the cold
run. Medians of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import edgelink
from edgelink.bench import context_tokens
from edgelink.cache.prefix import PrefixCache
from edgelink.config import load_config

QUESTION = " Question: in one sentence, what happened to the keeper after the storm? Answer:"


def bench_model(model: str, prefix: int, question: int, repeats: int, chunk: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        cfg = load_config().replace(cache_dir=d, cache_chunk_tokens=chunk)
        with edgelink.load(model, cfg) as m:
            rt = m.runtime
            q = (rt.tokenize(QUESTION, add_special=False) * 8)[:question]
            toks = context_tokens(rt, prefix) + q
            cache = PrefixCache(cfg)
            rows: dict[str, list[float]] = {"no cache": [], "cold, through the cache": [],
                                             "first hit after it": [], "RAM hit": [], "disk hit": []}
            outs: dict[str, list[int]] = {}
            hits: dict[str, int] = {}

            def timed(label: str, fn) -> None:
                rt.clear()
                t0 = time.perf_counter()
                res = fn()
                first = rt.generate(1, stop_at_eog=False)
                rows[label].append(time.perf_counter() - t0)
                outs[label] = first + rt.generate(15, stop_at_eog=False)
                if hasattr(res, "hit_tokens"):
                    hits[label] = res.hit_tokens

            for _ in range(repeats):
                timed("no cache", lambda: rt.prefill(toks) is None)
                cache.store.clear()
                timed("cold, through the cache", lambda: cache.prefill(rt, m.signature, toks))
                # the first restore after a cold run faults in fresh buffers (tens of MB); the
                # rows after it are the steady state of a process that serves many prompts
                timed("first hit after it", lambda: cache.prefill(rt, m.signature, toks))
                timed("RAM hit", lambda: cache.prefill(rt, m.signature, toks))
                cache.store.clear_ram()
                timed("disk hit", lambda: cache.prefill(rt, m.signature, toks))
            stored = cache.store.stats()["disk"].bytes
    cold = statistics.median(rows["no cache"])
    out = []
    for label, times in rows.items():
        t = statistics.median(times)
        out.append({"model": model, "case": label, "tokens": len(toks), "ttft_s": t, "vs_no_cache": cold / t,
                    "hit_tokens": hits.get(label, 0), "disk_bytes": stored,
                    "same_as_cold_cache_run": outs[label] == outs["cold, through the cache"]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--prefix", type=int, default=2000)
    ap.add_argument("--question", type=int, default=50)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    for model in args.models.split(","):
        for row in bench_model(model, args.prefix, args.question, args.repeats, args.chunk):
            rows.append(row)
            print(f"{row['model']:14s} {row['case']:24s} {row['tokens']} tokens  TTFT {row['ttft_s']:7.3f} s  "
                  f"{row['vs_no_cache']:6.1f}x  hit {row['hit_tokens']:5d}  "
                  f"{'same' if row['same_as_cold_cache_run'] else 'DIFFERS'}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
