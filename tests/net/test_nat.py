"""Peers behind NAT (docs/nat.md): two home networks, each behind a router namespace that
masquerades with nftables and silently drops what arrives unasked, and a relay on the public
segment between them (edgelink/bench/netns.nat_world). A node on one LAN reserves a slot on the relay;
a client on the other reaches it only through the relay, exactly; DCUtR then takes the state
direct where the NATs keep ports, and the relayed path carries it where they do not; a relay
that dies mid-transfer costs a typed error, nothing applied, and the node reserves again."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from edgelink.bench.netns import ensure_nft, nat_world, shape_iface, tx_bytes
from edgelink.roles.launcher import start_node, start_relay, stop_receiver

PROMPT = "The old lighthouse keeper climbed the stairs every evening, and"
TOKEN = "nat-token"


@contextlib.contextmanager
def _world(random_ports: bool):
    if ensure_nft() is None:  # pragma: no cover - a machine without nftables or a mirror
        pytest.skip("nft (Debian's nftables) is missing and apt-get could not install it")
    with nat_world(random_ports=random_ports) as w:
        yield w


def _cli(host, cfg, env, *args: str, wait: bool = True, timeout: float = 240):
    """`edgelink ARGS` on ``host`` (its network namespace), with this test's settings."""
    from edgelink.config import to_env

    cmd = [*host.wrapper, sys.executable, "-m", "edgelink", *args]
    full = {**os.environ, **to_env(cfg), **env}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full)


class Setup:
    """A relay on the public segment and a node on the first home LAN reserved on it."""

    def __init__(self, world, model, cfg, tmp):
        self.world, self.model, self.cfg, self.tmp = world, model, cfg, tmp
        (tmp / "tokens").write_text(TOKEN + "\n")
        self.relay = self.start_relay("0")
        self.relay_addr = self.relay.ready["addrs"][0]
        self.node = start_node(str(model), cfg, listen=f"/ip4/{world.home[0].ip}/tcp/0",
                               extra_env={"EDGELINK_P2P_IDENTITY_KEY": str(tmp / "node.key"),
                                          "EDGELINK_RUNTIME_N_THREADS": "1", "EDGELINK_P2P_RESERVE_RETRY_S": "0.5"},
                               node_args=("--token-file", str(tmp / "tokens"), "--via", self.relay_addr),
                               wrapper=world.home[0].wrapper)
        self.direct, self.circuit = self.node.ready["addrs"]
        assert self.relay.next_event(timeout=30) == {"event": "reservation", "peer": self.node.ready["peer_id"],
                                                     "ok": True}

    def start_relay(self, port: str):
        return start_relay(self.cfg, f"/ip4/{self.world.public.ip}/tcp/{port}", wrapper=self.world.public.wrapper,
                           extra_env={"EDGELINK_P2P_IDENTITY_KEY": str(self.tmp / "relay.key")})

    def client(self, *args: str, punch: bool = True, wait: bool = True):
        env = {"EDGELINK_P2P_IDENTITY_KEY": str(self.tmp / "client.key"), "EDGELINK_P2P_CONNECT_TIMEOUT_S": "5",
               "EDGELINK_P2P_HOLE_PUNCH": "on" if punch else "off"}
        return _cli(self.world.home[1], self.cfg, env, *args, "--token", TOKEN, wait=wait)

    def handoff(self, n: int = 16, punch: bool = True) -> dict:
        out = self.client("handoff", str(self.model), "--to", self.circuit, "-p", PROMPT, "-n", str(n),
                          "--verify", "--json", punch=punch)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def close(self) -> None:
        assert stop_receiver(self.node) == 0, self.node.stderr_tail()
        assert stop_receiver(self.relay) == 0, self.relay.stderr_tail()


@pytest.fixture(scope="module")
def home(smollm2_path, cfg, tmp_path_factory):
    with _world(random_ports=False) as w:
        s = Setup(w, smollm2_path, cfg, tmp_path_factory.mktemp("nat"))
        yield s
        s.close()


