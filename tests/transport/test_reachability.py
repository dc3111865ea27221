"""The dial-back reachability check (edgelink/transport/reachability.py) on loopback: a relay
reaches a listening node's port on a fresh connection and not a closed one, refuses a second
check too soon and peers off relay.allow_peers, and both sides' parsers take only what they
should. Also held: why it exists, py-libp2p 0.8.1's AutoNAT answering OK for a closed port,
because its dial-back reuses the asker's own connection. (tests/net/test_nat.py runs the check
across NATs in network namespaces.)"""

from __future__ import annotations

import socket

import pytest

from edgelink.errors import ConfigError, EdgelinkError, ProtocolError, TransportError
from edgelink.net.relay import Relay
from edgelink.transport import reachability
from edgelink.transport.identity import load_identity
from edgelink.transport.p2p import P2PHost

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_requests_and_answers_are_parsed_strictly():
    assert reachability.parse_request(reachability.encode_request([4001, 80, 4001])) == [80, 4001]
    for bad in (b"", b"4001", b"0\n", b"70000\n", b"1,2,3,4,5\n", b"a,b\n", b"\xff\n", b"1" * 80 + b"\n", b"-1\n"):
        with pytest.raises(ProtocolError):
            reachability.parse_request(bad)
    ok = reachability.parse_answer(reachability.encode_answer("203.0.113.7", [4001]), [4001], "relay")
    assert ok.public and ok.observed_ip == "203.0.113.7" and ok.addrs("Qm") == ["/ip4/203.0.113.7/tcp/4001/p2p/Qm"]
    for bad in (b'{"observed": "x", "reachable": []}\n', b'{"observed": "10.0.0.1", "reachable": [22]}\n',
                b'{"observed": "10.0.0.1", "reachable": "4001"}\n', b"[]\n", b"not json\n",
                b'{"observed": "10.0.0.1", "reachable": [4001]}', b" " * 600 + b"\n"):
        with pytest.raises(ProtocolError):
            reachability.parse_answer(bad, [4001], "relay")


def test_a_relay_dials_back_on_a_fresh_connection_within_its_bounds(cfg, tmp_path):
    relay = Relay(cfg, load_identity(tmp_path / "relay.key"), [LOOPBACK])
    node = P2PHost(cfg, load_identity(tmp_path / "node.key"), listen=[LOOPBACK])
    other = P2PHost(cfg, load_identity(tmp_path / "other.key"), listen=[LOOPBACK])
    try:
        got = node.check_reachability(relay.addrs[0], 5)
        port = int(node.addrs[0].split("/")[4])
        assert got.public and got.reachable_ports == (port,) and got.observed_ip == "127.0.0.1"
        assert "reachable from outside" in got.describe()
        # asked again at once: refused (one check per peer every 10 s), a typed error
        with pytest.raises(TransportError, match="refused"):
            node.check_reachability(relay.addrs[0], 5)
        # a port where nothing listens is not reachable, though the asker's connection is open
        from libp2p.peer.peerinfo import info_from_p2p_addr
        from multiaddr import Multiaddr

        closed = _closed_port()
        info = info_from_p2p_addr(Multiaddr(relay.addrs[0]))

        async def ask_closed():
            return await reachability.ask(other.libp2p_host, info, [closed], 5, "relay")

        got = other.call(ask_closed)
        assert not got.public and got.reachable_ports == () and "not reachable" in got.describe()
        assert relay.dialback.answered == 2
    finally:
        for h in (node, other, relay):
            h.close()


def test_a_relay_checks_only_peers_that_may_reserve_and_not_when_told_not_to(cfg, tmp_path):
    node = P2PHost(cfg, load_identity(tmp_path / "node.key"), listen=[LOOPBACK])
    try:
        relay = Relay(cfg.replace(relay_allow_peers="12D3KooWSomeoneElse"), load_identity(tmp_path / "r1.key"),
                      [LOOPBACK])
        try:
            with pytest.raises(TransportError, match="refused"):
                node.check_reachability(relay.addrs[0], 5)
        finally:
            relay.close()
        with pytest.raises(ConfigError, match="negative"):
            Relay(cfg.replace(relay_dialback_timeout_s=-1), load_identity(tmp_path / "r3.key"), [LOOPBACK])
        relay = Relay(cfg.replace(relay_dialback_timeout_s=0), load_identity(tmp_path / "r2.key"), [LOOPBACK])
        try:
            assert relay.dialback is None
            with pytest.raises(EdgelinkError, match="could not check"):  # the protocol is not offered
                node.check_reachability(relay.addrs[0], 5)
        finally:
            relay.close()
    finally:
        node.close()


def test_the_pinned_autonat_calls_a_closed_port_reachable(cfg, tmp_path):
    """Why edgelink has its own check: py-libp2p 0.8.1's AutoNAT server dials back with
    ``host.connect``, which returns at once on the asker's open connection, so it answers OK
    for a port nothing listens on. If this starts failing, the pinned AutoNAT was fixed."""
    from libp2p.host.autonat.autonat import AutoNATService
    from libp2p.host.autonat.pb.autonat_pb2 import Message
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from multiaddr import Multiaddr

    server = P2PHost(cfg, load_identity(tmp_path / "server.key"), listen=[LOOPBACK])
    asker = P2PHost(cfg, load_identity(tmp_path / "asker.key"), listen=[LOOPBACK])
    try:
        async def serve():
            AutoNATService(server.libp2p_host, serve=True)

        server.call(serve)
        info = info_from_p2p_addr(Multiaddr(server.addrs[0]))
        closed = Multiaddr(f"/ip4/127.0.0.1/tcp/{_closed_port()}")

        async def query():
            await asker.libp2p_host.connect(info)
            return await AutoNATService(asker.libp2p_host, serve=False).query_server(info.peer_id, [closed.to_bytes()])

        status, _ = asker.call(query)
        assert status == Message.OK
    finally:
        asker.close()
        server.close()
