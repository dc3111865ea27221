"""Receiving a frame straight into place (protocol/reader.py): a snapshot's K and V tensors are
written into the very blob llama.cpp imports, hashed as they arrive, and the result is the
same, byte for byte and token for token, as decoding the whole frame first."""

from __future__ import annotations

import numpy as np
import pytest

from edgelink.bench import context_tokens
from edgelink.errors import ChecksumMismatch
from edgelink.fuzz import synthetic_signature
from edgelink.kinds.snapshot import SnapshotApplier, snapshot_tensors
from edgelink.protocol import codec
from edgelink.protocol.kinds import ApplyMode, DType, Kind
from edgelink.protocol.messages import Tensor
from edgelink.protocol.reader import PIECE_BYTES, FrameReader
from edgelink.protocol.session import Role, Session
from edgelink.transport.framing import Scatter


def _feed(reader: FrameReader, frame: bytes, step: int) -> None:
    out = Scatter(reader, len(frame))
    view = memoryview(frame)
    while out.remaining:
        out.write(view[:step])
        view = view[step:]
    assert out.current() is None and not view.nbytes


def _sessions(sig, cfg):
    client = Session(Role.CLIENT, sig, cfg.protocol, kinds=tuple(Kind))
    server = Session(Role.SERVER, sig, cfg.protocol, kinds=tuple(Kind))
    server.receive(client.hello())
    client.receive(server.hello())
    return client, server


@pytest.mark.parametrize("step", [4093, 1 << 22])
def test_snapshot_lands_in_the_blob_it_imports(pair, cfg, step):
    tx, rx = pair
    tx.clear()
    tx.prefill(context_tokens(tx, 300))
    want_blob = bytes(tx.export_state())
    tensors, attrs, token_range = snapshot_tensors(tx)
    sig = synthetic_signature()
    client, server = _sessions(sig, cfg)
    parts, _ = client.encode_tensor_message(Kind.KV_CACHE, ApplyMode.OVERWRITE, tensors, seq_slot=tx.seq,
                                            layer_range=(0, tx.n_layer), token_range=token_range, attrs=attrs)
    frame = b"".join(bytes(p) for p in parts)
    applier = SnapshotApplier(rx)
    reader = FrameReader(cfg.protocol, applier.place)
    _feed(reader, frame, step)
    msg = server.receive(reader)
    kv_bytes = sum(t.nbytes for t in msg.tensors if t.name.split(".")[-1][0] in "kv")
    assert reader.placed == kv_bytes > PIECE_BYTES  # every K and V tensor went straight into place
    blob, tokens, logits = applier.check(msg)
    assert bytes(blob) == want_blob  # the blob assembled around them is llama.cpp's own, exactly
    whole = codec.decode_frame(frame, cfg.protocol)
    assert [(t.name, bytes(t.data)) for t in whole.tensors] == [(t.name, bytes(t.data)) for t in msg.tensors]
    applier.apply(msg)
    assert rx.state_digest() == tx.state_digest()
    assert rx.generate(12) == tx.generate(12)


def test_a_corrupted_tensor_is_refused_after_its_bytes_are_in(pair, cfg):
    """A flipped payload byte: the whole frame is consumed (the stream stays in step), the
    session refuses that message only, and nothing reaches the runtime."""
    tx, rx = pair
    tx.clear()
    tx.prefill(context_tokens(tx, 64))
    rx.clear()
    rx.prefill(context_tokens(rx, 10))
    before = rx.state_digest()
    tensors, attrs, token_range = snapshot_tensors(tx)
    client, server = _sessions(synthetic_signature(), cfg)
    parts, _ = client.encode_tensor_message(Kind.KV_CACHE, ApplyMode.OVERWRITE, tensors, seq_slot=tx.seq,
                                            layer_range=(0, tx.n_layer), token_range=token_range, attrs=attrs)
    frame = bytearray(b"".join(bytes(p) for p in parts))
    frame[-100] ^= 0x10  # inside the last tensor (logits)
    applier = SnapshotApplier(rx)
    reader = FrameReader(cfg.protocol, applier.place)
    _feed(reader, bytes(frame), 65536)
    with pytest.raises(ChecksumMismatch, match="logits") as refused:
        server.receive(reader)
    assert rx.state_digest() == before
    # the session goes on: the refusal reaches the client, and the intact message is taken
    client.receive(server.reject(server.last_seen_id, refused.value))
    parts, _ = client.encode_tensor_message(Kind.KV_CACHE, ApplyMode.OVERWRITE, tensors, seq_slot=tx.seq,
                                            layer_range=(0, tx.n_layer), token_range=token_range, attrs=attrs)
    _feed(reader, b"".join(bytes(p) for p in parts), 65536)
    applier.apply(server.receive(reader))
    assert rx.state_digest() == tx.state_digest()


def test_a_placer_that_fails_or_lies_only_costs_a_copy(cfg):
    sig = synthetic_signature()
    client, server = _sessions(sig, cfg)
    a = np.arange(1000, dtype=np.float32)
    t = Tensor("x", DType.F32, a.shape, memoryview(a).cast("B"))
    frame = b"".join(bytes(p) for p in client.encode_tensor_message(Kind.HIDDEN_SLICE, ApplyMode.OVERWRITE, [t])[0])

    def wrong(th):
        return {"x": memoryview(bytearray(10)), "y": memoryview(bytearray(4000))}

    def broken(th):
        raise RuntimeError("placer bug")

    for placer in (wrong, broken):
        reader = FrameReader(cfg.protocol, placer)
        _feed(reader, frame, 999)
        msg = reader.message()
        reader.verify(msg)
        assert reader.placed == 0 and np.array_equal(msg.tensor("x").array(), a)
