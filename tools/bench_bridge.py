#!/usr/bin/env python3
"""Time what a bridged handoff costs at run time, side by side with what it replaces.

* ``apply``: ``Bridge.apply`` (numpy) per message for each kind at K = 1, 8, 32 (perceiver and
  lip with random weights of the default architecture; the cost does not depend on the values),
  on 32 source rows. The issue's budget is 5 ms per message for K <= 32.
* ``capture``: the sender's capture of the source layer for one review, running the whole model
  (what a text handoff's prefill costs) and stopping after the source layer (what a bridged
  handoff does), and their ratio.

    python tools/bench_bridge.py [--repeats 50]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from edgelink.bench.timing import median_seconds
from edgelink.bridge import export_bridge, load_bridge
from edgelink.bridge.forward import expected_shapes
from edgelink.config import load_config
from edgelink.models.resolve import resolve_model
from edgelink.runtime.evalhook import capture
from edgelink.runtime.llama import LlamaRuntime

ARCH = {"perceiver": {"d_model": 256, "n_heads": 4, "n_layers": 2, "d_ff": 512, "target_norm": 1.0},
        "lip": {"bottleneck": 256, "target_norm": 1.0}, "ridge": {}}
SIG = {"source": {"architecture": "llama", "n_embd": 576, "weights_digest": "a" * 64},
       "target": {"architecture": "gemma3", "n_embd": 640, "weights_digest": "b" * 64}}
REVIEW = ("A warm, funny and beautifully acted film that never loses its nerve, even when its "
          "plot wobbles in the last act.")


def _median_ms(fn, repeats: int) -> float:
    return median_seconds(fn, repeats, warmup=1) * 1000


def bench_apply(repeats: int) -> list[tuple[str, int, float]]:
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((33, 576)).astype(np.float32)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, arch in ARCH.items():
            for k in (1, 8, 32):
                arrays = {n: rng.standard_normal(s).astype(np.float32) * 0.02
                          for n, s in expected_shapes(kind, 576, 640, k, arch).items()}
                pool = {"ridge": "mean", "perceiver": "none", "lip": "segments"}[kind]
                stem = Path(tmp) / f"{kind}{k}"
                export_bridge(stem, kind=kind, arrays=arrays, source_sig=SIG["source"],
                              target_sig=SIG["target"], source_layer=15, k=k,
                              norm_mean=np.zeros(576), norm_std=np.ones(576),
                              pool={"kind": pool, "skip": 1}, arch=arch or None)
                br = load_bridge(stem)
                out.append((kind, k, _median_ms(lambda br=br: br.apply(rows), repeats)))
    return out


def bench_capture(repeats: int, layer: int = 15) -> tuple[int, float, float]:
    cfg = load_config()
    with LlamaRuntime(resolve_model("smollm2-135m", cfg), cfg, eval_hook=True) as rt:
        toks = rt.tokenize(REVIEW)

        def run(stop: bool) -> None:
            rt.clear()
            capture(rt, toks, [layer], stop_early=stop)
            rt.clear()
        return len(toks), _median_ms(lambda: run(False), repeats), _median_ms(lambda: run(True), repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    print("| kind | K | apply ms (median) |\n|---|---|---|")
    for kind, k, ms in bench_apply(args.repeats):
        print(f"| {kind} | {k} | {ms:.2f} |")
    n, full, stop = bench_capture(min(args.repeats, 20))
    print(f"\n| sender capture, {n} tokens | ms (median) |\n|---|---|")
    print(f"| whole model (30 layers) | {full:.1f} |\n| stop after layer 15 | {stop:.1f} |")
    print(f"| ratio | {full / stop:.2f}x |")


if __name__ == "__main__":
    main()
