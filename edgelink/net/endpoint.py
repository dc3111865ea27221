"""Where a peer lives: ``shm:NAME`` (same machine), a libp2p multiaddr ending in ``/p2p/ID``,
or ``/p2p/ID`` alone (found through the cache DHT when ``cache.bootstrap`` names members,
else, or when the DHT has no record of it, on the LAN with mDNS)."""

from __future__ import annotations

import dataclasses

from edgelink.config import Config, config_list, load_config
from edgelink.errors import ConfigError, EdgelinkError, PeerGone
from edgelink.net.dht import find_peer
from edgelink.net.discovery import resolve_peer
from edgelink.transport.base import Channel
from edgelink.transport.p2p import client_host
from edgelink.transport.shm import connect as shm_connect


@dataclasses.dataclass(frozen=True)
class Endpoint:
    scheme: str
    address: str

    def __str__(self) -> str:
        if self.scheme == "mdns":
            return f"/p2p/{self.address}"
        return self.address if self.scheme == "p2p" else f"{self.scheme}:{self.address}"


def parse_endpoint(text: str) -> Endpoint:
    if text.startswith("/p2p/") and "/" not in text[5:] and text[5:]:
        # A bare peer id: its address is found through the DHT or on the LAN (_dial_peer_id).
        return Endpoint("mdns", text[5:])
    if text.startswith("/"):
        # A libp2p multiaddr: /ip4/HOST/tcp/PORT/p2p/PEERID (the peer id is required: it is
        # what the encrypted connection authenticates).
        head, sep, pid = text.rpartition("/p2p/")
        if not sep or not head or not pid or "/" in pid:
            raise ConfigError(f"endpoint {text!r} needs a /p2p/<peer id> part "
                              "(for example /ip4/10.0.0.2/tcp/4001/p2p/12D3KooW...)")
        return Endpoint("p2p", text)
    scheme, sep, address = text.partition(":")
    if not sep or not address:
        raise ConfigError(f"endpoint {text!r} is not SCHEME:ADDRESS (for example shm:demo)")
    if scheme != "shm":
        raise ConfigError(f"unsupported endpoint scheme {scheme!r} (supported: shm)")
    return Endpoint(scheme, address)


def connect(endpoint: str, cfg: Config | None = None) -> Channel:
    """A raw channel to a serving peer (for tools and tests that speak the protocol directly):
    ``shm:NAME``, or a multiaddr ``/ip4/H/tcp/P/p2p/ID`` (end-to-end encrypted; this process
    keeps its libp2p connection to that peer for the next call), or ``/p2p/ID`` alone, whose
    address is looked up with mDNS."""

    cfg = cfg if cfg is not None else load_config()
    ep = parse_endpoint(endpoint)
    if ep.scheme == "mdns":
        return _dial_peer_id(cfg, ep.address)
    if ep.scheme == "p2p":
        return client_host(cfg).open_channel(ep.address)
    return shm_connect(ep.address, cfg)


def _dial_peer_id(cfg: Config, peer_id: str) -> Channel:
    """A bare peer id: the addresses its DHT record names (``cache.bootstrap`` set; a node behind
    NAT, its circuits first), each tried in turn; else, or when none of them answers, mDNS."""
    tried: list[str] = []
    if config_list(cfg.cache.bootstrap):
        for addr in find_peer(cfg, peer_id):
            try:
                return client_host(cfg).open_channel(addr)
            except EdgelinkError as exc:
                tried.append(f"{addr}: {exc}")
        if not tried:
            tried.append("the DHT (cache.bootstrap) has no record of it")
    try:
        addr = resolve_peer(cfg, peer_id)
    except PeerGone as exc:
        if tried:
            raise PeerGone(f"{exc}; {'; '.join(tried)[:1500]}") from None
        raise
    return client_host(cfg).open_channel(addr)
