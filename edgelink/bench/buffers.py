"""`edgelink bench buffers`: what keeping weights out of llama.cpp's extra buffer types costs.

``runtime.extra_buffers = auto`` turns them off on builds with AMX kernels (they fault there:
runtime/system.py). On other builds the extra types still matter: the CPU backend repacks
some quantized weights (Q4_0, IQ4_NL, ...) into interleaved layouts for faster kernels. This
benchmark measures prefill and greedy decode with them on and off, side by side in one run.
Each measurement runs in its own child process, so a variant that dies (SIGILL on an AMX
machine with extra buffers on) is reported as such instead of ending the benchmark; rounds
alternate the two variants so that machine noise hits both alike.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from edgelink.bench import context_tokens
from edgelink.config import Config, load_config, to_env
from edgelink.models.resolve import resolve_model
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.system import build_features, cpu_flags, cpu_model, extra_buffers

VARIANTS = ("on", "off")


def _child(model_path: str, prompt_tokens: int, n_tokens: int) -> dict[str, Any]:
    """Runs in the child: one load (with the environment's runtime.extra_buffers), a warm-up,
    then the best of three prefills and decodes."""

    cfg = load_config()
    t0 = time.perf_counter()
    with LlamaRuntime(model_path, cfg) as rt:
        load_s = time.perf_counter() - t0
        prompt = context_tokens(rt, prompt_tokens)
        rt.prefill(prompt[:32])
        rt.generate(4)
        prefill, decode = [], []
        for _ in range(3):
            rt.clear()
            t0 = time.perf_counter()
            rt.prefill(prompt)
            prefill.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = rt.generate(n_tokens, stop_at_eog=False)
            decode.append((time.perf_counter() - t0) / max(len(out), 1))
        return {"load_s": load_s, "prefill_s": min(prefill), "decode_s_per_token": min(decode),
                "use_extra_bufts": rt.extra_buffers.use, "tokens": out[:8]}


def _run_variant(model_path: str, cfg: Config, variant: str, prompt_tokens: int, n_tokens: int,
                 timeout_s: float) -> dict[str, Any]:
    env = {**os.environ, **to_env(cfg), "EDGELINK_RUNTIME_EXTRA_BUFFERS": variant}
    code = ("import json, sys; from edgelink.bench.buffers import _child; "
            "print(json.dumps(_child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))")
    try:
        done = subprocess.run([sys.executable, "-c", code, model_path, str(prompt_tokens), str(n_tokens)],
                              capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"failed": f"no answer in {timeout_s:g} s"}
    if done.returncode != 0:
        rc = done.returncode
        why = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
        return {"failed": why, "stderr": done.stderr[-400:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_buffers_bench(model: str, cfg: Config, prompt_tokens: int = 512, n_tokens: int = 64,
                      repeats: int | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:

    say = log or (lambda s: None)
    reps = repeats or cfg.bench.repeats
    path = str(resolve_model(model, cfg, pull=True))
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for r in range(reps):
        for v in VARIANTS if r % 2 == 0 else reversed(VARIANTS):
            res = _run_variant(path, cfg, v, prompt_tokens, n_tokens, timeout_s=cfg.protocol.reply_timeout_s)
            runs[v].append(res)
            say(f"round {r + 1}/{reps}, extra buffers {v}: " + (
                res["failed"] if "failed" in res else
                f"prefill {prompt_tokens / res['prefill_s']:.0f} tok/s, decode {1 / res['decode_s_per_token']:.1f} tok/s"))
    summary: dict[str, Any] = {}
    for v, rs in runs.items():
        ok = [x for x in rs if "failed" not in x]
        if not ok:
            summary[v] = {"failed": rs[0]["failed"]}
            continue
        summary[v] = {"prefill_tok_s": prompt_tokens / statistics.median(x["prefill_s"] for x in ok),
                      "decode_tok_s": 1 / statistics.median(x["decode_s_per_token"] for x in ok),
                      "load_s": statistics.median(x["load_s"] for x in ok), "runs": len(ok),
                      "failed_runs": len(rs) - len(ok)}
    same = None
    if all("failed" not in summary[v] for v in VARIANTS):
        a, b = (next(x for x in runs[v] if "failed" not in x) for v in VARIANTS)
        same = a["tokens"] == b["tokens"]
        summary["off_vs_on"] = {k: summary["off"][k] / summary["on"][k] for k in ("prefill_tok_s", "decode_tok_s")}
    feats = build_features()
    return {
        "model": model, "prompt_tokens": prompt_tokens, "n_tokens": n_tokens, "rounds": reps,
        "threads": cfg.runtime.n_threads or os.cpu_count(), "variants": summary, "same_tokens": same,
        "auto": extra_buffers("auto").reason, "build_amx": feats.get("AMX_INT8") == "1",
        "cpu_amx": "amx_int8" in cpu_flags(), "cpu": cpu_model(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "load_avg_1min": os.getloadavg()[0],
    }


def format_buffers_table(rep: dict[str, Any]) -> str:
    lines = [f"{rep['model']}: prefill of {rep['prompt_tokens']} tokens and greedy decode of "
             f"{rep['n_tokens']}, median of {rep['rounds']} rounds (best of 3 in each), "
             f"{rep['threads']} threads; {rep['cpu']} ({rep['machine']})",
             f"build AMX kernels: {rep['build_amx']}, CPU AMX: {rep['cpu_amx']}; {rep['auto']}",
             f"{'extra buffers':<16}{'prefill tok/s':>15}{'decode tok/s':>14}{'load s':>9}"]
    for v in VARIANTS:
        s = rep["variants"][v]
        if "failed" in s:
            lines.append(f"{v:<16}{'failed: ' + s['failed']:>38}")
        else:
            lines.append(f"{v:<16}{s['prefill_tok_s']:>15.1f}{s['decode_tok_s']:>14.1f}{s['load_s']:>9.2f}")
    if "off_vs_on" in rep["variants"]:
        r = rep["variants"]["off_vs_on"]
        lines.append(f"{'off / on':<16}{r['prefill_tok_s']:>15.3f}{r['decode_tok_s']:>14.3f}")
        lines.append(f"same greedy tokens: {rep['same_tokens']}")
    return "\n".join(lines)
