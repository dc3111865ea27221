"""Finding prefix-cache holders with libp2p's Kademlia DHT (edgelink/net/dht.py), or in
``cache.peers``.

Without models: five DHT members on loopback and a client; records route, the deepest
announced key is found by a binary search, a node's allowlist guards its DHT protocol, and a
provider record's addresses are checked before anything dials them.

With real nodes: four network namespaces on one Ethernet segment (edgelink/bench/netns.lan). Three
`edgelink node --dht` processes (a bootstrap node, one holding a document's chunks, one
holding nothing) and an asker that knows only the bootstrap node: `generate --cache-from dht`
finds the holder through the DHT, fetches the chunks over the encrypted session, and continues
exactly as a cold run. A holder not in cache.trust is named, not asked. Without the DHT,
``cache.peers`` are asked in order, and one that does not answer is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import edgelink
from edgelink.bench import context_tokens
from edgelink.cache.prefix import PrefixCache
from edgelink.config import to_env
from edgelink.errors import ConfigError
from edgelink.net.dht import CacheDht, Provider, dht_enabled, dialable
from edgelink.transport.identity import load_identity
from edgelink.transport.p2p import P2PHost


def test_provider_addresses_are_checked_before_anything_dials_them():
    pid = "12D3KooWDk6yjt3XiP4nntm3cmkJvmExGenGZJj34eUXUnBTtMoj"
    assert dialable("/ip4/10.0.0.2/tcp/4001", pid) == f"/ip4/10.0.0.2/tcp/4001/p2p/{pid}"
    assert dialable(f"/ip4/10.0.0.2/tcp/4001/p2p/{pid}", pid) == f"/ip4/10.0.0.2/tcp/4001/p2p/{pid}"
    for bad in ("/ip4/0.0.0.0/tcp/4001", "/ip4/10.0.0.2/udp/4001", "/ip4/10.0.0.2/tcp/0",
                "/ip4/10.0.0.2/tcp/99999", "/dns4/x/tcp/1", "", "ip4/1.2.3.4/tcp/1",
                "/ip4/10.0.0.2/tcp/4001/p2p/12D3KooWOther", "/ip4/10.0.0.2/tcp/80x",
                "/ip4/10.0.0.2/tcp/\u00b2", "/ip4/10.0.0.2/tcp/" + "9" * 4000):
        assert dialable(bad, pid) is None, bad
    # a holder behind NAT: a circuit through a relay at a dialable address
    relay = "12D3KooWRUJ9QQJazxmqvXXtyVi8RcsB4aZEPVq5jmodYMAHtKMP"
    circuit = f"/ip4/203.0.113.7/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{pid}"
    assert dialable(circuit, pid) == circuit
    assert dialable(f"/ip4/203.0.113.7/tcp/4001/p2p/{relay}/p2p-circuit", pid) == circuit
    assert dialable(circuit.replace("203.0.113.7", "10.0.0.1"), pid, 2) is None  # out of scope
    for bad in (f"/ip4/203.0.113.7/tcp/4001/p2p-circuit/p2p/{pid}",  # no relay id
                f"/ip4/203.0.113.7/tcp/4001/p2p/{pid}/p2p-circuit/p2p/{pid}",  # relays through itself
                f"/ip4/203.0.113.7/tcp/4001/p2p/{relay}/p2p-circuit/p2p/12D3KooWOther",
                f"/ip4/203.0.113.7/tcp/4001/p2p/notapeerid/p2p-circuit/p2p/{pid}",
                f"/ip4/203.0.113.7/tcp/0/p2p/{relay}/p2p-circuit/p2p/{pid}",
                f"/ip4/0.0.0.0/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{pid}",
                f"{circuit}/p2p-circuit/p2p/{pid}", f"/ip4/203.0.113.7/tcp/4001/p2p/{relay}/p2p-circuitx"):
        assert dialable(bad, pid) is None, bad


def test_the_pinned_kad_dht_still_has_what_its_adaptations_rely_on():
    """edgelink/net/dht.py adapts py-libp2p's kad_dht from outside (``_KadHost``,
    ``_kad_dht_class``): when an upgrade moves what they rely on, this says where."""
    import inspect
    from importlib.metadata import version

    from libp2p.kad_dht import kad_dht, peer_routing, provider_store

    from edgelink.net.dht import _PINNED_LIBP2P

    assert version("libp2p") == _PINNED_LIBP2P
    # the stream handler admits every sender to the table through KadDHT.add_peer (overridden)
    assert "await self.add_peer(peer_id, skip_server_mode_check=True)" in \
        inspect.getsource(kad_dht.KadDHT._do_handle_stream)
    # provider records carry the DHT's host.get_addrs() (ours: with the circuits)
    assert "self.host.get_addrs()" in inspect.getsource(provider_store.ProviderStore._send_add_provider)
    # the routing table admits a peer unchecked when identify has not told its protocols
    from libp2p.kad_dht.routing_table import RoutingTable

    assert "if peer_protocols is not None and len(peer_protocols) > 0" in inspect.getsource(RoutingTable.add_peer)
    # every query goes through the DHT's host.new_stream (ours: refused or bounded)
    for fn in (peer_routing.PeerRouting._query_peer_for_closest,
               provider_store.ProviderStore._get_providers_from_peer_with_closers):
        assert "self.host.new_stream(" in inspect.getsource(fn)


@pytest.mark.slow
def test_a_holder_behind_a_relay_is_a_client_announcing_its_circuit_and_no_later_lookup_waits_on_it(cfg, tmp_path):
    """A holder that listens nowhere and is reachable only through its relay reservation (a host
    behind NAT) joins as a DHT client: its records carry its circuit address, the member it
    queried keeps it out of its routing table (the pinned handler put every sender there), and
    an asker's every lookup finds it, not only the first (they used to wait on it until
    cache.dht_timeout_s and come back empty)."""
    from edgelink.net.relay import Relay
    from edgelink.transport.p2p import wait_until

    c = cfg.replace(p2p_hole_punch="off")
    loop = "/ip4/127.0.0.1/tcp/0"
    hosts = []
    relay = Relay(c, load_identity(tmp_path / "relay.key"), [loop], lambda ev: None)
    try:
        member = P2PHost(c, load_identity(tmp_path / "m.key"), listen=[loop], on_channel=lambda ch: None)
        hosts.append(member)
        public = CacheDht(member, c, server=True)
        holder = P2PHost(c, load_identity(tmp_path / "h.key"))  # listens nowhere
        hosts.append(holder)
        circuit = holder.reserve(relay.addrs[0])
        behind = CacheDht(holder, c.replace(cache_bootstrap=member.addrs[0]), server=False)
        keys = [f"{i:064x}" for i in range(1, 5)]
        assert behind.announce(keys) == 4
        asker_host = P2PHost(c, load_identity(tmp_path / "a.key"))
        hosts.append(asker_host)
        asker = CacheDht(asker_host, c.replace(cache_bootstrap=member.addrs[0]), server=False)
        for key in keys:
            assert asker.providers(key) == [Provider(holder.peer_id, (circuit,))], key
        assert asker.deepest(keys) == (4, [Provider(holder.peer_id, (circuit,))])
        # neither client got into the member's table (its checks of them have ended: no answer)
        assert wait_until(lambda: not public._dht._probing, 30)
        assert public.routing_peers() == 0
        # ... while a server that joins does
        other = P2PHost(c, load_identity(tmp_path / "o.key"), listen=[loop], on_channel=lambda ch: None)
        hosts.append(other)
        CacheDht(other, c.replace(cache_bootstrap=member.addrs[0]), server=True)
        assert wait_until(lambda: public.routing_peers() == 1, 30)
    finally:
        for h in hosts:
            h.close()
        relay.close()


def test_the_dht_setting_is_checked(cfg):
    assert dht_enabled(cfg.replace(cache_dht="on")) is True
    with pytest.raises(ConfigError, match="on or off"):
        dht_enabled(cfg.replace(cache_dht="yes"))
    with pytest.raises(ConfigError, match="cache.share"):
        dht_enabled(cfg.replace(cache_dht="on", cache_share="off"))


@pytest.mark.slow
def test_records_route_through_members_and_the_deepest_key_is_found(cfg, tmp_path):
    hosts, dhts = [], []
    outsider = load_identity(tmp_path / "outsider.key")
    try:
        for i in range(5):
            host = P2PHost(cfg, load_identity(tmp_path / f"m{i}.key"), listen=["/ip4/127.0.0.1/tcp/0"],
                           on_channel=lambda ch: None)
            hosts.append(host)
            boot = hosts[0].addrs[0] if i else ""
            dhts.append(CacheDht(host, cfg.replace(cache_bootstrap=boot), server=True,
                                 admit=lambda peer: peer != outsider.peer_id_str))
        assert all(d.routing_peers() >= 2 for d in dhts)  # they learned of each other, not only of #0
        keys = [f"{i:064x}" for i in range(1, 9)]
        assert dhts[3].announce(keys[:5]) == 5
        assert dhts[3].announce(keys[:5]) == 0  # each key once
        # a client that knows only member 1 finds member 3 as the holder of the 5th key
        client = P2PHost(cfg, load_identity(tmp_path / "c.key"))
        hosts.append(client)
        asker = CacheDht(client, cfg.replace(cache_bootstrap=hosts[1].addrs[0]), server=False)
        n, found = asker.deepest(keys)
        assert n == 5 and found == [Provider(hosts[3].peer_id, (hosts[3].addrs[0],))]
        assert asker.deepest(keys, accept=lambda p: p.peer_id != hosts[3].peer_id) == (0, [])
        assert asker.providers(f"{99:064x}") == []
        # the members refuse their DHT protocol to a peer their allowlist does not admit
        stranger = P2PHost(cfg, outsider)
        hosts.append(stranger)
        shut_out = CacheDht(stranger, cfg.replace(cache_bootstrap=hosts[2].addrs[0]), server=False)
        assert shut_out.deepest(keys) == (0, [])
    finally:
        for h in hosts:
            h.close()


def _event(proc, name: str, pred=lambda ev: True) -> dict:
    while True:
        ev = proc.next_event()
        if ev.get("event") == name and pred(ev):
            return ev


def test_an_asker_finds_a_prefix_holder_through_the_dht_among_real_nodes(smollm2_path, cfg, tmp_path):
    from edgelink.bench.netns import lan
    from edgelink.roles.launcher import start_node, stop_receiver

    chunk = 64
    # wire.prefill_tps set: the nodes skip measuring their prefill speed at start
    base = cfg.replace(cache_chunk_tokens=chunk, p2p_connect_timeout_s=10.0, wire_prefill_tps=500.0)
    holder_dir = tmp_path / "holder-kv"
    with edgelink.load(str(smollm2_path), base.replace(cache_dir=str(holder_dir))) as m:
        prompt = m.runtime.detokenize(context_tokens(m.runtime, 300))
        toks = m.tokenize(prompt, add_special=True)
        assert 4 * chunk < len(toks) < 5 * chunk  # 4 whole chunks, the 5th partial
        PrefixCache(base.replace(cache_dir=str(holder_dir))).prefill(m.runtime, m.signature, toks)
        cold = m.generate(8, stop_at_eog=False).tokens
    procs = []
    with lan(4) as hosts:
        try:
            def node(i: int, cache_dir: Path, *args: str):
                proc = start_node(str(smollm2_path), base.replace(cache_dir=str(cache_dir)),
                                  listen=f"/ip4/{hosts[i].ip}/tcp/4001", wrapper=hosts[i].wrapper,
                                  extra_env={"EDGELINK_P2P_IDENTITY_KEY": str(tmp_path / f"n{i}.key")},
                                  node_args=("--dht", "--open", *args))
                procs.append(proc)
                return proc

            boot = node(0, tmp_path / "boot-kv")
            boot_addr = boot.ready["addrs"][0]
            node(1, tmp_path / "empty-kv", "--bootstrap", boot_addr)  # a member that holds nothing
            holder = node(2, holder_dir, "--bootstrap", boot_addr)
            ev = _event(holder, "cache_announced", lambda e: e["total"] == 5)  # the node itself and 4 chunks
            assert ev["peers"] >= 2
            holder_id = holder.ready["peer_id"]

            def ask(cache_dir: Path, *args: str, peers: str = "") -> dict:
                env = to_env(base.replace(cache_dir=str(cache_dir), p2p_identity_key=tmp_path / "asker.key",
                                          cache_peers=peers))
                how = ("--cache",) if peers else ("--cache-from", "dht", "--bootstrap", boot_addr)
                r = subprocess.run([*hosts[3].wrapper, sys.executable, "-m", "edgelink", "generate",
                                    str(smollm2_path), "-p", prompt, "-n", "8", *how, "--json", *args],
                                   capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
                assert r.returncode == 0, r.stderr[-3000:]
                return json.loads(r.stdout)

            # not trusted: named, not asked; the prompt is prefilled here instead
            out = ask(tmp_path / "asker1-kv")
            fetch = out["fetch"]
            assert fetch["untrusted"] == [holder_id] and fetch["chunks"] == 0 and fetch["sources"] == []
            assert out["cache"]["hit_tokens"] == 0 and out["tokens"] == cold
            # trusted: the chunks come from the holder, found through the DHT, and continue exactly
            out = ask(tmp_path / "asker2-kv", "--trust", holder_id)
            fetch = out["fetch"]
            assert fetch["providers"] == [holder_id] and fetch["chunks"] == 4 and fetch["lacking"] == 4
            assert fetch["sources"] == [f"/ip4/{hosts[2].ip}/tcp/4001/p2p/{holder_id}"]
            assert out["cache"]["hit_tokens"] == 4 * chunk
            assert out["tokens"] == cold
            # cache.peers, no DHT: a peer that does not answer is skipped, the next one serves
            dead = f"/ip4/{hosts[1].ip}/tcp/4999/p2p/{holder_id}"
            out = ask(tmp_path / "asker3-kv", peers=f"{dead},{holder.ready['addrs'][0]}")
            fetch = out["fetch"]
            assert fetch["chunks"] == 4 and len(fetch["errors"]) == 1 and fetch["errors"][0].startswith(dead)
            assert out["cache"]["hit_tokens"] == 4 * chunk and out["tokens"] == cold
        finally:
            for proc in procs:
                stop_receiver(proc)



@pytest.mark.slow
def test_a_member_survives_hostile_bytes_on_its_dht_protocol(cfg, tmp_path):
    """Garbage on the Kademlia protocol (huge declared lengths, random bytes, a truncated
    protobuf, a forged ADD_PROVIDER naming another peer) costs the sender its stream; the member
    keeps routing, keeps its records, and stores no forged one."""
    import random

    import varint
    from libp2p.kad_dht.common import PROTOCOL_ID
    from libp2p.kad_dht.pb.kademlia_pb2 import Message

    hosts = []
    try:
        for i in range(3):
            host = P2PHost(cfg, load_identity(tmp_path / f"m{i}.key"), listen=["/ip4/127.0.0.1/tcp/0"],
                           on_channel=lambda ch: None)
            hosts.append(host)
        dhts = [CacheDht(h, cfg.replace(cache_bootstrap=hosts[0].addrs[0] if i else ""), server=True)
                for i, h in enumerate(hosts)]
        keys = [f"{i:064x}" for i in range(1, 4)]
        assert dhts[1].announce(keys) == 3
        attacker = P2PHost(cfg, load_identity(tmp_path / "a.key"))
        hosts.append(attacker)
        victim = hosts[0]
        import multiaddr
        from libp2p.peer.peerinfo import info_from_p2p_addr

        info = info_from_p2p_addr(multiaddr.Multiaddr(victim.addrs[0]))
        forged = Message(type=Message.MessageType.ADD_PROVIDER, key=bytes.fromhex(f"{9:064x}"))
        p = forged.providerPeers.add()
        p.id = info.peer_id.to_bytes()  # claims the victim itself provides it: not the sender
        p.addrs.append(multiaddr.Multiaddr("/ip4/10.9.9.9/tcp/1").to_bytes())
        rng = random.Random(7)
        payloads = [varint.encode(1 << 40), bytes(rng.getrandbits(8) for _ in range(10_000)),
                    varint.encode(50) + b"\x08\x01\x12\xff", varint.encode(len(forged.SerializeToString()))
                    + forged.SerializeToString()]
        for payload in payloads:
            async def attack(payload=payload):
                import trio

                await attacker.libp2p_host.connect(info)
                stream = await attacker.libp2p_host.new_stream(info.peer_id, [PROTOCOL_ID])
                await stream.write(payload)
                with trio.move_on_after(2):
                    await stream.read(1 << 16)  # an answer, a reset or nothing: all fine
                await stream.close()

            try:
                attacker.call(attack)
            except Exception:  # noqa: BLE001 - the victim may reset the stream: that is the point
                pass
        # the victim still routes and answers, and stored no record for the forged key
        asker = CacheDht(attacker, cfg.replace(cache_bootstrap=victim.addrs[0]), server=False)
        n, found = asker.deepest(keys)
        assert n == 3 and [p.peer_id for p in found] == [hosts[1].peer_id]
        assert not [p for p in asker.providers(f"{9:064x}") if "10.9.9.9" in " ".join(p.addrs)]
    finally:
        for h in hosts:
            h.close()


def test_a_node_that_started_alone_announces_once_a_member_joins(cfg, tmp_path):
    """Keys no other member took stay pending, and go out once someone joins."""
    import queue

    from edgelink.cache.store import ChunkStore
    from edgelink.net.dht import Announcer

    store = ChunkStore(tmp_path / "kv", 1 << 20, 1 << 20)
    keys = [f"{i:064x}" for i in range(1, 4)]
    for k in keys:
        store.put(k, b"x")
    hosts = []
    events: queue.Queue = queue.Queue()
    try:
        fast = cfg.replace(cache_announce_retry_s=0.5)
        first = P2PHost(fast, load_identity(tmp_path / "a.key"), listen=["/ip4/127.0.0.1/tcp/0"],
                        on_channel=lambda ch: None)
        hosts.append(first)
        alone = CacheDht(first, fast, server=True)
        announcer = Announcer(alone, store, events.put)
        ev = events.get(timeout=60)
        assert ev["total"] == 0 and ev["pending"] == 3 and ev["peers"] == 0
        second = P2PHost(fast, load_identity(tmp_path / "b.key"), listen=["/ip4/127.0.0.1/tcp/0"],
                         on_channel=lambda ch: None)
        hosts.append(second)
        CacheDht(second, fast.replace(cache_bootstrap=first.addrs[0]), server=True)
        while ev["total"] < 3:
            ev = events.get(timeout=60)
        assert ev["pending"] == 0 and ev["peers"] >= 1
        store.put(f"{9:064x}", b"y")  # a chunk stored later is announced as it arrives
        while ev["total"] < 4:
            ev = events.get(timeout=60)
        announcer.close()
    finally:
        for h in hosts:
            h.close()
