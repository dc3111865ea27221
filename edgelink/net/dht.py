"""Finding who holds a prefix-cache chunk: Kademlia provider records (libp2p's ``kad_dht``).

A node with ``cache.dht = on`` joins a DHT through the nodes named in ``cache.bootstrap`` and
announces (ADD_PROVIDER) the key of every chunk its cache holds; an asker looks the keys of
its prompt up (GET_PROVIDERS) and fetches from whoever holds the deepest one, over the usual
encrypted, authenticated session. The records are py-libp2p's, stored and routed by its
Kademlia implementation; this module only runs it on a :class:`P2PHost`'s trio loop, paces the
announcements to what the pinned implementation accepts, guards the DHT protocol with the
node's allowlist, and checks every provider address before anything dials it.

A host behind NAT (one with a relay reservation, ``--via``) is a DHT *client*: it serves no
DHT protocol, looks up and announces only, and its records carry its circuit addresses beside
its listen addresses; an asker dials those through the relay (docs/nat.md). Two adaptations
around the pinned py-libp2p (checked by ``tests/cache/test_cache_dht.py``) make that work:
``_KadHost``, the host as the DHT sees it (its addresses with the circuits, and a stream to a
peer that cannot serve the DHT refused at once, any other bounded to a share of the lookup), and
``_kad_dht_class``'s routing table admission (only peers that serve the DHT protocol).

What a record reveals, and why fetched chunks are only taken from ``cache.trust``: see
docs/security.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from edgelink.config import Config, config_list
from edgelink.errors import ConfigError, PeerGone, TransportError, Unreachable
from edgelink.transport.circuit import CIRCUIT
from edgelink.transport.p2p import client_host

if TYPE_CHECKING:
    from edgelink.transport.p2p import P2PHost

log = logging.getLogger("edgelink.net.dht")

# The pinned kad_dht drops a peer's ADD_PROVIDER messages past 10 in a fixed 10 s window
# (KadDHT._provider_rate_max / _provider_rate_window); announcements stay under that.
_RATE_WINDOW_S = 10.0
_RATE_MAX = 10
_DHT_TAG = b"edgelink-cache-dht/1\0"
# The py-libp2p whose kad_dht internals _KadHost and _kad_dht_class were written against
# (pyproject.toml pins it exactly); another version logs a warning once.
_PINNED_LIBP2P = "0.8.1"
_MAX_PROBES = 32  # server-mode checks of peers that opened a DHT stream, at once


def dht_key(chunk_key: str) -> str:
    """The DHT key a chunk is announced under: a sha2-256 multihash of the (tagged) chunk key.
    Other implementations read a provider key as a CID and drop anything else (js-libp2p's
    kad-dht refuses a bare blake3 digest), so the key has the one shape they all accept."""
    return "1220" + hashlib.sha256(_DHT_TAG + bytes.fromhex(chunk_key)).hexdigest()


def peer_key(peer_id: str) -> str:
    """The key a DHT node announces itself under (hex, like a chunk key), so that a bare
    ``/p2p/ID`` is found through the DHT: its provider record carries the node's addresses,
    circuits included, which a DHT client behind NAT has no other way to publish (it is in no
    routing table, so a peer lookup cannot find it)."""
    return hashlib.sha256(_PEER_TAG + peer_id.encode("ascii")).hexdigest()


_PEER_TAG = b"edgelink-peer/1\0"


@dataclasses.dataclass(frozen=True)
class Provider:
    peer_id: str
    addrs: tuple[str, ...]  # dialable multiaddrs, each ending in /p2p/<peer id>, in the order to try


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
    an IP of at least ``min_scope``, or a circuit through a relay at such an address:
    ``/ip4/R/tcp/P/p2p/RELAY/p2p-circuit``); None for anything else a record may carry."""
    relay, sep, dest = addr.partition(CIRCUIT)
    if sep:
        if dest not in ("", f"/p2p/{peer_id}"):
            return None
        parts = relay.split("/")
        if len(parts) != 7 or parts[5] != "p2p" or parts[6] == peer_id or not _is_peer_id(parts[6]):
            return None
        base = _tcp_base(parts[:5], min_scope)
        return None if base is None else f"{base}/p2p/{parts[6]}{CIRCUIT}/p2p/{peer_id}"
    parts = addr.split("/")
    base = _tcp_base(parts[:5], min_scope)
    if base is None:
        return None
    rest = parts[5:]
    if rest and rest != ["p2p", peer_id]:
        return None
    return f"{base}/p2p/{peer_id}"


def _tcp_base(parts: list[str], min_scope: int) -> str | None:
    """``/ip4/H/tcp/P`` (or ip6) from its split parts, if dialable at ``min_scope``."""
    if len(parts) < 5 or parts[0] != "" or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
        return None
    scope = addr_scope("/".join(parts))
    port = parts[4]
    if scope is None or scope < min_scope or not (port.isascii() and port.isdigit() and len(port) <= 5) \
            or not 0 < int(port) < 65536:
        return None
    return "/".join(parts)


