"""The KV snapshot on real models, in one process: blob parsing, checks, exact continuation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgelink.bench import context_tokens
from edgelink.errors import StateError
from edgelink.kinds.snapshot import SnapshotApplier, snapshot_tensors
from edgelink.protocol.kinds import ApplyMode, DType, Kind
from edgelink.protocol.messages import Tensor, TensorMessage
from edgelink.runtime.kvstate import (
    assemble_seq_state,
    parse_seq_state,
    state_to_tensors,
    tensors_to_state,
)
from edgelink.runtime.llama import LlamaRuntime

MODELS = ["smollm2-135m", "gemma3-270m"]


@pytest.fixture(scope="module")
def runtimes(model_paths, cfg):
    """Two runtimes per model: a sender and a receiver."""
    rts = {name: (LlamaRuntime(p, cfg), LlamaRuntime(p, cfg)) for name, p in model_paths.items()}
    yield rts
    for a, b in rts.values():
        a.close()
        b.close()


def _message(rt: LlamaRuntime, mid: int = 1) -> TensorMessage:
    tensors, attrs, token_range = snapshot_tensors(rt)
    return TensorMessage(b"\0" * 16, mid, Kind.KV_CACHE, ApplyMode.OVERWRITE, rt.seq, (0, rt.n_layer),
                         token_range, tuple(tensors), attrs)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("n", [16, 700])
def test_parse_then_assemble_is_byte_identical(runtimes, name, n):
    rt, _ = runtimes[name]
    rt.clear()
    rt.prefill(context_tokens(rt, n))
    blob = bytes(rt.export_state())
    state = parse_seq_state(blob)
    assert bytes(assemble_seq_state(state)) == blob
    tensors, layout = state_to_tensors(state)
    again = tensors_to_state({t.name: t for t in tensors}, layout)
    assert bytes(assemble_seq_state(again)) == blob
    n_layers = sum(len(st.k) for c in state.caches for st in c.streams if st)
    assert n_layers == rt.n_layer
    if name == "gemma3-270m":
        # sliding-window model: a full cache and a window cache; past the window the latter is bounded
        assert len(state.caches) == 2
        swa = state.caches[1].streams[0]
        assert swa.positions[-1] == n - 1
        assert (swa.n_cells < n) == (n > 512 + 64)


@pytest.mark.parametrize("name", MODELS)
def test_snapshot_continues_exactly_in_a_second_context(runtimes, name):
    a, b = runtimes[name]
    a.clear()
    a.prefill(context_tokens(a, 300))
    msg = _message(a)
    SnapshotApplier(b).apply(msg)
    assert b.tokens == a.tokens
    assert a.generate(24) == b.generate(24)


def test_snapshot_past_the_window_after_generation_continues_exactly(runtimes):
    """Past Gemma-3's 512-token window, with tokens decoded one by one (recycled cells)."""
    a, b = runtimes["gemma3-270m"]
    a.clear()
    a.prefill(context_tokens(a, 1020))
    a.generate(12)
    swa = parse_seq_state(a.export_state()).caches[1].streams[0]
    assert swa.n_cells == 512 and swa.positions.max() == len(a.tokens) - 1
    SnapshotApplier(b).apply(_message(a))
    assert a.generate(16) == b.generate(16)


def _replace_tensor(msg: TensorMessage, name: str, tensor: Tensor) -> TensorMessage:
    tensors = tuple(tensor if t.name == name else t for t in msg.tensors)
    return dataclasses.replace(msg, tensors=tensors)


