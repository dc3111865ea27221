"""The libp2p transport and `edgelink node`: real hosts and real processes on loopback.

Every bad-input test checks that the node's model state (its digest) is unchanged and that the
node goes on serving the next client.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from edgelink.errors import (
    ConfigError,
    EdgelinkError,
    MessageTooLarge,
    PeerGone,
    PeerRejected,
    SessionError,
    TransportError,
    Unreachable,
)
from edgelink.roles.launcher import start_node, stop_receiver
from edgelink.transport import p2p
from edgelink.transport.identity import load_identity

TOKEN = "s3cret-token"


# ---------------------------------------------------------------------------- transport only


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, cfg):
    d = tmp_path_factory.mktemp("p2p")
    got: list = []

    def echo(ch):
        while True:
            try:
                f = ch.recv(1 << 26)
            except MessageTooLarge:
                ch.send(b"refused")
                return
            except TransportError:
                return
            got.append(len(f))
            ch.send(bytes(f[:32]), len(f).to_bytes(8, "little"))

    c = cfg.replace(p2p_chunk_bytes=65536, p2p_window_bytes=1 << 20)
    srv = p2p.P2PHost(c, load_identity(d / "srv.key"), listen=["/ip4/127.0.0.1/tcp/0"], on_channel=echo)
    cli = p2p.P2PHost(c, load_identity(d / "cli.key"))
    yield srv, cli, got
    cli.close()
    srv.close()


def test_channel_round_trip_and_connection_reuse(hosts):
    srv, cli, _ = hosts
    addr = srv.addrs[0]
    assert addr.endswith(f"/p2p/{srv.peer_id}")
    ch = cli.open_channel(addr)
    assert ch.encryption["scheme"] == "x25519-ed25519-xchacha20poly1305"
    for size in (0, 1, 1000, 65536, 65537, 3 * 65536 + 5, 5 << 20):
        data = os.urandom(size)
        ch.send(data[: size // 3], data[size // 3:])
        r = ch.recv(100)
        assert bytes(r[:-8]) == data[:32] and int.from_bytes(r[-8:], "little") == size
    ch.close()
    t0 = time.perf_counter()
    ch2 = cli.open_channel(addr)  # same connection, new stream: no dial, no Noise handshake
    warm = time.perf_counter() - t0
    ch2.send(b"x")
    assert bytes(ch2.recv(100))[:1] == b"x"
    ch2.close()
    assert cli.connected_peers() == [srv.peer_id]
    assert warm < 0.2, warm


def test_declared_length_over_limit_refused_before_allocation(hosts):
    srv, cli, got = hosts
    ch = cli.open_channel(srv.addrs[0])
    before = len(got)
    with pytest.raises(PeerGone):
        ch.send(bytes(1 << 26 + 1))  # the echo server allows 64 MiB
    assert bytes(ch.recv(100)) == b"refused"  # the refusal still arrives
    assert len(got) == before
    ch.close()


def test_plaintext_only_dialer_is_refused(hosts):
    import multiaddr
    import trio
    from libp2p import create_yamux_muxer_option, new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport

    srv, _, _ = hosts
    kp = create_new_key_pair()
    h = new_host(key_pair=kp, sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(kp)},
                 muxer_opt=create_yamux_muxer_option())
    outcome = {}

    async def main():
        async with h.run([]):
            with trio.move_on_after(20):
                try:
                    await h.connect(info_from_p2p_addr(multiaddr.Multiaddr(srv.addrs[0])))
                    outcome["connected"] = True
                except Exception as exc:  # noqa: BLE001
                    outcome["error"] = repr(exc)

    trio.run(main)
    assert "error" in outcome, outcome


def test_a_second_listener_on_a_taken_port_fails_naming_it(cfg, tmp_path):
    """libp2p listens with SO_REUSEPORT; edgelink must not let two nodes share a port."""
    first = p2p.P2PHost(cfg, load_identity(tmp_path / "a.key"), listen=["/ip4/127.0.0.1/tcp/0"],
                        on_channel=lambda ch: None)
    try:
        port = int(first.addrs[0].split("/tcp/")[1].split("/")[0])
        with pytest.raises(TransportError, match=f"TCP port {port} on 127.0.0.1 is already in use"):
            p2p.P2PHost(cfg, load_identity(tmp_path / "b.key"), listen=[f"/ip4/127.0.0.1/tcp/{port}"],
                        on_channel=lambda ch: None)
    finally:
        first.close()
    again = p2p.P2PHost(cfg, load_identity(tmp_path / "b.key"), listen=[f"/ip4/127.0.0.1/tcp/{port}"],
                        on_channel=lambda ch: None)  # free again once the first one closed
    again.close()


def test_a_refused_stream_is_reported_at_once_and_its_connection_kept(cfg, tmp_path):
    """A listener resets a refused stream unread; the reset may reach the dialler while it
    still reads protocol negotiation. Either way the dialler must say "refused" at once,
    not take the connection for dead and redial it: that would cut every other stream on it
    (CI saw an attacker's own pending streams vanish, and its next stream get in)."""
    c = cfg.replace(p2p_handshake_timeout_s=60.0)
    srv_box: list = []

    def hold(ch) -> None:
        with contextlib.suppress(EdgelinkError):
            ch.recv(1 << 20, 60)

    srv = p2p.P2PHost(c, load_identity(tmp_path / "srv.key"), listen=["/ip4/127.0.0.1/tcp/0"],
                      on_channel=hold, admit=lambda peer, ip: srv_box[0].pending() < 1)
    srv_box.append(srv)
    cli = p2p.P2PHost(c, load_identity(tmp_path / "cli.key"))
    try:
        addr = srv.addrs[0]
        first = cli.open_channel(addr)  # holds the one pending place
        for _ in range(30):
            t0 = time.monotonic()
            with pytest.raises(PeerGone, match="node.max_pending"):
                cli.open_channel(addr)
            assert time.monotonic() - t0 < 5.0
            assert not first.closed and srv.pending() == 1
        first.send(b"still here")
    finally:
        cli.close()
        srv.close()


@pytest.fixture()
def echo_pair(cfg, tmp_path):
    """A listener that echoes every frame whole, and a client host; small rekey interval."""
    import queue

    c = cfg.replace(p2p_window_bytes=1 << 20, p2p_rekey_bytes=256 << 10)
    served: queue.Queue = queue.Queue()  # how each served session ended

    def echo(ch) -> None:
        try:
            while True:
                ch.send(bytes(ch.recv(1 << 24, 30)))
        except EdgelinkError as exc:
            served.put(str(exc))

    srv = p2p.P2PHost(c, load_identity(tmp_path / "srv.key"), listen=["/ip4/127.0.0.1/tcp/0"], on_channel=echo)
    cli = p2p.P2PHost(c, load_identity(tmp_path / "cli.key"))
    yield srv, cli, served
    cli.close()
    srv.close()


def test_both_directions_rekey_with_fresh_dh_during_a_transfer(echo_pair):
    srv, cli, served = echo_pair
    ch = cli.open_channel(srv.addrs[0])
    payload = os.urandom(1 << 20)
    for i in range(8):
        ch.send(payload[i:] + payload[:i])
        assert bytes(ch.recv(1 << 24, 30)) == payload[i:] + payload[:i]
    keys = ch._keys
    # every direction renewed its key several times, by fresh X25519 exchanges (each answered
    # by the receiver announcing its next key), not only by the hash ratchet
    assert keys.sealer.dh_rekeys >= 3 and keys.opener.dh_rekeys >= 3, (keys.sealer.dh_rekeys, keys.opener.dh_rekeys)
    assert ch.encryption["version"] == 2
    ch.close()


def test_a_close_is_told_from_a_cut_and_flow_control_is_sealed(echo_pair):
    srv, cli, served = echo_pair
    from edgelink.transport import e2e

    ch = cli.open_channel(srv.addrs[0])
    ch.send(b"x" * 100)
    assert bytes(ch.recv(1 << 20, 30)) == b"x" * 100
    ch.close()  # a sealed end record: the server's next recv ends as a close
    # a cut: the end record is dropped, so the server sees the stream end without it
    ch2 = cli.open_channel(srv.addrs[0])
    ch2.record_filter = lambda typ, raw: [] if typ == p2p.R_DATA and raw[0] & e2e.FLAG_END else [raw]
    ch2.send(b"y")
    assert bytes(ch2.recv(1 << 20, 30)) == b"y"
    ch2.close()
    # a flipped bit in a credit record: the server cannot open it and resets the stream
    ch3 = cli.open_channel(srv.addrs[0])

    def flip(typ, raw):
        if typ == p2p.R_CREDIT:
            raw = bytearray(raw)
            raw[-1] ^= 1
            raw = bytes(raw)
        return [raw]

    ch3.record_filter = flip
    with pytest.raises(EdgelinkError):
        for _ in range(16):  # the echo comes back; our credit for it is what breaks
            ch3.send(b"z" * (512 << 10))
            ch3.recv(1 << 24, 30)
    reasons = [served.get(timeout=30) for _ in range(3)]  # how the server saw each end, in order
    assert "(closed)" in reasons[0], reasons
    assert "without its sealed end record" in reasons[1], reasons
    assert "does not authenticate" in reasons[2], reasons


def test_identity_persists_with_mode_0600(tmp_path):
    path = tmp_path / "sub" / "id.key"
    a = load_identity(path)
    assert a.created and stat.S_IMODE(path.stat().st_mode) == 0o600
    b = load_identity(path)
    assert not b.created and b.peer_id_str == a.peer_id_str and a.peer_id_str.startswith("12D3KooW")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load_identity(path)


# ---------------------------------------------------------------------------- a node process


class NodeUnderTest:
    def __init__(self, path, cfg, tmp, allowed_key, friend_key):
        self.cfg = cfg
        self.key = tmp / "node.key"
        self.allowed = load_identity(allowed_key)
        self.friend = load_identity(friend_key)
        self.env = {
            "EDGELINK_P2P_IDENTITY_KEY": str(self.key),
            "EDGELINK_NODE_TOKENS": f"other-token,{TOKEN}",
            "EDGELINK_NODE_ALLOW_PEERS": f"{self.allowed.peer_id_str},{self.friend.peer_id_str}",
            "EDGELINK_NODE_MESSAGES_PER_S": "20",
            "EDGELINK_NODE_MESSAGES_BURST": "10",
            "EDGELINK_NODE_MAX_MESSAGE_BYTES": str(64 << 20),
            "EDGELINK_NODE_SHUTDOWN_GRACE_S": "5",
            # tests here check a node's state across sessions (faults leave it unchanged)
            "EDGELINK_PROTOCOL_SESSION_STATE": "keep",
        }
        self.model = str(path)
        self.start()

    def start(self):
        self.proc = start_node(self.model, self.cfg, extra_env=self.env)
        self.addr = self.proc.ready["addrs"][0]
        self.peer_id = self.proc.ready["peer_id"]

    def stop(self) -> int:
        return stop_receiver(self.proc)

    def event(self, refused: bool = False):
        """The next session event; ``refused``: the next refused-stream event instead (a
        client's libp2p may open a refused stream twice, so those are skipped otherwise)."""
        while True:
            ev = self.proc.next_event()
            if (ev.get("event") == "refused") == refused:
                return ev


@pytest.fixture(scope="module")
def node(smollm2_path, cfg, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("node")
    client_key = tmp / "client.key"
    n = NodeUnderTest(smollm2_path, cfg, tmp, client_key, tmp / "friend.key")
    n.client_cfg = cfg.replace(p2p_identity_key=client_key)
    n.friend_cfg = cfg.replace(p2p_identity_key=tmp / "friend.key")
    n.stranger_cfg = cfg.replace(p2p_identity_key=tmp / "stranger.key")
    yield n
    p2p.close_client_hosts()
    assert n.stop() in (0, -15), n.proc.stderr_tail()


@pytest.fixture(scope="module")
def sender_rt(smollm2_path, cfg):
    from edgelink.runtime.llama import LlamaRuntime
    from edgelink.runtime.signature import model_signature

    rt = LlamaRuntime(smollm2_path, cfg)
    rt.signature = model_signature(rt, cfg)
    yield rt
    rt.close()


def _sender(node, rt, token=TOKEN, cfg=None):
    from edgelink.api import connect
    from edgelink.roles.sender import Sender

    cfg = cfg or node.client_cfg
    s = Sender(connect(node.addr, cfg), cfg, rt.signature, auth={"token": token} if token else None)
    s.handshake()
    return s


def _digest(node, rt) -> str:
    s = _sender(node, rt)
    try:
        return s.request("digest").digest
    finally:
        s.close()
        ev = node.event()
        assert ev["ended_by"] == "close", ev


def _prefill(rt, n):
    from edgelink.bench import context_tokens

    rt.clear()
    rt.prefill(context_tokens(rt, n))


def test_handoff_over_p2p_continues_exactly(node, sender_rt):
    rt = sender_rt
    _prefill(rt, 256)
    s = _sender(node, rt)
    sent = s.send_snapshot(rt)
    body = s.request("generate", n_tokens=24, stop_at_eog=False)
    s.close()
    ev = node.event()
    assert ev["applied"] == 1 and ev["peer"] == node.allowed.peer_id_str
    assert ev["bytes_in"] >= sent.wire_bytes
    local = rt.generate(24, stop_at_eog=False)
    assert body.tokens == local


def test_a_network_handoff_is_compressed_losslessly_by_default(node, sender_rt):
    """wire.codec = auto over p2p: other messages use zstd-shuffle/1; a handoff over a link
    known to be slow (split off) ships the whole state with it: fewer bytes, exact continuation;
    a lossy codec the node did not allow is refused before anything is sent."""
    rt = sender_rt
    _prefill(rt, 300)
    slow = node.client_cfg.replace(wire_link_mbit=20.0, wire_split="off")
    s = _sender(node, rt, cfg=slow)
    assert s.codec == "zstd-shuffle/1"
    sent = s.send_snapshot(rt)
    body = s.request("generate", n_tokens=16, stop_at_eog=False)
    s.close()
    node.event()
    assert sent.codec == "zstd-shuffle/1" and sent.split == 0 and sent.link.bytes_per_s == 20e6 / 8
    assert body.tokens == rt.generate(16, stop_at_eog=False)
    _prefill(rt, 300)
    raw = _sender(node, rt, cfg=node.client_cfg.replace(wire_codec="raw"))
    raw_sent = raw.send_snapshot(rt)
    raw.close()
    node.event()
    assert raw.codec is None and raw_sent.codec == "raw" and sent.wire_bytes < 0.97 * raw_sent.wire_bytes
    with pytest.raises(SessionError, match="allow_lossy = on on the receiver"):
        _sender(node, rt, cfg=node.client_cfg.replace(wire_codec="kivi4/1"))
    # the sender closed the session at once (it does not idle until the node's timeout)
    assert node.event()["ended_by"] == "close"


def test_auto_measures_the_link_and_the_plan_is_exact(node, sender_rt):
    """On loopback the probe measures a fast link (well over 100 Mbit/s) and the plan ships
    the whole state; the receiver's HELLO announced its prefill speed."""
    rt = sender_rt
    _prefill(rt, 300)
    s = _sender(node, rt)
    assert s.session.peer.prefill_tps > 10
    sent = s.send_snapshot(rt)
    body = s.request("generate", n_tokens=8, stop_at_eog=False)
    s.close()
    node.event()
    assert sent.link is not None and sent.link.bytes_per_s > 100e6 / 8 and sent.split == 0
    assert sent.predicted_s is not None
    assert body.tokens == rt.generate(8, stop_at_eog=False)


def _split_handoff(node, rt, n, cfg):
    """Hand ``n`` tokens over as if on a 20 Mbit/s link; returns (sent, the node's digest
    after the handoff, the continuation there)."""
    s = _sender(node, rt, cfg=cfg.replace(wire_link_mbit=20.0))
    try:
        sent = s.send_snapshot(rt)
        digest = s.request("digest").digest
        body = s.request("generate", n_tokens=16, stop_at_eog=False)
    finally:
        s.close()
    return sent, digest, body.tokens


def test_a_split_handoff_leaves_exactly_the_senders_state(node, sender_rt):
    """On a slow link the receiver prefills the first tokens itself while the rest of the KV
    travels; it verifies its own cells against the sender's, so the merged state is the
    sender's bit for bit (the same digest) and continues the same."""
    rt = sender_rt
    _prefill(rt, 1024)
    assert rt.batched == 1024
    sent, digest, remote = _split_handoff(node, rt, 1024, node.client_cfg)
    ev = node.event()
    assert sent.split >= 64 and sent.split % 32 == 0 and not sent.fallback, sent
    assert ev["applied"] == 1 and ev["rejected"] == [] and ev["codec"] == "zstd-shuffle/1"
    assert digest == rt.state_digest()
    assert remote == rt.generate(16, stop_at_eog=False)


def test_a_split_whose_cells_differ_falls_back_to_the_whole_state(node, smollm2_path, cfg):
    """A sender that computed its cells in 16-token batches (not reproducible by the receiver's
    prefill) but claims otherwise: the receiver refuses the delta (state), and the whole state
    follows in the same handoff; the result is still exactly the sender's."""
    from edgelink.runtime.llama import LlamaRuntime
    from edgelink.runtime.signature import model_signature

    small = cfg.replace(runtime_n_batch=16, runtime_n_ubatch=16)
    with LlamaRuntime(smollm2_path, small) as rt:
        rt.signature = model_signature(rt, small)
        _prefill(rt, 512)
        assert rt.batched == 0  # a planner would not split this state ...
        rt.batched = 512  # ... unless it misjudged: the receiver's check is what holds
        sent, digest, remote = _split_handoff(node, rt, 512, node.client_cfg)
        ev = node.event()
        assert sent.split > 0 and sent.fallback, sent
        assert ev["rejected"] == ["state"] and ev["applied"] == 1
        assert digest == rt.state_digest()
        assert remote == rt.generate(16, stop_at_eog=False)


def test_a_lossy_handoff_to_a_node_that_allows_it(smollm2_path, cfg, tmp_path, sender_rt):
    rt = sender_rt
    key = tmp_path / "lossy.key"
    proc = start_node(str(smollm2_path), cfg.replace(wire_allow_lossy="on"),
                      extra_env={"EDGELINK_P2P_IDENTITY_KEY": str(key)})
    try:
        _prefill(rt, 300)
        from edgelink.api import connect
        from edgelink.roles.sender import Sender

        c = cfg.replace(wire_codec="kivi4/1", p2p_identity_key=tmp_path / "client.key")
        s = Sender(connect(proc.ready["addrs"][0], c), c, rt.signature)
        s.handshake()
        sent = s.send_snapshot(rt)
        digest = s.request("digest")
        s.close()
        proc.next_event()
        assert s.codec == "kivi4/1" and sent.wire_bytes < 0.4 * len(rt.export_state())
        assert digest.context_tokens == 300
    finally:
        assert stop_receiver(proc) in (0, -15), proc.stderr_tail()


def test_on_a_very_slow_link_the_text_travels_and_the_digests_must_agree(node, sender_rt, smollm2_path, cfg):
    """At 1 Mbit/s the plan sends the token ids; the receiver's prefill must give our state
    digest exactly (cells, tokens, logits). A sender whose cells no prefill reproduces (16-token
    batches, claimed otherwise) is caught by that digest and the whole state follows."""
    from edgelink.runtime.llama import LlamaRuntime
    from edgelink.runtime.signature import model_signature

    rt = sender_rt
    _prefill(rt, 700)  # 512 + 188: the receiver decodes the same ubatches
    s = _sender(node, rt, cfg=node.client_cfg.replace(wire_link_mbit=1.0))
    sent = s.send_snapshot(rt)
    digest = s.request("digest").digest
    s.close()
    node.event()
    assert sent.codec == "tokens" and sent.split == 700 and not sent.fallback and sent.payload_bytes == 0
    assert digest == rt.state_digest() == sent.digest
    small = cfg.replace(runtime_n_batch=16, runtime_n_ubatch=16)
    with LlamaRuntime(smollm2_path, small) as other:
        other.signature = model_signature(other, small)
        _prefill(other, 300)
        other.batched = 300
        s = _sender(node, other, cfg=node.client_cfg.replace(wire_link_mbit=1.0))
        sent = s.send_snapshot(other)
        digest = s.request("digest").digest
        s.close()
        node.event()
        assert sent.fallback and sent.codec != "tokens" and digest == other.state_digest()


def test_a_split_handoff_past_gemmas_window_is_exact(gemma3_path, cfg, tmp_path):
    """Gemma-3 keeps a 512-token window cache beside its full one: a 1,024-token split handoff
    merges the receiver's own cells and the shipped ones in both, exactly."""
    from edgelink.api import connect
    from edgelink.bench import context_tokens
    from edgelink.roles.sender import Sender
    from edgelink.runtime.llama import LlamaRuntime
    from edgelink.runtime.signature import model_signature

    proc = start_node(str(gemma3_path), cfg, extra_env={"EDGELINK_P2P_IDENTITY_KEY": str(tmp_path / "g.key"),
                                                        "EDGELINK_PROTOCOL_SESSION_STATE": "keep"})
    try:
        with LlamaRuntime(gemma3_path, cfg) as rt:
            assert rt.n_swa == 512
            rt.prefill(context_tokens(rt, 1024))
            c = cfg.replace(wire_link_mbit=20.0, p2p_identity_key=tmp_path / "c.key")
            s = Sender(connect(proc.ready["addrs"][0], c), c, model_signature(rt, c))
            s.handshake()
            sent = s.send_snapshot(rt)
            digest = s.request("digest").digest
            remote = s.request("generate", n_tokens=16, stop_at_eog=False).tokens
            s.close()
            ev = proc.next_event()
            assert sent.split >= 64 and not sent.fallback and ev["rejected"] == [], (sent, ev)
            assert digest == rt.state_digest()
            assert remote == rt.generate(16, stop_at_eog=False)
    finally:
        p2p.close_client_hosts()
        assert stop_receiver(proc) in (0, -15), proc.stderr_tail()


@pytest.mark.parametrize("who", ["wrong_token", "no_token"])
def test_auth_is_checked_before_model_work(node, sender_rt, who):
    before = _digest(node, sender_rt)
    cfg, token = node.client_cfg, ("nope" if who == "wrong_token" else None)
    with pytest.raises(PeerRejected) as info:
        _sender(node, sender_rt, token=token, cfg=cfg)
    assert info.value.reason == "auth"
    ev = node.event()
    assert ev["rejected"] == ["auth"] and ev["slot"] is None and ev["applied"] == 0, ev
    assert "auth" in node.proc.stderr_tail() and ev["peer"] in node.proc.stderr_tail()
    assert _digest(node, sender_rt) == before


def test_a_peer_off_the_allowlist_is_reset_unread(node, sender_rt):
    """The allowlist is checked when the stream opens: no key exchange, no HELLO read, no
    answer; the client's error says what to check, the node's event and log say who."""
    before = _digest(node, sender_rt)
    with pytest.raises(PeerGone, match="node.allow_peers"):
        _sender(node, sender_rt, cfg=node.stranger_cfg)
    ev = node.event(refused=True)
    assert ev["event"] == "refused" and "allow_peers" in ev["reason"], ev
    assert ev["peer"] in node.proc.stderr_tail()
    assert _digest(node, sender_rt) == before


def _corrupted_snapshot(node, rt, how):
    """Ship a snapshot (three DATA records: its length, then two chunks) whose second record
    is tampered with or sent twice: either way mid-frame, before the message is whole."""
    s = _sender(node, rt)
    count = [0]

    def flt(typ, body):
        if typ != p2p.R_DATA:
            return [body]
        count[0] += 1
        if count[0] != 2:
            return [body]
        if how == "tamper":
            b = bytearray(body)
            b[len(b) // 2] ^= 0x40
            return [bytes(b)]
        return [body, body]  # replay

    s.ch.record_filter = flt
    with pytest.raises((PeerGone, TransportError)):
        s.send_snapshot(rt)
        s.request("digest")
    s.ch.close()
    return node.event()


@pytest.mark.parametrize("how, code", [("tamper", "crypto"), ("replay", "replay")])
def test_tampered_or_replayed_record_is_refused_state_unchanged(node, sender_rt, how, code):
    _prefill(sender_rt, 64)
    before = _digest(node, sender_rt)
    ev = _corrupted_snapshot(node, sender_rt, how)
    assert ev["ended_by"] == code and ev["applied"] == 0, ev
    assert _digest(node, sender_rt) == before


def test_oversize_declared_length_refused_before_allocation(node, sender_rt):
    before = _digest(node, sender_rt)
    s = _sender(node, sender_rt)
    ch = s.ch
    fno = ch._tx_frame
    ch._tx_frame += 1
    ch._push(p2p.R_DATA, ch._keys.sealer.seal(p2p.U64.pack(1 << 40), fno), fno)
    with pytest.raises(PeerRejected) as info:
        s._reply()
    assert info.value.reason == "too_large"
    ch.close()
    ev = node.event()
    assert ev["ended_by"] == "too_large", ev
    assert _digest(node, sender_rt) == before


def test_client_killed_mid_transfer_node_serves_next(node, sender_rt, tmp_path):
    before = _digest(node, sender_rt)
    script = textwrap.dedent(f"""
        import os, sys
        from edgelink.api import connect
        from edgelink.config import load_config
        from edgelink.runtime.signature import model_signature
        from edgelink.roles.sender import Sender
        from edgelink.runtime.llama import LlamaRuntime
        cfg = load_config(p2p_identity_key={str(node.allowed.path)!r})
        rt = LlamaRuntime({node.model!r}, cfg)
        s = Sender(connect({node.addr!r}, cfg), cfg, model_signature(rt, cfg),
                   auth={{"token": {TOKEN!r}}})
        s.handshake()  # authenticated: a first frame this large would be refused unread
        ch = s.ch
        n = [0]
        def flt(typ, body):
            n[0] += 1
            if n[0] == 6:
                print("dying", flush=True)
                os._exit(9)
            return [body]
        ch.record_filter = flt
        ch.send(bytes(32 << 20))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9 and "dying" in proc.stdout, proc.stderr
    ev = node.event()
    assert ev["applied"] == 0 and ev["ended_by"] in ("peer_gone", "timeout", "version", "protocol",
                                                      "truncated", "crypto"), ev
    assert node.proc.poll() is None
    assert _digest(node, sender_rt) == before


def test_flooding_client_is_throttled_while_another_is_served(node, sender_rt, smollm2_path, cfg):
    from edgelink.runtime.llama import LlamaRuntime

    stop = threading.Event()
    counts = []

    def flood():
        s = _sender(node, sender_rt, cfg=node.friend_cfg)
        n = 0
        t0 = time.monotonic()
        while not stop.is_set():
            s.request("digest")
            n += 1
        counts.append((n, time.monotonic() - t0))
        s.close()

    t = threading.Thread(target=flood)
    t.start()
    try:
        with LlamaRuntime(smollm2_path, cfg) as rt2:
            rt2.signature = sender_rt.signature
            _prefill(rt2, 128)
            s = _sender(node, rt2)
            s.send_snapshot(rt2)
            body = s.request("generate", n_tokens=8, stop_at_eog=False)
            s.close()
            assert body.tokens == rt2.generate(8, stop_at_eog=False)
        time.sleep(1.0)  # let the flood run against its limit for a while
    finally:
        stop.set()
        t.join(60)
    evs = [node.event(), node.event()]
    flood_ev = max(evs, key=lambda e: e["generated"] == 0 and e["applied"] == 0)
    n, dt = counts[0]
    # 20 messages/s with a burst of 10: the flooder gets roughly rate * time + burst requests
    assert n <= 20 * dt + 10 + 5, (n, dt)
    assert flood_ev["throttled_s"] > 0, evs


def test_node_restart_keeps_its_peer_id(node):
    old = node.peer_id
    assert node.stop() in (0, -15)
    p2p.close_client_hosts()
    node.start()
    assert node.peer_id == old
    assert stat.S_IMODE(node.key.stat().st_mode) == 0o600


def test_delta_and_prefix_messages_over_p2p(node, sender_rt):
    """The other message kinds take the encrypted network path like the snapshot."""
    rt = sender_rt
    _prefill(rt, 200)
    s = _sender(node, rt)
    try:
        full = s.send_snapshot(rt)
        synced = len(rt.tokens)
        rt.prefill(rt.tokenize(" And then the storm came.", add_special=False))
        delta = s.send_delta(rt, synced)
        assert delta.payload_bytes < full.payload_bytes / 5
        before_reply = len(rt.tokens)
        s.request("generate", n_tokens=8, stop_at_eog=False)
        s.pull_delta(rt, before_reply)  # the node's 8 new cells come back
        assert len(rt.tokens) == before_reply + 8
        assert s.request("digest").digest == rt.state_digest()
        s.request("reset")
        toks = rt.tokenize("The capital of France is")
        s.send_prefix(rt.token_embeddings().rows(toks), 0)
        out = s.request("generate", n_tokens=6)
    finally:
        s.close()
    assert node.event()["applied"] == 3
    rt.clear()
    rt.prefill(toks)
    assert out.tokens == rt.generate(6)


def test_client_follows_a_node_that_restarted_on_another_port(node, sender_rt):
    """Same key, new port: a long-lived client process must dial the new address."""
    old = node.addr
    assert _digest(node, sender_rt)
    node.stop()
    node.start()
    assert node.addr != old and node.peer_id in old
    assert _digest(node, sender_rt)


def test_keys_ratchet_during_a_live_handoff(smollm2_path, cfg, tmp_path, sender_rt):
    """Rekey every 1 MB on both sides: a 6 MB snapshot crosses several key changes and the
    continuation is still exact."""
    small = {"EDGELINK_P2P_REKEY_BYTES": str(1 << 20)}
    node = NodeUnderTest(smollm2_path, cfg, tmp_path, tmp_path / "client.key", tmp_path / "friend.key")
    node.stop()
    node.env.update(small)
    node.start()
    client_cfg = cfg.replace(p2p_identity_key=tmp_path / "client.key", p2p_rekey_bytes=1 << 20)
    try:
        rt = sender_rt
        _prefill(rt, 256)
        s = _sender(node, rt, cfg=client_cfg)
        s.send_snapshot(rt)
        body = s.request("generate", n_tokens=12, stop_at_eog=False)
        sealer = s.ch._keys.sealer
        s.close()
        assert node.event()["applied"] == 1
        assert sealer.rekeys >= 5  # about 6 MB went out under 1 MB keys
        assert body.tokens == rt.generate(12, stop_at_eog=False)
    finally:
        p2p.close_client_hosts()
        node.stop()


def test_clients_past_the_maximum_are_refused_busy(node, sender_rt):
    from edgelink.api import connect
    from edgelink.errors import PeerRejected
    from edgelink.roles.sender import Sender

    held = [_sender(node, sender_rt) for _ in range(2)]  # node.max_clients = 2
    try:
        extra = Sender(connect(node.addr, node.client_cfg), node.client_cfg, sender_rt.signature,
                       auth={"token": TOKEN})
        with pytest.raises(PeerRejected) as info:
            extra.handshake()
        extra.ch.close()
        assert info.value.reason == "busy"
        assert node.event()["rejected"] == ["busy"]
    finally:
        for s in held:
            s.close()
    events = [node.event(), node.event()]
    assert all(e["ended_by"] == "close" for e in events), (events, node.proc.stderr_tail(3000))
    assert _digest(node, sender_rt)  # a slot is free again


def test_sigterm_lets_running_work_finish_refuses_new_and_cuts_idle(smollm2_path, cfg, tmp_path, sender_rt):
    """Graceful shutdown with work in flight: after SIGTERM the node announces it, refuses new
    sessions (`busy`), still serves a session that was running (its continuation is exact),
    cuts a session that stays idle past node.shutdown_grace_s, and exits 0."""
    from edgelink.errors import PeerGone, PeerRejected, TransportError

    n = NodeUnderTest(smollm2_path, cfg, tmp_path, tmp_path / "client.key", tmp_path / "friend.key")
    n.client_cfg = cfg.replace(p2p_identity_key=tmp_path / "client.key")
    grace = float(n.env["EDGELINK_NODE_SHUTDOWN_GRACE_S"])
    try:
        _prefill(sender_rt, 256)
        working = _sender(n, sender_rt)
        working.send_snapshot(sender_rt)  # applied and acknowledged before the signal
        idle = _sender(n, sender_rt)
        n.proc.send_signal(signal.SIGTERM)
        t_signal = time.monotonic()
        ev = n.event()
        assert ev["event"] == "stopping" and ev["active_sessions"] == 2, ev
        with pytest.raises(PeerRejected) as info:
            _sender(n, sender_rt)
        assert info.value.reason == "busy"
        assert n.event()["rejected"] == ["busy"]
        body = working.request("generate", n_tokens=16, stop_at_eog=False)
        assert body.tokens == sender_rt.generate(16, stop_at_eog=False)
        working.close()
        done = n.event()
        assert done["applied"] == 1 and done["ended_by"] == "close", done
        cut = n.event()  # the idle session, cut once the grace period is over
        assert cut["applied"] == 0 and cut["ended_by"] != "close", cut
        assert n.proc.wait(timeout=grace + 30) == 0, n.proc.stderr_tail()
        assert time.monotonic() - t_signal >= grace - 0.5
        with pytest.raises((PeerGone, TransportError)):
            idle.request("digest")
    finally:
        p2p.close_client_hosts()
        n.stop()


def test_bytes_per_second_bucket_alone_paces_a_large_snapshot(smollm2_path, cfg, tmp_path, sender_rt):
    """With plenty of messages per second but 4 MiB/s of bytes (burst 4 MiB), a ~6 MB snapshot
    is paced by the byte bucket: it arrives intact, the node reports the throttling, and the
    transfer cannot beat (size - burst) / rate."""
    rate = burst = 4 << 20
    n = NodeUnderTest(smollm2_path, cfg, tmp_path, tmp_path / "client.key", tmp_path / "friend.key")
    n.stop()
    n.env.update({"EDGELINK_NODE_MESSAGES_PER_S": "10000", "EDGELINK_NODE_MESSAGES_BURST": "10000",
                  "EDGELINK_NODE_BYTES_PER_S": str(rate), "EDGELINK_NODE_BYTES_BURST": str(burst)})
    n.start()
    n.client_cfg = cfg.replace(p2p_identity_key=tmp_path / "client.key")
    try:
        _prefill(sender_rt, 256)
        s = _sender(n, sender_rt)
        t0 = time.monotonic()
        sent = s.send_snapshot(sender_rt)
        took = time.monotonic() - t0
        body = s.request("generate", n_tokens=8, stop_at_eog=False)
        s.close()
        assert body.tokens == sender_rt.generate(8, stop_at_eog=False)
        ev = n.event()
        assert sent.wire_bytes > burst + (1 << 20), sent.wire_bytes
        floor = (sent.wire_bytes - burst) / rate
        assert took >= 0.8 * floor, (took, floor)
        assert ev["applied"] == 1 and ev["throttled_s"] >= 0.5 * floor, ev
    finally:
        p2p.close_client_hosts()
        n.stop()


def test_node_flags_add_tokens_and_allowed_peers(smollm2_path, cfg, tmp_path, sender_rt):
    """`edgelink node --token T --allow-peer ID` does what node.tokens and node.allow_peers do."""
    allowed = load_identity(tmp_path / "allowed.key")
    proc = start_node(str(smollm2_path), cfg, extra_env={"EDGELINK_P2P_IDENTITY_KEY": str(tmp_path / "n.key")},
                      node_args=("--token", "flag-token", "--allow-peer", allowed.peer_id_str))
    try:
        from edgelink.api import connect
        from edgelink.roles.sender import Sender

        addr = proc.ready["addrs"][0]
        ok = cfg.replace(p2p_identity_key=tmp_path / "allowed.key")
        for who, c, token in (("no token", ok, None), ("stranger", cfg.replace(p2p_identity_key=tmp_path / "s.key"),
                                                                      "flag-token")):
            try:
                s = Sender(connect(addr, c), c, sender_rt.signature, auth={"token": token} if token else None)
                with pytest.raises((PeerRejected, TransportError)):
                    s.handshake()
            except TransportError:
                pass  # the node may refuse a stranger before any session
            assert proc.poll() is None, who
        s = Sender(connect(addr, ok), ok, sender_rt.signature, auth={"token": "flag-token"})
        s.handshake()
        assert s.request("digest").context_tokens == 0
        s.close()
    finally:
        p2p.close_client_hosts()
        assert stop_receiver(proc) in (0, -15), proc.stderr_tail()
    bad = subprocess.run([sys.executable, "-m", "edgelink", "node", str(smollm2_path), "--token", "a,b"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "without commas" in bad.stderr


def test_a_failed_dial_is_one_line_from_the_readers_side(cfg, tmp_path, capfd):
    """Nothing listening, another peer at the address: each is one line that says which, and
    py-libp2p's own log lines stay off stderr unless asked for (-v)."""
    srv = p2p.P2PHost(cfg, load_identity(tmp_path / "srv.key"), listen=["/ip4/127.0.0.1/tcp/0"],
                      on_channel=lambda ch: None)
    other = load_identity(tmp_path / "other.key")
    cli = p2p.P2PHost(cfg, load_identity(tmp_path / "cli.key"))
    try:
        head = srv.addrs[0].rsplit("/p2p/", 1)[0]
        port = head.rsplit("/", 1)[1]
        with pytest.raises(Unreachable) as wrong:
            cli.open_channel(f"{head}/p2p/{other.peer_id_str}")
        msg = str(wrong.value)
        assert f"127.0.0.1:{port}" in msg and other.peer_id_str in msg and "\n" not in msg
        assert f"is {srv.peer_id}, not {other.peer_id_str}" in msg
        with socket.socket() as s:  # a port with nothing behind it
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        with pytest.raises(Unreachable, match=f"nothing is listening at 127.0.0.1:{free}"):
            cli.open_channel(f"/ip4/127.0.0.1/tcp/{free}/p2p/{other.peer_id_str}")
    finally:
        cli.close()
        srv.close()
    err = capfd.readouterr().err
    assert "Failed to open TCP stream" not in err and "failed to upgrade security" not in err, err
