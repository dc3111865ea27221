"""Faults at real size: a 1 GB KV_CACHE message (the Llama-3-8B shape twin's geometry at 7,900
tokens) cut off at 900 MB, its sender killed mid-stream, and a flipped byte in its last layer.
Each gives a typed outcome, leaves the receiver's state digest exactly as it was, gives the
memory back (its RSS within 10% of its level before the message), and the receiver serves the
next client. The message is built from synthetic rows of the right shapes: none of these faults
lets a byte reach llama.cpp, so no 90-second prefill is needed to make it."""

from __future__ import annotations

import multiprocessing
import os
import uuid

import numpy as np
import pytest

from edgelink.api import connect
from edgelink.bench.rss import rss_bytes
from edgelink.errors import PeerRejected
from edgelink.models.twins import twin_path
from edgelink.protocol.kinds import ApplyMode, DType, Kind
from edgelink.protocol.messages import Tensor
from edgelink.roles.launcher import start_receiver, stop_receiver
from edgelink.roles.sender import Sender
from edgelink.runtime.kvstate import CacheState, LayerRows, SeqState, StreamState, state_to_tensors
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.signature import model_signature
from edgelink.runtime.sizing import fit_limits
from edgelink.transport.framing import HEADER, byte_views

CELLS = 7900


@pytest.fixture(scope="module")
def big(cfg, tmp_path_factory):
    """A serving receiver on the Llama-3-8B twin, its signature, and a 1 GB message's tensors."""
    c = cfg.replace(paths_cache_dir=tmp_path_factory.mktemp("twins"), runtime_n_ctx=8192)
    path = str(twin_path("llama-3-8b", c))
    with LlamaRuntime(path, c) as rt:
        sig = model_signature(rt, c)
        sender_cfg = fit_limits(c, rt)
        n_vocab, n_layer = rt.n_vocab, rt.n_layer
    rng = np.random.default_rng(0)
    rows = [LayerRows(1, (CELLS, 1024), memoryview(rng.integers(0, 1 << 15, (CELLS, 1024), dtype=np.uint16)).cast("B"))
            for _ in range(2 * n_layer)]
    st = StreamState(np.arange(CELLS, dtype=np.int32), np.zeros(CELLS, np.int32), True,
                     tuple(rows[:n_layer]), tuple(LayerRows(1, (1024, CELLS), r.data) for r in rows[n_layer:]))
    tensors, layout = state_to_tensors(SeqState(0, (CacheState((st,)),)))
    toks = np.full(CELLS, 5, dtype="<i4")
    logits = np.zeros(n_vocab, dtype="<f4")
    tensors += [Tensor("tokens", DType.I32, (CELLS,), memoryview(toks).cast("B")),
                Tensor("logits", DType.F32, (n_vocab,), memoryview(logits).cast("B"))]
    name = f"t-big-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    # keep: each fault must leave a context primed in an earlier session exactly as it was
    proc = start_receiver(path, c.replace(protocol_session_state="keep"), name)
    yield {"proc": proc, "name": name, "cfg": sender_cfg, "sig": sig, "tensors": tensors,
           "attrs": {"kv": layout}, "n_layer": n_layer}
    assert stop_receiver(proc) in (0, -15), proc.stderr_tail()


def _sender(big) -> Sender:
    s = Sender(connect(f"shm:{big['name']}", big["cfg"]), big["cfg"], big["sig"])
    s.handshake()
    return s


def _state(big) -> tuple[str, int]:
    """(digest, receiver RSS) between sessions."""
    s = _sender(big)
    try:
        digest = s.request("digest").digest
    finally:
        s.close()
        big["proc"].next_event()
    return digest, rss_bytes(big["proc"].pid)


def _parts(big, sender: Sender):
    parts, _ = sender.session.encode_tensor_message(
        Kind.KV_CACHE, ApplyMode.OVERWRITE, big["tensors"], layer_range=(0, big["n_layer"]),
        token_range=(0, CELLS), attrs=big["attrs"])
    return parts


def _prime(big) -> None:
    s = _sender(big)
    s.request("reset")
    s.request("prefill", tokens=list(range(3, 40)))  # a small real context (37 tokens) to keep
    s.close()
    big["proc"].next_event()


