"""`edgelink bench bridge`: what a bridged handoff costs at run time, side by side with what it replaces.

* ``apply``: ``Bridge.apply`` (numpy) per message for each kind at K = 1, 8, 32 (perceiver and
  lip with random weights of the default architecture; the cost does not depend on the values),
  on 32 source rows. The issue's budget is 5 ms per message for K <= 32.
* ``capture``: the sender's capture of the source layer for one review, running the whole model
  (what a text handoff's prefill costs) and stopping after the source layer (what a bridged
  handoff does), and their ratio; then the stopped capture after each of ``--layers``.
* ``read``: Gemma-3's read of K bridged vectors behind its cached sentiment primer, with the
  prompt's tail (" \nSentiment:") or ``direct`` (answer at the last vector), computing the whole
  vocabulary's logits (llama.cpp's head) or only the two labels' (``LabelHead``).

    edgelink bench bridge [--repeats 50] [--layers 0,2,4,8,15]
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgelink.bench.timing import median_seconds
from edgelink.bridge import export_bridge, load_bridge
from edgelink.bridge.forward import expected_shapes
from edgelink.config import Config
from edgelink.kinds.bridged import feed_vectors
from edgelink.models.resolve import resolve_model
from edgelink.runtime.evalhook import capture
from edgelink.runtime.label_head import LabelHead
from edgelink.runtime.llama import LlamaRuntime
from edgelink.train.tasks import task_prompt

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


def _capture_ms(cfg: Config, repeats: int, stops: list[int | None], layer: int = 15) -> tuple[int, list[float]]:
    """(tokens, median ms per entry of ``stops``): None runs the whole model capturing
    ``layer``, an int stops the graph right after that layer."""
    with LlamaRuntime(resolve_model("smollm2-135m", cfg), cfg, eval_hook=True) as rt:
        toks = rt.tokenize(REVIEW)

        def run(stop: int | None) -> None:
            rt.clear()
            capture(rt, toks, [layer if stop is None else stop], stop_early=stop is not None)
            rt.clear()
        return len(toks), [_median_ms(lambda s=s: run(s), repeats) for s in stops]


def bench_capture(cfg: Config, repeats: int, layer: int = 15) -> tuple[int, float, float]:
    n, (full, stop) = _capture_ms(cfg, repeats, [None, layer], layer)
    return n, full, stop


def bench_capture_layers(cfg: Config, repeats: int, layers: list[int]) -> list[tuple[int, float]]:
    return list(zip(layers, _capture_ms(cfg, repeats, list(layers))[1], strict=True))


def bench_read(cfg: Config, repeats: int, ks: tuple[int, ...] = (1, 2, 8)) -> list[tuple[int, str, float, float]]:
    """(K, tail|direct, full head ms, label head ms) for Gemma-3 reading random vectors."""
    prompt = task_prompt("sentiment")
    out = []
    with LlamaRuntime(resolve_model("gemma3-270m", cfg), cfg, eval_hook=True) as rt:
        emb = rt.token_embeddings()
        head = LabelHead(rt, [rt.tokenize(v, add_special=False)[0] for v in prompt.labels.values()])
        rt.prefill(rt.tokenize(prompt.primer + prompt.before))
        n0 = len(rt.tokens)
        rng = np.random.default_rng(0)
        for k in ks:
            v = rng.standard_normal((k, rt.n_embd)).astype(np.float32) * 0.05
            for how, tail in (("tail", rt.tokenize(prompt.after, add_special=False)), ("direct", [])):
                rows = emb.rows(tail) if tail else None

                def full(v=v, tail=tail, rows=rows) -> None:
                    rt.truncate(n0)
                    feed_vectors(rt, v, tail, rows, emb.input_scale)

                def labels(v=v, tail=tail, rows=rows) -> None:
                    rt.truncate(n0)
                    head.read(len(v) + len(tail), lambda: feed_vectors(rt, v, tail, rows, emb.input_scale))
                out.append((k, how, _median_ms(full, repeats), _median_ms(labels, repeats)))
    return out


def run_bridge_bench(cfg: Config, repeats: int, layers: list[int]) -> dict[str, Any]:
    """apply, capture and read, in one run (capture at most 20 rounds, read at most 30)."""
    n, full, stop = bench_capture(cfg, min(repeats, 20))
    return {"apply": [{"kind": kind, "k": k, "ms": ms} for kind, k, ms in bench_apply(repeats)],
            "capture": {"tokens": n, "whole_model_ms": full, "stop_after_15_ms": stop,
                        "layers": [{"layer": layer, "ms": ms}
                                   for layer, ms in bench_capture_layers(cfg, min(repeats, 20), layers)]},
            "read": [{"k": k, "prompt": how, "full_head_ms": f, "label_head_ms": lh}
                     for k, how, f, lh in bench_read(cfg, min(repeats, 30))]}


def format_bridge_tables(report: dict[str, Any]) -> str:
    """The three markdown tables of docs/bridges.md."""
    cap = report["capture"]
    lines = ["| kind | K | apply ms (median) |", "|---|---|---|"]
    lines += [f"| {r['kind']} | {r['k']} | {r['ms']:.2f} |" for r in report["apply"]]
    lines += ["", f"| sender capture, {cap['tokens']} tokens | ms (median) |", "|---|---|",
              f"| whole model (30 layers) | {cap['whole_model_ms']:.1f} |",
              f"| stop after layer 15 | {cap['stop_after_15_ms']:.1f} |",
              f"| ratio | {cap['whole_model_ms'] / cap['stop_after_15_ms']:.2f}x |"]
    lines += [f"| stop after layer {r['layer']} | {r['ms']:.1f} |" for r in cap["layers"]]
    lines += ["", "| Gemma-3 read, K vectors | prompt | full head ms | label head ms |", "|---|---|---|---|"]
    lines += [f"| {r['k']} | {r['prompt']} | {r['full_head_ms']:.1f} | {r['label_head_ms']:.1f} |"
              for r in report["read"]]
    return "\n".join(lines)
