"""Bridged sessions in the sans-IO state machine: two *different* models may talk only through
a bridge both sides name by the same digest, the client running its source and the server its
target (edgelink/protocol/compat.py, bridge_rule). No sockets, no models."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgelink.errors import (
    BridgeMismatch,
    PeerRejected,
    SessionError,
    SignatureMismatch,
    UnknownKind,
)
from edgelink.protocol import codec
from edgelink.protocol.kinds import ApplyMode, DType, Kind
from edgelink.protocol.messages import Hello, Tensor, TensorMessage
from edgelink.protocol.session import Role, Session, State
from edgelink.protocol.signature import ModelSignature


def _named(tag: str) -> ModelSignature:
    return ModelSignature(**{f.name: f"{tag}-{f.name}" for f in dataclasses.fields(ModelSignature)})


SRC, TGT = _named("src"), _named("tgt")
CLAIM = {"digest": "d" * 64, "source": SRC.weights_digest, "target": TGT.weights_digest}
OTHER = dict(CLAIM, digest="e" * 64)  # same models, another bridge (e.g. retrained)
SERVER_KINDS = (Kind.KV_CACHE, Kind.VIRTUAL_PREFIX, Kind.BRIDGED_PREFIX)


def _sessions(cfg, client_sig=SRC, server_sig=TGT, client_bridge=CLAIM, server_bridge=CLAIM,
              server_kinds=SERVER_KINDS):
    c = Session(Role.CLIENT, client_sig, cfg.protocol, kinds=tuple(Kind), bridge=client_bridge)
    s = Session(Role.SERVER, server_sig, cfg.protocol, kinds=server_kinds, bridge=server_bridge)
    return c, s


def _embd():
    arr = np.zeros((2, 8), dtype="<f4")
    return [Tensor("embd", DType.F32, (2, 8), memoryview(arr).cast("B"))]


def _refused(s: Session, c: Session, hello: bytes) -> BridgeMismatch:
    """The server refuses the hello; the client gets the typed REJECT as PeerRejected."""
    with pytest.raises(BridgeMismatch) as info:
        s.receive(hello)
    assert s.state is State.CLOSED and info.value.code == "bridge"
    assert isinstance(info.value, SignatureMismatch)  # a kind of signature rejection
    with pytest.raises(PeerRejected) as rej:
        c.receive(s.reject(0, info.value))
    assert rej.value.reason == "bridge" and c.state is State.CLOSED
    return info.value


def test_bridged_handshake_between_different_models(cfg):
    c, s = _sessions(cfg)
    hello = c.hello()
    assert codec.decode_frame(hello, cfg.protocol).bridge == CLAIM
    s.receive(hello)
    answer = s.hello()
    assert codec.decode_frame(answer, cfg.protocol).bridge == CLAIM  # the server confirms it
    c.receive(answer)
    assert c.state is s.state is State.READY and c.bridged and s.bridged
    # two different models: only what the bridge made may cross
    assert c.negotiated_kinds == s.negotiated_kinds == {Kind.BRIDGED_PREFIX}
    parts, sent = c.encode_tensor_message(Kind.BRIDGED_PREFIX, ApplyMode.OVERWRITE, _embd(),
                                          attrs={"bridge": CLAIM["digest"], "source_tokens": 3})
    got = s.receive(b"".join(bytes(p) for p in parts))
    assert isinstance(got, TensorMessage) and got.kind is Kind.BRIDGED_PREFIX
    assert got.attrs == sent.attrs


def test_no_kv_state_crosses_a_bridged_session(cfg):
    c, s = _sessions(cfg)
    s.receive(c.hello())
    c.receive(s.hello())
    with pytest.raises(UnknownKind):
        c.encode_tensor_message(Kind.KV_CACHE, ApplyMode.OVERWRITE, _embd())
    with pytest.raises(UnknownKind):
        s.encode_tensor_message(Kind.KV_CACHE_DELTA, ApplyMode.APPEND, _embd())


def test_another_bridge_is_rejected(cfg):
    c, s = _sessions(cfg, client_bridge=OTHER)
    err = _refused(s, c, c.hello())
    assert "bridge" in err.fields and "eeeeeeee" in str(err)


def test_bridged_hello_to_a_receiver_without_a_bridge_is_rejected(cfg):
    c, s = _sessions(cfg, server_bridge=None)
    err = _refused(s, c, c.hello())
    assert "holds no bridge" in str(err)


def test_source_model_without_a_bridge_is_rejected_by_a_bridge_holder(cfg):
    c, s = _sessions(cfg, client_bridge=None)
    err = _refused(s, c, c.hello())
    assert "names no bridge" in str(err) and "weights_digest" in err.fields


def test_a_third_model_gets_the_plain_signature_mismatch_from_a_bridge_holder(cfg):
    third = _named("third")
    c, s = _sessions(cfg, client_sig=third, client_bridge=None)
    with pytest.raises(SignatureMismatch) as info:
        s.receive(c.hello())
    assert info.value.code == "signature" and s.state is State.CLOSED


def test_client_model_must_be_the_bridges_source(cfg):
    stranger = dataclasses.replace(SRC, weights_digest="x" * 64)  # same architecture, other weights
    c, s = _sessions(cfg, client_sig=stranger)
    err = _refused(s, c, c.hello())
    assert "is not the bridge's source" in str(err)
    assert err.fields["weights_digest"] == (SRC.weights_digest, "x" * 64)


def test_server_model_must_be_the_bridges_target(cfg):
    # A server that holds the bridge but runs another model refuses on its own side...
    c, s = _sessions(cfg, server_sig=dataclasses.replace(TGT, weights_digest="y" * 64))
    assert "this side's model" in str(_refused(s, c, c.hello()))
    # ...and a client checks the server's answer too (here a hand-made, lying HELLO).
    c, _ = _sessions(cfg)
    first = codec.decode_frame(c.hello(), cfg.protocol)
    liar = Hello(first.session_id, dict(TGT.to_dict(), weights_digest="y" * 64), ("f32",), ("BRIDGED_PREFIX",),
                 1 << 20, {"scheme": "none"}, "server", bridge=CLAIM)
    with pytest.raises(BridgeMismatch, match="is not the bridge's target"):
        c.receive(codec.encode_hello(liar))
    assert c.state is State.CLOSED


def test_client_refuses_a_server_that_drops_the_bridge(cfg):
    c, _ = _sessions(cfg)
    first = codec.decode_frame(c.hello(), cfg.protocol)
    plain = Hello(first.session_id, TGT.to_dict(), ("f32",), ("BRIDGED_PREFIX",), 1 << 20, {"scheme": "none"},
                  "server")
    with pytest.raises(BridgeMismatch, match="answered without bridge"):
        c.receive(codec.encode_hello(plain))


def test_same_digest_but_other_models_named_is_rejected(cfg):
    c, s = _sessions(cfg, client_bridge=dict(CLAIM, target="z" * 64))
    assert "same bridge digest" in str(_refused(s, c, c.hello()))


@pytest.mark.parametrize("claim", [{"digest": "d" * 64}, dict(CLAIM, digest=""), dict(CLAIM, source=7),
                                   dict(CLAIM, extra="x")])
def test_malformed_bridge_field_is_rejected(cfg, claim):
    c, s = _sessions(cfg, client_bridge=claim)
    assert "bridge field" in str(_refused(s, c, c.hello()))


def test_bridge_holder_still_serves_its_own_model_as_usual(cfg):
    # Same model as the server's, no bridge named: an ordinary session, exact match, all kinds
    # but BRIDGED_PREFIX; the server's HELLO names no bridge.
    c, s = _sessions(cfg, client_sig=TGT, client_bridge=None)
    s.receive(c.hello())
    answer = s.hello()
    assert codec.decode_frame(answer, cfg.protocol).bridge == {}
    c.receive(answer)
    assert not c.bridged and not s.bridged
    assert c.negotiated_kinds == {Kind.KV_CACHE, Kind.VIRTUAL_PREFIX}
    with pytest.raises(UnknownKind):
        c.encode_tensor_message(Kind.BRIDGED_PREFIX, ApplyMode.OVERWRITE, _embd())


def test_without_bridges_different_models_are_a_plain_signature_mismatch(cfg):
    c, s = _sessions(cfg, client_bridge=None, server_bridge=None)
    with pytest.raises(SignatureMismatch) as info:
        s.receive(c.hello())
    assert not isinstance(info.value, BridgeMismatch) and info.value.code == "signature"


def test_server_without_the_kind_cannot_be_bridged_to(cfg):
    c, s = _sessions(cfg, server_kinds=(Kind.KV_CACHE,))
    with pytest.raises(SessionError, match="no message kind in common"):
        s.receive(c.hello())


def test_hello_bridge_field_round_trips_and_is_absent_when_empty(cfg):
    h = Hello(b"\1" * 16, SRC.to_dict(), ("f32",), ("KV_CACHE",), 10, {"scheme": "none"}, "client")
    assert b'"bridge"' not in codec.encode_hello(h)
    with_bridge = dataclasses.replace(h, bridge=CLAIM)
    assert codec.decode_frame(codec.encode_hello(with_bridge), cfg.protocol).bridge == CLAIM
