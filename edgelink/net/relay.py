"""``edgelink relay``: a circuit relay (libp2p circuit relay v2) for peers behind NAT.

A node behind a home router reserves a slot here and stays connected; a client that cannot
dial the node dials ``/.../p2p/RELAY/p2p-circuit/p2p/NODE`` and this relay pumps the bytes
between the two streams. What it relays is the peers' own Noise session, and inside that
edgelink's end-to-end encryption: it learns the two peer ids, when and how many bytes, nothing
of the state (docs/security.md, "Relays").

The pump is ours, not py-libp2p 0.8.1's (measured on loopback, /tmp reproduction in
docs/nat.md): its circuits are keyed by peer id, so a second circuit to the same node overwrote
the first one's entry and a circuit whose dialler left could keep a direction blocked reading
the node forever, holding its circuit slot (``relay.max_circuits``) until the relay restarted;
its duration cap was checked only when bytes arrived; and ``data = 0`` cut every circuit. Here
both directions of one circuit share one cancel scope and tear down exactly their own two
streams; the caps hold on idle circuits; 0 means no limit. Reservations check
``relay.allow_peers`` against the connection's authenticated peer id (the request's optional
peer field, which any peer can fill in, is not trusted).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from edgelink.config import Config
from edgelink.errors import ConfigError
from edgelink.transport.identity import Identity
from edgelink.transport.p2p import P2PHost
from edgelink.transport.reachability import PROTOCOL as DIALBACK
from edgelink.transport.reachability import DialBack

log = logging.getLogger(__name__)


def relay_limits(cfg: Config):
    """py-libp2p's ``RelayLimits`` from the ``relay`` settings (checked: nothing negative)."""
    from libp2p.relay.circuit_v2.resources import RelayLimits

    r = cfg.relay
    for key in ("max_reservations", "reservation_ttl_s", "max_circuits", "circuit_bytes", "circuit_duration_s"):
        if getattr(r, key) < 0:
            raise ConfigError(f"relay.{key} = {getattr(r, key)} is negative")
    if r.max_reservations == 0 or r.max_circuits == 0 or r.reservation_ttl_s == 0:
        raise ConfigError("relay.max_reservations, relay.max_circuits and relay.reservation_ttl_s must be above 0")
    # py-libp2p's holders refresh a reservation when it has less than this left, and sleep until
    # the next one is due (CircuitV2Transport._refresh_reservations_worker): with a lifetime at or
    # under it they sleep 0 s and re-reserve back to back
    from libp2p.relay.circuit_v2.transport import RESERVATION_REFRESH_MARGIN

    if r.reservation_ttl_s < 2 * RESERVATION_REFRESH_MARGIN:
        raise ConfigError(f"relay.reservation_ttl_s = {r.reservation_ttl_s:g} is too short: libp2p peers refresh a "
                          f"reservation {RESERVATION_REFRESH_MARGIN} s before it ends, so a lifetime under "
                          f"{2 * RESERVATION_REFRESH_MARGIN} s has them refreshing without pause")
    return RelayLimits(duration=int(r.circuit_duration_s), data=int(r.circuit_bytes),
                       max_circuit_conns=int(r.max_circuits), max_reservations=int(r.max_reservations),
                       reservation_ttl=int(r.reservation_ttl_s))


def _peer_set(text: str) -> frozenset[str]:
    return frozenset(p.strip() for p in text.split(",") if p.strip())


@dataclasses.dataclass
class _Circuit:
    """One circuit while it runs: its two directions' cancel scopes and what each peer read."""

    t0: float = dataclasses.field(default_factory=time.monotonic)
    scopes: list[Any] = dataclasses.field(default_factory=list)
    bytes_from: dict[str, int] = dataclasses.field(default_factory=dict)
    ended_by: str = "closed"

    def event(self) -> dict[str, Any]:
        """What the relay reports when the circuit is over (one JSON line of `edgelink relay`)."""
        by = self.bytes_from
        return {"event": "circuit", "peers": sorted(by), "bytes": sum(by.values()), "bytes_from": dict(by),
                "seconds": round(time.monotonic() - self.t0, 3), "ended_by": self.ended_by}


