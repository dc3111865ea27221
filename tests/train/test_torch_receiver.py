"""The torch receiver (edgelink/train/torch_receiver.py) against llama.cpp on the same GGUF files.

llama.cpp's CPU kernels quantize activations to 8 bits before each quantized matmul and keep
K/V in f16; the torch copy computes in f32 from the dequantized weights. The logits therefore
differ by a few tenths (about 1% of their spread) and the top-1 token agrees except where
llama.cpp's own top-2 margin is within that noise. A structural error (a wrong rope, norm or
mask) shows as correlation far below 0.99 and top-1 disagreement on clear-cut prompts.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edgelink.runtime.evalhook import capture
from edgelink.runtime.llama import LlamaRuntime
from edgelink.train.torch_receiver import TorchReceiver

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little robot who lived in a lighthouse by the sea. Every night",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Water boils at a temperature of",
    "The three primary colours are red, yellow and",
    "Question: What is 7 times 8?\nAnswer:",
]
# Clear-cut prompts (llama.cpp's top-2 margin above this) must agree on the top-1 token.
CLEAR_MARGIN = 0.75


def _long_tokens(rt: LlamaRuntime, n: int) -> list[int]:
    root = Path(__file__).resolve().parents[2]
    text = "\n\n".join(p.read_text() for p in sorted((root / "docs").glob("*.md")))
    toks = rt.tokenize(text)
    assert len(toks) >= n
    return toks[:n]


def _compare(name: str, receiver: TorchReceiver, rt: LlamaRuntime, prompts: list[list[int]]):
    rows = []
    for toks in prompts:
        rt.clear()
        ref = rt.prefill(toks)
        t0 = time.perf_counter()
        with torch.no_grad():
            got = receiver(torch.tensor(toks), last_only=True)[-1].numpy()
        dt = time.perf_counter() - t0
        diff = np.abs(got - ref)
        top2 = np.sort(ref)[-2:]
        rows.append({
            "n": len(toks), "max_abs": float(diff.max()),
            "corr": float(np.corrcoef(got, ref)[0, 1]),
            "top1": bool(got.argmax() == ref.argmax()), "margin": float(top2[1] - top2[0]),
            "top5": len(set(np.argsort(-got)[:5]) & set(np.argsort(-ref)[:5])), "torch_s": dt,
        })
    agree = sum(r["top1"] for r in rows)
    print(f"\n{name}: max |logit diff| {max(r['max_abs'] for r in rows):.3f}, "
          f"top-1 agreement {agree}/{len(rows)}, min corr {min(r['corr'] for r in rows):.5f}")
    for r in rows:
        print(f"  T={r['n']:4d} max_abs {r['max_abs']:.3f} corr {r['corr']:.5f} top1 {r['top1']} "
              f"(llama.cpp margin {r['margin']:.2f}) top5 overlap {r['top5']}/5 "
              f"torch {r['torch_s']:.2f}s")
    return rows


def _per_layer(name: str, receiver: TorchReceiver, rt: LlamaRuntime, toks: list[int]):
    """Each torch layer fed llama.cpp's own residual stream: relative error per layer."""
    rt.clear()
    caps = capture(rt, toks, range(receiver.cfg.n_layer))
    rel = []
    with torch.no_grad():
        for il in range(receiver.cfg.n_layer):
            x = receiver.embed(torch.tensor(toks)) if il == 0 else torch.from_numpy(caps[il - 1])
            got = receiver.block(il, x[None])[0].numpy()
            rel.append(float(np.linalg.norm(got - caps[il]) / np.linalg.norm(caps[il])))
    print(f"{name}: per-layer relative error (T={len(toks)}, llama.cpp's input to each layer): "
          f"max {max(rel):.4f}, mean {np.mean(rel):.4f}")
    return rel, caps


def _check(rows, max_abs: float):
    for r in rows:
        assert r["corr"] > 0.997, r
        assert r["max_abs"] < max_abs, r
        assert r["top5"] >= 3, r
        if r["margin"] > CLEAR_MARGIN:
            assert r["top1"], r
    assert sum(r["top1"] for r in rows) >= len(rows) - 1


