"""Reaching peers behind NAT: libp2p circuit relay v2, from the two ends of a circuit.

A node that no one can dial (a laptop behind a home router) keeps a connection to a relay and
a *reservation* on it; a client dials ``/ip4/R/tcp/P/p2p/RELAY/p2p-circuit/p2p/NODE``, the
relay opens a stream to the node and pumps bytes between the two. The libp2p connection
(Noise, yamux) runs end to end over that pump, and edgelink's own end-to-end layer over it, so
the relay sees only ciphertext. This module is the peers' side; the relay itself is
``edgelink.net.relay``.

What py-libp2p 0.8.1 does not do for us, measured: ``host.connect`` refuses circuit addresses
(the swarm drops them), so a dial goes through ``CircuitV2Transport.dial``; a reservation lasts
only while the connection to the relay does; a relayed connection that dies is not redialled.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

from edgelink.errors import TransportError

if TYPE_CHECKING:
    from edgelink.transport.p2p import P2PHost

log = logging.getLogger(__name__)

CIRCUIT = "/p2p-circuit"


def is_circuit(addr: str) -> bool:
    return f"{CIRCUIT}/p2p/" in addr


def split_circuit(addr: str) -> tuple[str, str]:
    """``(relay address with its /p2p/ID, destination peer id)`` of a circuit address."""
    relay, sep, dest = addr.partition(f"{CIRCUIT}/p2p/")
    if not sep or "/p2p/" not in relay or not dest or "/" in dest:
        raise TransportError(f"{addr!r} is not a circuit address (/ip4/H/tcp/P/p2p/RELAY/p2p-circuit/p2p/PEER)")
    return relay.rstrip("/"), dest


def circuit_addr(relay_addr: str, peer_id: str) -> str:
    return f"{relay_addr.rstrip('/')}{CIRCUIT}/p2p/{peer_id}"


def is_relayed(muxed_conn: Any) -> bool:
    """Whether a libp2p connection runs through a relay (its transport address names a circuit)."""
    for conn in (muxed_conn, getattr(muxed_conn, "secured_conn", None)):
        try:
            if any(CIRCUIT in str(a) for a in conn.get_transport_addresses()):
                return True
        except Exception:  # noqa: BLE001 - a connection without addresses
            continue
    return False


async def run_service(service, *, task_status=None) -> None:
    """Run a py-libp2p ``Service`` until cancelled; started once its handlers are set."""
    import trio
    from libp2p.tools.anyio_service import background_trio_service

    async with background_trio_service(service):
        started = getattr(service, "event_started", None)
        if started is not None:
            await started.wait()
        if task_status is not None:
            task_status.started()
        await trio.sleep_forever()


class Circuits:
    """Circuit relay v2 for one ``P2PHost``: its STOP handler (a relayed connection may arrive),
    its reservations on relays, and dials through relays. Everything here runs in the host's
    trio thread; ``P2PHost`` calls it."""

    def __init__(self, host: P2PHost):
        self._p2p = host
        self._proto = None
        self._transport = None
        self._dcutr = None
        self.reserved: dict[str, str] = {}  # relay address -> our circuit address through it

    async def start(self) -> None:
        """Register the STOP handler and make the transport (once)."""
        if self._transport is not None:
            return
        from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
        from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
        from libp2p.relay.circuit_v2.transport import CircuitV2Transport

        host = self._p2p.libp2p_host
        proto = CircuitV2Protocol(host, allow_hop=False)  # its STOP handler: circuits to us
        # Two transports over one protocol: one that reserves (CLIENT), one that only dials (a
        # CLIENT transport reserves a slot for the dialler itself before each dial)
        self._reserver = CircuitV2Transport(host, proto, RelayConfig(roles=RelayRole.STOP | RelayRole.CLIENT))
        self._transport = CircuitV2Transport(host, proto, RelayConfig(roles=RelayRole.STOP))
        self._proto = proto
        await self._p2p.nursery.start(run_service, proto)

    async def reserve(self, relay_addr: str) -> str:
        """Connect to the relay at ``relay_addr``, reserve a slot (refreshed before it expires,
        for as long as this host runs), and return our circuit address through it."""
        import multiaddr
        from libp2p.peer.peerinfo import info_from_p2p_addr
        from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_ID

        await self.start()
        host = self._p2p.libp2p_host
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(relay_addr))
        except Exception as exc:  # noqa: BLE001
            raise TransportError(f"relay address {relay_addr!r} is not /ip4/H/tcp/P/p2p/ID: {exc}") from None
        await host.connect(info)  # a failure is P2PHost.reserve's to word
        stream = await host.new_stream(info.peer_id, [HOP_ID])
        try:
            ok = await self._reserver.reserve(stream, info.peer_id, self._p2p.nursery)
        finally:
            with contextlib.suppress(Exception):
                await stream.close()
        if not ok:
            raise TransportError(f"the relay at {relay_addr} refused a reservation (it holds its maximum, "
                                 "relay.max_reservations, or this peer is not on its relay.allow_peers)")
        addr = circuit_addr(relay_addr, self._p2p.peer_id)
        if self._p2p.cfg.p2p.hole_punch:
            await self.hole_puncher()  # answer the clients that try to go direct
        log.info("reserved a slot on %s; reachable at %s", relay_addr, addr)
        if relay_addr not in self.reserved:
            self._p2p.nursery.start_soon(self._keep, relay_addr, info.peer_id)
        self.reserved[relay_addr] = addr
        return addr

    async def _keep(self, relay_addr: str, relay_id) -> None:
        """A reservation lasts as long as the connection to the relay: when that is gone (the
        relay restarted, the network changed), reserve again, every ``p2p.reserve_retry_s``
        until it works. (py-libp2p refreshes a live reservation before it expires itself.)"""
        import trio

        every = max(0.5, self._p2p.cfg.p2p.reserve_retry_s)
        lost = False
        while True:
            await trio.sleep(every)
            if self._p2p.libp2p_host.get_network().get_connections(relay_id):
                continue
            if not lost:
                log.warning("lost the connection to the relay at %s; reserving again every %g s "
                            "(p2p.reserve_retry_s)", relay_addr, every)
                lost = True
            try:
                with trio.fail_after(self._p2p.cfg.p2p.connect_timeout_s):
                    await self.reserve(relay_addr)
                log.warning("reserved again on %s", relay_addr)
                lost = False
            except Exception as exc:  # noqa: BLE001 - keep trying: the relay may come back
                log.info("reservation on %s failed again: %s", relay_addr, exc)

    async def dial(self, addr: str) -> None:
        """A relayed connection to the peer named at the end of circuit address ``addr``."""
        import multiaddr

        await self.start()
        split_circuit(addr)
        if self._p2p.cfg.p2p.hole_punch:
            # listen first: the relay's identify then tells us the address our NAT maps that
            # port to, which is what the peer must dial back (a port opened later is unknown)
            await self.hole_puncher()
        await self._transport.dial(multiaddr.Multiaddr(addr))

    async def go_direct(self, peer_id) -> bool:
        """With ``p2p.hole_punch = on``: try DCUtR to add a direct connection to ``peer_id``
        (reached through a relay), for at most ``p2p.connect_timeout_s``; new streams then take
        it. Whether there is one now."""
        import trio

        if not self._p2p.cfg.p2p.hole_punch:
            return False
        dcutr = await self.hole_puncher()
        with trio.move_on_after(self._p2p.cfg.p2p.connect_timeout_s):
            if await dcutr.initiate_hole_punch(peer_id):
                log.info("hole punched to %s: the session goes direct", peer_id)
                return True
        log.info("no direct connection to %s (hole punching failed or timed out): the session stays relayed",
                 peer_id)
        return False

    async def hole_puncher(self):
        """This host's DCUtR service (started once). Hole punching dials from a listen port, so
        a host that listens on none (a client) first listens on an ephemeral TCP port."""
        if self._dcutr is None:
            import multiaddr
            from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol

            host = self._p2p.libp2p_host
            if not any("/tcp/" in str(a) and CIRCUIT not in str(a) for a in host.get_addrs()):
                await host.get_network().listen(multiaddr.Multiaddr(self._p2p.cfg.p2p.punch_listen))
            dcutr = DCUtRProtocol(host, dial_timeout=max(1, int(self._p2p.cfg.p2p.connect_timeout_s)))
            await self._p2p.nursery.start(run_service, dcutr)
            self._dcutr = dcutr
        return self._dcutr
