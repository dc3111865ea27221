"""A handoff to a node on another network host: a network namespace behind a veth link
(1,500-byte MTU, its own address), not loopback."""

from __future__ import annotations

import pytest

from edgelink import api
from edgelink.bench.netns import remote_host
from edgelink.roles.launcher import start_node, stop_receiver


@pytest.fixture(scope="module")
def remote():
    with remote_host() as host:
        yield host


def test_handoff_to_a_node_on_another_host_continues_exactly(remote, smollm2_path, cfg, tmp_path):
    # Beyond loopback a node needs a token (or an allowlist, or --open) to start at all.
    (tmp_path / "tokens").write_text("# the node's clients\nnetns-token\n")
    node = start_node(str(smollm2_path), cfg, listen=f"/ip4/{remote.ip}/tcp/0",
                      extra_env={"EDGELINK_P2P_IDENTITY_KEY": str(tmp_path / "remote.key"),
                                 "EDGELINK_RUNTIME_N_THREADS": "1"},
                      node_args=("--token-file", str(tmp_path / "tokens")),
                      wrapper=remote.wrapper)
    try:
        (addr,) = node.ready["addrs"]
        assert addr.startswith(f"/ip4/{remote.ip}/tcp/")
        prompt = "The old lighthouse keeper climbed the stairs every evening, and"
        for _ in range(2):  # the second handoff reuses the connection
            g = api.handoff(str(smollm2_path), prompt, addr, 8, cfg, verify=True, token="netns-token")
            assert g.verified.matches is True and g.text
        assert g.bytes["payload"] > 100_000  # the KV state itself crossed the link
        event = node.next_event()
        assert event["applied"] >= 1 and not event["rejected"]
    finally:
        assert stop_receiver(node) == 0


@pytest.mark.slow
def test_transport_bench_across_the_veth_link(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "EDGELINK_P2P_IDENTITY_KEY": str(tmp_path / "id.key")}
    out = subprocess.run([sys.executable, "-m", "edgelink", "bench", "transport", "--veth", "--sizes", "1",
                          "--repeats", "1", "--json"], capture_output=True, text=True, env=env,
                         timeout=180, check=True)
    report = json.loads(out.stdout)
    assert report["link"].startswith("to 10.")
    assert report["rows"][0]["libp2p_nacl_mbps"] > 0


def test_link_bench_measures_every_option_across_a_shaped_link(cfg):
    """`edgelink bench link` end to end on a tiny run: a 20 Mbit/s tc-shaped veth link, every
    option once; exact options continue exactly, and a slow link makes the plan split."""
    from edgelink.bench.link import LOSSLESS, OPTIONS, run_link_bench

    report = run_link_bench(["smollm2-135m"], cfg, tokens=448, rates=[20.0], repeats=1)
    rows = {r["option"]: r for r in report["rows"]}
    assert set(rows) == set(OPTIONS)
    for name in LOSSLESS:
        assert rows[name]["same_continuation"], rows[name]
    assert 14 < rows["auto"]["link_mbit"] < 30  # the probe saw the shaped rate
    assert rows["split + zstd-shuffle/1"]["split"] >= 64 and not rows["split + zstd-shuffle/1"]["fallback"]
    assert rows["zstd-shuffle/1"]["wire_mb"] < rows["raw"]["wire_mb"]
    assert len(report["summary"]) == 2