def _bad_messages(msg: TensorMessage, rt: LlamaRuntime):
    k0 = msg.tensor("c0.s0.k0")
    arr = np.array(k0.array())
    narrow = np.ascontiguousarray(arr[:, :-2])
    yield "wrong width", _replace_tensor(msg, k0.name, Tensor(k0.name, k0.dtype, narrow.shape, memoryview(narrow).cast("B")))
    as_f32 = arr.astype("<f4")
    yield "wrong dtype", _replace_tensor(msg, k0.name, Tensor(k0.name, DType.F32, as_f32.shape, memoryview(as_f32).cast("B")))
    logits = np.array(msg.tensor("logits").array())
    logits[5] = np.nan
    yield "nan logits", _replace_tensor(msg, "logits", Tensor("logits", DType.F32, logits.shape, memoryview(logits).cast("B")))
    toks = np.array(msg.tensor("tokens").array())
    toks[0] = rt.n_vocab + 7
    yield "token outside vocab", _replace_tensor(msg, "tokens", Tensor("tokens", DType.I32, toks.shape, memoryview(toks).cast("B")))
    yield "missing layer", dataclasses.replace(msg, tensors=tuple(t for t in msg.tensors if t.name != "c0.s0.v1"))
    layout = {"kv": {**msg.attrs["kv"], "caches": msg.attrs["kv"]["caches"][:-1]}}
    yield "layers dropped from layout", dataclasses.replace(msg, attrs=layout)
    yield "wrong slot", dataclasses.replace(msg, seq_slot=3)
    yield "wrong kind", dataclasses.replace(msg, kind=Kind.HIDDEN_SLICE)
    pos = np.array(msg.tensor("c0.s0.pos").array())
    pos[3] = pos[4]
    yield "bad positions", _replace_tensor(msg, "c0.s0.pos", Tensor("c0.s0.pos", DType.I32, pos.shape, memoryview(pos).cast("B")))


@pytest.mark.parametrize("name", MODELS)
def test_bad_snapshots_are_rejected_and_state_is_unchanged(runtimes, name):
    a, b = runtimes[name]
    a.clear()
    a.prefill(context_tokens(a, 40))
    b.clear()
    b.prefill(context_tokens(b, 20))
    before = b.state_digest()
    applier = SnapshotApplier(b)
    good = _message(a)
    for label, bad in _bad_messages(good, b):
        with pytest.raises(StateError):
            applier.apply(bad)
        assert b.state_digest() == before, label
    applier.apply(good)
    assert b.state_digest() != before


def test_state_larger_than_the_receivers_context_is_rejected(model_paths, cfg, runtimes):
    a, _ = runtimes["smollm2-135m"]
    a.clear()
    a.prefill(context_tokens(a, 300))
    small = LlamaRuntime(model_paths["smollm2-135m"], cfg.replace(runtime_n_ctx=256))
    try:
        small.prefill([1, 2, 3])
        before = small.state_digest()
        with pytest.raises(StateError):
            SnapshotApplier(small).apply(_message(a))
        assert small.state_digest() == before
    finally:
        small.close()


def test_a_prefill_that_fails_part_way_leaves_the_sequence_as_it_was(runtimes):
    """Two batches: the first is decoded, the second holds a token outside the vocabulary, so
    llama.cpp refuses it; the first batch's cells are taken out again."""
    rt, _ = runtimes["smollm2-135m"]
    rt.clear()
    rt.prefill(context_tokens(rt, 40))
    before = rt.state_digest()
    toks = context_tokens(rt, rt.n_batch + 20)
    toks[-3] = rt.n_vocab + 5
    with pytest.raises(StateError, match="llama_decode failed"):
        rt.prefill(toks)
    assert len(rt.tokens) == 40 and rt.state_digest() == before
    rt.prefill([toks[0]])  # and it goes on
    assert len(rt.tokens) == 41


def test_prefill_all_logits_gives_one_row_per_token(runtimes):
    rt, _ = runtimes["smollm2-135m"]
    rt.clear()
    rt.prefill(context_tokens(rt, 30))
    more = context_tokens(rt, 40)[30:]
    rows = rt.prefill_all_logits(more)
    assert rows.shape == (10, rt.n_vocab) and np.array_equal(rows[-1], rt.logits)
    assert len(rt.tokens) == 40
    with pytest.raises(StateError):
        rt.prefill_all_logits([])
