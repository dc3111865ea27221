"""`edgelink bench hook`: what the native eval hook costs during greedy decoding.

One run, three contexts on the same model, measured round-robin so that machine noise hits
them alike: (a) no hook, (b) the hook installed but idle (it answers "no" to every graph node),
(c) the hook capturing the residual after one layer at every decoded token. Each measurement
decodes ``n_tokens`` greedy tokens after a fixed prompt; the median of ``repeats`` is reported
as tokens/s, with each ratio to (a).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

from edgelink.bench import context_tokens
from edgelink.config import Config
from edgelink.models.resolve import resolve_model
from edgelink.runtime.evalhook import capturing
from edgelink.runtime.llama import LlamaRuntime


def _decode_s(rt: LlamaRuntime, prompt: list[int], n: int, layer: int | None) -> float:
    rt.clear()
    rt.prefill(prompt)
    tok = int(rt.logits.argmax())
    start = len(rt.tokens)
    t0 = time.perf_counter()
    if layer is None:
        for _ in range(n):
            rt.prefill([tok])
            tok = int(rt.logits.argmax())
    else:
        with capturing(rt, [layer], range(start, start + n)) as hook:
            for _ in range(n):
                rt.prefill([tok])
                tok = int(rt.logits.argmax())
            rows, done = hook.take_capture(layer)
            assert done.all()
    return time.perf_counter() - t0


def run_hook_bench(model: str, cfg: Config, n_tokens: int = 64, prompt_tokens: int = 64,
                   repeats: int | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    say = log or (lambda s: None)
    reps = repeats or max(cfg.bench.repeats, 9)
    path = resolve_model(model, cfg, pull=True)
    with LlamaRuntime(path, cfg, eval_hook=False) as plain, LlamaRuntime(path, cfg, eval_hook=True) as hooked:
        layer = hooked.n_layer // 2
        prompt = context_tokens(plain, prompt_tokens)
        cases: dict[str, tuple[LlamaRuntime, int | None]] = {
            "no_hook": (plain, None), "hook_idle": (hooked, None), "hook_capture_1_layer": (hooked, layer)}
        for rt, lay in cases.values():  # warm-up
            _decode_s(rt, prompt, 4, lay)
        times: dict[str, list[float]] = {k: [] for k in cases}
        for r in range(reps):
            for name, (rt, lay) in cases.items():
                times[name].append(_decode_s(rt, prompt, n_tokens, lay))
            say(f"repeat {r + 1}/{reps}: " + ", ".join(f"{k} {n_tokens / v[-1]:.1f} tok/s" for k, v in times.items()))
        # Best of N is the estimator least hurt by other load on the machine; the median of the
        # per-round ratios (each round runs the three cases back to back) is reported beside it.
        rates = {k: n_tokens / min(v) for k, v in times.items()}
        paired = {k: statistics.median(b / a for a, b in zip(v, times["no_hook"], strict=True)) for k, v in times.items()}
        return {
            "model": model, "n_layer": hooked.n_layer, "capture_layer": layer, "n_tokens": n_tokens,
            "prompt_tokens": prompt_tokens, "repeats": reps, "threads": cfg.runtime.n_threads or os.cpu_count(),
            "tokens_per_s": rates,
            "ratio_to_no_hook": {k: v / rates["no_hook"] for k, v in rates.items()},
            "median_paired_ratio": paired,
            "load_avg_1min": os.getloadavg()[0],
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        }


def format_hook_table(rep: dict[str, Any]) -> str:
    lines = [f"{rep['model']}: greedy decode of {rep['n_tokens']} tokens after {rep['prompt_tokens']}, "
             f"best of {rep['repeats']}, {rep['threads']} threads ({rep['machine']}, "
             f"load {rep['load_avg_1min']:.1f})",
             f"{'case':<24}{'tok/s':>10}{'ratio':>10}{'paired':>10}"]
    for k, v in rep["tokens_per_s"].items():
        lines.append(f"{k:<24}{v:>10.1f}{rep['ratio_to_no_hook'][k]:>10.3f}{rep['median_paired_ratio'][k]:>10.3f}")
    return "\n".join(lines)
