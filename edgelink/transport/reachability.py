"""Whether this host can be dialled from outside: a dial-back check against a peer it knows
(a relay), so that a node behind NAT reserves a relay slot and a reachable one does not.

py-libp2p 0.8.1 ships AutoNAT v1, but its server cannot tell: it "dials back" with
``host.connect``, which returns at once when a connection to the peer exists, and the asker's
own request arrived over one, so every asker is told it is public (held by
tests/net/test_nat.py). Here the asker opens ``PROTOCOL`` to the peer and writes the ports it
listens on; the peer opens a *fresh* TCP connection to each of them at the IP address it sees
the asker's connection come from (only there: it cannot be made to dial a third party), and
counts a port as reachable when a libp2p listener answers multistream-select's greeting. It
writes back the ports that answered and the address it saw.

Both sides read the other's bytes as untrusted: the request is at most ``REQUEST_MAX`` bytes
of decimal ports, the answer at most ``ANSWER_MAX`` bytes of JSON; anything else is a typed
error on the asker's side and a closed stream on the peer's.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import ipaddress
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from edgelink.errors import ProtocolError
from edgelink.transport.circuit import is_relayed

log = logging.getLogger(__name__)

PROTOCOL = "/edgelink/dialback/1.0.0"
MAX_PORTS = 4
REQUEST_MAX = 64
ANSWER_MAX = 512
# what a libp2p listener writes first, and answers with: multistream-select's protocol id
GREETING = b"\x13/multistream/1.0.0\n"
REACHABILITY = ("auto", "public", "private")


@dataclasses.dataclass(frozen=True)
class Reachability:
    """What a dial-back check found: the ports a peer reached from outside (none: behind NAT
    or a firewall), the address the peer saw this host's connection come from, and who checked."""

    reachable_ports: tuple[int, ...]
    observed_ip: str
    checked_by: str

    @property
    def public(self) -> bool:
        return bool(self.reachable_ports)

    def addrs(self, peer_id: str) -> list[str]:
        """The addresses others can dial this host at, as the checker saw them."""
        ip = ipaddress.ip_address(self.observed_ip)
        return [f"/{'ip4' if ip.version == 4 else 'ip6'}/{ip}/tcp/{p}/p2p/{peer_id}" for p in self.reachable_ports]

    def describe(self) -> str:
        if self.public:
            return f"reachable from outside at {self.observed_ip} (checked by {self.checked_by})"
        return (f"not reachable from outside (the peer at {self.checked_by} saw this host as "
                f"{self.observed_ip} and could not dial it back): behind NAT or a firewall")


def encode_request(ports: Sequence[int]) -> bytes:
    ports = sorted({int(p) for p in ports if 0 < int(p) < 65536})[:MAX_PORTS]
    return (",".join(str(p) for p in ports) + "\n").encode()


def parse_request(data: bytes) -> list[int]:
    """The ports of a request; ProtocolError for anything but 1..MAX_PORTS decimal ports."""
    if len(data) > REQUEST_MAX or not data.endswith(b"\n"):
        raise ProtocolError("a dial-back request is one short line of ports")
    try:
        ports = [int(p) for p in data[:-1].decode("ascii").split(",")]
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("a dial-back request holds something other than ports") from None
    if not 0 < len(ports) <= MAX_PORTS or not all(0 < p < 65536 for p in ports):
        raise ProtocolError(f"a dial-back request names 1 to {MAX_PORTS} ports in 1..65535")
    return sorted(set(ports))


def encode_answer(observed_ip: str, reachable: Sequence[int]) -> bytes:
    return json.dumps({"observed": observed_ip, "reachable": sorted(reachable)}).encode() + b"\n"


def parse_answer(data: bytes, asked: Sequence[int], checked_by: str) -> Reachability:
    """The peer's answer, checked: JSON with an IP address and a subset of the ports asked."""
    if len(data) > ANSWER_MAX or not data.endswith(b"\n"):
        raise ProtocolError("a dial-back answer is one line of at most 512 bytes")
    try:
        body = json.loads(data)
        if isinstance(body, dict) and isinstance(body.get("refused"), str):
            raise ProtocolError(f"the peer at {checked_by} refused the check: {body['refused'][:200]}")
        ip = str(ipaddress.ip_address(body["observed"]))
        ports = body["reachable"]
    except (ValueError, KeyError, TypeError):
        raise ProtocolError("a dial-back answer is not the JSON this side asked for") from None
    if not isinstance(ports, list) or not all(isinstance(p, int) and p in asked for p in ports):
        raise ProtocolError("a dial-back answer names ports that were not asked about")
    return Reachability(tuple(sorted(set(ports))), ip, checked_by)


