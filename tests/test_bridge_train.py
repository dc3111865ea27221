"""Smoke training of both trainable bridge kinds on the real models, and the exported numpy
bridge against the torch module that produced it (same outputs within float tolerance)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bridges.features import split_features
from bridges.train import TrainSpec, train_bridge
from edgelink.bridge import load_bridge
from edgelink.models.signature import model_signature
from edgelink.runtime.llama import LlamaRuntime

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