def _is_peer_id(text: str) -> bool:
    """Whether ``text`` is a base58 libp2p peer id (a relay named inside a record)."""
    if not 8 <= len(text) <= 128 or not text.isascii() or not text.isalnum():
        return False
    try:
        import multihash
        from libp2p.peer.id import ID

        peer = ID.from_base58(text)
        multihash.decode(peer.to_bytes())  # base58 alone is any string of its alphabet
        return peer.to_base58() == text
    except Exception:  # noqa: BLE001 - a record is a peer's word
        return False


def _check_pinned_libp2p() -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("libp2p")
    except PackageNotFoundError:  # pragma: no cover - a source checkout of libp2p
        found = "unknown"
    if found != _PINNED_LIBP2P:
        log.warning("dht: py-libp2p is %s, not %s: edgelink/net/dht.py adapts the pinned kad_dht's "
                    "internals (routing table admission, its host); check them against this version",
                    found, _PINNED_LIBP2P)


_check_once = threading.Lock()
_checked: list[bool] = []


class _KadHost:
    """The libp2p host as the pinned kad_dht sees it (it touches its host only through
    ``get_addrs``, ``new_stream``, ``get_peerstore``, ``get_id``, ``get_connected_peers``,
    ``set_stream_handler``, ``remove_stream_handler``, ``get_private_key`` and ``ping``; the
    rest passes through unchanged):

    - ``get_addrs`` adds this host's circuit addresses (its reservations) to its listen
      addresses: they go into its provider records and its signed peer record. (py-libp2p's own
      ``addrs_factory`` cannot carry them: it cuts an address at its first ``/p2p/``.)
    - ``new_stream`` refuses at once a peer that cannot serve the DHT: one whose identify says it
      does not speak the DHT protocol (a client, a relay), or one not connected that announces a
      circuit address (it is behind NAT, so a client; the swarm dials no circuit, and its other
      addresses are its private network's, where a dial from elsewhere waits for nothing). A lookup of the pinned kad_dht waits for every peer of a batch, and its
      fallback when the routing table is small queries every peer in the peerstore; without
      this a peer met once in a record would hold every later lookup to its timeout.
    - any other stream has ``per_peer_s`` to open and to be read and written, a share of the
      lookup's ``cache.dht_timeout_s`` (the pinned QUERY_TIMEOUT is 10 s a peer, as long as a
      whole lookup), so one silent peer costs a lookup a part of its time, not all of it.
    """

    def __init__(self, p2p: P2PHost, per_peer_s: float):
        self._p2p = p2p
        self._host = p2p.libp2p_host
        self.per_peer_s = per_peer_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host, name)

    def get_addrs(self) -> list:
        import multiaddr

        addrs = list(self._host.get_addrs())
        seen = {str(a) for a in addrs}
        for a in list(self._p2p.circuits.reserved.values()):
            if a not in seen:
                seen.add(a)
                addrs.append(multiaddr.Multiaddr(a))
        return addrs

    def cannot_serve(self, peer_id: Any) -> str | None:
        """Why ``peer_id`` cannot answer a DHT query (None: it may)."""
        if serves_kad(self._host, peer_id) is False:
            return "it does not serve the DHT protocol (a DHT client)"
        if self._host.get_network().get_connections(peer_id):
            return None
        try:
            addrs = [str(a) for a in self._host.get_peerstore().addrs(peer_id)]
        except Exception:  # noqa: BLE001 - a peer the peerstore does not know
            addrs = []
        if any(CIRCUIT in a for a in addrs):
            # it announces a circuit: it is behind NAT, so a DHT client (here, and in go-libp2p's
            # AutoNAT rule); its other addresses are its LAN's, where a dial waits for nothing
            return "it is reachable through a relay (behind NAT: a DHT client)"
        return None

    async def new_stream(self, peer_id: Any, protocols: Sequence[Any]) -> Any:
        import trio

        why = self.cannot_serve(peer_id)
        if why is not None:
            raise Unreachable(f"dht: {peer_id} is not queried: {why}")
        deadline = trio.current_time() + self.per_peer_s
        with trio.fail_after(self.per_peer_s):
            stream = await self._host.new_stream(peer_id, protocols)
        return _BoundedStream(stream, deadline)


class _BoundedStream:
    """A DHT stream whose reads and writes end at one deadline (``trio.TooSlowError`` then,
    which the pinned kad_dht counts as a failed peer)."""

    def __init__(self, stream: Any, deadline: float):
        self._stream = stream
        self._deadline = deadline

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def read(self, n: int | None = None) -> bytes:
        import trio

        with trio.fail_after(max(0.0, self._deadline - trio.current_time())):
            return await self._stream.read(n)

    async def write(self, data: bytes) -> None:
        import trio

        with trio.fail_after(max(0.0, self._deadline - trio.current_time())):
            await self._stream.write(data)


