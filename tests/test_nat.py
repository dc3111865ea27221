"""Peers behind NAT (docs/nat.md): two home networks, each behind a router namespace that
masquerades with nftables and drops what arrives unasked, and a relay on the public segment
between them (tools/netns.nat_world). A node on one LAN reserves a slot on the relay; a client
on the other reaches it only through the relay, and the handoff is exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgelink.roles.launcher import start_node, start_relay, stop_receiver
from tools.netns import nat_world

PROMPT = "The old lighthouse keeper climbed the stairs every evening, and"
TOKEN = "nat-token"


@pytest.fixture(scope="module")
def world():
    try:
        with nat_world() as w:
            yield w
    except RuntimeError as exc:
        if "nft" in str(exc):
            pytest.skip(f"no NAT here: {exc}")
        raise


def _cli(host, cfg, env, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """`edgelink ARGS` run on ``host`` (its network namespace), with this test's settings."""
    from edgelink.config import to_env

    return subprocess.run([*host.wrapper, sys.executable, "-m", "edgelink", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **to_env(cfg), **env})


@pytest.fixture(scope="module")
def behind_nat(world, smollm2_path, cfg, tmp_path_factory):
    """A relay on the public segment, and a node on the first home LAN reserved on it."""
    tmp = tmp_path_factory.mktemp("nat")
    (tmp / "tokens").write_text(TOKEN + "\n")
    relay = start_relay(cfg, f"/ip4/{world.public.ip}/tcp/0", wrapper=world.public.wrapper,
                        extra_env={"EDGELINK_P2P_IDENTITY_KEY": str(tmp / "relay.key")})
    node = None
    try:
        (relay_addr,) = relay.ready["addrs"]
        node = start_node(str(smollm2_path), cfg, listen=f"/ip4/{world.home[0].ip}/tcp/0",
                          extra_env={"EDGELINK_P2P_IDENTITY_KEY": str(tmp / "node.key"),
                                     "EDGELINK_RUNTIME_N_THREADS": "1"},
                          node_args=("--token-file", str(tmp / "tokens"), "--via", relay_addr),
                          wrapper=world.home[0].wrapper)
        yield relay, node, relay_addr, tmp
    finally:
        if node is not None:
            assert stop_receiver(node) == 0, node.stderr_tail()
        assert stop_receiver(relay) == 0, relay.stderr_tail()


def test_a_node_behind_nat_is_reached_through_the_relay_and_only_that_way(behind_nat, world, cfg, smollm2_path):
    relay, node, relay_addr, tmp = behind_nat
    direct, circuit = node.ready["addrs"]
    assert circuit == f"{relay_addr}/p2p-circuit/p2p/{node.ready['peer_id']}"
    ev = relay.next_event(timeout=30)
    assert ev == {"event": "reservation", "peer": node.ready["peer_id"], "ok": True}
    env = {"EDGELINK_P2P_IDENTITY_KEY": str(tmp / "client.key"), "EDGELINK_P2P_CONNECT_TIMEOUT_S": "3"}
    # the node's own address is private: from the other LAN nothing leads there
    out = _cli(world.home[1], cfg, env, "handoff", str(smollm2_path), "--to", direct, "-p", PROMPT, "-n", "8",
               "--token", TOKEN)
    assert out.returncode == 7, out.stderr  # a transport error
    # through the relay: exact, and the report says which path carried it
    out = _cli(world.home[1], cfg, env, "handoff", str(smollm2_path), "--to", circuit, "-p", PROMPT, "-n", "16",
               "--verify", "--token", TOKEN, "--json")
    assert out.returncode == 0, out.stderr
    g = json.loads(out.stdout)
    assert g["extra"]["matches_local"] is True and g["extra"]["wire"]["path"] == "relayed"
    session = node.next_event(timeout=30)
    assert session["applied"] == 1 and session["generated"] == 16, session
    circuit_ev = relay.next_event(timeout=30)
    assert circuit_ev["event"] == "circuit" and circuit_ev["bytes"] > g["bytes"]["wire"], circuit_ev
    assert node.ready["peer_id"] in circuit_ev["peers"]
