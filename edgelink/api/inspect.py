"""Describe a file of protocol frames (what `export` writes) without applying anything."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgelink.config import Config
from edgelink.protocol import codec
from edgelink.protocol.kinds import CHECKSUM_NAMES
from edgelink.protocol.messages import Hello, TensorMessage
from edgelink.transport.file import FileChannelReader


def describe_frame(frame: memoryview, cfg: Config) -> dict[str, Any]:
    """One frame as plain data; tensor checksums are recomputed and reported as verified or not."""
    msg = codec.decode_frame(frame, cfg.protocol)
    out: dict[str, Any] = {"frame": msg.frame_type.name, "message_id": msg.message_id,
                           "session_id": msg.session_id.hex(), "bytes": frame.nbytes}
    if isinstance(msg, Hello):
        sig = msg.signature
        out.update(role=msg.role, kinds=list(msg.kinds), encryption=msg.encryption,
                   model={k: sig.get(k) for k in ("architecture", "name", "n_layer", "n_embd",
                                                   "weights_digest", "llama_cpp")})
    elif isinstance(msg, TensorMessage):
        tensors = []
        for t in msg.tensors:
            tensors.append({"name": t.name, "dtype": t.dtype.name.lower(), "shape": list(t.shape),
                            "bytes": t.nbytes, "checksum": t.checksum.hex(),
                            "verified": codec.checksum(t.data, msg.checksum_alg) == t.checksum})
        out.update(kind=msg.kind.name, apply=msg.apply.name, seq_slot=msg.seq_slot,
                   layers=list(msg.layer_range), tokens=list(msg.token_range),
                   payload_bytes=msg.payload_bytes, attrs=msg.attrs, tensors=tensors,
                   checksum=CHECKSUM_NAMES[msg.checksum_alg],
                   digest=codec.tensor_message_digest(msg).hex(),
                   verified=all(t["verified"] for t in tensors))
    return out


def inspect_file(path: str | Path, cfg: Config) -> list[dict[str, Any]]:
    frames = []
    if not cfg.protocol.max_message_bytes:
        # No model to derive a limit from: the file's own size bounds what it can hold (a
        # Llama-3-8B state at 8k tokens is over the 1 GiB fallback).
        try:
            size = os.path.getsize(path)
        except (OSError, ValueError):
            size = 0  # the reader below says what is wrong with the path
        cfg = cfg.replace(protocol_max_message_bytes=max(size, 1))
    with FileChannelReader(path, magic=codec.MAGIC) as reader:
        for frame in reader:
            frames.append(describe_frame(frame, cfg))
    return frames
