"""Two real OS processes: a serving receiver (`edgelink serve`) and a sender in the test.

Exactness across processes, and every kind of bad input against a live receiver, whose state
digest must be unchanged afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from gguf_variants import write_weight_variant

from edgelink.api import connect
from edgelink.bench import context_tokens
from edgelink.errors import MessageTooLarge, PeerRejected
from edgelink.kinds.snapshot import snapshot_tensors
from edgelink.protocol.kinds import ApplyMode, Kind
from edgelink.protocol.messages import Reject
from edgelink.roles.launcher import start_receiver, stop_receiver
from edgelink.roles.receiver import frame_limit
from edgelink.roles.sender import Sender
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.signature import model_signature
from edgelink.transport.shm import segment_dir


def _name(tag: str) -> str:
    return f"t-{tag}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _segments(name: str, cfg) -> list[Path]:
    return sorted(segment_dir(cfg).glob(f"edgelink-{name}*"))


class Peer:
    """A receiver process plus a sender runtime for the same model, in this process."""

    def __init__(self, path, cfg, tag, extra_env=None):
        self.cfg = cfg
        self.name = _name(tag)
        self.proc = start_receiver(str(path), cfg, self.name, extra_env)
        self.rt = LlamaRuntime(path, cfg)
        self.signature = model_signature(self.rt, cfg)

    def sender(self) -> Sender:
        s = Sender(connect(f"shm:{self.name}", self.cfg), self.cfg, self.signature)
        s.handshake()
        return s

    def digest(self) -> str:
        s = self.sender()
        try:
            return s.request("digest").digest
        finally:
            s.close()
            self.proc.next_event()

    def stop(self) -> None:
        self.rt.close()
        assert stop_receiver(self.proc) in (0, -signal.SIGTERM), self.proc.stderr_tail()
        assert _segments(self.name, self.cfg) == [], "segments left behind"


@pytest.fixture(scope="module")
def peers(model_paths, cfg):
    # keep: these tests prime a receiver in one session and check it from the next
    keep = cfg.replace(protocol_session_state="keep")
    made = {name: Peer(path, keep, name.split("-")[0]) for name, path in model_paths.items()}
    yield made
    for p in made.values():
        p.stop()


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
@pytest.mark.parametrize("n", [16, 256, 1024])
def test_receiver_continues_exactly_as_the_sender_would(peers, name, n):
    peer = peers[name]
    rt = peer.rt
    rt.clear()
    rt.prefill(context_tokens(rt, n))
    s = peer.sender()
    try:
        sent = s.send_snapshot(rt)
        remote = s.request("generate", n_tokens=32)
    finally:
        s.close()
    event = peer.proc.next_event()
    assert event["applied"] == 1 and event["ended_by"] == "close"
    local = rt.generate(32)
    assert len(local) > 0
    assert remote.tokens == local
    assert remote.context_tokens == n + len(local)
    assert sent.payload_bytes > n * 1000


def test_by_default_no_session_sees_what_an_earlier_one_left(smollm2_path, cfg):
    """protocol.session_state = clear: the next peer finds an empty sequence, cannot generate
    from the last peer's conversation, and its first snapshot needs no backup of one."""
    peer = Peer(smollm2_path, cfg, "clear")
    try:
        rt = peer.rt
        rt.prefill(context_tokens(rt, 200))
        s = peer.sender()
        s.send_snapshot(rt)
        assert s.request("digest").context_tokens == 200
        s.close()
        peer.proc.next_event()
        s = peer.sender()
        try:
            assert s.request("digest").context_tokens == 0
            with pytest.raises(PeerRejected, match="no logits"):
                s.request("generate", n_tokens=4)
        finally:
            s.close()
            peer.proc.next_event()
    finally:
        peer.stop()


@pytest.mark.parametrize("n", [16, 1024])
def test_handoff_through_the_portable_wait_is_exact(smollm2_path, cfg, n):
    """shm.wait = poll on both sides (the path macOS and other POSIX systems take): the
    receiver continues exactly as the sender would, across a context of 1,024 tokens."""
    poll = cfg.replace(shm_wait="poll")
    peer = Peer(smollm2_path, poll, f"poll{n}")
    try:
        rt = peer.rt
        rt.prefill(context_tokens(rt, n))
        s = peer.sender()
        try:
            s.send_snapshot(rt)
            remote = s.request("generate", n_tokens=16)
        finally:
            s.close()
        assert peer.proc.next_event()["applied"] == 1
        assert remote.tokens == rt.generate(16)
    finally:
        peer.stop()


def _prime(peer: Peer, n: int = 64) -> str:
    """Give the receiver a known state and return its digest."""
    rt = peer.rt
    rt.clear()
    rt.prefill(context_tokens(rt, n))
    s = peer.sender()
    s.send_snapshot(rt)
    s.close()
    peer.proc.next_event()
    return peer.digest()


