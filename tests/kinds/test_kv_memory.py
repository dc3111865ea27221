"""KV_MEMORY on real models: another text's cells appended after the receiver's context."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgelink.errors import StateError
from edgelink.kinds.memory import MemoryApplier, memory_tensors
from edgelink.protocol.kinds import ApplyMode, Kind
from edgelink.protocol.messages import TensorMessage
from edgelink.runtime.kvstate import parse_seq_state
from edgelink.runtime.llama import LlamaRuntime

FACT = "Note for the record: the secret password for the vault is tangerine."
PRE = "You are a helpful assistant. Here is what you know:"
QUESTION = " Question: what is the secret password for the vault? Answer: the password is"


def _memory_msg(rt: LlamaRuntime) -> TensorMessage:
    tensors, attrs, token_range = memory_tensors(rt)
    return TensorMessage(b"\0" * 16, 1, Kind.KV_MEMORY, ApplyMode.MEMORY, rt.seq, (0, rt.n_layer),
                         token_range, tuple(tensors), attrs)


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_memory_lands_after_the_receivers_context(model_paths, cfg, name):
    a, b = LlamaRuntime(model_paths[name], cfg), LlamaRuntime(model_paths[name], cfg)
    try:
        a.prefill(a.tokenize(FACT, add_special=False))
        m = len(a.tokens)
        b.prefill(b.tokenize(PRE))
        n = len(b.tokens)
        MemoryApplier(b).apply(_memory_msg(a))
        assert b.tokens[n:] == [-1] * m and b.logits is None
        positions = np.sort(parse_seq_state(b.export_state()).caches[0].streams[0].positions)
        assert positions.tolist() == list(range(n + m))
        b.prefill(b.tokenize(QUESTION, add_special=False))
        assert len(b.generate(6)) > 0  # what it says is measured by `edgelink bench memory`
    finally:
        a.close()
        b.close()


def test_bad_memory_is_rejected_and_state_unchanged(model_paths, cfg):
    a, b = (LlamaRuntime(model_paths["smollm2-135m"], cfg) for _ in range(2))
    small = LlamaRuntime(model_paths["smollm2-135m"], cfg.replace(runtime_n_ctx=256))
    try:
        a.prefill(a.tokenize(FACT * 20, add_special=False))
        good = _memory_msg(a)
        b.prefill(b.tokenize(PRE))
        before = b.state_digest()
        for bad in (dataclasses.replace(good, apply=ApplyMode.APPEND),
                    dataclasses.replace(good, token_range=(1, good.token_range[1] + 1)),
                    dataclasses.replace(good, tensors=good.tensors[:-3] + good.tensors[-2:])):
            with pytest.raises(StateError):
                MemoryApplier(b).apply(bad)
            assert b.state_digest() == before
        small.prefill(small.tokenize(PRE * 3))
        before = small.state_digest()
        with pytest.raises(StateError, match="exceed|fit"):
            MemoryApplier(small).apply(good)  # does not fit after the context
        assert small.state_digest() == before
    finally:
        for rt in (a, b, small):
            rt.close()