def serves_kad(host: Any, peer_id: Any) -> bool | None:
    """Whether ``peer_id`` serves the DHT protocol, as its identify told ``host`` (None: not
    known yet)."""
    from libp2p.kad_dht.common import PROTOCOL_ID

    try:
        protocols = host.get_peerstore().get_protocols(peer_id)
    except Exception:  # noqa: BLE001 - PeerStoreError: never heard of
        return None
    if not protocols:
        return None
    return str(PROTOCOL_ID) in [str(p) for p in protocols]


def _kad_dht_class():
    """py-libp2p's KadDHT with its routing table kept to DHT servers.

    The libp2p Kademlia spec: a node adds another to its routing table if and only if that node
    operates in server mode. The pinned stream handler adds every peer that opens a DHT stream,
    unchecked ("a peer that opens a KAD stream must be a server"), but clients open them too: a
    node behind NAT that announced or looked something up through a public member ended up in
    that member's table, the member then named it to every asker as a closer peer, and every
    asker's lookups waited on a peer they could not dial. Here that call admits a peer only
    when its identify lists the DHT protocol, or, when identify has not told yet, when a DHT
    stream to it opens (checked in the background, so the query is answered meanwhile)."""
    from libp2p.kad_dht.common import PROTOCOL_ID
    from libp2p.kad_dht.kad_dht import KadDHT

    class EdgelinkKadDHT(KadDHT):
        def __init__(self, host: _KadHost, mode: Any, nursery: Any):
            super().__init__(host, mode)
            self._nursery = nursery
            self._probing: set[Any] = set()

        async def add_peer(self, peer_id: Any, *, skip_server_mode_check: bool = False) -> bool:
            table = self.routing_table
            if table.peer_in_table(peer_id):
                return await table.add_peer(peer_id, skip_server_mode_check=True)  # seen again
            served = serves_kad(self.host, peer_id)
            if served:
                return await table.add_peer(peer_id, skip_server_mode_check=True)
            if served is None and peer_id not in self._probing and len(self._probing) < _MAX_PROBES:
                self._probing.add(peer_id)
                self._nursery.start_soon(self._probe, peer_id)
            return False

        async def _probe(self, peer_id: Any) -> None:
            import trio

            try:
                with trio.move_on_after(self.host.per_peer_s):
                    stream = await self.host.new_stream(peer_id, [PROTOCOL_ID])
                    with contextlib.suppress(Exception):
                        await stream.close()
                    await self.routing_table.add_peer(peer_id, skip_server_mode_check=True)
            except Exception as exc:  # noqa: BLE001 - not a server (or gone): stays out of the table
                log.debug("dht: %s stays out of the routing table: %s", peer_id, exc)
            finally:
                self._probing.discard(peer_id)

    return EdgelinkKadDHT


class CacheDht:
    """One host's membership in the cache DHT: ``server`` (a node: answers DHT queries, stores
    records, announces its chunks) or client (an asker, or a node behind NAT: looks up and
    announces, serves no DHT protocol and stays out of every routing table).

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

        with _check_once:
            if not _checked:
                _checked.append(True)
                _check_pinned_libp2p()

        async def start():
            from libp2p.kad_dht.common import PROTOCOL_ID
            from libp2p.kad_dht.kad_dht import DHTMode
            from libp2p.tools.anyio_service import background_trio_service

            c = self.cfg
            per_peer = max(0.5, min(c.p2p.connect_timeout_s, c.cache.dht_timeout_s / 3))
            dht = _kad_dht_class()(_KadHost(self.host, per_peer),
                                   DHTMode.SERVER if self.server else DHTMode.CLIENT, self.host.nursery)
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
                    # a member named in cache.bootstrap is a server by configuration
                    await self._dht.routing_table.add_peer(info.peer_id, skip_server_mode_check=True)
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
        itself meanwhile, a server does)."""
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
        # a holder that announces a circuit is behind NAT: its circuits first, since its listen
        # addresses lead into its private network, where a dial from elsewhere waits out
        # p2p.connect_timeout_s (from its own LAN the circuit works too, and hole punching then
        # takes the session direct)
        return [Provider(pid, tuple(sorted(a, key=lambda x: CIRCUIT not in x))) for pid, a in sorted(out.items())
                if a]

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

    def __init__(self, dht: CacheDht, store, on_event: Callable[[dict], None], *, first: Sequence[str] = ()):
        import queue

        self.dht = dht
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._stop = threading.Event()
        self._on_event = on_event
        for key in first:  # the node itself (peer_key), before its chunks
            self._queue.put(key)
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


def find_peer(cfg: Config, peer_id: str) -> list[str]:
    """Addresses for a bare ``/p2p/ID`` from its own DHT record (``peer_key``), circuits through
    relays first; [] when no member knows it. Only that peer's entries count: the dial then
    authenticates it, so another peer's record could only name a place where it is not."""
    found = client_dht(cfg).providers(peer_key(peer_id))
    return [a for p in found if p.peer_id == peer_id for a in p.addrs]