def _assert_unchanged(big, before: tuple[str, int]) -> None:
    digest, rss = _state(big)
    assert digest == before[0]
    assert abs(rss - before[1]) <= 0.10 * before[1], f"RSS {before[1] >> 20} MiB -> {rss >> 20} MiB"


def test_a_message_cut_off_at_900_mb(big):
    _prime(big)
    before = _state(big)
    s = _sender(big)
    views, total = byte_views(_parts(big, s))
    assert total > 1_000_000_000
    cut, sent = 900_000_000, []
    for v in [memoryview(HEADER.pack(total)), *views]:
        take = v[:max(0, cut - sum(sent))]
        if take.nbytes:
            s.ch._tx.write([take], 60.0)
            sent.append(take.nbytes)
    # the ring holds at most 64 MiB: the receiver really took in over 800 MB of it
    assert rss_bytes(big["proc"].pid) - before[1] > 800_000_000
    s.ch.close()  # the rest never comes
    event = big["proc"].next_event()
    assert event["ended_by"] == "peer_gone" and event["applied"] == 0
    _assert_unchanged(big, before)


def _stream_then_die(name: str, cfg, sig, specs, attrs, n_layer: int, ready) -> None:
    """Child: open a session, write the first half gigabyte of a real 1 GB KV frame (its header
    is valid, so the receiver takes the tensors in), say so, wait to be killed."""
    s = Sender(connect(f"shm:{name}", cfg), cfg, sig)
    s.handshake()
    # zero-filled tensors of the real shapes: untouched pages, so this child stays small
    tensors = [Tensor(n, dt, shape, memoryview(np.zeros(nbytes, dtype=np.uint8))) for n, dt, shape, nbytes in specs]
    parts, _ = s.session.encode_tensor_message(Kind.KV_CACHE, ApplyMode.OVERWRITE, tensors,
                                               layer_range=(0, n_layer), token_range=(0, CELLS), attrs=attrs)
    views, total = byte_views(parts)
    s.ch._tx.write([memoryview(HEADER.pack(total))], 30.0)
    budget = 512 << 20
    for v in views:
        take = v[:budget]
        s.ch._tx.write([take], 30.0)
        budget -= take.nbytes
        if not budget:
            break
    ready.send(True)
    ready.recv()  # never answered: the parent kills this process


def test_a_sender_killed_mid_stream(big):
    _prime(big)
    before = _state(big)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    specs = [(t.name, t.dtype, t.shape, t.nbytes) for t in big["tensors"]]
    p = ctx.Process(target=_stream_then_die,
                    args=(big["name"], big["cfg"], big["sig"], specs, big["attrs"], big["n_layer"], child))
    p.start()
    assert parent.recv() is True  # half a gigabyte is in the receiver
    assert rss_bytes(big["proc"].pid) - before[1] > 400_000_000
    p.kill()
    p.join()
    event = big["proc"].next_event()
    assert event["ended_by"] == "peer_gone" and event["applied"] == 0
    _assert_unchanged(big, before)


def test_a_flipped_byte_in_the_last_layer(big):
    _prime(big)
    before = _state(big)
    s = _sender(big)
    parts = _parts(big, s)
    last_v = [t for t in big["tensors"] if t.name == f"c0.s0.v{big['n_layer'] - 1}"][0]
    data = np.frombuffer(last_v.data, dtype=np.uint8)
    flipped = data.copy()
    flipped[-1] ^= 1  # after its checksum was computed
    parts = [flipped if p is last_v.data else p for p in parts]
    assert any(p is flipped for p in parts)
    s.ch.send(*parts)
    peak = rss_bytes(big["proc"].pid)
    with pytest.raises(PeerRejected) as err:
        s._reply()
    assert err.value.reason == "checksum" and f"v{big['n_layer'] - 1}" in err.value.detail
    s.close()
    event = big["proc"].next_event()
    assert event["rejected"] == ["checksum"] and event["applied"] == 0
    assert peak - before[1] > 900_000_000  # the whole gigabyte arrived before the refusal
    _assert_unchanged(big, before)


def test_the_receiver_still_serves(big):
    """After all three faults the same process answers, still holding the primed context."""
    assert big["proc"].poll() is None
    s = _sender(big)
    try:
        assert s.request("digest").context_tokens == 37
    finally:
        s.close()
        big["proc"].next_event()