def _frame(sender: Sender, rt: LlamaRuntime) -> bytearray:
    tensors, attrs, token_range = snapshot_tensors(rt)
    parts, _ = sender.session.encode_tensor_message(
        Kind.KV_CACHE, ApplyMode.OVERWRITE, tensors, layer_range=(0, rt.n_layer),
        token_range=token_range, attrs=attrs)
    return bytearray(b"".join(bytes(p) for p in parts))


def _expect_reject(sender: Sender, code: str) -> None:
    reply = sender.session.receive(sender.ch.recv(frame_limit(sender.cfg)))
    assert isinstance(reply, Reject), reply
    assert reply.code == code, reply


def test_flipped_payload_byte_is_rejected_and_state_unchanged(peers):
    peer = peers["smollm2-135m"]
    before = _prime(peer)
    peer.rt.clear()
    peer.rt.prefill(context_tokens(peer.rt, 100))
    s = peer.sender()
    frame = _frame(s, peer.rt)
    frame[len(frame) // 2] ^= 0x04
    s.ch.send(frame)
    _expect_reject(s, "checksum")
    # the session survives a refused message: the next request is served
    assert s.request("digest").digest == before
    s.close()
    assert peer.proc.next_event()["rejected"] == ["checksum"]


def test_truncated_message_is_rejected_and_state_unchanged(peers):
    peer = peers["smollm2-135m"]
    before = _prime(peer)
    s = peer.sender()
    frame = _frame(s, peer.rt)
    s.ch.send(frame[: len(frame) - 1000])
    _expect_reject(s, "truncated")
    s.ch.close()
    assert peer.proc.next_event()["ended_by"] == "fatal"
    assert peer.digest() == before


def test_replayed_message_is_rejected(peers):
    peer = peers["smollm2-135m"]
    _prime(peer)
    s = peer.sender()
    frame = _frame(s, peer.rt)
    s.ch.send(frame)
    ack = s.session.receive(s.ch.recv(frame_limit(s.cfg)))
    assert ack.frame_type.name == "ACK"
    after = s.request("digest").digest
    s.ch.send(frame)  # the very same bytes again
    _expect_reject(s, "replay")
    assert s.request("digest").digest == after
    s.close()
    peer.proc.next_event()


@pytest.mark.parametrize("sender_name,receiver_name", [("smollm2-135m", "gemma3-270m"),
                                                       ("gemma3-270m", "smollm2-135m")])
def test_state_from_another_model_is_rejected_at_the_handshake(peers, sender_name, receiver_name):
    src, dst = peers[sender_name], peers[receiver_name]
    before = dst.digest()
    s = Sender(connect(f"shm:{dst.name}", dst.cfg), dst.cfg, src.signature)
    with pytest.raises(PeerRejected) as info:
        s.handshake()
    s.ch.close()
    assert info.value.reason == "signature"
    assert "architecture" in info.value.detail
    assert dst.proc.next_event()["ended_by"] == "handshake"
    assert dst.digest() == before


def test_same_architecture_different_weights_is_rejected(peers, smollm2_path, cfg, tmp_path):
    variant = write_weight_variant(smollm2_path, tmp_path / "smollm2-variant.gguf")
    other = Peer(variant, cfg, "variant")
    try:
        sig = peers["smollm2-135m"].signature
        assert {k: v for k, v in other.signature.to_dict().items() if k not in ("weights_digest", "name")} == \
            {k: v for k, v in sig.to_dict().items() if k not in ("weights_digest", "name")}
        s = Sender(connect(f"shm:{other.name}", cfg), cfg, sig)
        with pytest.raises(PeerRejected) as info:
            s.handshake()
        s.ch.close()
        assert info.value.reason == "signature" and "weights_digest" in info.value.detail
        assert other.proc.next_event()["ended_by"] == "handshake"
    finally:
        other.stop()


@pytest.fixture(scope="module")
def strict_peer(smollm2_path, cfg):
    """A receiver with a 4 MB message limit, 1 MiB rings and a 3 s transport timeout."""
    peer = Peer(smollm2_path, cfg, "strict", {"EDGELINK_PROTOCOL_MAX_MESSAGE_BYTES": str(4_000_000),
                                              "EDGELINK_SHM_RING_BYTES": str(1 << 20),
                                              "EDGELINK_SHM_TIMEOUT_S": "3"})
    yield peer
    peer.stop()


def test_oversized_message_is_refused_before_allocation(strict_peer):
    peer = strict_peer
    before = _prime(peer, 32)
    rt = peer.rt
    rt.clear()
    rt.prefill(context_tokens(rt, 400))  # about 9 MB of state
    s = peer.sender()
    with pytest.raises(MessageTooLarge, match=r"4\.0 MB \(4,000,000 bytes\), its protocol\.max_message_bytes"):
        s.send_snapshot(rt)  # the sender already knows the receiver's limit from its hello
    s.session.peer_max_bytes = 1 << 40  # a sender that ignores it
    s.session.state = s.session.state.READY
    # 9 MB through a 1 MiB ring: the receiver refuses on the length prefix, stops reading,
    # and the blocked sender still gets the typed refusal
    with pytest.raises(PeerRejected) as info:
        s.send_snapshot(rt)
    assert info.value.reason == "too_large" and "max_message_bytes" in info.value.detail
    s.ch.close()
    assert peer.proc.next_event()["ended_by"] == "too_large"
    assert peer.digest() == before


_PARTIAL_SENDER = r"""
import json, sys
from edgelink.api import connect
from edgelink.config import load_config
from edgelink.protocol.session import Role, Session
from edgelink.protocol.signature import ModelSignature
from edgelink.roles.receiver import frame_limit
from edgelink.transport.framing import HEADER
cfg = load_config()
ch = connect("shm:" + sys.argv[1], cfg)
s = Session(Role.CLIENT, ModelSignature.from_dict(json.loads(sys.argv[2])), cfg.protocol)
ch.send(s.hello())
s.receive(ch.recv(frame_limit(cfg)))
# announce a 3 MB frame, deliver 1 MB of it, then stall
ch._tx.write([memoryview(HEADER.pack(3_000_000)), memoryview(bytes(1_000_000))], 10)
print("partial", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("how", ["killed", "stalled"])
def test_sender_dying_or_stalling_mid_stream_leaves_receiver_clean(strict_peer, how):
    peer = strict_peer
    before = _prime(peer, 32)
    child = subprocess.Popen([sys.executable, "-c", _PARTIAL_SENDER, peer.name, json.dumps(peer.signature.to_dict())],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "partial"
        if how == "killed":
            child.send_signal(signal.SIGKILL)
        event = peer.proc.next_event()  # the receiver gives up on its own
        assert event["ended_by"] == ("peer_gone" if how == "killed" else "timeout"), event
    finally:
        child.kill()
        child.wait()
    assert peer.digest() == before  # partial data discarded, next client served


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_conversation_of_deltas_across_processes(peers, model_paths, cfg, name):
    from edgelink.api import converse

    peer = peers[name]
    first = peer.rt.detokenize(context_tokens(peer.rt, 400)[1:])
    conv = converse(str(model_paths[name]), [first, " The miller's daughter asked why.", " He said:"],
                    f"shm:{peer.name}", n_tokens=8, cfg=cfg)
    assert peer.proc.next_event()["applied"] == 3
    assert conv.same_state
    r0, r1, r2 = conv.rounds
    assert r0.sent_kind == "KV_CACHE" and r1.sent_kind == r2.sent_kind == "KV_CACHE_DELTA"
    # a delta round ships what the round added, far less than the context
    assert r1.sent_bytes < r1.full_snapshot_bytes / 3 and r2.sent_bytes < r2.full_snapshot_bytes / 3
    assert all(len(r.reply_tokens) == 8 for r in conv.rounds)


def test_virtual_prefix_across_processes_matches_reading_the_text(peers, model_paths, cfg):
    from edgelink.api import generate, send_prefix

    path = str(model_paths["smollm2-135m"])
    peer = peers["smollm2-135m"]
    got = send_prefix(path, f"shm:{peer.name}", text="The capital of France is", n_tokens=10, cfg=cfg)
    peer.proc.next_event()
    assert got.tokens == generate(path, "The capital of France is", 10, cfg).tokens
    assert got.bytes["payload"] > 0


def test_bench_handoff_reports_shm_and_p2p_columns(smollm2_path, tmp_path):
    """`edgelink bench handoff` end to end (a real receiver and a real node), tiny sizes."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "EDGELINK_P2P_IDENTITY_KEY": str(tmp_path / "id.key"),
           "EDGELINK_RUNTIME_N_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "edgelink", "bench", "handoff", str(smollm2_path),
                          "--tokens", "64", "--repeats", "1", "--json"], capture_output=True,
                         text=True, env=env, timeout=300, check=True)
    (row,) = json.loads(out.stdout)["rows"]
    assert row["tokens"] == 64 and row["wire_bytes"] > row["payload_bytes"] > 0
    for key in ("reprefill_ms", "handoff_ms", "p2p_handoff_ms", "shm_gbps", "memcpy_gbps"):
        assert row[key] > 0, key
    assert row["speedup_vs_reprefill"] == pytest.approx(row["reprefill_ms"] / row["handoff_ms"])
