"""The session state machine without any I/O: two Session objects talk through byte strings."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgelink.errors import (
    ChecksumMismatch,
    ConfigError,
    PeerRejected,
    ReplayError,
    SessionError,
    SignatureMismatch,
    UnknownKind,
)
from edgelink.protocol.kinds import ApplyMode, Checksum, DType, Kind
from edgelink.protocol.messages import Ack, Close, Request, Result, Tensor, TensorMessage
from edgelink.protocol.session import Role, Session, State
from edgelink.protocol.signature import ModelSignature

SIG = ModelSignature(**{f.name: f"value-{f.name}" for f in dataclasses.fields(ModelSignature)})


def _join(parts):
    return b"".join(bytes(p) for p in parts)


def _pair(cfg, client_sig=SIG, server_sig=SIG):
    c = Session(Role.CLIENT, client_sig, cfg.protocol)
    s = Session(Role.SERVER, server_sig, cfg.protocol)
    s.receive(c.hello())
    c.receive(s.hello())
    return c, s


def _tensors():
    arr = np.arange(12, dtype="<f4").reshape(3, 4)
    return [Tensor("x", DType.F32, (3, 4), memoryview(arr).cast("B"))]


def test_handshake_reaches_ready(cfg):
    c, s = _pair(cfg)
    assert c.state is s.state is State.READY
    assert c.session_id == s.session_id and len(c.session_id) == 16
    assert c.negotiated_kinds == {Kind.KV_CACHE}


@pytest.mark.parametrize("field", ["weights_digest", "n_layer", "architecture", "flash_attn", "llama_cpp"])
def test_any_signature_difference_rejects_the_session(cfg, field):
    other = dataclasses.replace(SIG, **{field: "different"})
    c = Session(Role.CLIENT, SIG, cfg.protocol)
    s = Session(Role.SERVER, other, cfg.protocol)
    with pytest.raises(SignatureMismatch) as info:
        s.receive(c.hello())
    assert field in info.value.fields
    assert s.state is State.CLOSED
    # the server's REJECT reaches the client as a typed PeerRejected, never a downgrade
    with pytest.raises(PeerRejected) as rej:
        c.receive(s.reject(0, info.value))
    assert rej.value.reason == "signature" and c.state is State.CLOSED


def test_missing_signature_field_is_a_mismatch(cfg):
    from edgelink.protocol import codec

    hello = codec.decode_frame(Session(Role.CLIENT, SIG, cfg.protocol).hello(), cfg.protocol)
    partial = {k: v for k, v in hello.signature.items() if k != "head_dim"}
    s = Session(Role.SERVER, SIG, cfg.protocol)
    with pytest.raises(SignatureMismatch):
        s.receive(codec.encode_hello(dataclasses.replace(hello, signature=partial)))


def test_tensor_exchange_and_ack(cfg):
    c, s = _pair(cfg)
    parts, sent = c.encode_tensor_message(Kind.KV_CACHE, ApplyMode.OVERWRITE, _tensors())
    assert c.state is State.STREAMING
    got = s.receive(_join(parts))
    assert isinstance(got, TensorMessage) and got.message_id == sent.message_id
    ack = c.receive(s.ack(got, b"\0" * 32))
    assert isinstance(ack, Ack) and c.state is State.READY


def test_a_server_answers_requests_sent_ahead_within_its_pipeline(cfg):
    """A server that announces ``pipeline`` = 2 may send a second tensor message before the
    first's ACK, not a third; each ACK (or REJECT) settles its own message, READY after the last.
    A client learns the figure from the HELLO; a server without one announces nothing (1)."""
    c = Session(Role.CLIENT, SIG, cfg.protocol, kinds=(Kind.KV_CACHE_DELTA,))
    s = Session(Role.SERVER, SIG, cfg.protocol, kinds=(Kind.KV_CACHE_DELTA,), pipeline=2)
    s.receive(c.hello())
    c.receive(s.hello())
    assert c.peer.pipeline == 2
    sent = []
    for _ in range(2):
        s.receive(c.request("cache_get", {"key": "ab" * 32}))
        parts, msg = s.encode_tensor_message(Kind.KV_CACHE_DELTA, ApplyMode.APPEND, _tensors())
        sent.append((_join(parts), msg))
    assert s.state is State.STREAMING
    with pytest.raises(SessionError):  # a third is past the window
        s.encode_tensor_message(Kind.KV_CACHE_DELTA, ApplyMode.APPEND, _tensors())
    got = [c.receive(frame) for frame, _ in sent]
    s.receive(c.ack(got[0], b"\0" * 32))
    assert s.state is State.STREAMING  # the second is still out
    s.encode_tensor_message(Kind.KV_CACHE_DELTA, ApplyMode.APPEND, _tensors())  # room for one again
    s.receive(c.reject(got[1].message_id, "not wanted"))
    assert s.state is State.STREAMING
    plain_c, plain_s = _pair(cfg)
    assert plain_c.peer.pipeline == 1
    with pytest.raises(ConfigError):
        Session(Role.SERVER, SIG, cfg.protocol, pipeline=0)


def test_replayed_and_out_of_order_ids_are_rejected(cfg):
    c, s = _pair(cfg)
    parts, sent = c.encode_tensor_message(Kind.KV_CACHE, ApplyMode.OVERWRITE, _tensors())
    frame = _join(parts)
    got = s.receive(frame)
    with pytest.raises(ReplayError):
        s.receive(frame)  # the same message again
    assert s.state is State.READY
    c.receive(s.ack(got, b"\0" * 32))
    c.request("generate", {"n_tokens": 1})  # never delivered
    with pytest.raises(ReplayError):
        s.receive(c.request("generate", {"n_tokens": 1}))  # arrives out of order


def test_corrupted_payload_is_refused_but_session_survives(cfg):
    c, s = _pair(cfg)
    parts, _ = c.encode_tensor_message(Kind.KV_CACHE, ApplyMode.OVERWRITE, _tensors())
    frame = bytearray(_join(parts))
    frame[len(frame) - 64] ^= 0x01  # the last 64 bytes are the (padded) payload
    with pytest.raises(ChecksumMismatch):
        s.receive(bytes(frame))
    assert s.state is State.READY
    c.receive(s.reject(1, ChecksumMismatch("x")))
    assert c.state is State.READY
    req = s.receive(c.request("generate", {"n_tokens": 2}))
    assert isinstance(req, Request)
    assert isinstance(c.receive(s.result(req, {"tokens": []})), Result)


def test_frames_from_another_session_end_it(cfg):
    c1, s1 = _pair(cfg)
    c2, _ = _pair(cfg)
    with pytest.raises(SessionError):
        s1.receive(c2.request("generate", {}))
    assert s1.state is State.CLOSED


def test_kinds_must_be_negotiated(cfg):
    c = Session(Role.CLIENT, SIG, cfg.protocol, kinds=(Kind.KV_CACHE, Kind.HIDDEN_SLICE))
    s = Session(Role.SERVER, SIG, cfg.protocol, kinds=(Kind.KV_CACHE,))
    s.receive(c.hello())
    c.receive(s.hello())
    with pytest.raises(UnknownKind):
        c.encode_tensor_message(Kind.HIDDEN_SLICE, ApplyMode.OVERWRITE, _tensors())


def test_rules_of_order(cfg):
    c = Session(Role.CLIENT, SIG, cfg.protocol)
    with pytest.raises(SessionError):
        c.encode_tensor_message(Kind.KV_CACHE, ApplyMode.OVERWRITE, _tensors())  # before handshake
    s = Session(Role.SERVER, SIG, cfg.protocol)
    with pytest.raises(SessionError):
        s.hello()  # a server never opens
    c, s = _pair(cfg)
    c.encode_tensor_message(Kind.KV_CACHE, ApplyMode.OVERWRITE, _tensors())
    with pytest.raises(SessionError):
        c.encode_tensor_message(Kind.KV_CACHE, ApplyMode.OVERWRITE, _tensors())  # one in flight


def test_close_ends_both_sides(cfg):
    c, s = _pair(cfg)
    assert isinstance(s.receive(c.close()), Close)
    assert c.state is s.state is State.CLOSED
    with pytest.raises(SessionError):
        s.receive(c.close())


# --------------------------------------------------------------------------- checksum negotiation


def _with_checksums(cfg, names: str):
    return cfg.replace(protocol_checksums=names).protocol


@pytest.mark.parametrize("client, server, used", [
    ("xxh3-128,blake3", "xxh3-128,blake3", Checksum.XXH3_128),
    ("xxh3-128,blake3", "blake3", Checksum.BLAKE3),
    ("blake3,xxh3-128", "xxh3-128,blake3", Checksum.BLAKE3),  # the sender's preference wins
    ("xxh3-128", "xxh3-128,blake3", Checksum.XXH3_128),
])
def test_the_sender_uses_its_first_checksum_the_receiver_takes(cfg, client, server, used):
    c = Session(Role.CLIENT, SIG, _with_checksums(cfg, client))
    s = Session(Role.SERVER, SIG, _with_checksums(cfg, server))
    s.receive(c.hello())
    c.receive(s.hello())
    parts, sent = c.encode_tensor_message(Kind.KV_CACHE, ApplyMode.OVERWRITE, _tensors())
    assert sent.checksum_alg is used
    got = s.receive(_join(parts))
    assert got.checksum_alg is used and got.tensors[0].checksum == sent.tensors[0].checksum
    if used is Checksum.XXH3_128:
        assert got.tensors[0].checksum[16:] == bytes(16)


def test_a_peer_that_predates_checksum_negotiation_gets_blake3(cfg):
    """An earlier peer's HELLO has no "checksums" field (and it sends reserved 0 = blake3)."""
    old = Session(Role.CLIENT, SIG, _with_checksums(cfg, "blake3"))
    hello = old.hello()
    assert b"checksums" not in hello  # what an earlier peer sends, byte for byte
    s = Session(Role.SERVER, SIG, cfg.protocol)
    s.receive(hello)
    assert s.send_checksum is Checksum.BLAKE3


