"""Finding edgelink nodes on the local network with mDNS (libp2p's ``_p2p._udp.local`` service).

A node started with mDNS on (``edgelink node --mdns`` or ``p2p.mdns = 1``) announces its peer
id and listen addresses; ``discover`` runs a short-lived libp2p host with mDNS on, listens
for ``timeout_s`` seconds and reports who answered. Every libp2p peer that announces itself
this way is reported (other libp2p software on the LAN too): the encrypted handshake, not
the announcement, is what proves a peer is the node it claims to be.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

from edgelink.config import Config
from edgelink.errors import PeerGone
from edgelink.transport.identity import load_identity
from edgelink.transport.p2p import P2PHost


@dataclasses.dataclass(frozen=True)
class DiscoveredPeer:
    peer_id: str
    addrs: list[str]  # full multiaddrs, each ending in /p2p/<peer id>


def discover(cfg: Config, timeout_s: float | None = None, *, peer_id: str | None = None,
             poll_s: float = 0.05) -> list[DiscoveredPeer]:
    """Peers heard on the LAN within ``timeout_s`` (default ``p2p.discover_timeout_s``); with
    ``peer_id``, return as soon as that one is heard.

    The listening host uses a throwaway identity, so looking around does not announce this
    machine's own peer id."""

    limit = cfg.p2p.discover_timeout_s if timeout_s is None else timeout_s
    with tempfile.TemporaryDirectory(prefix="edgelink-discover-") as tmp:
        ident = load_identity(Path(tmp) / "probe.key")
        host = P2PHost(cfg.replace(p2p_mdns=1), ident, listen=[cfg.p2p.discover_listen])
        try:
            end = time.monotonic() + limit
            while True:
                found = [p for p in _heard(host, ident.peer_id_str)
                         if peer_id is None or p.peer_id == peer_id]
                if (peer_id is not None and found) or time.monotonic() >= end:
                    return found
                time.sleep(poll_s)
        finally:
            host.close()


def _heard(host, own_id: str) -> list[DiscoveredPeer]:
    async def read():
        ps = host.libp2p_host.get_peerstore()
        return [(str(p), [str(a) for a in ps.addrs(p)]) for p in ps.peers_with_addrs()]

    out = []
    for pid, addrs in host.call(read):
        if pid == own_id or not addrs:
            continue
        full = sorted(a if "/p2p/" in a else f"{a}/p2p/{pid}" for a in addrs)
        out.append(DiscoveredPeer(pid, full))
    return sorted(out, key=lambda p: p.peer_id)


def resolve_peer(cfg: Config, peer_id: str, timeout_s: float | None = None) -> str:
    """A dialable multiaddr for ``peer_id``, found with mDNS; raises PeerGone if none answers."""
    limit = cfg.p2p.discover_timeout_s if timeout_s is None else timeout_s
    found = discover(cfg, limit, peer_id=peer_id)
    if not found:
        raise PeerGone(f"no peer {peer_id} answered mDNS within {limit} s (is the node running "
                       "with --mdns on this network? otherwise pass its full multiaddr)")
    return found[0].addrs[0]
