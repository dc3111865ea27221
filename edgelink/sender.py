"""The sending side of a session: handshake, ship a snapshot, ask for a continuation."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from edgelink.config import Config
from edgelink.errors import ChecksumMismatch, PeerGone, PeerRejected, SessionError
from edgelink.protocol.codec import tensor_message_digest
from edgelink.protocol.kinds import ApplyMode, Kind
from edgelink.protocol.messages import Ack, Reject, Result
from edgelink.protocol.session import Role, Session
from edgelink.receiver import frame_limit
from edgelink.runtime.llama import LlamaRuntime
from edgelink.snapshot import snapshot_tensors
from edgelink.transport.base import Channel


@dataclasses.dataclass
class SentSnapshot:
    message_id: int
    payload_bytes: int
    wire_bytes: int
    digest: str
    export_s: float
    roundtrip_s: float


class Sender:
    """A client session over one channel."""

    def __init__(self, ch: Channel, cfg: Config, signature: dict[str, Any],
                 kinds: tuple[Kind, ...] = (Kind.KV_CACHE,)):
        self.ch = ch
        self.cfg = cfg
        self.session = Session(Role.CLIENT, signature, cfg.protocol, kinds=kinds)
        self._limit = frame_limit(cfg)

    def handshake(self) -> None:
        self.ch.send(self.session.hello())
        self.session.receive(self.ch.recv(self._limit))  # raises PeerRejected / SignatureMismatch

    def _reply(self):
        msg = self.session.receive(self.ch.recv(self._limit))
        if isinstance(msg, Reject):
            raise PeerRejected(msg.code, msg.detail)
        return msg

    def send_snapshot(self, rt: LlamaRuntime) -> SentSnapshot:
        """Export the runtime's sequence, ship it and wait for the receiver's verified ACK."""
        t0 = time.perf_counter()
        tensors, attrs, token_range = snapshot_tensors(rt)
        parts, msg = self.session.encode_tensor_message(
            Kind.KV_CACHE, ApplyMode.OVERWRITE, tensors, seq_slot=rt.seq,
            layer_range=(0, rt.n_layer), token_range=token_range, attrs=attrs)
        t1 = time.perf_counter()
        try:
            self.ch.send(*parts)
        except PeerGone:
            # The receiver stopped reading mid-frame (it refused it); read why, if it said so.
            self._reply()
            raise
        ack = self._reply()
        t2 = time.perf_counter()
        if not isinstance(ack, Ack) or ack.acked_id != msg.message_id:
            raise SessionError(f"expected an ACK for message {msg.message_id}, got {ack}")
        digest = tensor_message_digest(msg)
        if ack.digest != digest:
            raise ChecksumMismatch("the receiver acknowledged a different digest than was sent")
        return SentSnapshot(msg.message_id, msg.payload_bytes, sum(memoryview(p).nbytes for p in parts),
                            digest.hex(), t1 - t0, t2 - t0)

    def request(self, op: str, **params: Any) -> dict[str, Any]:
        self.ch.send(self.session.request(op, params))
        res = self._reply()
        if not isinstance(res, Result):
            raise SessionError(f"expected a RESULT, got {res.frame_type.name}")
        return res.body

    def close(self) -> None:
        try:
            self.ch.send(self.session.close())
        finally:
            self.ch.close()
