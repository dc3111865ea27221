"""The parts of a split handoff that live in one process: which cells a runtime can vouch for
(``LlamaRuntime.batched``), the receiver's check of its own cells (``attrs.base_kv``), and the
receiver's background prefill, over a real shared-memory session."""

from __future__ import annotations

import os
import re
import threading
import uuid

import pytest

from edgelink.bench import context_tokens
from edgelink.errors import PeerRejected, StateError
from edgelink.kinds.delta import DeltaApplier, delta_tensors
from edgelink.protocol.kinds import ApplyMode, Kind
from edgelink.protocol.messages import TensorMessage
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.signature import model_signature


def test_batched_counts_the_cells_a_batch_prefill_reproduces(pair, smollm2_path, cfg):
    rt, _ = pair
    rt.clear()
    toks = context_tokens(rt, 700)
    rt.prefill(toks[:600])  # 512 + 88: both ubatches are large
    assert rt.batched == 600
    rt.generate(3, stop_at_eog=False)  # one token at a time: not reproducible
    assert rt.batched == 600
    rt.prefill(toks[:100])  # after the generated tokens: not at the batched prefix
    assert rt.batched == 600
    rt.truncate(300)
    assert rt.batched == 300
    rt.prefill(toks[300:301] * 70)
    assert rt.batched == 370
    rt.prefill(toks[:5])  # a small batch
    rt.prefill(toks[:100])
    assert rt.batched == 370
    rt.clear()
    assert rt.batched == 0
    rt.prefill(toks[:513])  # 512, then a one-token ubatch
    assert rt.batched == 512
    with LlamaRuntime(smollm2_path, cfg.replace(runtime_n_batch=16, runtime_n_ubatch=16)) as small:
        small.prefill(toks[:200])
        assert small.batched == 0


def _delta(rt, since):
    tensors, attrs, token_range = delta_tensors(rt, since, verify_base=True)
    return TensorMessage(b"\0" * 16, 1, Kind.KV_CACHE_DELTA, ApplyMode.APPEND, rt.seq, (0, rt.n_layer),
                         token_range, tuple(tensors), attrs)


def test_the_receiver_refuses_a_delta_over_cells_that_differ(pair):
    a, b = pair
    toks = context_tokens(a, 400)
    a.clear()
    a.prefill(toks)
    msg = _delta(a, 256)
    b.clear()
    b.prefill(toks[:256])
    before = b.state_digest()
    forged = TensorMessage(msg.session_id, msg.message_id, msg.kind, msg.apply, msg.seq_slot, msg.layer_range,
                           msg.token_range, msg.tensors, {**msg.attrs, "base_kv": "00" * 32})
    with pytest.raises(StateError, match="differ from the sender's"):
        DeltaApplier(b).apply(forged)
    assert b.state_digest() == before
    DeltaApplier(b).apply(msg)
    assert b.state_digest() == a.state_digest()


def _session(pair, cfg):
    from edgelink.roles.receiver import Receiver
    from edgelink.roles.sender import Sender
    from edgelink.transport.shm import ShmListener
    from edgelink.transport.shm import connect as shm_connect

    _, b = pair
    sig = model_signature(b, cfg)
    name = f"t-split-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    receiver = Receiver(b, cfg.replace(protocol_session_state="keep"), sig)
    listener = ShmListener(name, cfg)
    reports: list = []
    th = threading.Thread(target=lambda: reports.append(receiver.serve_channel(listener.accept())))
    th.start()
    sender = Sender(shm_connect(name, cfg), cfg, sig)
    sender.handshake()
    return receiver, sender, th, listener, reports


def test_a_background_prefill_answers_at_once_and_the_next_message_waits(pair, cfg):
    a, b = pair
    toks = context_tokens(a, 448)
    a.clear()
    a.prefill(toks)
    receiver, sender, th, listener, reports = _session(pair, cfg)
    try:
        assert sender.session.peer.prefill_tps > 0  # measured when the receiver started
        b.prefill(toks[:10])  # replaced by the request below
        body = sender.request("prefill", tokens=toks, background=True, replace=True)
        assert body.context_tokens == 448 and body.background is True
        assert sender.request("digest").digest == a.state_digest()
    finally:
        sender.close()
        th.join(60)
        listener.close()
    assert reports[0].rejected == []


def test_a_failed_background_prefill_is_the_next_messages_refusal(pair, cfg, monkeypatch):
    a, b = pair
    receiver, sender, th, listener, reports = _session(pair, cfg)
    real = LlamaRuntime.prefill

    def failing(self, tokens, **kw):
        if threading.current_thread().name == "edgelink-prefill":
            raise StateError("injected: llama_decode failed")
        return real(self, tokens, **kw)

    try:
        monkeypatch.setattr(LlamaRuntime, "prefill", failing)
        sender.request("prefill", tokens=context_tokens(a, 100), background=True, replace=True)
        with pytest.raises(PeerRejected, match="background prefill failed") as err:
            sender.request("digest")
        assert err.value.reason == "session"
        monkeypatch.setattr(LlamaRuntime, "prefill", real)
        assert sender.request("digest").context_tokens == 0  # the session goes on
    finally:
        sender.close()
        th.join(60)
        listener.close()
    assert reports[0].rejected == ["session"]


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_bytes_from_a_position_are_what_a_delta_from_there_carries(model_paths, cfg, name):
    """What the planner counts is exactly the K/V bytes of a delta; for Gemma-3 past its
    512-token window it is far from proportional to the tokens (the window cache is the bulk)."""
    from edgelink.runtime.kvstate import bytes_from_position, parse_seq_state

    with LlamaRuntime(model_paths[name], cfg) as rt:
        rt.prefill(context_tokens(rt, 1024))
        shipped = bytes_from_position(parse_seq_state(rt.export_state()))
        for k in (64, 256, 512, 800, 1000):
            tensors, _, _ = delta_tensors(rt, k)
            assert shipped(k) == sum(t.nbytes for t in tensors if re.fullmatch(r"c\d+\.s\d+\.[kv]\d+", t.name)), k
        assert shipped(0) > shipped(64) > shipped(1024) == 0
        share = shipped(512) / shipped(0)
        if name == "gemma3-270m":
            assert share > 0.8  # half the tokens, most of the bytes
        else:
            assert abs(share - 0.5) < 0.01
