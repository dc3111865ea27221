"""mDNS discovery with real processes, inside a private network namespace.

The sandbox and CI have no multicast on their own network, so each test runs its scenario
in a new network namespace (``unshare -n``) whose loopback carries multicast: two real node
processes, one announcing itself and one not, and the discovering client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

NETNS = "ip link set lo up && ip link set lo multicast on && ip route add 224.0.0.0/4 dev lo && exec \"$@\""

SCENARIO = textwrap.dedent("""
    import json, sys, time
    from edgelink import api
    from edgelink.config import load_config
    from edgelink.errors import PeerGone
    from edgelink.roles.launcher import start_node, stop_receiver

    model, tmp = sys.argv[1], sys.argv[2]
    cfg = load_config()
    loud = start_node(model, cfg, extra_env={"EDGELINK_P2P_IDENTITY_KEY": tmp + "/loud.key"},
                      node_args=("--mdns",))
    quiet = start_node(model, cfg, extra_env={"EDGELINK_P2P_IDENTITY_KEY": tmp + "/quiet.key"})
    out = {"loud": loud.ready["peer_id"], "quiet": quiet.ready["peer_id"],
           "loud_addrs": loud.ready["addrs"]}
    try:
        t0 = time.monotonic()
        found = api.discover(cfg, 20, peer_id=out["loud"])
        out["found_loud"] = [p.__dict__ for p in found]
        out["found_loud_s"] = time.monotonic() - t0
        out["heard_in_2s"] = [p.peer_id for p in api.discover(cfg, 2)]
        g = api.handoff(model, "The lighthouse keeper lit the lamp and", "/p2p/" + out["loud"], 6, cfg,
                        verify=True)
        out["handoff"] = {"text": g.text, "matches_local": g.verified.matches}
        try:
            api.handoff(model, "Hello", "/p2p/" + out["quiet"], 2,
                        cfg.replace(p2p_discover_timeout_s=1.5))
            out["quiet_error"] = None
        except PeerGone as exc:
            out["quiet_error"] = str(exc)
    finally:
        stop_receiver(loud)
        stop_receiver(quiet)
    print(json.dumps(out))
""")


def _in_netns(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    cmd = ["unshare", "-n", "--", "sh", "-c", NETNS, "sh", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def netns_ok():
    r = _in_netns(["true"], dict(os.environ), 30)
    assert r.returncode == 0, (
        "these tests need `unshare -n` (root or CAP_SYS_ADMIN) to make a network namespace "
        f"with multicast on loopback: {r.stderr.strip()}")


def test_node_with_mdns_is_discovered_and_served_by_peer_id(netns_ok, smollm2_path, tmp_path):
    env = {**os.environ, "EDGELINK_RUNTIME_N_THREADS": "1"}
    r = _in_netns([sys.executable, "-c", SCENARIO, str(smollm2_path), str(tmp_path)], env, 300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    (peer,) = out["found_loud"]
    assert peer["peer_id"] == out["loud"]
    assert set(peer["addrs"]) & set(out["loud_addrs"])  # it announces where it listens
    assert out["loud"] in out["heard_in_2s"]
    assert out["quiet"] not in out["heard_in_2s"]  # mDNS is off unless asked for
    assert out["handoff"]["matches_local"] is True and out["handoff"]["text"]
    assert out["quiet_error"] and "answered mDNS" in out["quiet_error"]


@pytest.mark.slow
def test_discover_cli_json_and_exit_status(netns_ok, tmp_path):
    env = {**os.environ, "EDGELINK_P2P_IDENTITY_KEY": str(tmp_path / "id.key")}
    r = _in_netns([sys.executable, "-m", "edgelink", "discover", "--timeout", "0.5", "--json"], env, 60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"timeout_s": 0.5, "peers": []}
    r = _in_netns([sys.executable, "-m", "edgelink", "discover", "--timeout", "0.5",
                   "--peer", "12D3KooWHYBmjf3tLeYuFqiFU7cJM2235oGA5QYqFRG1ha7F1c7d"], env, 60)
    assert r.returncode == 1 and "0 peer(s) heard" in r.stdout


@pytest.mark.parametrize("text,scheme,address", [
    ("shm:demo", "shm", "demo"),
    ("/ip4/10.0.0.2/tcp/4001/p2p/12D3KooWabc", "p2p", "/ip4/10.0.0.2/tcp/4001/p2p/12D3KooWabc"),
    ("/p2p/12D3KooWabc", "mdns", "12D3KooWabc"),
])
def test_endpoint_forms(text, scheme, address):
    from edgelink.net.endpoint import parse_endpoint

    ep = parse_endpoint(text)
    assert (ep.scheme, ep.address, str(ep)) == (scheme, address, text)


@pytest.mark.parametrize("text", ["/p2p/", "/ip4/1.2.3.4/tcp/1", "/p2p/a/b", "tcp:1.2.3.4", "demo"])
def test_endpoint_errors_say_what_is_wrong(text):
    from edgelink.errors import ConfigError
    from edgelink.net.endpoint import parse_endpoint

    with pytest.raises(ConfigError, match="endpoint"):
        parse_endpoint(text)
