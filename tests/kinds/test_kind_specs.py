"""Every message kind is declared once (edgelink/kinds/specs.py), and everything that lists
kinds is built from that declaration."""

from __future__ import annotations

from edgelink.fuzz import seed_frames
from edgelink.kinds.specs import SPECS, acceptance
from edgelink.protocol import codec
from edgelink.protocol.kinds import Kind
from edgelink.protocol.messages import TensorMessage
from edgelink.roles.receiver import Receiver
from edgelink.runtime.signature import model_signature


def test_every_wire_kind_has_exactly_one_spec():
    assert sorted(s.kind for s in SPECS) == sorted(Kind)


def test_the_fuzz_seeds_hold_a_message_of_every_kind(cfg):
    kinds = set()
    for frame in seed_frames():
        msg = codec.decode_frame(frame, cfg.protocol)
        if isinstance(msg, TensorMessage):
            kinds.add(msg.kind)
    assert kinds == set(Kind)


def test_a_receiver_offers_what_its_runtime_can_apply(pair, cfg):
    """No eval hook: no RESIDUAL_PATCH (but HIDDEN_SLICE, which only stores); no bridge: no
    BRIDGED_PREFIX, though label_scores is answered; and the HELLO lists exactly those kinds."""
    rt = pair[0]
    sig = model_signature(rt, cfg)
    table = acceptance(rt, cfg, sig)
    assert set(table.kinds) == set(Kind) - {Kind.RESIDUAL_PATCH, Kind.BRIDGED_PREFIX}
    assert set(table.ops) == {"label_scores"}
    assert set(table.placers) == {Kind.KV_CACHE}
    assert acceptance(rt, cfg, sig, only=(Kind.KV_CACHE,)).kinds == (Kind.KV_CACHE,)
    recv = Receiver(rt, cfg, sig, calibrate=False)
    assert recv.appliers.keys() == table.appliers.keys()
    assert recv.hidden_slices is not None and len(recv.hidden_slices) == 0
