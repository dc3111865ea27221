"""`edgelink node`: a long-running peer that accepts handoffs over libp2p.

Per incoming session (each in its own thread, on its own yamux stream):

0. a stream from a peer id that is not on ``node.allow_peers`` is reset before a byte of it is
   read, as is one past the caps on streams that have not authenticated (``node.max_pending``
   in all, ``node.max_pending_per_ip`` from one address);
1. the transport runs the end-to-end key exchange (the peer proves its peer id);
2. the client's HELLO is read (at most ``protocol.max_handshake_bytes``) and the bearer tokens
   are checked, before any model work, all within one absolute deadline from the stream's
   opening (``p2p.handshake_timeout_s``); a first frame that is not a valid HELLO, or a wrong
   token, is a typed REJECT (code ``auth``, ``protocol``, ...) and takes no slot;
3. a free runtime slot is taken (``node.max_clients`` llama.cpp contexts over one mmapped
   weights file), or the client gets REJECT ``busy``;
4. ``Receiver.serve_channel`` runs the session: verify, import, continue, answer.

Per-peer token buckets slow a peer that sends too many messages or bytes per second (its
reads wait; other peers' sessions run on), and cap the size a peer may declare. SIGINT/SIGTERM
stop new sessions, let running ones finish for ``node.shutdown_grace_s``, then cut the rest at
a frame boundary of the transport: an apply is never interrupted, and a refused or cut message
leaves the runtime exactly as it was (the appliers restore it on any failure).
"""

from __future__ import annotations

import collections
import dataclasses
import hmac
import ipaddress
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgelink.cache.prefix import PrefixCache
from edgelink.config import Config, config_list
from edgelink.errors import (
    AuthError,
    BusyError,
    ConfigError,
    EdgelinkError,
    ProtocolError,
    TransportError,
)
from edgelink.net.dht import Announcer, CacheDht, dht_enabled, peer_key
from edgelink.protocol import codec
from edgelink.protocol.messages import Hello
from edgelink.protocol.session import Role, Session
from edgelink.roles.receiver import Receiver, frame_limit, hello_frame_limit
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.signature import model_signature
from edgelink.runtime.sizing import fit_limits, kv_bytes_per_token
from edgelink.transport.framing import Scatter
from edgelink.transport.identity import Identity, load_identity
from edgelink.transport.p2p import P2PHost
from edgelink.transport.reachability import REACHABILITY, Reachability

log = logging.getLogger("edgelink.net.node")
# Peers whose rate limiters a node remembers (least recently seen forgotten first).
LIMITERS_KEPT = 4096


class TokenBucket:
    """A classic token bucket; ``take(n)`` sleeps until ``n`` tokens are there."""

    def __init__(self, rate: float, burst: float, clock=time.monotonic, sleep=time.sleep):
        self.rate = float(rate)
        self.burst = float(max(burst, 1))
        self._tokens = self.burst
        self._t = clock()
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self.waited_s = 0.0

    def take(self, n: float) -> float:
        """Take ``n`` tokens (a request larger than the burst is allowed to go into debt)."""
        if self.rate <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate)
            self._t = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self.waited_s += wait
            self._sleep(wait)
        return wait


class PeerLimiter:
    """What one peer may do, shared by all of its sessions."""

    def __init__(self, cfg: Config):
        n = cfg.node
        self.messages = TokenBucket(n.messages_per_s, n.messages_burst)
        self.bytes = TokenBucket(n.bytes_per_s, n.bytes_burst)

    def wait_message(self) -> None:
        self.messages.take(1)

    def wait_bytes(self, n: int) -> None:
        self.bytes.take(n)

    @property
    def throttled_s(self) -> float:
        return self.messages.waited_s + self.bytes.waited_s


class _Prefetched:
    """A channel whose first ``recv`` returns a frame that was already read (the HELLO the
    node checked), then reads from the real channel."""

    def __init__(self, ch, first):
        self._ch = ch
        self._first = first
        self.encryption = ch.encryption

    def send(self, *parts) -> None:
        self._ch.send(*parts)

    def recv(self, max_bytes: int, timeout: float | None = None):
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return self._ch.recv(max_bytes, timeout)

    def recv_into(self, sink, max_bytes: int, timeout: float | None = None) -> int:
        if self._first is not None:  # the prefetched HELLO, written into the sink
            first, self._first = self._first, None
            out = Scatter(sink, first.nbytes)
            out.write(first)
            return first.nbytes
        return self._ch.recv_into(sink, max_bytes, timeout)

    def close(self) -> None:
        self._ch.close()