class DialBack:
    """The peer's side: answers dial-back requests within bounds (a few at once, one per asker
    every ``min_interval_s``, each dial ``timeout_s``), from peers ``allowed`` says yes to."""

    def __init__(self, timeout_s: float, allowed: Callable[[str], bool] = lambda peer: True,
                 concurrent: int = 4, min_interval_s: float = 10.0, remember: int = 1024):
        self.timeout_s, self.allowed = timeout_s, allowed
        self.concurrent, self.min_interval_s, self.remember = concurrent, min_interval_s, remember
        self._running = 0
        self._last: collections.OrderedDict[str, float] = collections.OrderedDict()
        self.answered = 0

    def _admit(self, peer: str) -> str | None:
        """Why a request is refused (None: it is not); counts it in when admitted."""
        if not self.allowed(peer):
            return "this peer is not on its relay.allow_peers"
        now = time.monotonic()
        last = self._last.get(peer)
        if last is not None and now - last < self.min_interval_s:
            return "asked again too soon"
        if self._running >= self.concurrent:
            return "busy"
        self._last[peer] = now
        self._last.move_to_end(peer)
        while len(self._last) > self.remember:
            self._last.popitem(last=False)
        self._running += 1
        return None

    async def handle(self, stream: Any) -> None:
        """One request on a libp2p stream (its connection authenticated by Noise)."""
        import trio

        peer = stream.muxed_conn.peer_id.to_base58()
        try:
            remote = stream.get_remote_address()
            ip = str(ipaddress.ip_address(remote[0])) if remote else None
        except (ValueError, TypeError, AttributeError):
            ip = None
        if ip is None or is_relayed(stream.muxed_conn):
            refused = "it came through a relay, or from no known address: nothing to dial back"
        else:
            refused = self._admit(peer)
        if refused is not None:
            log.info("dial-back for %s refused: %s", peer, refused)
            with contextlib.suppress(Exception):
                with trio.move_on_after(self.timeout_s):
                    await stream.write(json.dumps({"refused": refused}).encode() + b"\n")
                await stream.close()
            return
        try:
            ports: list[int] = []
            with trio.move_on_after(self.timeout_s):
                ports = parse_request(await _read_line(stream, REQUEST_MAX))
            if not ports:  # the request did not arrive within the timeout
                log.info("dial-back for %s: no request within %g s", peer, self.timeout_s)
                return
            reached = [p for p in ports if await self._reaches(ip, p)]
            self.answered += 1
            with trio.move_on_after(self.timeout_s):
                await stream.write(encode_answer(ip, reached))
            log.info("dial-back for %s at %s: ports %s answered of %s", peer, ip, reached, ports)
        except ProtocolError as exc:
            log.info("dial-back for %s: %s", peer, exc)
        except Exception as exc:  # noqa: BLE001 - a peer that goes away mid-request is no error here
            log.debug("dial-back for %s ended: %r", peer, exc)
        finally:
            self._running -= 1
            with contextlib.suppress(Exception):
                await stream.close()

    async def _reaches(self, ip: str, port: int) -> bool:
        """A fresh TCP connection to ip:port within the timeout, answered by a libp2p greeting."""
        import trio

        with trio.move_on_after(self.timeout_s):
            try:
                tcp = await trio.open_tcp_stream(ip, port)
            except OSError:
                return False
            async with tcp:
                await tcp.send_all(GREETING)
                got = b""
                while len(got) < len(GREETING):
                    part = await tcp.receive_some(len(GREETING) - len(got))
                    if not part:
                        break
                    got += part
                return got == GREETING
        return False


async def _read_line(stream: Any, limit: int) -> bytes:
    """Bytes up to and including the first newline, at most ``limit`` (then what was read)."""
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        part = await stream.read(limit - len(data))
        if not part:
            break
        data += part
    return data


async def ask(host: Any, peer_info: Any, ports: Sequence[int], timeout_s: float, checked_by: str) -> Reachability:
    """Ask the peer of ``peer_info`` (connected here first) to dial ``ports`` back; a peer that
    does not speak ``PROTOCOL`` raises (libp2p's negotiation error), bad answers ProtocolError."""
    import trio

    asked = parse_request(encode_request(ports))
    await host.connect(peer_info)
    stream = await host.new_stream(peer_info.peer_id, [PROTOCOL])
    try:
        # the peer may spend up to a timeout on each port, then one on the answer
        with trio.fail_after(timeout_s * (len(asked) + 2)):
            await stream.write(encode_request(asked))
            data = await _read_line(stream, ANSWER_MAX + 1)
    finally:
        with contextlib.suppress(Exception):
            await stream.close()
    if not data:
        raise ProtocolError(f"the peer at {checked_by} closed the dial-back check without an answer")
    return parse_answer(data, asked, checked_by)
