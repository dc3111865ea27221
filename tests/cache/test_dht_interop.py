"""A foreign libp2p implementation in edgelink's cache DHT: a js-libp2p node (@libp2p/kad-dht,
/ipfs/kad/1.0.0, TCP + Noise + yamux; tests/interop/js_dht) as the only DHT server that two
py-libp2p members share.

An announcer bootstraps to the js node and announces keys through it (ADD_PROVIDER); an asker
that knows only the js node finds the announcer as their provider (GET_PROVIDERS). The
announcer admits nobody but the js node to its own DHT protocol, so every record the asker
finds came from the js node. Then the other way round: the js node provides a key, and the
asker finds the js node.

The key format matters: @libp2p/kad-dht decodes each provider-record key as a CID and refuses
the message otherwise ("Invalid CID"), so a bare blake3 chunk key never reaches it. edgelink
announces a chunk under ``dht_key(chunk key)``, a sha2-256 multihash, which it accepts; the
raw digest is checked to be refused, which is why the mapping exists.

Needs Node.js 20+ and npm; the first run installs the pinned packages (npm ci) into the cache dir.
"""

from __future__ import annotations

import time

import blake3
import pytest

from edgelink.net.dht import CacheDht, Provider, dht_key
from edgelink.transport.identity import load_identity
from edgelink.transport.p2p import P2PHost
from tests.interop.js_dht import JsDhtNode, install


def digest(i: int) -> str:
    """A chunk key as edgelink makes them: a blake3 digest, 64 hex."""
    return blake3.blake3(f"chunk {i}".encode()).hexdigest()


@pytest.fixture(scope="module")
def js_dir():
    return install()


def by_peer(providers: list[Provider]) -> dict[str, set[str]]:
    """Providers as peer id -> addresses (the addresses of one record may repeat)."""
    return {p.peer_id: set(p.addrs) for p in providers}


@pytest.mark.slow
def test_a_js_libp2p_node_carries_provider_records_between_py_members(cfg, tmp_path, js_dir):
    hosts: list[P2PHost] = []
    try:
        with JsDhtNode(js_dir) as js:
            boot = cfg.replace(cache_bootstrap=js.addrs[0])
            announcer = P2PHost(cfg, load_identity(tmp_path / "a.key"), listen=["/ip4/127.0.0.1/tcp/0"],
                                on_channel=lambda ch: None)
            hosts.append(announcer)
            member = CacheDht(announcer, boot, server=True, admit=lambda peer: peer == js.peer_id)
            assert member.bootstrapped == [js.peer_id]
            keys = [digest(i) for i in range(4)]
            assert member.announce(keys) == 4

            client = P2PHost(cfg, load_identity(tmp_path / "c.key"))
            hosts.append(client)
            asker = CacheDht(client, boot, server=False)
            assert asker.bootstrapped == [js.peer_id]
            expected = {announcer.peer_id: {announcer.addrs[0]}}
            for key in keys:
                assert by_peer(asker.providers(key)) == expected, key
            n, found = asker.deepest([*keys, digest(99)])
            assert n == 4 and by_peer(found) == expected
            assert asker.providers(digest(98)) == []

            # without the mapping (the raw digest as the DHT key): the js node refuses it
            raw = digest(5)
            assert announcer.call(lambda: member._provide(raw))  # py-libp2p counts its own copy
            assert not [p for p in asker.host.call(lambda: asker._dht.find_providers(raw))
                        if p.peer_id.to_base58() == announcer.peer_id]

            # the other way round: the js node provides a chunk's DHT key, a py member finds it
            js.provide(dht_key(digest(7)))
            # js-libp2p answers the provide once its ADD_PROVIDERs are out, and its own record can
            # become readable to GET_PROVIDERS a moment later (seen when the CPU is busy): ask
            # until it is, within the DHT timeout
            want = {js.peer_id: {js.addrs[0]}}
            deadline = time.monotonic() + cfg.cache.dht_timeout_s
            got = by_peer(asker.providers(digest(7)))
            while got != want and time.monotonic() < deadline:
                got = by_peer(asker.providers(digest(7)))
            assert got == want
    finally:
        for h in hosts:
            h.close()