@pytest.fixture(scope="module")
def smollm2(cfg, smollm2_path):
    rt = LlamaRuntime(smollm2_path, cfg, eval_hook=True)
    yield TorchReceiver.from_gguf(smollm2_path, kv_f16=True), rt
    rt.close()


@pytest.fixture(scope="module")
def gemma3(cfg, gemma3_path):
    rt = LlamaRuntime(gemma3_path, cfg, eval_hook=True)
    yield TorchReceiver.from_gguf(gemma3_path, kv_f16=True), rt
    rt.close()


def test_smollm2_matches_llama_cpp(smollm2):
    receiver, rt = smollm2
    assert receiver.cfg.arch == "llama" and receiver.cfg.rope_type == "norm"
    long = _long_tokens(rt, 200)
    prompts = [rt.tokenize(p) for p in PROMPTS] + [long]
    _check(_compare("smollm2-135m", receiver, rt, prompts), max_abs=2.0)
    rel, _ = _per_layer("smollm2-135m", receiver, rt, long)
    assert max(rel) < 0.03


def test_gemma3_matches_llama_cpp_including_sliding_window(gemma3):
    receiver, rt = gemma3
    c = receiver.cfg
    assert c.arch == "gemma3" and c.n_swa == 512 and c.softcap == 0.0
    assert [il for il in range(c.n_layer) if not c.is_swa(il)] == [5, 11, 17]
    long = _long_tokens(rt, 700)  # past the 512-token window of the local layers
    prompts = [rt.tokenize(p) for p in PROMPTS] + [long]
    _check(_compare("gemma3-270m", receiver, rt, prompts), max_abs=2.5)
    rel, caps = _per_layer("gemma3-270m", receiver, rt, long)
    assert max(rel) < 0.03

    # The window matters: local layer 0 without it is far off at positions past 512.
    def tail_err(window: int) -> float:
        receiver.cfg = dataclasses.replace(c, n_swa=window)
        try:
            with torch.no_grad():
                got = receiver.block(0, receiver.embed(torch.tensor(long))[None])[0].numpy()
        finally:
            receiver.cfg = c
        return float(np.linalg.norm(got[600:] - caps[0][600:]) / np.linalg.norm(caps[0][600:]))

    with_window, without = tail_err(512), tail_err(0)
    print(f"gemma3-270m layer 0, positions 600-699: relative error {with_window:.4f} with the "
          f"512 window, {without:.4f} without")
    assert without > 3 * with_window


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_embedding_input_is_differentiable_and_matches(model, request):
    receiver, rt = request.getfixturevalue(model)
    toks = rt.tokenize("The capital of France is")
    embeds = receiver.embed(torch.tensor(toks)).detach().requires_grad_(True)
    logits = receiver(inputs_embeds=embeds, last_only=True)[-1]
    with torch.no_grad():
        by_ids = receiver(torch.tensor(toks), last_only=True)[-1]
    assert torch.allclose(logits, by_ids, atol=1e-4)
    # llama.cpp's embedding input (llama_batch.embd) takes the same vectors.
    rt.clear()
    ref = rt.prefill_embeddings(embeds.detach().numpy())
    assert int(ref.argmax()) == int(logits.argmax())
    assert np.corrcoef(ref, logits.detach().numpy())[0, 1] > 0.997
    # Gradients reach the input; the weights are frozen buffers.
    torch.log_softmax(logits, -1)[int(ref.argmax())].backward()
    assert embeds.grad is not None and torch.isfinite(embeds.grad).all()
    assert embeds.grad.abs().sum() > 0
    assert not list(receiver.parameters())


def test_batched_forward_equals_single(smollm2):
    receiver, rt = smollm2
    a = rt.tokenize("Water boils at a temperature of")
    b = rt.tokenize("The three primary colours are red")
    n = min(len(a), len(b))
    with torch.no_grad():
        batched = receiver(torch.tensor([a[:n], b[:n]]))
        single = receiver(torch.tensor(b[:n]))
    assert batched.shape == (2, n, receiver.cfg.n_vocab)
    assert torch.allclose(batched[1], single, atol=1e-3)
