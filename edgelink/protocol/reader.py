"""Decoding a frame while its bytes arrive, each tensor written where its consumer wants it.

``codec.decode_frame`` needs the whole frame in one buffer, so a receiver that imports a
gigabyte of KV state would hold it twice: once as the frame, once as the blob it assembles
for llama.cpp. A ``FrameReader`` is a frame sink (``transport.framing.FrameSink``): the
transport asks it where the next bytes go and copies them there. Once the header is in, it
asks a *placer* (the applier of the message's kind) for a destination per tensor (a view of
the very buffer that will be imported) and hashes every piece right after it lands, while it
is still in cache. Whatever the placer does not claim goes to a reused scratch buffer.

It never raises while bytes arrive: a malformed header turns the rest of the frame into a
drain through a small buffer (so the stream stays in step and nothing is allocated for it),
and the error is raised by ``message()``, exactly as ``decode_frame`` would have raised it.
Checksums are compared by ``verify()``, which the session calls after its own checks, so the
order of refusals is the same as for a whole frame.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from edgelink.config import ProtocolConfig
from edgelink.errors import ChecksumMismatch, EdgelinkError, ProtocolError
from edgelink.protocol import codec
from edgelink.protocol.buffers import RecvBuffer
from edgelink.protocol.kinds import CHECKSUM_NAMES, FrameType
from edgelink.protocol.messages import Message, TensorMessage

log = logging.getLogger("edgelink.protocol")

# A tensor arrives in pieces of this size, each hashed as soon as it is in: small enough to be
# still in cache, large enough that the per-piece Python cost is noise.
PIECE_BYTES = 1 << 20

Placer = Callable[[codec.TensorHeader], dict[str, memoryview]]


class FrameReader:
    """A reusable frame sink that decodes as it goes; see the module docstring."""

    def __init__(self, limits: ProtocolConfig, place: Placer | None = None):
        self.limits = limits
        self.place = place
        self._scratch = RecvBuffer()
        self._small = bytearray(codec.PREAMBLE_BYTES)
        self._drain_buf = memoryview(bytearray(PIECE_BYTES))
        self._steps: Iterator[memoryview] = iter(())
        self._reset()

    def _reset(self) -> None:
        self._error: EdgelinkError | None = None
        self._msg: Message | None = None
        self._bad_tensor: str | None = None
        self.placed = 0  # bytes written straight into a placer's buffers (for tests and logs)

    def release(self) -> None:
        """Drop the last message and give scratch memory back (after a failed frame)."""
        self._steps = iter(())
        self._reset()
        self._scratch.release()

    # ------------------------------------------------------------------ the sink protocol

    def start(self, length: int) -> memoryview:
        self._reset()
        self._steps = self._plan(length)
        return next(self._steps)

    def filled(self) -> memoryview | None:
        return next(self._steps, None)

    # ------------------------------------------------------------------ results

    def message(self) -> Message:
        """The decoded message; raises what ``decode_frame`` would raise for these bytes."""
        if self._error is not None:
            raise self._error
        if self._msg is None:
            raise ProtocolError("the frame was not received whole")
        return self._msg

    def verify(self, msg: TensorMessage) -> bytes:
        """The message digest, or ChecksumMismatch naming the first tensor that differed."""
        if self._bad_tensor is not None:
            raise ChecksumMismatch(f"tensor {self._bad_tensor}: {CHECKSUM_NAMES[msg.checksum_alg]} checksum "
                                   "mismatch (payload corrupted)")
        return codec.tensor_message_digest(msg)

    # ------------------------------------------------------------------ the plan

    def _drain(self, n: int) -> Iterator[memoryview]:
        while n > 0:
            k = min(n, self._drain_buf.nbytes)
            yield self._drain_buf[:k]
            n -= k

    def _plan(self, length: int) -> Iterator[memoryview]:
        head = memoryview(self._small)[:min(length, codec.PREAMBLE_BYTES)]
        yield head
        try:
            pre = codec.parse_preamble(head, self.limits)
            codec.check_frame_size(pre, length)
        except EdgelinkError as exc:
            self._error = exc
            yield from self._drain(length - head.nbytes)
            return
        header = memoryview(bytearray(pre.header_len))
        if pre.header_len:
            yield header
        try:
            codec.check_header_digest(head, header, pre.ftype)
            if pre.ftype != FrameType.TENSOR:
                self._msg = codec.decode_control(pre, header, self.limits)
                return
            th = codec.parse_tensor_header(header, pre.payload_len, self.limits)
        except EdgelinkError as exc:
            self._error = exc
            yield from self._drain(pre.payload_len)
            return
        dest = self._placements(th)
        spare = self._scratch.view(sum(e.nbytes for e in th.entries if e.name not in dest))
        data = []
        for e in th.entries:
            view = dest.get(e.name)
            if view is None:
                view, spare = spare[:e.nbytes], spare[e.nbytes:]
            else:
                self.placed += e.nbytes
            h = codec.hasher(th.checksum_alg)
            for at in range(0, e.nbytes, PIECE_BYTES):
                piece = view[at:at + PIECE_BYTES]
                yield piece
                h.update(piece)
            if self._bad_tensor is None and h.digest() != e.checksum:
                self._bad_tensor = e.name
            pad = codec.pad_bytes(e.nbytes)
            if pad:
                yield self._drain_buf[:pad]
            data.append(view)
        self._msg = codec.tensor_message(pre, th, data)

    def _placements(self, th: codec.TensorHeader) -> dict[str, memoryview]:
        """The placer's destinations, each checked: writable, flat, exactly the tensor's size.
        A placer that fails or offers a wrong buffer only costs the copy it would have saved."""
        if self.place is None:
            return {}
        try:
            offered = self.place(th)
        except Exception:  # noqa: BLE001 - a placer bug must not lose the frame
            log.exception("placing a %s message failed; receiving it into scratch", th.kind.name)
            return {}
        sizes = {e.name: e.nbytes for e in th.entries}
        dest = {}
        for name, view in offered.items():
            if (name in sizes and isinstance(view, memoryview) and not view.readonly
                    and view.c_contiguous and view.nbytes == sizes[name]):
                dest[name] = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        return dest
