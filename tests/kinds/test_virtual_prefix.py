"""VIRTUAL_PREFIX on real models: embeddings in place of tokens, checked and applied."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgelink.errors import StateError
from edgelink.kinds.prefix import PrefixApplier, energy_matched, prefix_tensors
from edgelink.protocol.kinds import ApplyMode, Kind
from edgelink.protocol.messages import TensorMessage
from edgelink.runtime.llama import LlamaRuntime

T1, T2, T3 = "The museum opened at nine.", " A tall guide named Ana", " showed the visitors"


@pytest.fixture(scope="module")
def rts(model_paths, cfg):
    made = {name: LlamaRuntime(p, cfg) for name, p in model_paths.items()}
    yield made
    for rt in made.values():
        rt.close()


def _msg(rt, vectors, start, energy=False):
    tensors, attrs, token_range = prefix_tensors(vectors, start, energy)
    return TensorMessage(b"\0" * 16, 1, Kind.VIRTUAL_PREFIX, ApplyMode.APPEND, rt.seq, (-1, -1),
                         token_range, tuple(tensors), attrs)


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_own_token_rows_reproduce_the_token_path_exactly(rts, name):
    rt = rts[name]
    emb = rt.token_embeddings()
    a, b, c = rt.tokenize(T1), rt.tokenize(T2, add_special=False), rt.tokenize(T3, add_special=False)
    rt.clear()
    rt.prefill(a)
    rt.prefill(b)
    want = rt.prefill(c).copy()
    rt.clear()
    rt.prefill(a)
    PrefixApplier(rt, emb).apply(_msg(rt, emb.rows(b), len(a)))  # between real tokens
    got = rt.prefill(c)
    assert np.array_equal(want, got)
    assert rt.tokens[len(a):len(a) + len(b)] == [-1] * len(b)


def test_energy_matching_scales_rows_to_the_mean_norm(rts):
    emb = rts["smollm2-135m"].token_embeddings()
    v = np.random.default_rng(0).standard_normal((5, emb.n_embd)).astype(np.float32) * 7
    out = energy_matched(v, emb.mean_norm)
    assert np.allclose(np.linalg.norm(out, axis=1), emb.mean_norm, rtol=1e-5)


def test_bad_prefixes_are_rejected_and_state_unchanged(rts):
    rt = rts["smollm2-135m"]
    emb = rt.token_embeddings()
    rt.clear()
    rt.prefill(rt.tokenize(T1))
    before = rt.state_digest()
    n = len(rt.tokens)
    good = emb.rows(rt.tokenize(T2, add_special=False))
    nan = good.copy()
    nan[1, 3] = np.nan
    bad = [
        _msg(rt, good[:, :-1], n),  # wrong width
        _msg(rt, nan, n),  # NaN
        _msg(rt, good, n + 1),  # positions do not follow the sequence
        _msg(rt, np.zeros((rt.n_ctx, emb.n_embd), np.float32), n),  # past the context
        dataclasses.replace(_msg(rt, good, n), apply=ApplyMode.ADDITIVE),
    ]
    for msg in bad:
        with pytest.raises(StateError):
            PrefixApplier(rt, emb).apply(msg)
        assert rt.state_digest() == before
