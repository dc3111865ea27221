"""edgelink's relay client against a foreign relay: a js-libp2p circuit relay v2 server
(tests/interop/js_dht/node.mjs with JS_RELAY=1) on loopback. A py-libp2p node reserves a slot
there, and a client reaches it through the js relay's circuit with edgelink's end-to-end
session on top: what edgelink's own relay does, done by another implementation. The dial-back
reachability check is edgelink's own protocol, so against the js relay it cannot tell (and a
node then reserves, as docs/nat.md says)."""

from __future__ import annotations

import os

import pytest

from edgelink.errors import TransportError
from edgelink.transport.identity import load_identity
from edgelink.transport.p2p import P2PHost
from tests.interop.js_dht import JsDhtNode, install
from tests.net.test_relay import LOOPBACK, _echo


@pytest.mark.slow
def test_a_node_reserves_on_a_js_libp2p_relay_and_a_client_reaches_it_through_the_circuit(cfg, tmp_path):
    c = cfg.replace(p2p_hole_punch="off")
    with JsDhtNode(install(), relay=True) as js:
        relay_addr = next(a for a in js.addrs if "/tcp/" in a and "/ws" not in a)
        relay_addr = relay_addr if "/p2p/" in relay_addr else f"{relay_addr}/p2p/{js.peer_id}"
        node = P2PHost(c, load_identity(tmp_path / "node.key"), listen=[LOOPBACK], on_channel=_echo)
        client = P2PHost(c, load_identity(tmp_path / "client.key"))
        try:
            with pytest.raises(TransportError, match="could not check"):  # not edgelink's relay
                node.check_reachability(relay_addr, 5)
            circuit = node.reserve(relay_addr)
            assert circuit == f"{relay_addr}/p2p-circuit/p2p/{node.peer_id}"
            ch = client.open_channel(circuit)
            try:
                assert ch.path == "relayed"
                for size in (1, 1000, 300_000):  # past one yamux window, through the js pump
                    payload = os.urandom(size)
                    ch.send(payload)
                    got = b""
                    while len(got) < size:
                        got += bytes(ch.recv(1 << 20, timeout=30))
                    assert got == payload
            finally:
                ch.close()
        finally:
            client.close()
            node.close()
