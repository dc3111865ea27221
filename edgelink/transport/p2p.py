"""Network transport: py-libp2p (TCP, Noise, yamux) with end-to-end encryption on top.

py-libp2p is trio-based and edgelink's Channel is synchronous, so a ``P2PHost`` runs the trio
event loop in a background thread it owns, and a ``P2PChannel`` is a synchronous Channel (same
contract and typed errors as shared memory) over one yamux stream per session. Connections
are cached by libp2p per peer, so a second session to the same peer opens a stream on the
existing connection and skips the ~250 ms connection set-up.

Security: the host offers Noise only (never plaintext, secio or TLS fallbacks), yamux only.
Inside the stream, every byte after the key exchange is sealed by ``edgelink.transport.e2e``;
there is no switch to turn that off.

Records on the stream (little-endian): ``type u8 | length u32 | body``

    HS      the end-to-end handshake message (once per direction, first)
    DATA    one sealed record (see e2e); plaintext is frame bytes
    CREDIT  u64: the reader consumed that many DATA bytes; the writer may send as many more
    STOP    u64 frame number: the reader refused that frame unread; stop sending it

Frames (the Channel's unit) live *inside* the encrypted stream: the first DATA record of a
frame holds only its u64 length, the next ones its bytes in order. So the declared length is
authenticated, and it is checked against the limit before the receive buffer is allocated.
Putting the E2E layer below framing (not the other way round) also hides frame sizes from
nothing but the total, and keeps one code path for frame bytes.

Flow control: a writer never has more than the peer's announced window (``p2p.window_bytes``)
of DATA bytes unacknowledged. The reader task in the trio thread always drains the yamux
stream into memory (bounded by that window), so yamux's hard-coded 5 s write timeout never
fires because the application is busy; a writer that runs out of credit waits with our own
timeout (``p2p.stream_timeout_s``) instead. A peer that sends past its credit is cut off.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from edgelink.config import Config
from edgelink.errors import (
    CryptoError,
    EdgelinkError,
    MessageTooLarge,
    PeerGone,
    ProtocolError,
    TransportError,
    TransportTimeout,
    Unreachable,
)
from edgelink.transport import e2e, reachability
from edgelink.transport.circuit import Circuits, is_circuit, is_relayed, run_service, split_circuit
from edgelink.transport.framing import (
    FrameSink,
    RecvBuffer,
    Scatter,
    WholeFrame,
    byte_views,
    check_length,
)
from edgelink.transport.identity import Identity, load_identity
from edgelink.transport.reachability import Reachability

log = logging.getLogger(__name__)

PROTOCOL_ID = "/edgelink/1.0.0"
REC = struct.Struct("<BI")
U64 = struct.Struct("<Q")
R_HS, R_DATA, R_CREDIT, R_STOP = 1, 2, 3, 4
# The largest yamux payload that, with yamux's 12-byte header, fits one Noise message
# (65,535 bytes less the 16-byte tag).
NOISE_PIECE = 65535 - 16 - 12
# The smallest flow-control window a peer may announce (a 1-byte window would make every
# record wait for its own credit, and hold the stream open for the whole timeout).
MIN_WINDOW = 65536
_EOF = object()
_CLOSE = object()


def split_multiaddr(addr: str) -> tuple[str, str]:
    """(transport address, peer id) of ``/ip4/H/tcp/P/p2p/ID``; raises TransportError."""
    head, sep, pid = addr.rpartition("/p2p/")
    if not sep or not head or not pid or "/" in pid:
        raise TransportError(f"{addr!r} is not a full multiaddr ending in /p2p/<peer id>")
    return head, pid


def check_port_free(addr: str) -> None:
    """A TransportError naming the port if something already listens on ``addr``'s TCP port.

    py-libp2p opens its listeners with SO_REUSEPORT (for hole punching), so a second node on a
    taken port would bind without an error and the kernel would split incoming connections
    between the two. A plain bind without SO_REUSEPORT fails against any listener there."""
    import socket

    parts = addr.strip("/").split("/")
    try:
        fam = {"ip4": socket.AF_INET, "ip6": socket.AF_INET6}[parts[0]]
        host, port = parts[1], int(parts[3]) if parts[2] == "tcp" else 0
    except (KeyError, IndexError, ValueError):
        return  # not an /ip4|ip6/.../tcp/PORT address: libp2p reports what is wrong with it
    if port == 0:
        return
    with socket.socket(fam, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no listener
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise TransportError(
                f"cannot listen on {addr}: TCP port {port} on {host} is already in use "
                f"({exc.strerror}); another edgelink node may be running there: stop it or pick "
                "another port (--listen, p2p.listen)") from None


async def write_in_noise_pieces(stream: Any, data) -> None:
    """Write ``data`` in pieces that fit one Noise message each, yamux header included.

    yamux cuts a long write into 65,536-byte frames, but a Noise message carries at most
    65,519 plaintext bytes, so py-libp2p sent every frame as two Noise messages (65,519 and
    17 bytes), each with its own encryption call, length prefix and syscall on both sides.
    Pieces of ``NOISE_PIECE`` bytes make one message per frame."""
    if len(data) <= NOISE_PIECE:
        await stream.write(data)
        return
    with memoryview(data) as view:
        for off in range(0, len(view), NOISE_PIECE):
            await stream.write(view[off:off + NOISE_PIECE])


class P2PChannel:
    """One session over one yamux stream; implements edgelink.transport.base.Channel.

    Not thread-safe: one thread sends and receives at a time (like ShmChannel). The host's
    trio thread runs a reader and a writer task for it.
    """

    link = "network"  # a sender compresses KV state over it by default (wire.codec = auto)

    def __init__(self, host: P2PHost, stream: Any, *, initiator: bool):
        import trio

        self._host = host
        self._stream = stream
        self.initiator = initiator
        cfg = host.cfg
        self._timeout_s = cfg.p2p.stream_timeout_s
        self._chunk = cfg.p2p.chunk_bytes
        self._window = cfg.p2p.window_bytes
        if self._window < MIN_WINDOW:
            raise TransportError(f"p2p.window_bytes = {self._window} is below the minimum of {MIN_WINDOW}")
        # A peer cuts its records to half our window (see handshake), whatever its chunk_bytes.
        self._max_record = max(self._chunk, self._window // 2) + e2e.RECORD_OVERHEAD
        self.remote_peer_id = stream.muxed_conn.peer_id.to_base58()
        self._remote_id = stream.muxed_conn.peer_id
        # what carries it: "relayed" (a circuit through a relay) or "direct"
        self.path = "relayed" if is_relayed(stream.muxed_conn) else "direct"
        self.encryption: dict[str, Any] | None = None
        self.max_frame: int | None = None  # optional per-peer cap (the node sets it)
        self.limiter = None  # optional, with wait_bytes(n) and wait_message()
        self.record_filter: Callable[[int, bytes], list[bytes]] | None = None  # tests only
        # Until a listener clears it (auth passed), every wait of this channel, in both
        # threads, ends by this monotonic time: a peer that has not authenticated gets one
        # absolute deadline for the key exchange and its HELLO, however it paces its bytes.
        self.deadline: float | None = None
        self.remote_ip: str | None = None
        self._hs_seen = False
        # trio side (touched only in the trio thread, except where noted)
        self._rx: queue.SimpleQueue = queue.SimpleQueue()  # records for the sync side
        self._tx_send, self._tx_recv = trio.open_memory_channel(4)
        self._in = b""  # the last chunk read off the stream, and how far it is parsed
        self._in_pos = 0
        self._read_size = self._max_record + REC.size
        self._in_flight = 0  # DATA bytes received and not yet credited back
        self._credit = 0
        self._credit_changed = trio.Event()
        self._peer_stopped: int | None = None  # frame number the peer refused
        self._done = trio.Event()
        self._tx_error: str | None = None
        # sync side
        self._keys: e2e.Keys | None = None
        self._rbuf = RecvBuffer()
        self._straddle = RecvBuffer()  # a record that spans two of a sink's buffers
        self._tx_frame = 0
        self._rx_frame = 0
        self._sending = 0  # send() calls in progress (a close() then sends no end record)
        self._peer_ended = False  # the reader saw the stream end (set in the trio thread)
        self._consumed = 0
        self._closed = False
        self._broken: str | None = None
        self._rx_broken: str | None = None
        self._tx_broken: str | None = None
        self.bytes_in = 0
        self.bytes_out = 0

    # ------------------------------------------------------------------ trio side

    async def _run(self) -> None:
        """Reader and writer tasks; returns when the channel is done (closed or broken)."""
        import trio

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reader)
            nursery.start_soon(self._writer)
            await self._done.wait()
            nursery.cancel_scope.cancel()
        if self._broken or self._tx_error:
            await self._reset()  # the peer learns at once; nothing of it stays queued here

    async def _read_exactly(self, n: int):
        """``n`` bytes off the stream, as bytes or a read-only view into what yamux returned.

        Each yamux read costs tens of microseconds of Python, so reads ask for a whole record
        plus the next header at once, and a record that arrived inside one read is handed on
        as a view, without another copy."""
        cur, pos = self._in, self._in_pos
        if len(cur) - pos >= n:
            self._in_pos = pos + n
            return memoryview(cur)[pos:pos + n]
        parts = [cur[pos:]] if pos < len(cur) else []
        got = len(cur) - pos
        while got < n:
            chunk = await self._stream.read(max(n - got, self._read_size))
            if not chunk:
                raise EOFError("stream closed")
            parts.append(chunk)
            got += len(chunk)
        last = parts[-1]
        used = len(last) - (got - n)  # the rest of the last chunk starts the next record(s)
        self._in, self._in_pos = last, used
        if len(parts) == 1:
            return memoryview(last)[:n]
        parts[-1] = memoryview(last)[:used]
        return b"".join(parts)

    async def _reader(self) -> None:
        try:
            while True:
                typ, n = REC.unpack(await self._read_exactly(REC.size))
                if n > self._max_record:
                    raise CryptoError(f"record of {n} bytes declared (limit {self._max_record})")
                if typ == R_DATA:
                    if self._in_flight + n > self._window:
                        raise CryptoError("peer sent past its flow-control credit")
                    body = await self._read_exactly(n)
                    self._in_flight += n
                    self._rx.put((R_DATA, body))
                elif typ == R_HS:
                    # One key-exchange record per stream, of its fixed size: anything else
                    # would queue outside the flow-control window.
                    if self._hs_seen or n > e2e.HS_BYTES:
                        raise CryptoError("a second or oversized key-exchange record")
                    self._hs_seen = True
                    self._rx.put((R_HS, await self._read_exactly(n)))
                elif typ in (R_CREDIT, R_STOP) and n == e2e.CONTROL_BYTES:
                    # sealed like everything else, with their own key and counter
                    body = await self._read_exactly(n)
                    if self._keys is None:
                        raise CryptoError("a flow-control record before the key exchange")
                    plain = bytearray(e2e.CONTROL_PLAIN)
                    self._keys.control_opener.open_into(body, typ, plain)
                    (value,) = U64.unpack(plain)
                    if typ == R_CREDIT:
                        self._credit += value
                    else:
                        self._peer_stopped = value
                    self._wake_writer()
                else:
                    raise CryptoError(f"unknown record type {typ} ({n} bytes)")
        except Exception as exc:  # noqa: BLE001 - EOF, reset, or a peer breaking the rules
            # A peer that closes on purpose sends a sealed end record first (the sync side
            # reads it); a bare end of stream means the stream was cut.
            eof = isinstance(exc, EOFError) or "EOF" in type(exc).__name__
            reason = "the stream ended without its sealed end record: cut, or truncated" if eof else str(exc)
            self._peer_ended = True
            if isinstance(exc, CryptoError):
                log.warning("p2p peer %s: %s", self.remote_peer_id, exc)
                await self._reset()
            self._rx.put((_EOF, reason))
            self._wake_writer()

    def _wake_writer(self) -> None:
        self._credit_changed.set()
        self._credit_changed = type(self._credit_changed)()

    async def _writer(self) -> None:
        import trio

        try:
            async for item in self._tx_recv:
                if item is _CLOSE:
                    with contextlib.suppress(Exception):
                        await self._stream.close()
                    self._done.set()
                    return
                typ, record, frame_no = item
                if typ == R_DATA:
                    if self._peer_stopped is not None and frame_no <= self._peer_stopped:
                        continue  # the peer refused this frame: drop the rest of it
                    n = len(record) - REC.size
                    with trio.move_on_after(self.remaining(self._timeout_s)) as scope:
                        while self._credit < n and (self._peer_stopped is None
                                                    or frame_no > self._peer_stopped):
                            await self._credit_changed.wait()
                    if scope.cancelled_caught:
                        raise TransportTimeout(f"peer granted no flow-control credit for {self._timeout_s} s")
                    if self._peer_stopped is not None and frame_no <= self._peer_stopped:
                        continue
                    self._credit -= n
                elif typ == R_CREDIT:
                    self._in_flight -= frame_no  # a credit record carries its grant here
                await write_in_noise_pieces(self._stream, record)
        except Exception as exc:  # noqa: BLE001
            self._tx_error = f"{type(exc).__name__}: {exc}"
            self._rx.put((_EOF, self._tx_error))
            self._done.set()

    async def _reset(self) -> None:
        with contextlib.suppress(Exception):
            await self._stream.reset()

    # ------------------------------------------------------------------ sync helpers

    def remaining(self, limit: float) -> float:
        """``limit``, cut to what is left before ``deadline`` (0 once it passed)."""
        if self.deadline is None:
            return limit
        return max(0.0, min(limit, self.deadline - time.monotonic()))

    def _push(self, typ: int, body, frame_no: int = 0, timeout: float | None = None, *,
              headroom: bool = False) -> None:
        """Hand one record to the writer task (waits while its small queue is full).

        With ``headroom``, ``body`` is a bytearray whose first ``REC.size`` bytes are free for
        the record header (see ``Sealer.seal``), which is written in place."""
        import trio

        if self.record_filter is not None:
            raw = bytes(body[REC.size:]) if headroom else bytes(body)
            records = [REC.pack(typ, len(b)) + b for b in self.record_filter(typ, raw)]
        elif headroom:
            REC.pack_into(body, 0, typ, len(body) - REC.size)
            records = [body]
        else:
            records = [REC.pack(typ, len(body)) + body]
        limit = self.remaining(self._timeout_s if timeout is None else timeout)

        async def put() -> bool:
            with trio.move_on_after(limit):
                for r in records:
                    await self._tx_send.send((typ, r, frame_no))
                return True
            return False

        try:
            ok = self._host.call(put)
        except (trio.ClosedResourceError, trio.BrokenResourceError, RuntimeError) as exc:
            raise PeerGone(f"p2p {self.remote_peer_id}: channel is gone: {exc}") from None
        if not ok:
            raise TransportTimeout(f"p2p {self.remote_peer_id}: peer did not take data for {limit} s")
        if self._tx_error:
            raise PeerGone(f"p2p {self.remote_peer_id}: send failed: {self._tx_error}")

    def _next(self, timeout: float) -> tuple[int, Any]:
        wait = self.remaining(timeout)
        try:
            typ, body = self._rx.get(timeout=None if math.isinf(wait) else wait)
        except queue.Empty:
            if self.deadline is not None and wait < timeout:
                raise TransportTimeout(f"p2p {self.remote_peer_id}: did not authenticate within the "
                                       "handshake deadline (p2p.handshake_timeout_s)") from None
            raise TransportTimeout(f"p2p {self.remote_peer_id}: nothing received for {timeout} s") from None
        if typ is _EOF:
            self._rx.put((_EOF, body))  # stays at the end for later calls
            raise PeerGone(f"p2p {self.remote_peer_id}: peer closed the stream ({body})")
        return typ, body

    def _check(self) -> None:
        if self._closed:
            raise TransportError(f"p2p {self.remote_peer_id}: channel is closed")
        if self._broken:
            raise TransportError(f"p2p {self.remote_peer_id}: channel is unusable after: {self._broken}")

    def _fail(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason
            self._host._call_soon(self._reset)
            self._finish()

    def _finish(self, flush: bool = False) -> None:
        if self._keys is not None:
            self._keys.close()
        if flush:
            # The writer task writes what is queued, closes the stream, then ends the channel.
            import trio

            async def put() -> None:
                with trio.move_on_after(self.remaining(self._timeout_s)):
                    await self._tx_send.send(_CLOSE)
                    return
                self._done.set()

            try:
                self._host.call(put)
            except Exception:  # noqa: BLE001
                self._host.call_soon_sync(self._done.set)
        else:
            self._host.call_soon_sync(self._done.set)
        self._host._forget(self)

    # ------------------------------------------------------------------ handshake

    def handshake(self, timeout: float) -> None:
        """The end-to-end key exchange: the client's key message, the server's, then each side's
        key confirmation (a signature over the whole transcript) as its first sealed record.
        Nothing else either side sends (the client's HELLO and token included) is used until
        the other's confirmation verified."""
        ident = self._host.identity
        remote_pk = self._remote_id.extract_public_key()
        if remote_pk is None:
            raise CryptoError(f"peer id {self.remote_peer_id} does not embed an Ed25519 key")
        hs = e2e.Handshake(
            e2e.CLIENT if self.initiator else e2e.SERVER, sign=ident.sign,
            identity_pk=ident.public_key, local_id=ident.peer_id.to_bytes(),
            remote_id=self._remote_id.to_bytes(), remote_pk=remote_pk.to_bytes(),
            params=e2e.Params(self._window, self._host.cfg.p2p.rekey_bytes, self._host.cfg.p2p.rekey_s))
        try:
            if self.initiator:
                self._push(R_HS, hs.message(), timeout=timeout)
            typ, body = self._next(timeout)
            if typ != R_HS:
                raise CryptoError("peer sent data before the key exchange")
            try:
                hs.receive(body)
            except CryptoError:
                if not self.initiator:  # the client learns our version, and says why it fails
                    with contextlib.suppress(EdgelinkError):
                        self._push(R_HS, hs.message(), timeout=timeout)
                raise
            if not self.initiator:
                self._push(R_HS, hs.message(), timeout=timeout)
            keys = hs.finish()
            peer_window = keys.peer_window
            if peer_window < MIN_WINDOW:
                raise CryptoError(f"the peer announced a flow-control window of {peer_window} bytes; "
                                  f"at least {MIN_WINDOW} is required (p2p.window_bytes)")
            self._keys = keys
            # A record must fit the peer's window, or the writer would wait for credit for ever.
            self._chunk = min(self._chunk, peer_window // 2 - e2e.RECORD_OVERHEAD)
            self._credit_from_peer(peer_window)
            self._push(R_DATA, keys.sealer.seal(hs.confirmation(keys), e2e.CONFIRM_FRAME, REC.size,
                                                flags=e2e.FLAG_CONFIRM), 0, timeout=timeout, headroom=True)
            typ, body = self._next(timeout)
            if typ != R_DATA or not e2e.Opener.flags_of(body) & e2e.FLAG_CONFIRM:
                raise CryptoError("the peer's first sealed record is not its key confirmation")
            plain = bytearray(e2e.Opener.plaintext_len(body))
            keys.opener.open_into(body, e2e.CONFIRM_FRAME, plain)
            hs.check_confirmation(keys, plain)
            self._consume(len(body))
        except EdgelinkError as exc:
            self._fail(str(exc))
            raise
        self.encryption = hs.encryption_params(self._keys)

    def _credit_from_peer(self, n: int) -> None:
        def grant() -> None:
            self._credit += n
            self._wake_writer()
        self._host.call_soon_sync(grant)

    # ------------------------------------------------------------------ Channel

    def send(self, *parts) -> None:
        """Send one frame: a sealed length record, then sealed chunks of ``parts``."""
        self._check()
        if self._tx_broken:
            raise TransportError(f"p2p {self.remote_peer_id}: sending is over after: {self._tx_broken}")
        if self._keys is None:
            raise TransportError("handshake first")
        views, total = byte_views(parts)
        sealer = self._keys.sealer
        fno = self._tx_frame
        self._tx_frame += 1
        chunk = self._chunk

        def push(plain, frame: int = fno, flags: int = 0) -> None:
            # sealed with room for the record header, written in place
            self._push(R_DATA, sealer.seal(plain, frame, REC.size, flags), fno, headroom=True)

        self._sending += 1
        try:
            announce = self._keys.opener.take_announcement()
            if announce is not None:  # the key the peer's next fresh-DH rekey must use
                push(announce, e2e.ANNOUNCE_FRAME, e2e.FLAG_ANNOUNCE)
            push(U64.pack(total))
            staging = bytearray()
            for view in views:
                pos = 0
                while pos < view.nbytes:
                    self._check_stopped(fno)
                    if not staging and view.nbytes - pos >= chunk:
                        push(view[pos:pos + chunk])
                        pos += chunk
                        continue
                    take = min(chunk - len(staging), view.nbytes - pos)
                    staging += view[pos:pos + take]
                    pos += take
                    if len(staging) == chunk:
                        push(staging)
                        staging = bytearray()
            if staging:
                push(staging)
            self._check_stopped(fno)
        except PeerGone as exc:
            if self._tx_broken:
                raise
            self._fail(str(exc))
            raise
        except TransportTimeout as exc:
            self._fail(f"send timed out mid-frame: {exc}")
            raise
        except EdgelinkError as exc:
            self._fail(str(exc))
            raise
        finally:
            self._sending -= 1
        self.bytes_out += total

    def _check_stopped(self, fno: int) -> None:
        stopped = self._peer_stopped
        if stopped is not None and fno <= stopped:
            # The peer refused this frame unread; its refusal (a REJECT) is still readable.
            self._tx_broken = f"peer refused frame {fno}"
            raise PeerGone(f"p2p {self.remote_peer_id}: the peer stopped reading frame {fno}")

    def recv(self, max_bytes: int, timeout: float | None = None) -> memoryview:
        """Receive one whole frame into a reusable buffer (valid until the next recv)."""
        sink = WholeFrame(self._rbuf)
        self.recv_into(sink, max_bytes, timeout)
        return sink.view

    def recv_into(self, sink: FrameSink, max_bytes: int, timeout: float | None = None) -> int:
        """Receive one frame into the buffers ``sink`` hands out (records are decrypted
        straight into them); returns the frame's length."""
        self._check()
        if self._rx_broken:
            raise TransportError(f"p2p {self.remote_peer_id}: receiving is over after: {self._rx_broken}")
        if self._keys is None:
            raise TransportError("handshake first")
        limit = self._timeout_s if timeout is None else timeout
        opener = self._keys.opener
        fno = self._rx_frame
        typ, body = self._next(limit)  # a timeout here leaves the channel usable
        try:
            while True:
                if typ != R_DATA:
                    raise CryptoError("handshake record after the key exchange")
                flags = e2e.Opener.flags_of(body)
                if not flags & (e2e.FLAG_ANNOUNCE | e2e.FLAG_END | e2e.FLAG_CONFIRM):
                    break
                self._control_record(opener, flags, body)
                typ, body = self._next(limit)
            opener.check_counter(body)
            if e2e.Opener.plaintext_len(body) != U64.size:
                raise CryptoError("a frame must start with its length record")
            hdr = bytearray(U64.size)
            opener.open_into(body, fno, hdr)
            self._consume(len(body))
            (length,) = U64.unpack(hdr)
            cap = max_bytes if self.max_frame is None else min(max_bytes, self.max_frame)
            try:
                check_length(length, cap, f"p2p {self.remote_peer_id}")
            except MessageTooLarge as exc:
                # Refused before allocating: tell the writer to stop, keep our sending side so
                # the refusal itself still reaches the peer, and read nothing more.
                self._rx_broken = str(exc)
                self._push(R_STOP, self._keys.control_sealer.seal(U64.pack(fno), R_STOP))
                raise
            out = Scatter(sink, length)
            while out.remaining:
                typ, body = self._next(self._timeout_s)
                if typ != R_DATA:
                    raise CryptoError("handshake record inside a frame")
                if e2e.Opener.flags_of(body) & (e2e.FLAG_ANNOUNCE | e2e.FLAG_END | e2e.FLAG_CONFIRM):
                    raise CryptoError(f"a key or end record inside frame {fno}")
                n = e2e.Opener.plaintext_len(body)
                opener.check_counter(body)
                if n == 0 or n > out.remaining:
                    raise CryptoError(f"record runs past the end of frame {fno}")
                room = out.room(n)
                if room is not None:
                    opener.open_into(body, fno, room)
                    out.advance(n)
                else:  # the record straddles two of the sink's buffers
                    tmp = self._straddle.view(n)
                    opener.open_into(body, fno, tmp)
                    out.write(tmp)
                self._consume(len(body))
        except MessageTooLarge:
            raise
        except EdgelinkError as exc:
            self._fail(str(exc))
            raise
        self._rx_frame += 1
        self.bytes_in += length
        if self.limiter is not None:
            self.limiter.wait_message()
        return length

    def peer_gone(self) -> bool:
        """Whether the peer's side of the stream ended (closed, reset, or cut); cheap."""
        return self._closed or self._peer_ended or self._broken is not None or self._done.is_set()

    def _control_record(self, opener: e2e.Opener, flags: int, body) -> None:
        """A sealed record between frames: a key announcement, or the peer's end record."""
        if flags & e2e.FLAG_CONFIRM:
            raise CryptoError("a second key confirmation")
        plain = bytearray(e2e.Opener.plaintext_len(body))
        if flags & e2e.FLAG_ANNOUNCE:
            opener.open_into(body, e2e.ANNOUNCE_FRAME, plain)
            if len(plain) != 32:
                raise CryptoError("a rekey announcement of the wrong size")
            self._keys.sealer.peer_rekey_pk = bytes(plain)
            self._consume(len(body))
            return
        opener.open_into(body, e2e.END_FRAME, plain)
        self._consume(len(body))
        self._rx.put((_EOF, "closed"))
        raise PeerGone(f"p2p {self.remote_peer_id}: peer closed the stream (closed)")

    def _consume(self, n: int) -> None:
        if self.limiter is not None:
            self.limiter.wait_bytes(n)
        self._consumed += n
        if self._consumed >= self._window // 4:
            grant, self._consumed = self._consumed, 0
            self._push(R_CREDIT, self._keys.control_sealer.seal(U64.pack(grant), R_CREDIT), grant)

    def close(self) -> None:
        """Close gracefully (queued records are still written, then a sealed end record, so
        the peer can tell a close from a cut); idempotent."""
        if self._closed:
            return
        self._closed = True
        if (self._keys is not None and self._keys.confirmed and self._broken is None and self._tx_error is None
                and not self._tx_broken and not self._sending):
            with contextlib.suppress(EdgelinkError):
                self._push(R_DATA, self._keys.sealer.seal(b"", e2e.END_FRAME, REC.size, e2e.FLAG_END),
                           self._tx_frame, headroom=True)
        self._finish(flush=self._broken is None and self._tx_error is None)
        # wake a recv blocked in another thread (a node cutting a session at shutdown)
        self._rx.put((_EOF, "closed by this side"))

    def __enter__(self) -> P2PChannel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return f"<P2PChannel {self.remote_peer_id} {'initiator' if self.initiator else 'responder'}>"


def _refused_in_negotiation(exc: BaseException) -> bool:
    """Whether a failed new_stream got past the multistream handshake (the connection works)
    and failed reading the protocol answer: how a stream the listener resets at once looks to
    the pinned py-libp2p. A failed handshake means the connection itself is broken."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 8:
        text = str(e)
        if "protocol read failed" in text:
            return True
        if "handshake read failed" in text or "handshake write failed" in text:
            return False
        e = e.__cause__ or e.__context__
        seen += 1
    return False


def _no_auto_dial(host) -> None:
    """Stop py-libp2p 0.8.1's AutoConnector, which every host runs: below 50 connections it
    dials every peer its peerstore has heard of ("initiating 200 new dials") every 10 s. An
    edgelink host dials only the peers it is asked to (a client that contacts peers on its own
    tells them it exists, and a node must not go looking for its clients)."""
    connector = getattr(host.get_network(), "auto_connector", None)
    if connector is None:
        return

    async def nothing(*_args, **_kwargs) -> None:
        return None

    connector.maybe_connect = nothing
    connector.run_background_task = nothing


def _peer_info(addr: str) -> tuple[Any, bool]:
    """The PeerInfo to dial for ``addr``, and whether it is a relay circuit; TransportError when malformed."""
    import multiaddr
    from libp2p.peer.peerinfo import info_from_p2p_addr

    relayed = is_circuit(addr)
    try:
        if relayed:  # through a relay: /ip4/H/tcp/P/p2p/RELAY/p2p-circuit/p2p/PEER
            from libp2p.peer.id import ID
            from libp2p.peer.peerinfo import PeerInfo

            relay, dest = split_circuit(addr)
            split_multiaddr(relay)
            info = PeerInfo(ID.from_base58(dest), [])
        else:
            split_multiaddr(addr)
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
    except EdgelinkError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise TransportError(f"bad multiaddr {addr!r}: {exc}") from None
    return info, relayed


class P2PHost:
    """A libp2p host (Noise only, yamux only) whose trio loop runs in a background thread.

    ``listen``: multiaddrs to listen on (a client may listen on none). ``on_channel`` (a
    listening host): called in a new thread for each incoming session, after the end-to-end
    key exchange, with the channel; ``admit(peer_id, ip)`` (optional) runs first in the trio
    thread and may refuse a stream outright (returning False resets it, before a byte of it is
    read). An incoming channel is *pending* from then until ``authenticated(ch)``: it has one
    absolute deadline (``p2p.handshake_timeout_s``) for the key exchange and whatever the
    listener reads before it decides, and ``pending()`` counts such channels (by IP) so that
    the listener can cap what peers that have not authenticated may hold.
    """

    def __init__(self, cfg: Config, identity: Identity, *, listen: list[str] | None = None,
                 on_channel: Callable[[P2PChannel], None] | None = None,
                 admit: Callable[[str], bool] | None = None,
                 sec_opt: dict | None = None, services: tuple[Callable[[Any], Any], ...] = ()):
        """``services``: factories called with the libp2p host in its trio thread, each
        returning a py-libp2p ``Service`` that runs as long as the host (the relay's HOP)."""
        self.cfg = cfg
        self._services = services
        self.circuits = Circuits(self)
        self.identity = identity
        self._listen = list(listen or [])
        self._on_channel = on_channel
        self._admit = admit
        self._sec_opt = sec_opt
        self._token = None
        self._host = None
        self._stop = None
        self._nursery = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._channels: set[P2PChannel] = set()
        self._pending: set[P2PChannel] = set()
        self._lock = threading.Lock()
        self._closed = False
        for addr in self._listen:
            check_port_free(addr)
        route_libp2p_logs()
        self._thread = threading.Thread(target=self._thread_main, name="edgelink-p2p", daemon=True)
        self._thread.start()
        if not self._ready.wait(cfg.p2p.connect_timeout_s + 30):
            raise TransportError("libp2p host did not start in time")
        if self._error is not None:
            raise TransportError(f"libp2p host failed to start: {self._error}") from self._error

    # ------------------------------------------------------------------ trio thread

    def _thread_main(self) -> None:
        import trio

        try:
            trio.run(self._main)
        except BaseException as exc:  # noqa: BLE001
            self._error = exc
            log.debug("p2p host stopped with %r", exc)
        finally:
            self._ready.set()

    def _make_host(self):
        import multiaddr
        from libp2p import create_yamux_muxer_option, new_host
        from libp2p.crypto.x25519 import create_new_key_pair as x25519_pair
        from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID

        from edgelink.transport.readahead import (
            ReadAheadNoise,  # imports libp2p, like the lines above
        )

        kp = self.identity.key_pair
        # Noise only: a default new_host() would also accept /plaintext/2.0.0 and secio.
        sec = self._sec_opt or {NOISE_ID: ReadAheadNoise(kp, noise_privkey=x25519_pair().private_key,
                                                         read_ahead=self.cfg.p2p.read_ahead_bytes)}
        addrs = [multiaddr.Multiaddr(a) for a in self._listen]
        return new_host(key_pair=kp, sec_opt=sec, muxer_opt=create_yamux_muxer_option(),
                        listen_addrs=addrs or None, enable_mDNS=bool(self.cfg.p2p.mdns),
                        negotiate_timeout=int(max(1, self.cfg.p2p.connect_timeout_s))), addrs

    async def _main(self) -> None:
        import trio

        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        host, addrs = self._make_host()
        _no_auto_dial(host)
        self._host = host
        if self._on_channel is not None:
            host.set_stream_handler(PROTOCOL_ID, self._handle_stream)
        async with host.run(addrs):
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for make in self._services:
                    await nursery.start(run_service, make(host))
                self._ready.set()
                await self._stop.wait()
                # Close every connection before the loop stops: py-libp2p leaves their sockets
                # open otherwise (until the process exits), so a peer, or a relay holding a
                # circuit for us, would not learn that we left.
                with trio.move_on_after(2), contextlib.suppress(Exception):
                    network = host.get_network()
                    for peer in list(network.connections):
                        with contextlib.suppress(Exception):
                            await network.close_peer(peer)
                nursery.cancel_scope.cancel()

    async def _handle_stream(self, stream) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        try:
            remote = stream.get_remote_address()
        except Exception:  # noqa: BLE001 - a transport without addresses
            remote = None
        ip = remote[0] if remote else None
        if self._closed or (self._admit is not None and not self._admit(peer, ip)):
            log.debug("p2p: refused a stream from %s (%s)", peer, ip)
            with contextlib.suppress(Exception):
                await stream.reset()
            return
        ch = P2PChannel(self, stream, initiator=False)
        ch.remote_ip = ip
        ch.deadline = time.monotonic() + self.cfg.p2p.handshake_timeout_s
        with self._lock:
            self._channels.add(ch)
            self._pending.add(ch)
        threading.Thread(target=self._serve, args=(ch,), name=f"edgelink-session-{peer[-6:]}",
                         daemon=True).start()
        await ch._run()

    def _serve(self, ch: P2PChannel) -> None:
        try:
            ch.handshake(self.cfg.p2p.handshake_timeout_s)
        except EdgelinkError as exc:
            log.warning("p2p: end-to-end handshake with %s failed: %s", ch.remote_peer_id, exc)
            ch.close()
            return
        try:
            self._on_channel(ch)
        except Exception:  # noqa: BLE001 - one session must never take the node down
            log.exception("p2p: session with %s failed", ch.remote_peer_id)
        finally:
            ch.close()

    # ------------------------------------------------------------------ bridges

    def call(self, afn, *args):
        """Run ``await afn(*args)`` in the host's trio thread and return its result."""
        import trio

        if self._token is None or self._closed:
            raise TransportError("libp2p host is closed")
        try:
            return trio.from_thread.run(afn, *args, trio_token=self._token)
        except trio.RunFinishedError:
            raise TransportError("libp2p host is closed") from None

    def _call_soon(self, afn, *args) -> None:
        """Run ``afn(*args)`` in the trio thread without waiting for it."""
        import trio

        if self._token is None or self._nursery is None:
            return
        with contextlib.suppress(trio.RunFinishedError, RuntimeError):
            self._token.run_sync_soon(self._nursery.start_soon, afn, *args)

    def call_soon_sync(self, fn, *args) -> None:
        """Run ``fn(*args)`` (not a coroutine) in the trio thread, without waiting for it."""
        import trio

        if self._token is None:
            return
        with contextlib.suppress(trio.RunFinishedError, RuntimeError):
            self._token.run_sync_soon(fn, *args)

    def _forget(self, ch: P2PChannel) -> None:
        with self._lock:
            self._channels.discard(ch)
            self._pending.discard(ch)

    def authenticated(self, ch: P2PChannel) -> None:
        """The listener accepted ``ch``'s peer: lift its deadline, stop counting it as pending."""
        ch.deadline = None
        with self._lock:
            self._pending.discard(ch)

    def pending(self, ip: str | None = None) -> int:
        """Incoming channels not yet authenticated (from ``ip``, when given)."""
        with self._lock:
            return sum(1 for c in self._pending if ip is None or c.remote_ip == ip)

    def channel_count(self) -> int:
        with self._lock:
            return len(self._channels)

    # ------------------------------------------------------------------ public

    @property
    def libp2p_host(self):
        """The py-libp2p host (touch it only in the trio thread: ``call``)."""
        return self._host

    @property
    def nursery(self):
        """The trio nursery that lives as long as the host (for tasks of its services)."""
        return self._nursery

    def reserve(self, relay_addr: str) -> str:
        """Reserve a slot on the relay at ``relay_addr`` (kept refreshed while this host
        runs) and return this host's circuit address through it (docs/nat.md)."""
        limit = self.cfg.p2p.connect_timeout_s

        async def go():
            import trio

            with trio.fail_after(limit):
                return await self.circuits.reserve(relay_addr)

        import trio

        try:
            return self.call(go)
        except EdgelinkError:
            raise
        except trio.TooSlowError:
            raise TransportTimeout(f"no reservation on the relay at {relay_addr} within {limit} s") from None
        except Exception as exc:  # noqa: BLE001 - libp2p raises many types on a failed dial
            raise Unreachable(f"relay: {dial_failure(relay_addr, exc)}") from None

    def serve(self, protocol: str, handler) -> None:
        """Answer streams of ``protocol`` with ``await handler(stream)`` (in the trio thread)."""

        async def register():
            self._host.set_stream_handler(protocol, handler)

        self.call(register)

    def check_reachability(self, peer_addr: str, timeout_s: float) -> Reachability:
        """Ask the peer at ``peer_addr`` (a relay) to dial this host's listen ports back on a
        fresh connection (transport/reachability.py). TransportError when it cannot tell: it
        is unreachable itself, does not offer the check, refuses it or answers nonsense."""
        import multiaddr
        from libp2p.peer.peerinfo import info_from_p2p_addr

        ports = [int(a.split("/")[4]) for a in self.addrs if a.split("/")[3:4] == ["tcp"]]
        if not ports:
            raise TransportError("this host listens on no TCP port: nothing to dial back")
        where = peer_addr.rsplit("/p2p/", 1)[0]

        async def go():
            info = info_from_p2p_addr(multiaddr.Multiaddr(peer_addr))
            return await reachability.ask(self._host, info, ports, timeout_s, where)

        try:
            return self.call(go)
        except ProtocolError as exc:
            raise TransportError(f"reachability: {exc}") from None
        except EdgelinkError:
            raise
        except Exception as exc:  # noqa: BLE001 - libp2p raises many types on a failed dial or negotiation
            raise TransportError(f"reachability: the peer at {where} could not check it "
                                 f"({type(exc).__name__}: {str(exc)[:200]})") from None

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id_str

    @property
    def addrs(self) -> list[str]:
        """Full multiaddrs of this host (with /p2p/<peer id>)."""
        pid = self.peer_id

        async def get():
            return [str(a) for a in self._host.get_addrs()]

        out = []
        for a in self.call(get):
            out.append(a if "/p2p/" in a else f"{a}/p2p/{pid}")
        return out

    def open_channel(self, addr: str, timeout: float | None = None) -> P2PChannel:
        """Dial ``addr`` (``/ip4/H/tcp/P/p2p/ID``), or reuse the live connection to that peer,
        open a stream and run the end-to-end key exchange."""
        import trio

        info, relayed = _peer_info(addr)
        limit = self.cfg.p2p.connect_timeout_s if timeout is None else timeout
        try:
            ch = self.call(self._dial, addr, info, relayed, limit)
        except trio.TooSlowError:
            raise TransportTimeout(f"could not reach {addr} within {limit} s") from None
        except EdgelinkError:
            raise
        except Exception as exc:  # noqa: BLE001 - libp2p raises many types on a failed dial
            raise Unreachable(dial_failure(addr, exc)) from None
        with self._lock:
            self._channels.add(ch)
        try:
            ch.handshake(self.cfg.p2p.handshake_timeout_s)
        except PeerGone as exc:
            raise PeerGone(self._refused(addr, exc)) from None
        return ch

    async def _dial(self, addr: str, info: Any, relayed: bool, limit: float) -> P2PChannel:
        """Connect, open the stream (a second try if it fails) and start the channel's tasks (trio thread)."""
        import trio

        with trio.fail_after(limit):
            # The address we were given is the truth: a peer that restarted elsewhere with
            # the same key must not be dialled at its old address.
            with contextlib.suppress(Exception):
                self._host.get_peerstore().clear_addrs(info.peer_id)
            # ... and a failed dial at another address must not block this one (libp2p keeps
            # a peer whose addresses all failed in a negative cache for a while).
            with contextlib.suppress(Exception):
                self._host.get_network().unblock_peer(info.peer_id)
            await self._connect_peer(addr, info, relayed)
        if relayed and not self._live_channels_to(info.peer_id.to_base58()):
            await self.circuits.go_direct(info.peer_id)  # its own time, not the dial's
        with trio.fail_after(limit):
            try:
                stream = await self._host.new_stream(info.peer_id, [PROTOCOL_ID])
            except Exception as exc:  # noqa: BLE001
                stream = await self._retry_stream(addr, info, relayed, exc)
        ch = P2PChannel(self, stream, initiator=True)
        self._nursery.start_soon(ch._run)
        return ch

    async def _connect_peer(self, addr: str, info: Any, relayed: bool) -> None:
        """A direct dial, or a circuit through the relay unless a connection to the peer is live."""
        if not relayed:
            await self._host.connect(info)
        elif not self._host.get_network().get_connections(info.peer_id):
            await self.circuits.dial(addr)  # the swarm refuses circuit addresses itself

    async def _redial(self, addr: str, info: Any, relayed: bool) -> None:
        """Drop the (maybe half dead) connection to the peer and dial it afresh."""
        with contextlib.suppress(Exception):
            await self._host.get_network().close_peer(info.peer_id)
        await self._connect_peer(addr, info, relayed)

    async def _retry_stream(self, addr: str, info: Any, relayed: bool, exc: BaseException):
        """A second try at a stream after ``exc``. A node that refuses a stream (allowlist,
        admission caps) resets it, sometimes while its protocol answer is still being read.
        With other live streams to that peer the connection works: ask again on it, since
        closing it would cut those sessions. With none it may be half dead (the peer reset
        hard, or restarted): dial afresh, once. A second reset in negotiation is a refusal."""
        live = self._live_channels_to(info.peer_id.to_base58())
        if live and _refused_in_negotiation(exc):
            raise PeerGone(self._refused(addr, exc)) from None
        log.info("p2p: new stream to %s failed (%s); %s", info.peer_id, exc,
                 "asking again" if live else "redialling")
        if not live:
            await self._redial(addr, info, relayed)
        try:
            return await self._host.new_stream(info.peer_id, [PROTOCOL_ID])
        except Exception as again:  # noqa: BLE001
            if _refused_in_negotiation(again):
                raise PeerGone(self._refused(addr, again)) from None
            if live and "No valid connections" in str(again):
                # the sessions we counted had not yet noticed that their connection died:
                # there is nothing left to cut, so dial afresh
                log.info("p2p: the connection to %s is gone; redialling", info.peer_id)
                await self._redial(addr, info, relayed)
                return await self._host.new_stream(info.peer_id, [PROTOCOL_ID])
            if live:
                raise PeerGone(f"{addr} did not open another stream beside this process's {live} "
                               f"live session(s) with it: {again}") from None
            raise

    def _refused(self, addr: str, exc: BaseException) -> str:
        """A node resets a stream unread when the peer is not on its allowlist or it holds its
        maximum of streams that have not authenticated; it says nothing more to a peer it has
        not authenticated, so the hint is ours."""
        return (f"{addr} closed the session before the key exchange finished: this peer "
                f"({self.peer_id}) may not be on its node.allow_peers, or it is at its limit of "
                f"streams waiting to authenticate (node.max_pending) ({exc})")

    def _live_channels_to(self, peer: str) -> int:
        with self._lock:
            return sum(1 for c in self._channels
                       if c.remote_peer_id == peer and not c.closed and c._broken is None and c._tx_error is None)

    def connected_peers(self) -> list[str]:
        async def get():
            return [p.to_base58() for p in self._host.get_network().connections]

        return self.call(get)

    def close(self) -> None:
        """Close every channel and stop the host thread."""
        if self._closed:
            return
        with self._lock:
            channels = list(self._channels)
        for ch in channels:
            ch.close()
        self._closed = True
        if self._token is not None and self._stop is not None:
            with contextlib.suppress(Exception):
                self._token.run_sync_soon(self._stop.set)
        self._thread.join(timeout=10)

    def __enter__(self) -> P2PHost:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _causes(exc: BaseException | None, seen: set[int] | None = None) -> Iterator[BaseException]:
    """``exc`` and everything under it: causes, contexts, and the parts of libp2p's MultiError."""
    seen = set() if seen is None else seen
    if exc is None or id(exc) in seen:
        return
    seen.add(id(exc))
    yield exc
    for sub in [*(getattr(exc, "errors", None) or ()), *(getattr(exc, "exceptions", None) or ())]:
        if isinstance(sub, BaseException):
            yield from _causes(sub, seen)
    yield from _causes(exc.__cause__, seen)
    yield from _causes(exc.__context__, seen)


class _ToApplication(logging.Handler):
    """Hands py-libp2p's records to the application's root handlers while it logs at INFO or
    below (edgelink -v), and drops them otherwise."""

    def emit(self, record: logging.LogRecord) -> None:
        root = logging.getLogger()
        level = root.getEffectiveLevel()
        if level <= logging.INFO and record.levelno >= level:
            root.handle(record)


def route_libp2p_logs() -> None:
    """Give py-libp2p's log records to the application's logging, verbose only.

    On import py-libp2p detaches its "libp2p" logger (no handler, no propagation) unless
    LIBP2P_DEBUG is set, so its errors reach stderr through logging's last-resort handler:
    four raw lines per failed dial above edgelink's own one-line error, whatever the
    application configured. Each failure they describe becomes an edgelink error that says it
    in the reader's words, so they are shown only when the application asks for INFO."""
    import libp2p  # noqa: F401 - its import is what detaches the logger

    lg = logging.getLogger("libp2p")
    if os.environ.get("LIBP2P_DEBUG") or any(isinstance(h, _ToApplication) for h in lg.handlers):
        return
    lg.addHandler(_ToApplication())


def dial_failure(addr: str, exc: BaseException) -> str:
    """One line for a dial that failed, from the reader's side: what is at that address, and
    what to change. (libp2p's own words are several exceptions deep; -v shows its log.)"""
    head = addr.rsplit("/p2p/", 1)[0]
    m = re.match(r"^/(?:ip4|ip6|dns|dns4|dns6)/([^/]+)/tcp/(\d+)", head)
    where = f"{m.group(1)}:{m.group(2)}" if m else head
    want = addr.rsplit("/p2p/", 1)[-1] if "/p2p/" in addr else "?"
    causes = list(_causes(exc))
    text = " | ".join(f"{type(c).__name__}: {c}" for c in causes)
    got = re.search(r"remote_peer_id_from_pubkey=(\w+)|got (12D3\w+|Qm\w+)", text)
    if got:
        return (f"the peer at {where} is {got.group(1) or got.group(2)}, not {want}: use the address that "
                "node prints now (its /p2p/ part changes with its identity key)")
    if any(isinstance(c, ConnectionRefusedError) for c in causes) or "all attempts to connect" in text \
            or "Connection refused" in text:
        return (f"nothing is listening at {where} (connection refused): is the node running, and is "
                "this the address it printed?")
    if "handshake failed when upgrading" in text:
        return (f"the peer at {where} failed the Noise handshake: it is not {want} (check the /p2p/ part "
                "of the address against what the node prints), or not a libp2p node")
    if "negotiate the secure protocol" in text:
        return f"the service at {where} does not speak libp2p with Noise: is it an edgelink node?"
    root = causes[-1] if causes else exc
    return f"could not open a session with {addr}: {type(root).__name__}: {str(root).splitlines()[0][:300]}"


def preload() -> None:
    """Import what dialling a peer needs now (py-libp2p: 1.4 s on a 2-core machine), so that a
    server whose requests may dial (``cache.peers``, ``http.prefill_peer``) does not spend it
    inside its first request's time to first token."""
    import libp2p  # noqa: F401
    import libp2p.crypto.ed25519  # noqa: F401 - the identity key (identity._from_seed)
    import libp2p.security.noise.transport  # noqa: F401

    import edgelink.transport.readahead  # noqa: F401 - its import is libp2p's, like the lines above


_CLIENT_HOSTS: dict[tuple[str, str], P2PHost] = {}
_CLIENT_LOCK = threading.Lock()


def client_host(cfg: Config, identity: Identity | None = None) -> P2PHost:
    """This process's dialling host for one identity key and one set of ``[p2p]`` settings,
    kept so that connections to a peer are reused across handoffs. A caller with other p2p
    settings (timeouts, windows, read-ahead) gets a host of its own: never the first caller's."""
    ident = identity or load_identity(cfg.p2p.identity_key)
    key = (str(ident.path), ident.peer_id_str, cfg.p2p)
    with _CLIENT_LOCK:
        host = _CLIENT_HOSTS.get(key)
        if host is None or host._closed or not host._thread.is_alive():
            host = P2PHost(cfg, ident)
            _CLIENT_HOSTS[key] = host
        return host


def close_client_hosts() -> None:
    with _CLIENT_LOCK:
        hosts = list(_CLIENT_HOSTS.values())
        _CLIENT_HOSTS.clear()
    for h in hosts:
        h.close()


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    """Poll ``pred`` until true or ``timeout`` passes (for shutdown paths, not data)."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= end:
            return False
        time.sleep(step)
    return True