def hop_protocol(cfg: Config, on_event: Callable[[dict[str, Any]], None]):
    """A factory: libp2p host -> the relay's HOP service (see the module docstring)."""
    from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol

    limits = relay_limits(cfg)
    allow = _peer_set(cfg.relay.allow_peers)

    class Hop(CircuitV2Protocol):
        def __init__(self, host):
            super().__init__(host, limits=limits, allow_hop=True)
            self._circuits: dict[frozenset[int], _Circuit] = {}
            self._ended: dict[frozenset[int], dict[str, Any]] = {}

        async def _handle_connect(self, stream, msg) -> None:
            try:
                await super()._handle_connect(stream, msg)
            finally:
                _report_ended(self._ended, stream, on_event)

        async def _handle_reserve(self, stream, msg) -> None:
            peer = stream.muxed_conn.peer_id
            refused = _reservation_refusal(peer, msg, allow)
            if refused is not None:
                on_event({"event": "reservation", "peer": peer.to_base58(), "ok": False, "reason": refused})
                await self._refuse_reservation(stream)
                return
            await super()._handle_reserve(stream, msg)
            ok = self.resource_manager.has_reservation(peer)
            on_event({"event": "reservation", "peer": peer.to_base58(), "ok": ok,
                      **({} if ok else {"reason": "relay.max_reservations reached"})})

        async def _refuse_reservation(self, stream) -> None:
            await _refuse_reservation(stream)

        async def _relay_data(self, src_stream, dst_stream, peer_id, deadline=None, circuit_data_limit=None):
            await _relay_data(self, src_stream, dst_stream, peer_id, deadline, circuit_data_limit)

    return Hop


def _report_ended(ended: dict[frozenset[int], dict[str, Any]], stream: Any,
                  on_event: Callable[[dict[str, Any]], None]) -> None:
    """Report the circuits of ``stream`` that ended, once super() has released their slot."""
    # a circuit is reported once super() has released its slot on the reservation:
    # whoever sees the event may open the next circuit at once (reported earlier, a
    # client that did so was refused NO_RESERVATION while the slot was still held)
    for key in [k for k in ended if id(stream) in k]:
        on_event(ended.pop(key))


def _reservation_refusal(peer: Any, msg: Any, allow: frozenset[str]) -> str | None:
    """Why a reservation is refused (None: it is not): judged on the connection's peer id."""
    claimed = msg.peer.id if msg.HasField("peer") else b""
    if allow and peer.to_base58() not in allow:
        return "not on relay.allow_peers"
    if claimed and claimed != peer.to_bytes():
        return "asked for a slot in another peer's name"
    return None


async def _refuse_reservation(stream: Any) -> None:
    """Answer PERMISSION_DENIED and reset the stream; a peer that already left is no error."""
    from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
    from libp2p.relay.circuit_v2.protocol import (
        StatusCode,
        to_proto_status,
        write_delimited_msg,
    )

    with contextlib.suppress(Exception):
        await write_delimited_msg(stream, HopMessage(type=HopMessage.STATUS,
                                                     status=to_proto_status(StatusCode.PERMISSION_DENIED)))
    with contextlib.suppress(Exception):
        await stream.reset()


async def _relay_data(hop: Any, src_stream: Any, dst_stream: Any, peer_id: Any, deadline: float | None,
                      circuit_data_limit: list[int] | None) -> None:
    """One direction of a circuit; both directions share the circuit's entry (keyed by the two streams)."""
    import trio

    key = frozenset((id(src_stream), id(dst_stream)))
    circuit = hop._circuits.setdefault(key, _Circuit())
    reader = peer_id.to_base58()
    circuit.bytes_from.setdefault(reader, 0)
    scope = trio.CancelScope()
    circuit.scopes.append(scope)
    try:
        with scope:
            await _pump(hop, src_stream, dst_stream, circuit, reader, deadline, circuit_data_limit)
    except Exception as exc:  # noqa: BLE001 - a reset or closed stream ends the circuit
        name = type(exc).__name__
        if circuit.ended_by == "closed" and "EOF" not in name:
            circuit.ended_by = name
    finally:
        await _end_direction(hop, key, circuit, scope, src_stream, dst_stream)


