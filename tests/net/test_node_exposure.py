"""Safe defaults and secrets kept off the command line (issue 25, parts 2 and 5).

A node that would listen beyond loopback with neither allowlist nor token refuses to start
(before it loads a model or binds a port) unless asked with --open; tokens can come from a
file; a DHT lookup dials only addresses in the scope of the network it joined, keeps a bounded
part of any answer, and hands the bearer token only to a holder named in cache.trust.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from edgelink.errors import ConfigError
from edgelink.net.dht import SCOPES, addr_scope, dial_scope, dialable
from edgelink.net.node import beyond_loopback, check_exposure, node_tokens

PID = "12D3KooWDk6yjt3XiP4nntm3cmkJvmExGenGZJj34eUXUnBTtMoj"


def test_which_listen_addresses_reach_beyond_this_machine():
    assert not beyond_loopback("/ip4/127.0.0.1/tcp/0")
    assert not beyond_loopback("/ip6/::1/tcp/4001")
    assert not beyond_loopback("/dns/localhost/tcp/4001")
    for addr in ("/ip4/0.0.0.0/tcp/0", "/ip6/::/tcp/0", "/ip4/192.168.1.5/tcp/4001",
                 "/dns4/node.example/tcp/1", "/unix/x", "garbage"):
        assert beyond_loopback(addr), addr


def test_an_exposed_node_needs_a_token_an_allowlist_or_open(cfg):
    check_exposure("/ip4/127.0.0.1/tcp/0", False, False, cfg)
    with pytest.raises(ConfigError, match="--open"):
        check_exposure("/ip4/0.0.0.0/tcp/4001", False, False, cfg)
    check_exposure("/ip4/0.0.0.0/tcp/4001", True, False, cfg)
    check_exposure("/ip4/0.0.0.0/tcp/4001", False, True, cfg)
    check_exposure("/ip4/0.0.0.0/tcp/4001", False, False, cfg.replace(node_open="on"))
    with pytest.raises(ConfigError, match="on or off"):
        check_exposure("/ip4/127.0.0.1/tcp/0", False, False, cfg.replace(node_open="yes"))


def test_the_cli_refuses_an_open_node_before_loading_anything(smollm2_path, tmp_path):
    env = {**os.environ, "EDGELINK_P2P_IDENTITY_KEY": str(tmp_path / "n.key")}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "edgelink", "node", str(smollm2_path), "--listen",
                        "/ip4/0.0.0.0/tcp/0"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0
    assert "--open" in r.stderr and "--token-file" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert time.monotonic() - t0 < 60


def test_tokens_come_from_a_file_and_a_bad_file_says_so(cfg, tmp_path):
    f = tmp_path / "tokens"
    f.write_text("# who may use this node\nalpha\n\n  beta  \n")
    os.chmod(f, 0o600)
    assert node_tokens(cfg.replace(node_tokens="inline", node_token_file=str(f))) == ("inline", "alpha", "beta")
    with pytest.raises(ConfigError, match="cannot read node.token_file"):
        node_tokens(cfg.replace(node_token_file=str(tmp_path / "missing")))
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ConfigError, match="holds no token"):
        node_tokens(cfg.replace(node_token_file=str(tmp_path / "empty")))


def test_a_client_token_from_a_file_or_the_environment(monkeypatch, tmp_path):
    import click

    from edgelink.cli.common import client_token

    (tmp_path / "t").write_text("# mine\nsecret-1\nsecret-2\n")
    assert client_token("given", str(tmp_path / "t")) == "given"
    assert client_token(None, str(tmp_path / "t")) == "secret-1"
    monkeypatch.setenv("EDGELINK_TOKEN", "from-env")
    assert client_token(None, None) == "from-env"
    with pytest.raises(click.BadParameter, match="cannot read"):
        client_token(None, str(tmp_path / "nope"))


def test_dht_addresses_are_dialled_only_within_the_joined_scope(cfg):
    assert addr_scope("/ip4/127.0.0.1/tcp/1") == SCOPES["loopback"]
    assert addr_scope("/ip4/10.1.2.3/tcp/1") == SCOPES["private"]
    assert addr_scope("/ip4/100.64.0.9/tcp/1") == SCOPES["private"]
    assert addr_scope("/ip4/8.8.8.8/tcp/1") == SCOPES["public"]
    for never in ("/ip4/169.254.1.1/tcp/1", "/ip4/224.0.0.1/tcp/1", "/ip4/0.0.0.0/tcp/1",
                  "/ip6/fe80::1/tcp/1", "/dns4/x/tcp/1"):
        assert addr_scope(never) is None, never
    public = cfg.replace(cache_bootstrap=f"/ip4/8.8.8.8/tcp/4001/p2p/{PID}")
    assert dial_scope(public) == SCOPES["public"]
    assert dial_scope(cfg.replace(cache_bootstrap=f"/ip4/10.0.0.1/tcp/4001/p2p/{PID}")) == SCOPES["private"]
    assert dial_scope(cfg.replace(cache_bootstrap=""), ["/ip4/127.0.0.1/tcp/5/p2p/x"]) == SCOPES["loopback"]
    assert dial_scope(public.replace(cache_dht_dial="loopback")) == SCOPES["loopback"]
    with pytest.raises(ConfigError, match="cache.dht_dial"):
        dial_scope(cfg.replace(cache_dht_dial="everywhere"))
    # a DHT joined through a public address never makes this machine dial itself or its LAN
    s = dial_scope(public)
    assert dialable("/ip4/127.0.0.1/tcp/22", PID, s) is None
    assert dialable("/ip4/192.168.0.10/tcp/4001", PID, s) is None
    assert dialable("/ip4/8.8.4.4/tcp/4001", PID, s) == f"/ip4/8.8.4.4/tcp/4001/p2p/{PID}"


def test_a_huge_provider_answer_costs_a_bounded_part_of_it(cfg, tmp_path):
    """A provider record with 50,000 addresses, and 1,000 providers: what is kept is bounded
    and the work is linear in it (it was quadratic: minutes for a 4 MiB answer)."""
    import multiaddr
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import PeerInfo

    from edgelink.net.dht import CacheDht
    from edgelink.transport.identity import load_identity
    from edgelink.transport.p2p import P2PHost

    host = P2PHost(cfg, load_identity(tmp_path / "h.key"), listen=["/ip4/127.0.0.1/tcp/0"],
                   on_channel=lambda ch: None)
    try:
        dht = CacheDht(host, cfg, server=False)
        one = ID.from_base58(PID)
        many = [multiaddr.Multiaddr(f"/ip4/127.0.{i // 250}.{i % 250 + 1}/tcp/{1000 + i % 60000}")
                for i in range(50_000)]
        answer = [PeerInfo(one, many)]
        others = [load_identity(tmp_path / f"p{i}.key").peer_id_str for i in range(30)]
        answer += [PeerInfo(ID.from_base58(p), [multiaddr.Multiaddr("/ip4/127.0.0.9/tcp/9")]) for p in others]
        real_call = host.call
        host.call = lambda fn: answer if fn.__name__ == "find" else real_call(fn)
        try:
            t0 = time.perf_counter()
            found = dht.providers("ab" * 32)
            took = time.perf_counter() - t0
        finally:
            host.call = real_call
        assert took < 1.0, took
        assert len(found) == cfg.cache.dht_max_providers
        assert all(len(p.addrs) <= cfg.cache.dht_max_addrs for p in found)
        assert len(next(p for p in found if p.peer_id == PID).addrs) == cfg.cache.dht_max_addrs
    finally:
        host.close()


def test_the_token_goes_only_to_a_dht_holder_named_in_trust(smollm2_path, cfg):
    import edgelink

    other = "12D3KooWK64mfjx1hT1fGvHRvWD9svCFdtskQCv3wCzoTv9Uh7xU"
    addr = f"/ip4/127.0.0.1/tcp/4001/p2p/{PID}"
    with edgelink.load(str(smollm2_path), cfg.replace(cache_trust="*")) as m:
        assert m._token_for(addr, "dht", "tok") is None  # anyone's chunks, never the token
        assert m._token_for(addr, addr, "tok") == "tok"  # a peer the user named
    with edgelink.load(str(smollm2_path), cfg.replace(cache_trust=f"{other},{PID}")) as m:
        assert m._token_for(addr, "dht", "tok") == "tok"
