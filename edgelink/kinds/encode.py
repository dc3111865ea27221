"""Tensor messages encoded for sending, one way for every path: a session's sends (both
roles), replies, message files, snapshots and prefix-cache chunks (``OneWay``). Here, below
cache and roles, so that both use it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from edgelink import wire
from edgelink.config import Config
from edgelink.protocol.kinds import ApplyMode, Kind
from edgelink.protocol.messages import TensorMessage
from edgelink.protocol.session import Role, Session
from edgelink.protocol.signature import ModelSignature
from edgelink.transport.file import FileChannelWriter, frame_bytes

Built = tuple[list, dict, tuple[int, int]]  # what a kind's builder returns: tensors, attrs, token range


def encode_message(session: Session, kind: Kind, apply: ApplyMode, built: Built, *, seq_slot: int,
                   layer_range: tuple[int, int], codec: str | None = None,
                   effort: wire.Effort = wire.DEFAULT_EFFORT) -> tuple[list, TensorMessage]:
    """One tensor message as the frame's parts, its K/V tensors encoded with ``codec`` (None:
    raw; ``effort``: wire.zstd_level and wire.threads): the encoding every send path and every
    message file shares."""
    tensors, attrs, token_range = built
    if codec is not None:
        tensors, attrs = wire.encode_tensors(tensors, attrs, codec, session.send_checksum, effort)
    return session.encode_tensor_message(kind, apply, tensors, seq_slot=seq_slot, layer_range=layer_range,
                                         token_range=token_range, attrs=attrs)


@dataclasses.dataclass(frozen=True)
class OneWay:
    """A message for a reader that cannot answer (a message file, a snapshot in memory): the
    writer's HELLO, then one tensor message."""

    hello: bytes
    parts: list
    message: TensorMessage

    @classmethod
    def encode(cls, signature: ModelSignature, cfg: Config, kind: Kind, apply: ApplyMode, built: Built, *,
               seq_slot: int, layer_range: tuple[int, int], codec: str | None = None,
               kinds: tuple[Kind, ...] = tuple(Kind)) -> OneWay:
        """``cfg``: fitted to the runtime the state comes from (its limits bound the message);
        ``kinds``: what the HELLO names (a prefix-cache chunk names only its own kind)."""
        session = Session(Role.CLIENT, signature, cfg.protocol, kinds=kinds)
        hello = session.hello()
        session.assume_peer_accepts()
        parts, msg = encode_message(session, kind, apply, built, seq_slot=seq_slot, layer_range=layer_range,
                                    codec=codec, effort=wire.effort(cfg.wire))
        return cls(hello, parts, msg)

    def write(self, path: str | Path) -> int:
        """Write it as a message file (atomically, private); returns the file's size."""
        with FileChannelWriter(path) as w:
            w.send(self.hello)
            w.send(*self.parts)
        return Path(path).stat().st_size

    def to_bytes(self) -> bytes:
        """The message file's bytes, in memory."""
        return frame_bytes(self.hello) + frame_bytes(*self.parts)
