"""Shape twins (edgelink/models/twins.py): each loads under llama.cpp, its KV state is byte for byte the
size of the real model's, Gemma-3-4B's keeps its sliding window, and a handoff on the
Llama-3-8B twin across two processes continues exactly."""

from __future__ import annotations

import hashlib
import os
import uuid

import pytest

from edgelink import api
from edgelink.bench import context_tokens
from edgelink.models.resolve import resolve_model
from edgelink.models.twins import TWINS, twin_path, write_twin
from edgelink.roles.launcher import start_receiver, stop_receiver
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.sizing import kv_bytes_per_token

# Published geometries: layers x KV heads x head size x (K, V) x f16
REAL_KV_BYTES_PER_TOKEN = {"llama-3-8b": 32 * 8 * 128 * 4, "llama-3.2-1b": 16 * 8 * 64 * 4,
                           "qwen2.5-7b": 28 * 4 * 128 * 4, "mistral-7b": 32 * 8 * 128 * 4,
                           "gemma-3-4b": 34 * 4 * 256 * 4}


@pytest.fixture(scope="module")
def twin_cfg(cfg, tmp_path_factory):
    return cfg.replace(paths_cache_dir=tmp_path_factory.mktemp("twins"), runtime_n_ctx=2048)


@pytest.mark.parametrize("name", sorted(TWINS))
def test_twin_state_has_the_real_models_size(twin_cfg, name):
    spec = TWINS[name]
    assert spec.kv_bytes_per_token == REAL_KV_BYTES_PER_TOKEN[name]
    path = resolve_model(f"twin:{name}", twin_cfg)
    assert path == twin_path(name, twin_cfg) and path.stat().st_size < 100 << 20
    n = 300
    with LlamaRuntime(path, twin_cfg) as rt:
        assert rt.n_layer == spec.n_layer and rt.n_swa == spec.n_swa
        assert kv_bytes_per_token(rt) == spec.kv_bytes_per_token
        rt.prefill(context_tokens(rt, n))
        blob = rt.export_state().nbytes
        # below the window every cell is held: K/V rows plus 8 bytes of position and sequence
        # id per cell and a small header
        assert n * spec.kv_bytes_per_token < blob < n * (spec.kv_bytes_per_token + 64) + 4096
        assert len(rt.generate(4)) == 4


def test_gemma3_twin_keeps_its_sliding_window(twin_cfg):
    """Past the 1,024-token window only the global layers (one in six) keep every cell."""
    spec = TWINS["gemma-3-4b"]
    with LlamaRuntime(twin_path(spec.name, twin_cfg), twin_cfg) as rt:
        n = 1800
        rt.prefill(context_tokens(rt, n))
        blob = rt.export_state().nbytes
    per_layer = spec.kv_bytes_per_token // spec.n_layer
    n_global = spec.n_layer // 6
    full = n * spec.kv_bytes_per_token
    assert blob < 0.8 * full
    assert blob > n * n_global * per_layer + spec.n_swa * (spec.n_layer - n_global) * per_layer


def test_twins_are_written_deterministically(tmp_path):
    spec = TWINS["llama-3.2-1b"]
    a, b = write_twin(spec, tmp_path / "a.gguf"), write_twin(spec, tmp_path / "b.gguf")
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()


def test_handoff_on_the_llama3_8b_twin_is_exact(twin_cfg):
    """About 90 MB of Llama-3-8B-shaped state over shared memory to a second process."""
    name = f"t-twin-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    path = str(twin_path("llama-3-8b", twin_cfg))
    proc = start_receiver(path, twin_cfg, name)
    try:
        with LlamaRuntime(path, twin_cfg) as rt:
            prompt = rt.detokenize(context_tokens(rt, 700)[1:])
        out = api.handoff(path, prompt, to=f"shm:{name}", n_tokens=8, cfg=twin_cfg, verify=True)
        assert out.verified.matches and len(out.tokens) == 8
        assert out.bytes["payload"] > 600 * TWINS["llama-3-8b"].kv_bytes_per_token
    finally:
        assert stop_receiver(proc) in (0, -15), proc.stderr_tail()


def test_models_twins_lists_them(twin_cfg):
    rows = api.twins(twin_cfg)
    assert [r["name"] for r in rows] == list(TWINS)
    assert rows[0]["kv_bytes_per_token"] == 131072
    one = api.twins(twin_cfg, "gemma-3-4b")
    assert len(one) == 1 and os.path.isfile(one[0]["path"])
