"""How much of a task the sender holds after each layer, and what reading that layer costs.

A fast bridge must stop the sender early (``capture(..., stop_early=True)`` pays for layers
0..L only), so the question behind issue 16's "accurate and fast" goal is how early the task's
information is there. For each layer this fits the evaluation's linear probe (mean-pooled rows
without BOS, standardized, C picked on DEV) on train rows and scores it on DEV, and times the
stopped capture of the first ``time_n`` DEV texts. It reads no test data.

    python -m edgelink.train.layers --task sentiment --layers 0,2,4,6,8,10,12,15 --out layers.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgelink.bridge.blas import blas_threads
from edgelink.config import Config, load_config
from edgelink.models.resolve import resolve_model
from edgelink.runtime.evalhook import capture
from edgelink.runtime.llama import LlamaRuntime
from edgelink.train.data import load_split
from edgelink.train.evaluate import PROBE_CS, SOURCE, fit_probe, probe_predict
from edgelink.train.features import mean_pool


def pooled_layers(rt: LlamaRuntime, texts: list[str], layers: list[int]) -> dict[int, np.ndarray]:
    """Mean of each text's rows after every layer in ``layers`` (BOS row dropped), one stopped
    prefill per text: {layer: f64 [n_texts, d]}."""
    out: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    for i, text in enumerate(texts):
        rt.clear()
        rows = capture(rt, rt.tokenize(text), layers, stop_early=True)
        for layer in layers:
            out[layer].append(mean_pool(rows[layer]))
        if (i + 1) % 100 == 0 or i + 1 == len(texts):
            sys.stderr.write(f"\rcaptured {i + 1}/{len(texts)} texts")
    sys.stderr.write("\n")
    rt.clear()
    return {layer: np.stack(v).astype(np.float64) for layer, v in out.items()}


def capture_ms(rt: LlamaRuntime, texts: list[str], layer: int) -> float:
    """Median wall time of a capture stopped after ``layer`` (the fast bridge's sender cost)."""
    ts = []
    for text in texts:
        rt.clear()
        ids = rt.tokenize(text)
        t0 = time.perf_counter()
        capture(rt, ids, [layer], stop_early=True)
        ts.append(time.perf_counter() - t0)
    rt.clear()
    return float(np.median(ts) * 1e3)


def layer_curve(task: str, layers: list[int], cfg: Config | None = None, n_train: int = 2000,
                n_dev: int = 300, time_n: int = 50) -> dict[str, Any]:
    cfg = cfg or load_config()
    train = load_split(task, "train", cfg)[:n_train]
    dev = load_split(task, "dev", cfg)[:n_dev]
    labels = sorted({ex.label for ex in train})
    y_tr = np.array([labels.index(ex.label) for ex in train])
    y_dev = np.array([labels.index(ex.label) for ex in dev])
    with LlamaRuntime(resolve_model(SOURCE, cfg), cfg, eval_hook=True) as rt, blas_threads(1):
        x_tr = pooled_layers(rt, [ex.text for ex in train], layers)
        x_dev = pooled_layers(rt, [ex.text for ex in dev], layers)
        n_tok = float(np.mean([len(rt.tokenize(ex.text)) for ex in dev[:time_n]]))
        rows = []
        for layer in layers:
            probe = fit_probe(x_tr[layer], y_tr, x_dev[layer], y_dev, len(labels), PROBE_CS)
            acc = float(np.mean(probe_predict(probe, x_dev[layer]) == y_dev))
            ms = capture_ms(rt, [ex.text for ex in dev[:time_n]], layer)
            rows.append({"layer": layer, "probe_dev_acc": acc, "c": probe["C"], "capture_ms": ms})
            sys.stderr.write(f"layer {layer}: probe dev accuracy {acc:.3f}, capture {ms:.1f} ms\n")
    return {"task": task, "n_train": len(train), "n_dev": len(dev), "time_n": time_n,
            "mean_tokens": n_tok, "threads": cfg.runtime.n_threads, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m edgelink.train.layers", description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="sentiment")
    ap.add_argument("--layers", default="0,2,4,6,8,10,12,15")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-dev", type=int, default=300)
    ap.add_argument("--time-n", type=int, default=50, help="dev texts timed per layer")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    res = layer_curve(a.task, [int(x) for x in a.layers.split(",")], n_train=a.n_train,
                      n_dev=a.n_dev, time_n=a.time_n)
    text = json.dumps(res, indent=1)
    if a.out:
        a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
