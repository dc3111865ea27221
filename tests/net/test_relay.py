"""The relay itself, on loopback (docs/nat.md): circuits release their slots when they end,
reservations follow relay.allow_peers and the authenticated peer id, and its settings are
checked. (tests/net/test_nat.py runs the whole path across NATs in network namespaces.)"""

from __future__ import annotations

import threading

import pytest

from edgelink.errors import ConfigError, TransportError
from edgelink.net.relay import Relay, relay_limits
from edgelink.transport.identity import load_identity
from edgelink.transport.p2p import P2PHost

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def _wait_for(pred, what, timeout: float = 30.0) -> None:
    """Until ``pred()`` (the relay's events arrive from its own thread)."""
    idle = threading.Event()
    for _ in range(int(timeout / 0.02)):
        if pred():
            return
        idle.wait(0.02)
    raise AssertionError(f"not within {timeout} s: {what}")


def _echo(ch) -> None:
    while True:
        try:
            data = ch.recv(1 << 20, timeout=30)
        except Exception:  # noqa: BLE001 - the client closed
            return
        ch.send(bytes(data))


def _open_through(client: P2PHost, circuit: str, relay: Relay, node: P2PHost):
    """A channel through ``circuit``. A circuit reset at the relay can take the node's own
    connection to the relay down with it (py-libp2p 0.8.1; about one run in six here): the relay
    then answers NO_RESERVATION (204) until the node has reserved again, which it does within
    p2p.reserve_retry_s. That case waits for the node and tries once more."""
    try:
        return client.open_channel(circuit)
    except TransportError as exc:
        if "status 204" not in str(exc):
            raise
    _wait_for(lambda: node.peer_id in relay.host.connected_peers(), "the node back on the relay")
    return client.open_channel(circuit)


@pytest.fixture
def relayed(cfg, tmp_path):
    """A relay allowing two circuits per node, and a node that reserved on it."""
    c = cfg.replace(relay_max_circuits=2, p2p_hole_punch="off")
    events: list[dict] = []
    relay = Relay(c, load_identity(tmp_path / "relay.key"), [LOOPBACK], events.append)
    node = P2PHost(c, load_identity(tmp_path / "node.key"), listen=[LOOPBACK], on_channel=_echo)
    try:
        circuit = node.reserve(relay.addrs[0])
        yield c, relay, node, circuit, events
    finally:
        node.close()
        relay.close()


@pytest.mark.slow
def test_circuits_release_their_slots_and_carry_bytes_both_ways(relayed, tmp_path):
    """Two circuits at once (the most relay.max_circuits allows), both closed, then two more:
    py-libp2p 0.8.1's own pump kept a dead circuit's slot, so the third was refused."""
    c, relay, node, circuit, events = relayed
    assert circuit == f"{relay.addrs[0]}/p2p-circuit/p2p/{node.peer_id}"
    for rnd in range(2):
        clients = [P2PHost(c, load_identity(tmp_path / f"client-{rnd}-{i}.key")) for i in range(2)]
        try:
            chans = [_open_through(h, circuit, relay, node) for h in clients]
            assert all(ch.path == "relayed" for ch in chans)
            for i, ch in enumerate(chans):  # a MiB each way, through the relay
                payload = bytes([i + 1]) * (1 << 20)
                ch.send(payload)
                got = b""
                while len(got) < len(payload):
                    got += bytes(ch.recv(1 << 21, timeout=30))
                assert got == payload
            for ch in chans:
                ch.close()
        finally:
            for h in clients:
                h.close()
        _wait_for(lambda n=2 * (rnd + 1): sum(e["event"] == "circuit" for e in events) == n, events)
    circuits = [e for e in events if e["event"] == "circuit"]
    assert all(e["bytes"] > 2 << 20 and node.peer_id in e["peers"] for e in circuits), circuits
    assert relay.totals["circuits"] == 4 and relay.totals["reservations"] >= 1  # more: see _open_through


def test_a_relay_reserves_only_for_the_peers_it_allows(cfg, tmp_path):
    other = load_identity(tmp_path / "other.key").peer_id_str
    c = cfg.replace(relay_allow_peers=other)
    events: list[dict] = []
    with Relay(c, load_identity(tmp_path / "relay.key"), [LOOPBACK], events.append) as relay:
        node = P2PHost(c, load_identity(tmp_path / "node.key"), listen=[LOOPBACK])
        try:
            with pytest.raises(TransportError, match="refused a reservation.*relay.allow_peers"):
                node.reserve(relay.addrs[0])
        finally:
            node.close()
    assert events == [{"event": "reservation", "peer": node.peer_id, "ok": False,
                       "reason": "not on relay.allow_peers"}]


@pytest.mark.parametrize("key,value", [("relay_max_circuits", 0), ("relay_circuit_bytes", -1),
                                       ("relay_reservation_ttl_s", 0), ("relay_reservation_ttl_s", 30)])
def test_relay_settings_are_checked(cfg, key, value):
    with pytest.raises(ConfigError, match="relay."):
        relay_limits(cfg.replace(**{key: value}))


@pytest.mark.slow
def test_a_node_refreshes_its_reservation_before_it_expires_and_stays_reachable(cfg, tmp_path):
    """The shortest lifetime a relay accepts (60 s): the node's second reservation arrives before
    the first ends (py-libp2p refreshes 30 s ahead), and a circuit opened after it still works."""
    c = cfg.replace(relay_reservation_ttl_s=60, p2p_hole_punch="off")
    events: list[dict] = []
    with Relay(c, load_identity(tmp_path / "relay.key"), [LOOPBACK], events.append) as relay:
        node = P2PHost(c, load_identity(tmp_path / "node.key"), listen=[LOOPBACK], on_channel=_echo)
        client = P2PHost(c, load_identity(tmp_path / "client.key"))
        try:
            circuit = node.reserve(relay.addrs[0])
            _wait_for(lambda: sum(e["event"] == "reservation" and e["ok"] for e in events) == 2,
                      "a refreshed reservation", timeout=45)
            ch = client.open_channel(circuit)
            ch.send(b"still here")
            assert bytes(ch.recv(64, timeout=30)) == b"still here" and ch.path == "relayed"
            ch.close()
        finally:
            client.close()
            node.close()
    assert all(e["peer"] == node.peer_id for e in events if e["event"] == "reservation")