async def _pump(hop: Any, src_stream: Any, dst_stream: Any, circuit: _Circuit, reader: str,
                deadline: float | None, circuit_data_limit: list[int] | None) -> None:
    """Copy until EOF or a cap; the duration cap holds on an idle circuit (the read times out)."""
    import trio
    from libp2p.tools.constants import MAX_READ_LEN

    while True:
        left = math.inf if deadline is None else deadline - time.monotonic()
        data = None
        with trio.move_on_after(max(0.0, left)):
            data = await src_stream.read(MAX_READ_LEN)
        if data is None:
            circuit.ended_by = "relay.circuit_duration_s"
            return
        if not data:
            return
        if circuit_data_limit is not None:
            if len(data) > circuit_data_limit[0]:
                circuit.ended_by = "relay.circuit_bytes"
                return
            circuit_data_limit[0] -= len(data)
        with trio.fail_after(hop.write_timeout):
            await dst_stream.write(data)
        circuit.bytes_from[reader] += len(data)


async def _end_direction(hop: Any, key: frozenset[int], circuit: _Circuit, scope: Any,
                         src_stream: Any, dst_stream: Any) -> None:
    """Tear down exactly this circuit's two streams; the last direction out records its event."""
    # one direction over: the other, blocked in a read, is cancelled (a local reset
    # does not wake a read on a yamux stream)
    for other in circuit.scopes:
        other.cancel()
    circuit.scopes.remove(scope)
    last = not circuit.scopes  # decided before any await: the other may finish first
    for st in (src_stream, dst_stream):
        with contextlib.suppress(Exception):
            await st.reset()
    for k, pair in list(hop._active_relays.items()):
        if src_stream in pair or dst_stream in pair:
            del hop._active_relays[k]
    if last:
        hop._circuits.pop(key, None)
        hop._ended[key] = circuit.event()


class Relay:
    """A running relay: a libp2p host with the HOP service; ``events`` counts what it relayed."""

    def __init__(self, cfg: Config, identity: Identity, listen: list[str],
                 on_event: Callable[[dict[str, Any]], None] | None = None):
        self._lock = threading.Lock()
        self.totals = {"reservations": 0, "circuits": 0, "bytes": 0}
        self._on_event = on_event
        if cfg.relay.dialback_timeout_s < 0:
            raise ConfigError(f"relay.dialback_timeout_s = {cfg.relay.dialback_timeout_s:g} is negative (0: no checks)")
        self.host = P2PHost(cfg, identity, listen=listen, services=(hop_protocol(cfg, self._event),))
        # reachability checks for the peers that may reserve (transport/reachability.py)
        self.dialback: DialBack | None = None
        if cfg.relay.dialback_timeout_s > 0:
            allow = _peer_set(cfg.relay.allow_peers)
            self.dialback = DialBack(cfg.relay.dialback_timeout_s, lambda peer: not allow or peer in allow)
            self.host.serve(DIALBACK, self.dialback.handle)

    def _event(self, ev: dict[str, Any]) -> None:
        with self._lock:
            if ev["event"] == "reservation" and ev["ok"]:
                self.totals["reservations"] += 1
            elif ev["event"] == "circuit":
                self.totals["circuits"] += 1
                self.totals["bytes"] += ev["bytes"]
        log.info("relay: %s", ev)
        if self._on_event is not None:
            self._on_event(ev)

    @property
    def addrs(self) -> list[str]:
        return self.host.addrs

    @property
    def peer_id(self) -> str:
        return self.host.peer_id

    def run(self, stop: threading.Event | None = None, *, handle_signals: bool = False) -> None:
        """Relay until ``stop`` is set, or with ``handle_signals`` (a command's choice, from
        the main thread) until SIGINT/SIGTERM."""
        import signal

        stop = stop or threading.Event()
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(0.2):
            pass
        self.close()

    def close(self) -> None:
        self.host.close()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
