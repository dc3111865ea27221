"""The native eval hook, HIDDEN_SLICE and RESIDUAL_PATCH, against the real models.

Exactness (an idle hook, a zero patch and an overwrite with the model's own activations change
no bit of the logits), every bad input refused with the receiver's state digest unchanged, a
steering patch that moves the next-token distribution, and both kinds across a real
`edgelink serve` process and through a file.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import uuid

import numpy as np
import pytest

from edgelink.api import connect
from edgelink.api import latent as api_latent
from edgelink.errors import NormGateError, PeerRejected, StateError
from edgelink.kinds.hidden import HiddenSliceApplier, capture_slice
from edgelink.kinds.patch import PatchApplier, ResidualPatch, apply_patch, steering_patch
from edgelink.protocol.kinds import ApplyMode, Kind
from edgelink.protocol.messages import TensorMessage
from edgelink.roles.launcher import start_receiver, stop_receiver
from edgelink.roles.sender import Sender
from edgelink.runtime.evalhook import Patch, capture, patching
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.signature import model_signature

TEXT = "The old lighthouse keeper climbed the stairs every evening to light the lamp for the ships."


@pytest.fixture(scope="module")
def runtimes(model_paths, cfg):
    made = {name: (LlamaRuntime(path, cfg, eval_hook=False), LlamaRuntime(path, cfg, eval_hook=True))
            for name, path in model_paths.items()}
    yield made
    for plain, hooked in made.values():
        plain.close()
        hooked.close()


def _msg(parts, kind, apply, slot=0) -> TensorMessage:
    tensors, attrs, lr, tr = parts
    return TensorMessage(b"\0" * 16, 1, kind, apply, slot, lr, tr, tuple(tensors), attrs)


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_idle_hook_is_bit_identical(runtimes, name):
    plain, hooked = runtimes[name]
    for rt in (plain, hooked):
        rt.clear()
        rt.prefill(rt.tokenize(TEXT))
    assert np.array_equal(plain.logits, hooked.logits)
    assert plain.generate(8) == hooked.generate(8)
    assert np.array_equal(plain.logits, hooked.logits)
    assert hooked.eval_hook.stats()["seen"] == 0  # never said yes to a node


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_capture_is_exact_and_overwrite_with_it_reproduces_logits(runtimes, name):
    plain, rt = runtimes[name]
    plain.clear()
    ref = plain.prefill(plain.tokenize(TEXT)).copy()
    rt.clear()
    toks = rt.tokenize(TEXT)
    layers = [0, rt.n_layer // 2, rt.n_layer - 1]
    acts = capture(rt, toks, layers)
    assert np.array_equal(rt.logits, ref)  # capturing does not disturb the forward pass
    for layer in layers:
        assert acts[layer].shape == (len(toks), rt.n_embd) and np.isfinite(acts[layer]).all()
    # the same capture from a fresh sequence is identical, and the hook is idle again after
    rt.clear()
    again = capture(rt, toks, layers)
    assert all(np.array_equal(acts[k], again[k]) for k in layers)
    assert not rt.eval_hook.armed
    # overwrite the residual after the middle layer with the model's own rows: same logits
    mid = layers[1]
    rt.clear()
    with patching(rt, {mid: Patch(np.arange(len(toks)), acts[mid], "overwrite")}) as hook:
        rt.prefill(toks)
        assert hook.patch_applied(mid).all()
    assert np.array_equal(rt.logits, ref)


@pytest.mark.parametrize("ubatch", [None, 8])
def test_stop_early_capture_gives_the_same_rows_and_leaves_the_sequence(smollm2_path, cfg, ubatch):
    """A capture that ends the graph after the highest layer (what a bridge sender does) reads
    exactly the rows of a full run, also across micro-batches (layer <= 10 K/V of the first
    micro-batch are written before the stop), and drops its positions again."""
    c = cfg if ubatch is None else cfg.replace(runtime_n_batch=16, runtime_n_ubatch=ubatch)
    with LlamaRuntime(smollm2_path, c, eval_hook=True) as rt:
        head = rt.tokenize("Prefix kept:")
        toks = rt.tokenize(TEXT, add_special=False)
        rt.prefill(head)
        full = capture(rt, toks, [3, 10])
        rt.truncate(len(head))
        before = rt.state_digest()
        early = capture(rt, toks, [3, 10], stop_early=True)
        for layer in (3, 10):
            np.testing.assert_array_equal(early[layer], full[layer])
        assert rt.tokens == head and rt.state_digest() == before
        assert not rt.eval_hook.armed
        # the runtime is sound afterwards: the next decodes run the whole model again
        ref = rt.prefill(toks).copy()
        rt.truncate(len(head))
        assert np.array_equal(rt.prefill(toks), ref)
        with pytest.raises(StateError, match="no capture"):
            rt.eval_hook.stop_after(10)  # only a captured layer can end the graph


def test_multi_ubatch_prefill_captures_every_position(smollm2_path, cfg):
    small = cfg.replace(runtime_n_batch=16, runtime_n_ubatch=8)
    with LlamaRuntime(smollm2_path, small, eval_hook=True) as rt, \
            LlamaRuntime(smollm2_path, cfg, eval_hook=True) as big:
        toks = rt.tokenize(TEXT)
        assert len(toks) > 16
        a = capture(rt, toks, [5])[5]
        b = capture(big, toks, [5])[5]
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-2)
        # positions inside the second micro-batch only
        rt.clear()
        part = capture(rt, toks, [5], positions=[9, 12])[5]
        np.testing.assert_array_equal(part, a[[9, 12]])


def test_zero_additive_patch_changes_nothing(runtimes, cfg):
    plain, rt = runtimes["smollm2-135m"]
    plain.clear()
    plain.prefill(plain.tokenize(TEXT))
    rt.clear()
    toks = rt.tokenize(TEXT)
    zero = steering_patch(0, toks, rt.n_layer // 2, np.zeros(rt.n_embd, np.float32), gain=3.0)
    apply_patch(rt, cfg, zero, norms=np.ones(rt.n_layer))
    assert np.array_equal(rt.logits, plain.logits)
    assert rt.state_digest() == plain.state_digest()


def _prefixed(rt, n=12) -> str:
    rt.clear()
    rt.prefill(rt.tokenize(TEXT)[:n])
    return rt.state_digest()


def _good_patch(rt, **kw) -> ResidualPatch:
    start = len(rt.tokens)
    toks = np.asarray(rt.tokenize(" and then", add_special=False), dtype=np.int32)
    pos = np.arange(start, start + len(toks), dtype=np.int32)
    rows = np.full((len(toks), rt.n_embd), 0.01, np.float32)
    base = dict(start=start, tokens=toks, positions=pos, rows={3: rows}, mode=ApplyMode.ADDITIVE, gain=1.0)
    base.update(kw)
    return ResidualPatch(**base)


def _bad_patches(rt):
    good = _good_patch(rt)
    n, w = len(good.positions), rt.n_embd
    nan = good.rows[3].copy()
    nan[0, 5] = np.nan
    inf = good.rows[3].copy()
    inf[-1, 0] = np.inf
    return {
        "wrong width": dataclasses.replace(good, rows={3: np.zeros((n, w + 1), np.float32)}),
        "layer out of range": dataclasses.replace(good, rows={rt.n_layer: good.rows[3]}),
        "negative layer": dataclasses.replace(good, rows={-1: good.rows[3]}),
        "positions past context": dataclasses.replace(good, positions=good.positions + rt.n_ctx),
        "positions before the tokens": dataclasses.replace(good, positions=good.positions - 1),
        "stale start": dataclasses.replace(good, start=good.start + 1),
        "NaN": dataclasses.replace(good, rows={3: nan}),
        "inf": dataclasses.replace(good, rows={3: inf}),
        "gain over the limit": dataclasses.replace(good, gain=1e6),
        "token outside vocabulary": dataclasses.replace(good, tokens=good.tokens + rt.n_vocab),
        "norm gate": dataclasses.replace(good, rows={3: good.rows[3] * 1e5}),
    }


def test_bad_patches_are_refused_and_state_is_unchanged(runtimes, cfg):
    _, rt = runtimes["smollm2-135m"]
    before = _prefixed(rt)
    applier = PatchApplier(rt, cfg)
    for what, patch in _bad_patches(rt).items():
        with pytest.raises(StateError) as info:
            applier.apply(_msg(patch.message_parts(), Kind.RESIDUAL_PATCH, patch.mode))
        assert rt.state_digest() == before, what
        assert not rt.eval_hook.armed, what
        if what == "norm gate":
            assert isinstance(info.value, NormGateError) and info.value.code == "norm_gate"
    # a good patch still applies afterwards, and changes the state
    good = _good_patch(rt)
    applier.apply(_msg(good.message_parts(), Kind.RESIDUAL_PATCH, good.mode))
    assert rt.state_digest() != before and len(rt.tokens) == good.start + len(good.tokens)


def test_norm_gate_clamp_mode_scales_rows_down(runtimes, cfg):
    _, rt = runtimes["smollm2-135m"]
    _prefixed(rt)
    clamp = cfg.replace(latent_norm_gate_mode="clamp")
    applier = PatchApplier(rt, clamp)
    big = _good_patch(rt, rows={3: np.full((3, rt.n_embd), 1e3, np.float32)[: len(_good_patch(rt).positions)]})
    _, patches = applier.check(_msg(big.message_parts(), Kind.RESIDUAL_PATCH, big.mode))
    limit = clamp.latent.norm_gate_multiple * applier.norms[3]
    np.testing.assert_allclose(np.linalg.norm(patches[3].rows, axis=1), limit, rtol=1e-4)


def test_hidden_slice_checks_and_store(runtimes, cfg):
    _, rt = runtimes["smollm2-135m"]
    rt.clear()
    sl = capture_slice(rt, rt.tokenize(TEXT), [2, 7], positions=[1, 4, 5])
    before = rt.state_digest()
    applier = HiddenSliceApplier(rt, cfg)
    applier.apply(_msg(sl.message_parts(), Kind.HIDDEN_SLICE, ApplyMode.OVERWRITE))
    stored = applier.store[0]
    assert stored.layers == (2, 7) and stored.positions.tolist() == [1, 4, 5]
    assert np.array_equal(stored.rows[7], sl.rows[7]) and stored.tokens.tolist() == rt.tokens[1:6]
    bad_rows = sl.rows[7].copy()
    bad_rows[1, 1] = np.nan
    bad = {
        "NaN": dataclasses.replace(sl, rows={2: sl.rows[2], 7: bad_rows}),
        "width": dataclasses.replace(sl, rows={2: sl.rows[2], 7: sl.rows[7][:, :-1]}),
        "layer": dataclasses.replace(sl, layers=(2, rt.n_layer), rows={2: sl.rows[2], rt.n_layer: sl.rows[7]}),
        "past context": dataclasses.replace(sl, positions=sl.positions + rt.n_ctx),
    }
    for what, s in bad.items():
        with pytest.raises(StateError):
            applier.apply(_msg(s.message_parts(), Kind.HIDDEN_SLICE, ApplyMode.OVERWRITE))
        assert len(applier.store) == 1, what
    assert rt.state_digest() == before


POSITIVE = ["I loved this movie, it was wonderful and beautiful.", "An excellent, delightful film. Great acting!",
            "What a fantastic experience, truly amazing.", "The food was superb and the staff were lovely.",
            "Brilliant, heartwarming and fun from start to finish.", "I am so happy with it, highly recommended."]
NEGATIVE = ["I hated this movie, it was awful and ugly.", "A terrible, boring film. Bad acting!",
            "What a horrible experience, truly dreadful.", "The food was disgusting and the staff were rude.",
            "Stupid, depressing and dull from start to finish.", "I am so angry with it, avoid it."]
PROMPTS = ["I watched the film last night. Honestly, it was", "My opinion of the restaurant: the meal was",
           "The new album is", "Overall, I would describe the hotel as"]
POS_WORDS = [" great", " good", " wonderful", " amazing", " excellent", " fantastic", " beautiful", " perfect",
             " brilliant", " lovely", " nice", " fun"]
NEG_WORDS = [" bad", " terrible", " awful", " boring", " horrible", " disappointing", " poor", " worst", " dull",
             " ugly", " stupid", " sad"]


def steering_effect(rt, cfg, layer: int, gains=(-2.0, 0.0, 2.0)) -> dict[float, float]:
    """Mean over PROMPTS of log P(positive words) - log P(negative words) for the next token,
    with the steering vector (positive minus negative mean activations) added at every prompt
    position of ``layer`` times each gain."""
    vec = api_latent.steering_vector(rt, POSITIVE, NEGATIVE, layer)
    pos_ids = [t[0] for t in (rt.tokenize(w, add_special=False) for w in POS_WORDS) if len(t) == 1]
    neg_ids = [t[0] for t in (rt.tokenize(w, add_special=False) for w in NEG_WORDS) if len(t) == 1]

    def log_odds(logits):
        lp = logits - logits.max()
        lp = lp - np.log(np.exp(lp).sum())
        return float(np.log(np.exp(lp[pos_ids]).sum()) - np.log(np.exp(lp[neg_ids]).sum()))

    out = {}
    for g in gains:
        vals = []
        for p in PROMPTS:
            rt.clear()
            apply_patch(rt, cfg, steering_patch(0, rt.tokenize(p), layer, vec, g))
            vals.append(log_odds(rt.logits))
        out[g] = float(np.mean(vals))
    rt.clear()
    return out


def test_steering_patch_shifts_sentiment(runtimes, cfg):
    _, rt = runtimes["smollm2-135m"]
    eff = steering_effect(rt, cfg, rt.n_layer // 2)
    # measured (SmolLM2-135M, layer 15): -1.92 / +3.27 / +6.71 nats
    assert eff[2.0] - eff[0.0] > 1.5, eff
    assert eff[-2.0] - eff[0.0] < -1.5, eff


def _name(tag: str) -> str:
    return f"t-{tag}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def test_latent_kinds_across_a_serving_process(runtimes, smollm2_path, cfg):
    plain, rt = runtimes["smollm2-135m"]
    hooked_cfg = cfg.replace(runtime_eval_hook="on")
    name = _name("latent")
    proc = start_receiver(str(smollm2_path), hooked_cfg, name)
    try:
        signature = model_signature(rt, cfg)
        ls = Sender(connect(f"shm:{name}", cfg), cfg, signature, kinds=api_latent.LATENT_KINDS)
        ls.handshake()
        # a hidden slice is verified, acknowledged and stored; the sequence is untouched
        rt.clear()
        sl = capture_slice(rt, rt.tokenize(TEXT), [4], positions=[2, 3])
        empty = ls.request("digest").digest
        ack = ls.send_hidden(sl)
        assert len(ack.digest) == 64
        assert ls.request("digest").digest == empty
        # a patch over the prompt: the peer continues exactly as a local patched run would
        caps = ls.request("latent_caps")
        assert caps.n_embd == rt.n_embd and caps.context_tokens == 0
        toks = rt.tokenize(TEXT)
        vec = np.full(rt.n_embd, 0.05, np.float32)
        patch = steering_patch(0, toks, 9, vec, gain=min(2.0, caps.max_gain))
        ls.send_patch(patch)
        remote = ls.request("generate", n_tokens=8)
        rt.clear()
        apply_patch(rt, cfg, patch)
        assert remote.tokens == rt.generate(8)
        # a bad patch is refused with a typed reason and the peer's state is unchanged
        state = ls.request("digest").digest
        bad = dataclasses.replace(_good_patch(plain), start=caps.context_tokens + 999)
        with pytest.raises(PeerRejected) as info:
            ls.send_patch(bad)
        assert info.value.reason == "state"
        assert ls.request("digest").digest == state
        ls.close()
        event = proc.next_event()
        assert event["applied"] == 2 and event["rejected"] == ["state"]
    finally:
        assert stop_receiver(proc) in (0, -signal.SIGTERM), proc.stderr_tail()


def test_latent_kinds_through_a_file(runtimes, cfg, tmp_path):
    _, rt = runtimes["smollm2-135m"]
    path = tmp_path / "hidden.elk"
    api_latent.export_hidden("smollm2-135m", TEXT, path, layers=[1, 2], cfg=cfg)
    out = api_latent.apply_file("smollm2-135m", path, n_tokens=0, cfg=cfg)
    assert out.applied == ["HIDDEN_SLICE"] and out.hidden_slices == 1
    toks = rt.tokenize(TEXT)
    patch = steering_patch(0, toks, 6, np.full(rt.n_embd, 0.05, np.float32), gain=1.0)
    ppath = tmp_path / "patch.elk"
    api_latent.export_patch("smollm2-135m", patch, ppath, cfg=cfg)
    out = api_latent.apply_file("smollm2-135m", ppath, n_tokens=6, cfg=cfg)
    rt.clear()
    apply_patch(rt, cfg, patch)
    assert out.applied == ["RESIDUAL_PATCH"] and out.tokens == rt.generate(6)