def test_a_node_behind_nat_is_reached_through_the_relay_and_only_that_way(home):
    assert home.circuit == f"{home.relay_addr}/p2p-circuit/p2p/{home.node.ready['peer_id']}"
    # the node's own address is private: from the other LAN nothing leads there
    out = home.client("handoff", str(home.model), "--to", home.direct, "-p", PROMPT, "-n", "8")
    assert out.returncode == 7, out.stderr  # a transport error, in one line
    g = home.handoff(punch=False)
    assert g["verified"]["matches"] is True and g["wire"]["path"] == "relayed"
    session = home.node.next_event(timeout=30)
    assert session["applied"] == 1 and session["generated"] == 16, session
    circuit = home.relay.next_event(timeout=30)  # the client exited: its circuit ended
    assert circuit["event"] == "circuit" and home.node.ready["peer_id"] in circuit["peers"]
    assert circuit["bytes"] > g["bytes"]["wire"], circuit  # the state itself went through the relay


def test_a_node_learns_it_is_behind_nat_and_one_on_the_public_segment_that_it_is_not(home):
    """p2p.reachability = auto: the relay dials each node's port back on a fresh connection. The
    node behind NAT is told no (the relay saw its router's address), so it reserved; a node on
    the public segment with the same --via is told yes, reserves nothing, and is dialled direct."""
    r = home.node.ready["reachability"]
    assert r["public"] is False and r["observed_ip"] == home.world.routers[0].ip, r
    assert home.node.ready["circuit_addrs"] == [home.circuit]
    (home.tmp / "pub-tokens").write_text(TOKEN + "\n")
    pub = start_node(str(home.model), home.cfg, listen=f"/ip4/{home.world.public.ip}/tcp/0",
                     extra_env={"EDGELINK_P2P_IDENTITY_KEY": str(home.tmp / "pub.key"),
                                "EDGELINK_RUNTIME_N_THREADS": "1"},
                     node_args=("--token-file", str(home.tmp / "pub-tokens"), "--via", home.relay_addr),
                     wrapper=home.world.public.wrapper)
    try:
        r = pub.ready["reachability"]
        assert r["public"] is True and r["observed_ip"] == home.world.public.ip, r
        assert "circuit_addrs" not in pub.ready and len(pub.ready["addrs"]) == 1
        out = home.client("handoff", str(home.model), "--to", pub.ready["addrs"][0], "-p", PROMPT, "-n", "4",
                          "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["wire"]["path"] == "direct"
    finally:
        assert stop_receiver(pub) == 0, pub.stderr_tail()


def test_hole_punching_takes_the_state_direct_and_the_relay_carries_only_the_handshakes(home):
    g = home.handoff()
    assert g["verified"]["matches"] is True and g["wire"]["path"] == "direct"
    assert home.node.next_event(timeout=30)["applied"] == 1
    circuit = home.relay.next_event(timeout=60)
    assert circuit["event"] == "circuit"
    # libp2p's and DCUtR's handshakes only: the 450 KB state and the link probe went direct
    assert circuit["bytes"] < g["bytes"]["wire"] / 10, (circuit, g["bytes"])


def test_a_relay_that_dies_mid_transfer_costs_a_typed_error_and_the_node_reserves_again(home):
    port = home.relay_addr.split("/tcp/")[1].split("/")[0]
    shape_iface(home.world.public, "wan", 20)  # ~24 MB of raw KV state: ten seconds through the relay
    try:
        long_prompt = " ".join([PROMPT] * 80)  # about a thousand tokens
        base = tx_bytes(home.world.public, "wan")
        proc = home.client("handoff", str(home.model), "--to", home.circuit, "-p", long_prompt, "-n", "4",
                           "--wire", "raw", punch=False, wait=False)
        deadline = time.monotonic() + 120
        while tx_bytes(home.world.public, "wan") - base < 4_000_000:  # the state is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        home.relay.send_signal(signal.SIGKILL)
        home.relay.wait(10)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 7, err  # a transport error, not a crash or a hang
        session = home.node.next_event(timeout=60)
        assert session["applied"] == 0 and session["ended_by"] != "close", session  # nothing half-applied
    finally:
        subprocess.run([*home.world.public.wrapper, "tc", "qdisc", "del", "dev", "wan", "root"], capture_output=True)
    home.relay = home.start_relay(port)  # the same relay, back at the same address
    ev = home.relay.next_event(timeout=60)
    assert ev == {"event": "reservation", "peer": home.node.ready["peer_id"], "ok": True}
    g = home.handoff(punch=False)
    assert g["verified"]["matches"] is True


def test_a_prefix_cache_lookup_from_another_lan_finds_a_holder_behind_nat_and_fetches_through_its_circuit(
        home, tmp_path):
    """The cache DHT across NAT: a holder on the first LAN (`--dht --via` the relay) is a DHT client
    that announces its circuit address to a member on the public segment; an asker on the other
    LAN, knowing only that member, finds it with `--cache-from dht` (three lookups, a binary
    search: every one of them finds it), fetches the four chunks through the relay, and continues
    exactly. A second asker does the same: the member kept both clients out of its routing table.
    A third hands a state to `--to /p2p/<holder id>`, found through the holder's own record."""
    import edgelink
    from edgelink.bench import context_tokens
    from edgelink.cache.prefix import PrefixCache

    chunk = 64
    base = home.cfg.replace(cache_chunk_tokens=chunk, wire_prefill_tps=500.0)
    holder_dir = tmp_path / "holder-kv"
    with edgelink.load(str(home.model), base.replace(cache_dir=str(holder_dir))) as m:
        prompt = m.runtime.detokenize(context_tokens(m.runtime, 300))
        toks = m.tokenize(prompt, add_special=True)
        PrefixCache(base.replace(cache_dir=str(holder_dir))).prefill(m.runtime, m.signature, toks)
        cold = m.generate(8, stop_at_eog=False).tokens
    w = home.world
    procs = []
    try:
        member = start_node(str(home.model), base.replace(cache_dir=str(tmp_path / "member-kv")),
                            listen=f"/ip4/{w.public.ip}/tcp/0", wrapper=w.public.wrapper,
                            extra_env={"EDGELINK_P2P_IDENTITY_KEY": str(tmp_path / "member.key")},
                            node_args=("--dht", "--open"))
        procs.append(member)
        member_addr = member.ready["addrs"][0]
        holder = start_node(str(home.model), base.replace(cache_dir=str(holder_dir)),
                            listen=f"/ip4/{w.home[0].ip}/tcp/0", wrapper=w.home[0].wrapper,
                            extra_env={"EDGELINK_P2P_IDENTITY_KEY": str(tmp_path / "holder.key")},
                            node_args=("--dht", "--open", "--via", home.relay_addr, "--bootstrap", member_addr))
        procs.append(holder)
        circuit = holder.ready["addrs"][1]
        holder_id = holder.ready["peer_id"]
        while True:  # each event comes or the wait fails within next_event's own limit
            ev = holder.next_event()
            if ev.get("event") == "cache_announced" and ev["total"] == 5:  # the node itself, its 4 chunks
                break
        assert ev["pending"] == 0, ev
        for n in (1, 2):
            asker = base.replace(cache_dir=str(tmp_path / f"asker{n}-kv"), p2p_identity_key=tmp_path / f"a{n}.key")
            out = _cli(w.home[1], asker, {}, "generate", str(home.model), "-p", prompt, "-n", "8", "--cache-from",
                       "dht", "--bootstrap", member_addr, "--trust", holder_id, "--json")
            assert out.returncode == 0, out.stderr[-3000:]
            g = json.loads(out.stdout)
            fetch = g["fetch"]
            # its circuit first (its LAN address leads nowhere from here), and it served all four
            assert fetch["providers"] == [holder_id] and fetch["chunks"] == 4, fetch
            assert fetch["sources"] == [circuit] and not fetch["errors"], fetch
            # three lookups and the relayed fetch, within one lookup's limit: no lookup waited on
            # the holder (the DHT used to query it at its LAN address, which waits for nothing)
            assert fetch["seconds"] < base.cache.dht_timeout_s, fetch
            assert g["cache"]["hit_tokens"] == 4 * chunk and g["tokens"] == cold
        # a bare peer id: its own record (peer_key) names its circuit, and a handoff goes there
        out = _cli(w.home[1], base.replace(p2p_identity_key=tmp_path / "a3.key", cache_bootstrap=member_addr), {},
                   "handoff", str(home.model), "--to", f"/p2p/{holder_id}", "-p", PROMPT, "-n", "4", "--json")
        assert out.returncode == 0, out.stderr[-3000:]
        assert json.loads(out.stdout)["wire"]["path"] in ("relayed", "direct")
        while (ev := holder.next_event(timeout=60)).get("applied") != 1:
            pass  # the askers' fetch sessions (nothing applied) and announcements come first
    finally:
        for p in reversed(procs):
            stop_receiver(p)


def test_a_nat_that_randomizes_ports_defeats_hole_punching_and_the_relayed_path_still_works(smollm2_path, cfg,
                                                                                            tmp_path):
    with _world(random_ports=True) as w:
        s = Setup(w, smollm2_path, cfg, tmp_path)
        try:
            g = s.handoff()
            assert g["verified"]["matches"] is True and g["wire"]["path"] == "relayed"
        finally:
            s.close()


def test_prefix_cache_chunks_come_from_a_holder_behind_nat_through_its_circuit_address(smollm2_path, cfg, tmp_path):
    """`--cache-from` a node's circuit address: an asker on another private network fetches a
    prompt's chunks from a holder behind NAT through the relay, verified, and continues exactly."""
    import edgelink
    from edgelink.bench import context_tokens
    from edgelink.cache.prefix import PrefixCache

    chunk = 64
    base = cfg.replace(cache_chunk_tokens=chunk, wire_prefill_tps=500.0)
    holder_dir = tmp_path / "holder-kv"
    with edgelink.load(str(smollm2_path), base.replace(cache_dir=str(holder_dir))) as m:
        prompt = m.runtime.detokenize(context_tokens(m.runtime, 300))
        toks = m.tokenize(prompt, add_special=True)
        PrefixCache(base.replace(cache_dir=str(holder_dir))).prefill(m.runtime, m.signature, toks)
        cold = m.generate(8, stop_at_eog=False).tokens
    with _world(random_ports=False) as w:
        procs = []
        try:
            relay = start_relay(base, f"/ip4/{w.public.ip}/tcp/0", wrapper=w.public.wrapper,
                                extra_env={"EDGELINK_P2P_IDENTITY_KEY": str(tmp_path / "relay.key")})
            procs.append(relay)
            holder = start_node(str(smollm2_path), base.replace(cache_dir=str(holder_dir)),
                                listen=f"/ip4/{w.home[0].ip}/tcp/0", wrapper=w.home[0].wrapper,
                                extra_env={"EDGELINK_P2P_IDENTITY_KEY": str(tmp_path / "holder.key")},
                                node_args=("--open", "--via", relay.ready["addrs"][0]))
            procs.append(holder)
            circuit = holder.ready["addrs"][1]
            asker = base.replace(cache_dir=str(tmp_path / "asker-kv"), p2p_identity_key=tmp_path / "a.key")
            out = _cli(w.home[1], asker, {}, "generate", str(smollm2_path), "-p", prompt, "-n", "8",
                       "--cache-from", circuit, "--json")
            assert out.returncode == 0, out.stderr[-3000:]
            g = json.loads(out.stdout)
            fetch = g["fetch"]
            assert fetch["chunks"] == 4 and fetch["sources"] == [circuit] and not fetch["errors"], fetch
            assert g["cache"]["hit_tokens"] == 4 * chunk and g["tokens"] == cold
        finally:
            for p in reversed(procs):
                stop_receiver(p)
