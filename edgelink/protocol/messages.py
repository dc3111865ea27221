"""Typed protocol messages. Plain data: encoding lives in ``codec``, rules in ``session``."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from edgelink.protocol.kinds import NUMPY_DTYPE, ApplyMode, Checksum, DType, FrameType, Kind

SESSION_ID_BYTES = 16
CHECKSUM_BYTES = 32


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One named tensor. ``data`` is a read-only view; it is never copied by the protocol."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    data: memoryview
    checksum: bytes = b""

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def array(self) -> np.ndarray:
        """A numpy view (raw uint8 rows for block-quantized types)."""
        if self.dtype in NUMPY_DTYPE:
            return np.frombuffer(self.data, dtype=NUMPY_DTYPE[self.dtype]).reshape(self.shape)
        return np.frombuffer(self.data, dtype=np.uint8).reshape(self.shape[:-1] + (-1,))


@dataclasses.dataclass(frozen=True)
class Hello:
    """First frame each side sends: who it is and what it can take."""

    session_id: bytes
    signature: dict[str, Any]
    dtypes: tuple[str, ...]
    kinds: tuple[str, ...]
    max_message_bytes: int
    encryption: dict[str, Any]
    role: str
    message_id: int = 0
    # Optional credentials for the peer (a bearer token: {"token": "..."}); sent only inside
    # an encrypted channel, and absent from the frame when empty.
    auth: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The bridge a bridged session (two different models) runs through: {"digest", "source",
    # "target"} (the bridge's sha256 and both models' weights digests); absent when empty.
    bridge: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The tensor checksum algorithms this side accepts, most preferred first (kinds.Checksum
    # names); absent from the frame when it is only blake3, which is what earlier peers take.
    checksums: tuple[str, ...] = ("blake3",)
    # The wire codecs (edgelink/wire) this side takes as a receiver; absent when none.
    codecs: tuple[str, ...] = ()
    # A receiver's prefill speed in tokens/s, for a sender planning a handoff (edgelink/wire/
    # plan.py); 0 (absent from the frame) when not announced.
    prefill_tps: float = 0.0
    # How many replies to requests sent ahead a receiver answers before their ACKs (cache_get:
    # a fetch keeps that many chunks in flight); 1 (absent from the frame): one at a time.
    pipeline: int = 1
    frame_type: FrameType = dataclasses.field(default=FrameType.HELLO, init=False)


@dataclasses.dataclass(frozen=True)
class TensorMessage:
    """A tensor message: what it is (kind), where it applies (layers, tokens, slot) and how."""

    session_id: bytes
    message_id: int
    kind: Kind
    apply: ApplyMode
    seq_slot: int
    layer_range: tuple[int, int]
    token_range: tuple[int, int]
    tensors: tuple[Tensor, ...]
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)
    checksum_alg: Checksum = Checksum.BLAKE3  # how every tensor's checksum was computed
    frame_type: FrameType = dataclasses.field(default=FrameType.TENSOR, init=False)

    def tensor(self, name: str) -> Tensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def payload_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclasses.dataclass(frozen=True)
class Ack:
    """The receiver applied message ``acked_id``; ``digest`` is what it verified."""

    session_id: bytes
    message_id: int
    acked_id: int
    digest: bytes
    frame_type: FrameType = dataclasses.field(default=FrameType.ACK, init=False)


@dataclasses.dataclass(frozen=True)
class Reject:
    """A typed refusal; ``code`` is an errors.*.code value, ``about_id`` the refused message."""

    session_id: bytes
    message_id: int
    about_id: int
    code: str
    detail: str
    frame_type: FrameType = dataclasses.field(default=FrameType.REJECT, init=False)


@dataclasses.dataclass(frozen=True)
class Request:
    """Ask the peer to do something with the state it holds (for example: generate)."""

    session_id: bytes
    message_id: int
    op: str
    params: dict[str, Any]
    frame_type: FrameType = dataclasses.field(default=FrameType.REQUEST, init=False)


@dataclasses.dataclass(frozen=True)
class Result:
    session_id: bytes
    message_id: int
    about_id: int
    body: dict[str, Any]
    frame_type: FrameType = dataclasses.field(default=FrameType.RESULT, init=False)


@dataclasses.dataclass(frozen=True)
class Close:
    session_id: bytes
    message_id: int
    frame_type: FrameType = dataclasses.field(default=FrameType.CLOSE, init=False)


Message = Hello | TensorMessage | Ack | Reject | Request | Result | Close