def node_tokens(cfg: Config) -> tuple[str, ...]:
    """``node.tokens`` and the lines of ``node.token_file`` (blank and # lines skipped)."""
    tokens = config_list(cfg.node.tokens)
    if cfg.node.token_file:
        path = Path(cfg.node.token_file).expanduser()
        try:
            st = path.stat()
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read node.token_file {path}: {exc}") from None
        if st.st_mode & 0o077:
            log.warning("node.token_file %s is readable by other users (mode %o): chmod 600 it",
                        path, st.st_mode & 0o777)
        tokens += [t.strip() for t in text.splitlines() if t.strip() and not t.strip().startswith("#")]
        if not tokens:
            raise ConfigError(f"node.token_file {path} holds no token")
    return tuple(tokens)


def beyond_loopback(addr: str) -> bool:
    """Whether a listen multiaddr may be reached from another machine (a wildcard address is)."""
    parts = addr.split("/")
    if len(parts) < 3 or parts[1] not in ("ip4", "ip6", "dns", "dns4", "dns6"):
        return True
    if parts[1].startswith("dns"):
        return parts[2] != "localhost"
    try:
        return not ipaddress.ip_address(parts[2]).is_loopback
    except ValueError:
        return True


def check_exposure(listen: str, allowlist: bool, tokens: bool, cfg: Config) -> None:
    """Refuse to serve anyone who reaches a non-loopback address unless that is asked for."""
    relays = config_list(cfg.p2p.relays)
    if allowlist or tokens or cfg.node.open or not (beyond_loopback(listen) or relays):
        return
    if relays and not beyond_loopback(listen):
        listen = f"{listen} and through the relay at {relays[0]}"
    raise ConfigError(
        f"the node would listen on {listen} with neither node.allow_peers nor a token, so anyone "
        "who reaches that address could use its model and cache. Give --token-file FILE (or "
        "--token, node.tokens, EDGELINK_NODE_TOKENS), --allow-peer PEER_ID, or listen on "
        "/ip4/127.0.0.1/...; --open (node.open = on) serves anyone, on purpose")