def test_a_checksum_the_receiver_did_not_offer_is_refused_and_the_session_goes_on(cfg):
    c, s = _pair(cfg)
    s.accepts = (Checksum.BLAKE3,)  # as if it had announced blake3 only
    parts, _ = c.encode_tensor_message(Kind.KV_CACHE, ApplyMode.OVERWRITE, _tensors())
    with pytest.raises(UnknownKind, match="xxh3-128 checksums were not offered"):
        s.receive(_join(parts))
    assert s.state is State.READY


def test_no_checksum_in_common_ends_the_handshake(cfg):
    c = Session(Role.CLIENT, SIG, _with_checksums(cfg, "xxh3-128"))
    s = Session(Role.SERVER, SIG, _with_checksums(cfg, "blake3"))
    with pytest.raises(SessionError, match="no tensor checksum in common.*protocol.checksums"):
        s.receive(c.hello())


@pytest.mark.parametrize("bad", ["", "md5", "xxh3-128,sha1"])
def test_unknown_checksum_names_are_a_config_error(cfg, bad):
    with pytest.raises(ConfigError, match="protocol.checksums"):
        Session(Role.CLIENT, SIG, _with_checksums(cfg, bad))


def test_a_receiver_announces_its_prefill_speed_and_a_client_never_does(cfg):
    c = Session(Role.CLIENT, SIG, cfg.protocol, prefill_tps=99.0)
    s = Session(Role.SERVER, SIG, cfg.protocol, prefill_tps=187.5)
    hello = c.hello()
    assert b"prefill_tps" not in hello  # a sender has nothing to announce
    s.receive(hello)
    c.receive(s.hello())
    assert c.peer.prefill_tps == 187.5 and s.peer.prefill_tps == 0.0


@pytest.mark.parametrize("value", ["-1", "1e10", "\"fast\"", "null", "[1]"])
def test_a_hostile_prefill_speed_ends_the_handshake_typed(cfg, value):
    import json

    from edgelink.errors import ProtocolError
    from edgelink.protocol import codec

    s = Session(Role.SERVER, SIG, cfg.protocol, prefill_tps=100.0)
    c = Session(Role.CLIENT, SIG, cfg.protocol)
    s.receive(c.hello())
    good = codec.decode_frame(s.hello(), cfg.protocol)
    body = {"role": "server", "signature": SIG.to_dict(), "dtypes": list(good.dtypes), "kinds": list(good.kinds),
            "max_message_bytes": good.max_message_bytes, "encryption": good.encryption,
            "prefill_tps": json.loads(value)}
    frame = codec._frame(codec.FrameType.HELLO, good.session_id, 0, json.dumps(body).encode())
    with pytest.raises(ProtocolError, match="prefill_tps"):
        c.receive(frame)
    assert c.state is State.CLOSED
