"""Smoke training of both trainable bridge kinds on the real models, and the exported numpy
bridge against the torch module that produced it (same outputs within float tolerance)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgelink.bridge import load_bridge
from edgelink.errors import ModelError
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.signature import model_signature
from edgelink.train.features import split_features
from edgelink.train.train import TrainSpec, train_bridge

SMOKE = dict(n_train=24, n_dev=12, steps=4, batch=6, eval_every=2, k=4, d_model=64, n_heads=4,
             d_ff=128, n_layers=2, bottleneck=64)


@pytest.fixture(scope="module")
def dev_rows(cfg, smollm2_path):
    rt = LlamaRuntime(smollm2_path, cfg, eval_hook=True)
    try:
        sig = model_signature(rt, cfg)
        _, feats = split_features(rt, cfg, "sentiment", "dev", 15, 12, sig.weights_digest, quiet=True)
    finally:
        rt.close()
    return [feats.rows_of(i) for i in range(len(feats))]


@pytest.mark.parametrize("kind", ["perceiver", "lip"])
def test_smoke_training_exports_a_bridge_numpy_matches_torch(kind, cfg, tmp_path, dev_rows):
    spec = TrainSpec(kind=kind, **SMOKE)
    out = train_bridge(spec, tmp_path, cfg, log=lambda m: None)
    assert out["manifest"].name == f"sentiment-{kind}-k4-l15-s0.json"
    assert len(out["curve"]) == 2 and 1 <= out["best_step"] <= 4
    br = load_bridge(out["manifest"])
    assert br.kind == kind and br.k == 4 and br.prompt is not None
    assert br.meta["training"]["n_train"] == 24 and br.meta["training"]["steps"] == 4
    model = out["model"].eval()
    target_norm = br.arch["target_norm"]
    worst = 0.0
    for rows in dev_rows:
        got = br.apply(rows)
        z = torch.from_numpy(br.normalize(br.rows(rows)))[None]
        with torch.no_grad():
            want = model(z, torch.ones(z.shape[:2], dtype=torch.bool))[0].numpy()
        assert got.shape == (4, 640)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), target_norm, rtol=1e-4)
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    assert worst < 1e-4, f"numpy and torch differ by {worst:.2e} (relative to the output's scale)"
    # Different texts give different vectors: the bridge reads its input.
    a, b = br.apply(dev_rows[0]), br.apply(dev_rows[1])
    assert np.abs(a - b).max() > 1e-4


@pytest.mark.slow
def test_same_seed_same_bridge(cfg, tmp_path):
    spec = TrainSpec(kind="lip", **{**SMOKE, "steps": 2, "eval_every": 2})
    a = train_bridge(spec, tmp_path / "a", cfg, log=lambda m: None)
    b = train_bridge(spec, tmp_path / "b", cfg, log=lambda m: None)
    assert a["npz"].read_bytes() == b["npz"].read_bytes()


def test_the_other_direction_gemma_to_smollm2(cfg, tmp_path):
    """Nothing assumes which model sends: a gemma3 source and a llama target train and export
    the same way (rows 640 wide in, 576 wide out)."""
    spec = TrainSpec(kind="perceiver", source="gemma3-270m", target="smollm2-135m",
                     **{**SMOKE, "steps": 2, "eval_every": 2, "layer": 9})
    out = train_bridge(spec, tmp_path, cfg, log=lambda m: None)
    br = load_bridge(out["manifest"])
    assert (br.d_src, br.d_tgt, br.source_layer) == (640, 576, 9)
    assert br.meta["source"]["architecture"] == "gemma3" and br.meta["target"]["architecture"] == "llama"
    rows = np.random.default_rng(0).standard_normal((7, 640)).astype(np.float32)
    z = torch.from_numpy(br.normalize(br.rows(rows)))[None]
    with torch.no_grad():
        want = out["model"].eval()(z, torch.ones(z.shape[:2], dtype=torch.bool))[0].numpy()
    np.testing.assert_allclose(br.apply(rows), want, rtol=1e-4, atol=1e-5)


def test_direct_bridge_is_trained_and_read_without_the_tail(cfg, tmp_path, dev_rows):
    """``tail=False``: the manifest's prompt has no tail, and what training optimised (the torch
    target's logits at the last bridged vector) is what llama.cpp answers when it reads the
    bridge the same way (primer + before + the K vectors, nothing after)."""
    from edgelink.kinds.bridged import feed_vectors
    from edgelink.models.resolve import resolve_model
    from edgelink.train.tasks import task_prompt
    from edgelink.train.torch_receiver import TorchReceiver
    from edgelink.train.train import _ReceiverHead

    spec = TrainSpec(kind="perceiver", tail=False, **{**SMOKE, "steps": 2, "eval_every": 2})
    out = train_bridge(spec, tmp_path, cfg, log=lambda m: None)
    assert out["manifest"].name == "sentiment-perceiver-k4-l15-direct-s0.json"
    br = load_bridge(out["manifest"])
    task = task_prompt("sentiment")
    assert br.prompt.after == "" and (br.prompt.primer, br.prompt.before) == (task.primer, task.before)
    with LlamaRuntime(resolve_model("gemma3-270m", cfg), cfg) as t:
        head = _ReceiverHead(TorchReceiver.from_gguf(t.path), t, br.prompt, list(task.labels))
        assert head.after is None
        ids = head.label_ids.tolist()
        emb = t.token_embeddings()
        t.prefill(t.tokenize(task.primer + task.before))
        n0 = len(t.tokens)
        for rows in dev_rows[:3]:
            v = br.apply(rows)
            t.truncate(n0)
            got = feed_vectors(t, v, [], None, emb.input_scale)[ids]
            assert len(t.tokens) == n0 + 4  # K positions read, no tail
            with torch.no_grad():
                want = head.logits(torch.from_numpy(v)[None])[0, ids].numpy()
            np.testing.assert_allclose(got, want, atol=0.5)  # llama.cpp vs torch (see the parity test)


def test_distillation_matches_the_teachers_answers(cfg, tmp_path):
    """A student trained on a teacher's answers: the teacher (a direct bridge) is read its own
    way, its logits cover every training example, and a teacher of another task is refused."""
    import dataclasses

    from edgelink.models.resolve import resolve_model
    from edgelink.train.torch_receiver import TorchReceiver
    from edgelink.train.train import teacher_label_logits

    t_spec = TrainSpec(kind="perceiver", tail=False, **{**SMOKE, "steps": 2, "eval_every": 2})
    teacher = train_bridge(t_spec, tmp_path / "t", cfg, log=lambda m: None)["manifest"]
    spec = TrainSpec(kind="perceiver", teacher=str(teacher), distill=1.0,
                     **{**SMOKE, "steps": 8, "eval_every": 8, "lr": 3e-3})
    logs: list[str] = []
    out = train_bridge(spec, tmp_path / "s", cfg, log=logs.append)
    assert any(m.startswith(f"teacher {teacher.name}: train accuracy") for m in logs)
    assert out["teacher"] == str(teacher)
    with LlamaRuntime(resolve_model("smollm2-135m", cfg), cfg, eval_hook=True) as src, \
            LlamaRuntime(resolve_model("gemma3-270m", cfg), cfg) as tgt:
        from edgelink.train.data import load_split

        train = load_split("sentiment", "train", cfg)[:SMOKE["n_train"]]
        rx = TorchReceiver.from_gguf(tgt.path)
        t_logits = teacher_label_logits(spec, cfg, src, tgt, rx, train, ["negative", "positive"],
                                        lambda m: None)
        assert t_logits.shape == (SMOKE["n_train"], 2) and torch.isfinite(t_logits).all()
        wrong = dataclasses.replace(spec, task="topic")
        with pytest.raises(ModelError, match="task"):
            teacher_label_logits(wrong, cfg, src, tgt, rx, train, ["negative", "positive"],
                                 lambda m: None)
