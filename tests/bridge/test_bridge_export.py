"""The bridge export format and numpy runtime (edgelink/bridge/__init__.py) and the ridge baseline
(edgelink/train/ridge.py): round trip, integrity, a torch reference, apply time, pair checks, and a
smoke fit on the real models."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from edgelink.bridge import FORMAT_VERSION, export_bridge, load_bridge
from edgelink.errors import ModelError

D_SRC, D_TGT = 576, 640


def _sig(arch: str, n_embd: int, digest: str) -> dict:
    return {"architecture": arch, "n_embd": n_embd, "weights_digest": digest, "name": arch}


SRC = _sig("llama", D_SRC, "a" * 64)
TGT = _sig("gemma3", D_TGT, "b" * 64)


def _export(tmp_path, k: int, seed: int = 0, name: str = "br"):
    rng = np.random.default_rng(seed)
    arrays = {"W": rng.standard_normal((D_SRC, k * D_TGT)).astype(np.float32) * 0.05,
              "b": rng.standard_normal(k * D_TGT).astype(np.float32) * 0.01}
    mean = rng.standard_normal(D_SRC).astype(np.float32)
    std = rng.uniform(0.5, 2.0, D_SRC).astype(np.float32)
    paths = export_bridge(tmp_path / name, kind="ridge", arrays=arrays, source_sig=SRC, target_sig=TGT,
                          source_layer=15, k=k, norm_mean=mean, norm_std=std,
                          pool={"kind": "mean", "skip": 1}, training={"task": "synthetic"})
    return paths, arrays, mean, std


def test_round_trip_and_manifest(tmp_path):
    (manifest, npz), arrays, mean, std = _export(tmp_path, k=3)
    assert manifest.name == "br.json" and npz.name == "br.npz"
    for path in (tmp_path / "br", manifest, npz):
        br = load_bridge(path)
        assert br.kind == "ridge" and br.k == 3 and (br.d_src, br.d_tgt) == (D_SRC, D_TGT)
        assert br.source_layer == 15
        np.testing.assert_array_equal(br.arrays["W"], arrays["W"])
        np.testing.assert_array_equal(br.mean, mean)
        np.testing.assert_array_equal(br.std, std)
    meta = json.loads(manifest.read_text())
    assert meta["format"] == FORMAT_VERSION and meta["edgelink"]
    assert meta["source"]["weights_digest"] == "a" * 64 and meta["target"]["n_embd"] == D_TGT
    assert meta["training"] == {"task": "synthetic"} and meta["weights_file"] == "br.npz"
    assert len(meta["weights_sha256"]) == 64 and meta["output_space"] == "token_embd"


def test_tampered_or_missing_weights_are_rejected(tmp_path):
    (manifest, npz), *_ = _export(tmp_path, k=1)
    blob = bytearray(npz.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    npz.write_bytes(bytes(blob))
    with pytest.raises(ModelError, match="sha256"):
        load_bridge(manifest)
    npz.unlink()
    with pytest.raises(ModelError):
        load_bridge(manifest)
    meta = json.loads(manifest.read_text())
    meta["kind"] = "telepathy9"
    manifest.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="kind"):
        load_bridge(manifest)


def test_bad_arrays_are_refused_at_export(tmp_path):
    with pytest.raises(ModelError):
        export_bridge(tmp_path / "x", kind="ridge", arrays={"W": np.zeros((D_SRC, D_TGT)), "b": np.zeros(5)},
                      source_sig=SRC, target_sig=TGT, source_layer=0, k=1,
                      norm_mean=np.zeros(D_SRC), norm_std=np.ones(D_SRC))


def test_apply_matches_torch_reference(tmp_path):
    import torch
    (manifest, _), arrays, mean, std = _export(tmp_path, k=4, seed=1)
    br = load_bridge(manifest)
    x = np.random.default_rng(2).standard_normal((17, D_SRC)).astype(np.float32) * 3
    got = br.apply(x)
    assert got.shape == (4, D_TGT) and got.dtype == np.float32
    t = torch.from_numpy(x).double()
    z = (t[1:].mean(dim=0) - torch.from_numpy(mean).double()) / torch.from_numpy(std).double()
    ref = (z @ torch.from_numpy(arrays["W"]).double() + torch.from_numpy(arrays["b"]).double())
    ref = ref.reshape(4, D_TGT).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # one row only: nothing to skip, the row itself is pooled
    np.testing.assert_allclose(br.apply(x[:1]), br.apply(np.repeat(x[:1], 2, axis=0)), rtol=1e-6)
    with pytest.raises(ModelError):
        br.apply(np.zeros((3, D_TGT), np.float32))


def test_apply_time_k32(tmp_path):
    (manifest, _), *_ = _export(tmp_path, k=32)
    br = load_bridge(manifest)
    x = np.random.default_rng(0).standard_normal((64, D_SRC)).astype(np.float32)
    br.apply(x)
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        out = br.apply(x)
        times.append(time.perf_counter() - t0)
    ms = float(np.median(times)) * 1e3
    print(f"\nBridge.apply K=32 (64 rows of {D_SRC} -> 32x{D_TGT}): median {ms:.2f} ms")
    assert out.shape == (32, D_TGT)
    assert ms <= 5.0


def test_check_pair(tmp_path):
    (manifest, _), *_ = _export(tmp_path, k=1)
    br = load_bridge(manifest)
    br.check_pair(SRC, TGT)
    with pytest.raises(ModelError, match="weights_digest"):
        br.check_pair({**SRC, "weights_digest": "c" * 64}, TGT)
    with pytest.raises(ModelError, match="target"):
        br.check_pair(SRC, {**TGT, "weights_digest": "c" * 64})
    with pytest.raises(ModelError):
        br.check_pair(TGT, SRC)  # swapped


def test_smoke_fit_on_real_models(tmp_path, cfg):
    from edgelink.models.resolve import resolve_model
    from edgelink.runtime.evalhook import capture
    from edgelink.runtime.llama import LlamaRuntime
    from edgelink.train.ridge import train_ridge

    res = train_ridge(tmp_path, cfg, n=40, n_dev=20, k=2, lambdas=(100.0, 1000.0), log=lambda *_: None)
    br = load_bridge(res["manifest"])
    assert br.k == 2 and (br.d_src, br.d_tgt) == (D_SRC, D_TGT) and br.source_layer == 15
    assert br.meta["source"]["architecture"] == "llama" and br.meta["target"]["architecture"] == "gemma3"
    assert br.meta["training"]["n_train"] == 40 and 0.0 <= br.meta["training"]["dev_acc"] <= 1.0
    br.check_pair(br.meta["source"], br.meta["target"])
    src = LlamaRuntime(resolve_model("smollm2-135m", cfg, pull=True), cfg, eval_hook=True)
    try:
        rows = capture(src, src.tokenize("A warm, funny and moving film."), [br.source_layer])[15]
    finally:
        src.close()
    out = br.apply(rows)
    assert out.shape == (2, D_TGT) and out.dtype == np.float32 and np.isfinite(out).all()
