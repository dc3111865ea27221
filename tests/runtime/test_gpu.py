"""A GPU build of llama.cpp exports the state from device memory through the same API: a GPU
context and a CPU context of the same model either hand off exactly (same signature) or are
refused at the handshake with the field that differs.

These run only where llama-cpp-python was built with a GPU backend (CUDA, Metal, Vulkan):
``CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir llama-cpp-python``.
On a CPU build there is no GPU context to make, which is what the skip reason says.
"""

from __future__ import annotations

import llama_cpp
import pytest

import edgelink
from edgelink.bench import context_tokens
from edgelink.errors import SignatureMismatch

pytestmark = pytest.mark.skipif(
    not llama_cpp.llama_supports_gpu_offload(),
    reason="this llama-cpp-python build has no GPU backend (llama_supports_gpu_offload() is "
           "false); the CPU<->GPU handoff test runs on CUDA or Metal builds")


@pytest.mark.parametrize("flash", ["on", "off"])
def test_a_gpu_state_restores_on_the_cpu_or_is_refused_with_the_field(smollm2_path, cfg, flash):
    gpu = cfg.replace(runtime_n_gpu_layers=-1, runtime_flash_attn=flash)
    cpu = cfg.replace(runtime_n_gpu_layers=0, runtime_flash_attn=flash)
    with edgelink.load(str(smollm2_path), gpu) as g, edgelink.load(str(smollm2_path), cpu) as c:
        g.prefill(context_tokens(g.runtime, 300))
        snap = g.snapshot()
        if g.signature != c.signature:
            with pytest.raises(SignatureMismatch) as err:
                c.restore(snap)
            gs, cs = g.signature.to_dict(), c.signature.to_dict()
            differ = {k for k in gs if gs[k] != cs.get(k)}
            assert any(k in str(err.value) for k in differ), (differ, str(err.value))
            return
        c.restore(snap)
        assert c.runtime.tokens == g.runtime.tokens
        # Different kernels round differently: the first greedy token from the same cells agrees
        assert c.generate(1, stop_at_eog=False).tokens == g.generate(1, stop_at_eog=False).tokens
