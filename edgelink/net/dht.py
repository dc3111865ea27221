"""Finding who holds a prefix-cache chunk: Kademlia provider records (libp2p's ``kad_dht``).

A node with ``cache.dht = on`` joins a DHT through the nodes named in ``cache.bootstrap`` and
announces (ADD_PROVIDER) the key of every chunk its cache holds; an asker looks the keys of
its prompt up (GET_PROVIDERS) and fetches from whoever holds the deepest one, over the usual
encrypted, authenticated session. The records are py-libp2p's, stored and routed by its
Kademlia implementation; this module only runs it on a :class:`P2PHost`'s trio loop, paces the
announcements to what the pinned implementation accepts, guards the DHT protocol with the
node's allowlist, and checks every provider address before anything dials it.

What a record reveals, and why fetched chunks are only taken from ``cache.trust``: see
docs/security.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from edgelink.config import Config, config_list
from edgelink.errors import ConfigError, PeerGone, TransportError
from edgelink.transport.p2p import client_host

if TYPE_CHECKING:
    from edgelink.transport.p2p import P2PHost

log = logging.getLogger("edgelink.net.dht")

# The pinned kad_dht drops a peer's ADD_PROVIDER messages past 10 in a fixed 10 s window
# (KadDHT._provider_rate_max / _provider_rate_window); announcements stay under that.
_RATE_WINDOW_S = 10.0
_RATE_MAX = 10
_DHT_TAG = b"edgelink-cache-dht/1\0"


def dht_key(chunk_key: str) -> str:
    """The DHT key a chunk is announced under: a sha2-256 multihash of the (tagged) chunk key.
    Other implementations read a provider key as a CID and drop anything else (js-libp2p's
    kad-dht refuses a bare blake3 digest), so the key has the one shape they all accept."""
    return "1220" + hashlib.sha256(_DHT_TAG + bytes.fromhex(chunk_key)).hexdigest()


@dataclasses.dataclass(frozen=True)
class Provider:
    peer_id: str
    addrs: tuple[str, ...]  # dialable multiaddrs, each ending in /p2p/<peer id>


SCOPES = {"loopback": 0, "private": 1, "public": 2}


def addr_scope(addr: str) -> int | None:
    """0 loopback, 1 private (RFC 1918, ULA, CGNAT), 2 public, None for an address never to
    dial (link-local, multicast, unspecified, reserved, or not an IP multiaddr)."""
    parts = addr.split("/")
    if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
        return None
    try:
        ip = ipaddress.ip_address(parts[2])
    except ValueError:
        return None
    if ip.is_loopback:
        return 0
    if ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved:
        return None
    return 1 if (ip.is_private or ip in _CGNAT) else 2


_CGNAT = ipaddress.ip_network("100.64.0.0/10")


def dial_scope(cfg: Config, own: Sequence[str] = ()) -> int:
    """The narrowest address scope a DHT lookup may dial (``cache.dht_dial``): auto is the
    narrowest among ``cache.bootstrap`` (the network joined), or among ``own`` addresses when
    there is no bootstrap (the first member of a network lives where it listens)."""
    mode = cfg.cache.dht_dial
    if mode in SCOPES:
        return SCOPES[mode]
    if mode != "auto":
        raise ConfigError(f"cache.dht_dial is {mode!r}: auto, public, private or loopback")
    where = config_list(cfg.cache.bootstrap) or list(own)
    scopes = [s for s in (addr_scope(b) for b in where) if s is not None]
    return min(scopes, default=SCOPES["public"])


def dialable(addr: str, peer_id: str, min_scope: int = 0) -> str | None:
    """``addr`` as a full multiaddr for ``peer_id`` if a session could be dialled there (TCP over
    an IP of at least ``min_scope``); None for anything else a record may carry."""
    parts = addr.split("/")
    if len(parts) < 5 or parts[0] != "" or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
        return None
    scope = addr_scope(addr)
    port = parts[4]
    if scope is None or scope < min_scope or not (port.isascii() and port.isdigit() and len(port) <= 5) \
            or not 0 < int(port) < 65536:
        return None
    base = "/".join(parts[:5])
    rest = parts[5:]
    if rest and rest != ["p2p", peer_id]:
        return None
    return f"{base}/p2p/{peer_id}"


class CacheDht:
    """One host's membership in the cache DHT: ``server`` (a node: answers DHT queries, stores
    records, announces its chunks) or client (an asker: only looks up).

    ``admit(peer_id)``, for a server, decides who may use its DHT protocol (a node passes its
    allowlist check)."""

    def __init__(self, host: P2PHost, cfg: Config, *, server: bool,
                 admit: Callable[[str], bool] | None = None):
        self.host = host
        self.cfg = cfg
        self.server = server
        self._admit = admit
        self._dht = None
        self._stop = None
        self._lock = threading.Lock()
        self._announced: set[str] = set()
        self.pending: set[str] = set()  # announced to no other member yet (none known, or none took it)
        self._window: list[float] = []  # send times of the current rate window
        self.bootstrapped: list[str] = []
        self._start()

    # ------------------------------------------------------------------ setup (trio thread)

    def _start(self) -> None:
        import trio

        async def start():
            from libp2p.kad_dht.common import PROTOCOL_ID
            from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
            from libp2p.tools.anyio_service import background_trio_service

            dht = KadDHT(self.host.libp2p_host, DHTMode.SERVER if self.server else DHTMode.CLIENT)
            if self.server:
                handler = dht.handle_stream

                async def guarded(stream):
                    peer = stream.muxed_conn.peer_id.to_base58()
                    if self._admit is not None and not self._admit(peer):
                        log.warning("dht: refused a DHT stream from %s", peer)
                        try:
                            await stream.reset()
                        except Exception:  # noqa: BLE001 - the stream may be gone already
                            pass
                        return
                    try:
                        await handler(stream)
                    except Exception as exc:  # noqa: BLE001 - a peer's bytes must never stop the host
                        log.warning("dht: a DHT stream from %s failed: %s: %s", peer, type(exc).__name__, exc)
                        try:
                            await stream.reset()
                        except Exception:  # noqa: BLE001
                            pass

                self.host.libp2p_host.set_stream_handler(PROTOCOL_ID, guarded)
            stop = trio.Event()

            async def run(task_status=trio.TASK_STATUS_IGNORED):
                async with background_trio_service(dht):
                    task_status.started()
                    await stop.wait()

            await self.host.nursery.start(run)
            self._dht, self._stop = dht, stop

        self.host.call(start)
        self.bootstrap(config_list(self.cfg.cache.bootstrap))

    def bootstrap(self, addrs: Sequence[str]) -> list[str]:
        """Connect to these DHT members and learn the network from them (a lookup of our own
        id). Returns the peer ids reached; an unreachable one is logged, not fatal, unless
        none is reached."""
        if not addrs:
            return []
        import multiaddr
        import trio
        from libp2p.peer.peerinfo import info_from_p2p_addr

        infos = []
        for a in addrs:
            try:
                infos.append(info_from_p2p_addr(multiaddr.Multiaddr(a)))
            except Exception as exc:  # noqa: BLE001
                raise ConfigError(f"cache.bootstrap: {a!r} is not a multiaddr ending in /p2p/<peer id> "
                                  f"({exc})") from None
        limit = self.cfg.p2p.connect_timeout_s

        async def join():
            reached = []
            for info in infos:
                if info.peer_id == self.host.libp2p_host.get_id():
                    continue
                try:
                    with trio.fail_after(limit):
                        await self.host.libp2p_host.connect(info)
                    await self._dht.add_peer(info.peer_id, skip_server_mode_check=True)
                    reached.append(info.peer_id.to_base58())
                except Exception as exc:  # noqa: BLE001 - libp2p raises many types on a failed dial
                    log.warning("dht: bootstrap peer %s unreachable: %s: %s", info.peer_id, type(exc).__name__, exc)
            if reached:
                with trio.move_on_after(limit):
                    await self._dht.refresh_routing_table()
            return reached

        reached = self.host.call(join)
        if not reached and any(i.peer_id != self.host.libp2p_host.get_id() for i in infos):
            raise PeerGone(f"no cache.bootstrap peer answered within {limit} s: {', '.join(addrs)}")
        self.bootstrapped += reached
        return reached

    # ------------------------------------------------------------------ records

    def announce(self, keys: Sequence[str], *, stop: threading.Event | None = None) -> int:
        """Announce that this host holds the chunks ``keys`` (hex), each once, paced so that
        no DHT member drops them. Blocks while pacing; ``stop`` ends it early. Returns how many
        reached another member now; the others stay in ``pending`` (this host answers for them
        itself meanwhile)."""
        done = 0
        for key in keys:
            if stop is not None and stop.is_set():
                break
            with self._lock:
                if key in self._announced:
                    continue
            self._pace(stop)
            ok = self.host.call(self._provide, dht_key(key))
            with self._lock:
                if ok:
                    self._announced.add(key)
                    self.pending.discard(key)
                else:
                    self.pending.add(key)
            done += bool(ok)
        return done

    async def _provide(self, key: str) -> bool:
        import trio

        try:
            with trio.move_on_after(self.cfg.cache.dht_timeout_s):
                return bool(await self._dht.provide(key))
        except Exception as exc:  # noqa: BLE001 - what peers answer is py-libp2p's to parse; any failure is a miss
            log.warning("dht: announcing %s failed: %s: %s", key[:16], type(exc).__name__, exc)
        return False

    def _pace(self, stop: threading.Event | None) -> None:
        budget = max(1, min(_RATE_MAX - 2, self.cfg.cache.announce_burst))
        now = time.monotonic()
        if self._window and now - self._window[0] >= _RATE_WINDOW_S + 0.5:
            self._window = []
        if len(self._window) >= budget:
            wait = self._window[0] + _RATE_WINDOW_S + 0.5 - now
            if wait > 0:
                (stop or threading.Event()).wait(wait)
            self._window = []
        self._window.append(time.monotonic())

    def routing_peers(self) -> int:
        """How many DHT members this host's routing table holds."""
        async def size():
            return self._dht.get_routing_table_size()

        return self.host.call(size)

    def announced(self) -> int:
        with self._lock:
            return len(self._announced)

    def providers(self, key: str) -> list[Provider]:
        """Who announced chunk ``key`` (hex), as dialable addresses; never this host itself."""
        import trio

        wanted = dht_key(key)

        async def find():
            try:
                with trio.move_on_after(self.cfg.cache.dht_timeout_s):
                    return await self._dht.find_providers(wanted)
            except Exception as exc:  # noqa: BLE001 - what peers answer is py-libp2p's to parse; any failure is a miss
                log.warning("dht: looking up %s failed: %s: %s", key[:16], type(exc).__name__, exc)
            return []

        own = self.host.peer_id
        c = self.cfg.cache
        scope = dial_scope(self.cfg, self.host.addrs)
        # dicts as ordered sets: linear in what is kept, and what is kept is bounded, however
        # many providers and addresses an answer carries
        out: dict[str, dict[str, None]] = {}
        for info in self.host.call(find):
            if len(out) >= c.dht_max_providers:
                break
            try:
                pid = info.peer_id.to_base58()
                raw = info.addrs[:4 * c.dht_max_addrs]
            except Exception:  # noqa: BLE001 - a record is a peer's word: skip what does not parse
                continue
            if pid == own:
                continue
            kept = out.setdefault(pid, {})
            for a in raw:
                try:
                    d = dialable(str(a), pid, scope)
                except Exception:  # noqa: BLE001 - an address that does not print is skipped
                    continue
                if d:
                    kept[d] = None
                    if len(kept) >= c.dht_max_addrs:
                        break
        return [Provider(pid, tuple(a)) for pid, a in sorted(out.items()) if a]

    def deepest(self, keys: Sequence[str], accept: Callable[[Provider], bool] = lambda p: True
                ) -> tuple[int, list[Provider]]:
        """The longest run ``keys[:n]`` whose last key has an accepted provider, and those
        providers: a binary search, since a holder of a chunk announced every chunk before it.
        (0, []) when none."""
        lo, hi, best = 0, len(keys), []
        while lo < hi:
            mid = (lo + hi + 1) // 2
            found = [p for p in self.providers(keys[mid - 1]) if accept(p)]
            if found:
                lo, best = mid, found
            else:
                hi = mid - 1
        return lo, best

    def close(self) -> None:
        if self._stop is None:
            return
        stop, self._stop = self._stop, None
        try:
            self.host.call_soon_sync(stop.set)
        except TransportError:
            pass