class Node:
    """Serve sessions over libp2p, each in its own llama.cpp context of one model: one context
    at start, more as clients need them, up to ``node.max_clients``."""

    def __init__(self, model_path: str | Path, cfg: Config, *, listen: str | None = None,
                 identity: Identity | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None,
                 bridge: Any = None):
        """``bridge``: an ``edgelink.bridge.Bridge`` for this model as its target; every slot
        then also accepts sessions bridged from the bridge's source model."""

        self.cfg = cfg
        use_dht = dht_enabled(cfg)
        self.identity = identity or load_identity(cfg.p2p.identity_key)
        self.on_event = on_event or (lambda e: None)
        self.allow_peers = frozenset(config_list(cfg.node.allow_peers))
        self.tokens = node_tokens(cfg)
        check_exposure(listen or cfg.p2p.listen, bool(self.allow_peers), bool(self.tokens), cfg)
        # Slot 0 now (the signature and the limits come from it); the other slots' contexts
        # are created when a client first needs one: llama.cpp commits a context's whole KV
        # cache when it creates it, so N idle contexts would hold N full caches.
        self._model_path = model_path
        self._bridge = bridge
        self.max_slots = max(1, cfg.node.max_clients)
        self._creating = 0
        self._runtimes = [LlamaRuntime(model_path, cfg)]
        try:
            self.signature = model_signature(self._runtimes[0], cfg)
            # Limits derived from the model (0 settings); a node's peers get the smaller of its
            # two limits, announced in its HELLO so a sender refuses before any bytes move.
            self.cfg = cfg = fit_limits(cfg, self._runtimes[0])
            self._serving = cfg.replace(protocol_max_message_bytes=min(cfg.protocol.max_message_bytes,
                                                                       cfg.node.max_message_bytes))
            # One prefix cache for every slot (cache.share): its chunks are what the DHT announces.
            self._cache = PrefixCache(cfg) if cfg.cache.share else None
            self._receivers = [Receiver(self._runtimes[0], self._serving, self.signature, bridge=bridge,
                                        prefix_cache=self._cache)]
            self.kv_bytes_per_context = self._runtimes[0].n_ctx * kv_bytes_per_token(self._runtimes[0])
        except BaseException:
            self._runtimes[0].close()
            raise
        self._free = list(range(len(self._receivers)))
        self._lock = threading.Lock()
        self._limiters: collections.OrderedDict[str, PeerLimiter] = collections.OrderedDict()
        self._refused = 0
        self._refusals_reported = 0
        self._refusal_budget = 100.0
        self._refusal_t = time.monotonic()
        self._active: dict[int, Any] = {}  # session number -> channel
        self._count = 0
        self._stopping = threading.Event()
        self._stopped = threading.Event()

        self.host = P2PHost(cfg, self.identity, listen=[listen or cfg.p2p.listen],
                            on_channel=self._session, admit=self._admit)
        # Behind NAT: a slot on each relay (p2p.relays, `--via`), and the circuit address it gives
        self.circuit_addrs: list[str] = []
        self.reachability: Reachability | None = None
        self.public_addrs: list[str] = []  # where the relay reached this node from outside
        t0 = time.perf_counter()
        try:
            relays = config_list(cfg.p2p.relays)
            if relays and self._behind_nat(relays[0]):
                for relay in relays:
                    self.circuit_addrs.append(self.host.reserve(relay))
            self.reserve_s = time.perf_counter() - t0  # to a reachable circuit address, all relays
        except BaseException:
            self.host.close()
            for rt in self._runtimes:
                rt.close()
            raise
        self.dht: CacheDht | None = None
        self._announcer: Announcer | None = None
        if use_dht:
            try:
                # behind NAT (a relay reservation): a DHT client, announcing its circuit addresses;
                # no one could dial it to query it, so it must stay out of routing tables
                self.dht = CacheDht(self.host, cfg, server=not self.circuit_addrs, admit=self._may_query)
            except BaseException:
                self.host.close()
                for rt in self._runtimes:
                    rt.close()
                raise

    def _behind_nat(self, relay: str) -> bool:
        """Whether to reserve relay slots (``p2p.reachability``): auto asks ``relay`` to dial
        this node's ports back (transport/reachability.py) and reserves unless one answered;
        a relay that cannot tell (no check offered, refused, unreachable) means reserve."""
        mode = self.cfg.p2p.reachability
        if mode not in REACHABILITY:
            raise ConfigError(f"p2p.reachability is {mode!r}: one of {', '.join(REACHABILITY)}")
        if mode != "auto":
            return mode == "private"
        try:
            self.reachability = self.host.check_reachability(relay, self.cfg.p2p.connect_timeout_s)
        except EdgelinkError as exc:
            log.warning("%s; reserving a relay slot anyway", exc)
            return True
        log.info("this node is %s", self.reachability.describe())
        if not self.reachability.public:
            return True
        own = set(self.host.addrs)
        self.public_addrs = [a for a in self.reachability.addrs(self.identity.peer_id_str) if a not in own]
        return False

    # ------------------------------------------------------------------ sessions

    @property
    def addrs(self) -> list[str]:
        """Where clients dial this node: its listen addresses, the addresses a relay reached it
        at from outside (a forwarded port), then its circuit addresses."""
        return self.host.addrs + self.public_addrs + self.circuit_addrs

    def _admit(self, peer: str, ip: str | None) -> bool:
        """Runs in the trio thread for every new stream, before any of it is read: the
        allowlist, and caps on what peers that have not authenticated may hold, so that a
        flood of streams (or of peer ids, which are free) costs bounded threads and memory.
        A refused stream is reset, not answered."""
        host = getattr(self, "host", None)
        if host is None:
            return False
        n = self.cfg.node
        reason = None
        if self.allow_peers and peer not in self.allow_peers:
            reason = "not on node.allow_peers"
        elif host.pending() >= n.max_pending:
            reason = f"{n.max_pending} streams already wait to authenticate (node.max_pending)"
        elif ip is not None and host.pending(ip) >= n.max_pending_per_ip:
            reason = f"{n.max_pending_per_ip} streams from {ip} already wait to authenticate (node.max_pending_per_ip)"
        elif host.channel_count() - host.pending() >= 2 * self.max_slots + 4:
            reason = "too many sessions in progress"
        if reason is None:
            return True
        self._note_refusal(peer, ip, reason)
        return False

    def _note_refusal(self, peer: str, ip: str | None, reason: str) -> None:
        """An event (and a log line) per refused stream, within a budget: a flood of refusals
        must not become a flood of output. What the budget drops is counted in the next one."""
        self._refused += 1
        now = time.monotonic()
        self._refusal_budget = min(100.0, self._refusal_budget + (now - self._refusal_t) * 10.0)
        self._refusal_t = now
        if self._refusal_budget < 1:
            return
        self._refusal_budget -= 1
        dropped = self._refused - 1 - self._refusals_reported
        self._refusals_reported = self._refused
        log.warning("refused a stream from %s (%s): %s", peer, ip, reason)
        self._emit({"event": "refused", "peer": peer, "ip": ip, "reason": reason,
                    "refused_total": self._refused, "not_reported": max(0, dropped)})

    def _may_query(self, peer: str) -> bool:
        """Who may use this node's DHT protocol: the peers its allowlist admits."""
        return not self.allow_peers or peer in self.allow_peers

    def _limiter(self, peer: str) -> PeerLimiter:
        """The peer's rate limits (made after it authenticated); the least recently seen are
        forgotten past ``LIMITERS_KEPT`` peers, so peer ids, which are free, cost bounded memory."""
        with self._lock:
            lim = self._limiters.get(peer)
            if lim is None:
                lim = self._limiters[peer] = PeerLimiter(self.cfg)
                while len(self._limiters) > LIMITERS_KEPT:
                    self._limiters.popitem(last=False)
            else:
                self._limiters.move_to_end(peer)
            return lim

    def _refuse(self, ch, hello: Hello | None, exc: EdgelinkError, event: dict[str, Any]) -> None:
        session = Session(Role.SERVER, self.signature, self.cfg.protocol,
                          session_id=hello.session_id if hello else None)
        log.warning("refused %s from peer %s: %s", exc.code, ch.remote_peer_id, exc)
        event.update(rejected=[exc.code], ended_by=exc.code, detail=str(exc))
        try:
            ch.send(session.reject(0, exc))
        except EdgelinkError:
            pass

    def _check_auth(self, peer: str, hello: Hello) -> None:
        if self.allow_peers and peer not in self.allow_peers:
            raise AuthError(f"peer {peer} is not on this node's allowlist")
        if self.tokens:
            given = hello.auth.get("token") if isinstance(hello.auth, dict) else None
            if not isinstance(given, str) or not given:
                raise AuthError("this node requires a bearer token")
            ok = False
            for tok in self.tokens:  # compare with every token, in constant time each
                ok |= hmac.compare_digest(tok.encode(), given.encode())
            if not ok:
                raise AuthError("wrong bearer token")

    def _session(self, ch) -> None:
        """One session, in its own thread (called by the host after the key exchange)."""
        peer = ch.remote_peer_id
        with self._lock:
            self._count += 1
            number = self._count
            self._active[number] = ch
        t0 = time.perf_counter()
        event: dict[str, Any] = {"event": "session", "session": number, "peer": peer, "slot": None,
                                 "applied": 0, "rejected": [], "generated": 0, "bytes_in": 0,
                                 "ended_by": ""}
        slot = None
        limiter = None
        try:
            # Before auth: one small frame, within the deadline the host set at the stream's
            # opening; no limiter, slot, context or prefill for a peer that has not passed.
            try:
                first = ch.recv(hello_frame_limit(self.cfg), timeout=self.cfg.p2p.handshake_timeout_s)
            except (TransportError, ProtocolError) as exc:
                log.warning("session %d with %s ended before its HELLO: %s", number, peer, exc)
                event.update(ended_by=exc.code, detail=str(exc))
                return
            try:
                hello = codec.decode_frame(first, self.cfg.protocol)
            except ProtocolError as exc:
                self._refuse(ch, None, exc, event)
                return
            if not isinstance(hello, Hello):
                self._refuse(ch, None, ProtocolError(
                    f"the first frame must be a HELLO, not {type(hello).__name__}"), event)
                return
            try:
                self._check_auth(peer, hello)
            except AuthError as exc:
                self._refuse(ch, hello, exc, event)
                return
            self.host.authenticated(ch)
            limiter = self._limiter(peer)
            ch.limiter = limiter
            ch.max_frame = frame_limit(self._receivers[0].cfg)
            if self._stopping.is_set():
                self._refuse(ch, hello, BusyError("node is shutting down"), event)
                return
            slot = self._take_slot()
            if slot is None:
                self._refuse(ch, hello, BusyError(
                    f"node is serving its maximum of {self.max_slots} clients (node.max_clients)"), event)
                return
            event["slot"] = slot
            report = self._receivers[slot].serve_channel(_Prefetched(ch, first))
            event.update(dataclasses.asdict(report))
            event["throttled_s"] = round(limiter.throttled_s, 3) if limiter else 0.0
        finally:
            event["seconds"] = round(time.perf_counter() - t0, 4)
            event["bytes_in"] = max(event.get("bytes_in", 0), ch.bytes_in)
            self._emit(event)  # before the slot is released: shutdown waits for that
            with self._lock:
                if slot is not None:
                    self._free.append(slot)
                    self._free.sort()
                self._active.pop(number, None)

    def _take_slot(self) -> int | None:
        """A free slot, or a new one while fewer than node.max_clients exist; None when full."""
        with self._lock:
            if self._free:
                return self._free.pop(0)
            if len(self._receivers) + self._creating >= self.max_slots:
                return None
            self._creating += 1
        try:
            rt = LlamaRuntime(self._model_path, self.cfg)
            try:
                receiver = Receiver(rt, self._serving, self.signature, bridge=self._bridge,
                                    prefix_cache=self._cache)
            except BaseException:
                rt.close()
                raise
        except EdgelinkError as exc:
            log.error("could not create a context for another client: %s", exc)
            return None
        finally:
            with self._lock:
                self._creating -= 1
        with self._lock:
            self._runtimes.append(rt)
            self._receivers.append(receiver)
            log.info("created context %d of %d", len(self._receivers), self.max_slots)
            return len(self._receivers) - 1

    def memory_facts(self) -> dict[str, int]:
        """What this node's llama.cpp contexts take (each commits its whole KV cache)."""
        with self._lock:
            n = len(self._runtimes)
        return {"max_clients": self.max_slots, "contexts": n,
                "kv_bytes_per_context": self.kv_bytes_per_context,
                "kv_bytes_now": n * self.kv_bytes_per_context,
                "kv_bytes_at_max_clients": self.max_slots * self.kv_bytes_per_context}

    def _emit(self, event: dict[str, Any]) -> None:
        try:
            self.on_event(event)
        except Exception:  # noqa: BLE001
            log.exception("event callback failed")

    # ------------------------------------------------------------------ lifecycle

    def run(self, install_signals: bool = False) -> None:
        """Serve until ``stop()`` (and, with ``install_signals``, a command's choice, until
        SIGINT/SIGTERM), then shut down gracefully."""
        if install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: self._stopping.set())
        if self.dht is not None and self._announcer is None:
            # announcing starts here, after the caller's "ready": its events come after that one
            self._announcer = Announcer(self.dht, self._cache.store, self._emit,
                                        first=(peer_key(self.identity.peer_id_str),))
        while not self._stopping.wait(0.2):
            pass
        self.shutdown()

    def stop(self) -> None:
        self._stopping.set()

    def shutdown(self) -> None:
        """Refuse new sessions, let running ones finish for the grace period, cut the rest."""
        if self._stopped.is_set():
            return
        self._stopping.set()
        with self._lock:
            running = len(self._active)
        self._emit({"event": "stopping", "active_sessions": running,
                    "grace_s": self.cfg.node.shutdown_grace_s})
        deadline = time.monotonic() + self.cfg.node.shutdown_grace_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._active:
                    break
            time.sleep(0.05)
        with self._lock:
            left = list(self._active.values())
        for ch in left:
            log.warning("shutdown: cutting the session with %s", ch.remote_peer_id)
            ch.close()
        # Wait for cut sessions to release their runtime before closing it.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with self._lock:
                if len(self._free) == len(self._receivers) and not self._creating:
                    break
            time.sleep(0.05)
        if self._announcer is not None:
            self._announcer.close()
        if self.dht is not None:
            self.dht.close()
        self.host.close()
        for rt in self._runtimes:
            rt.close()
        self._stopped.set()