def dht_enabled(cfg: Config) -> bool:
    """``cache.dht``, checked: a DHT member announces chunks it must also be willing to share."""
    if cfg.cache.dht and not cfg.cache.share:
        raise ConfigError("cache.dht = on announces this node's chunks, but cache.share = off refuses to "
                          "send them: turn one of the two around")
    return cfg.cache.dht


class Announcer:
    """Announces a store's chunks: every key it holds now, then each new one as it is put,
    on a thread of its own (pacing makes announcing slow by design). ``on_event`` hears
    ``{"event": "cache_announced", ...}`` each time the queue runs dry. Keys no other member
    took (a node that starts before its peers) are announced again every
    ``cache.announce_retry_s`` while any member is known."""

    def __init__(self, dht: CacheDht, store, on_event: Callable[[dict], None]):
        import queue

        self.dht = dht
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._stop = threading.Event()
        self._on_event = on_event
        for key in store.keys():
            self._queue.put(key)
        store.on_put.append(self._queue.put)
        self._thread = threading.Thread(target=self._run, name="edgelink-announce", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import queue

        while not self._stop.is_set():
            try:
                batch = [self._queue.get(timeout=max(0.1, self.dht.cfg.cache.announce_retry_s))]
            except queue.Empty:
                with self.dht._lock:
                    batch = sorted(self.dht.pending)
                if not batch or self.dht.routing_peers() == 0:
                    continue
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            keys = [k for k in batch if k is not None]
            if not keys:
                continue
            try:
                n = self.dht.announce(keys, stop=self._stop)
            except TransportError as exc:  # the host is closing
                log.info("dht: announcing stopped: %s", exc)
                return
            if self._queue.empty() and not self._stop.is_set():
                self._on_event({"event": "cache_announced", "keys": n, "total": self.dht.announced(),
                                "pending": len(self.dht.pending), "peers": self.dht.routing_peers()})

    def close(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout=5)


_CLIENT_DHTS: dict[tuple[int, Any], CacheDht] = {}


def client_dht(cfg: Config) -> CacheDht:
    """This process's DHT client on its dialling host, joined through ``cache.bootstrap``: one
    per host and ``[cache]`` settings, so a caller with another trust list, timeout or
    bootstrap list never gets a client made with the first caller's."""

    wanted = config_list(cfg.cache.bootstrap)
    if not wanted:
        raise ConfigError("a DHT lookup needs cache.bootstrap: the multiaddr of at least one node with "
                          "cache.dht = on")
    host = client_host(cfg)
    key = (id(host), cfg.cache)
    with _CLIENT_LOCK:
        dht = _CLIENT_DHTS.get(key)
        if dht is None or dht.host is not host:
            dht = _CLIENT_DHTS[key] = CacheDht(host, cfg, server=False)
    return dht


_CLIENT_LOCK = threading.Lock()
