"""The pure boundaries that read untrusted bytes, each as ``target(data) -> None`` that must
either return or raise an ``EdgelinkError``: anything else (another exception, a hang, an
allocation beyond the bytes given) is a defect. Used by the test suite (short, seeded) and by
``python -m edgelink.fuzz`` (long, before a release)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

from edgelink.config import ProtocolConfig
from edgelink.protocol import codec
from edgelink.protocol.kinds import Kind
from edgelink.protocol.limits import limit_of
from edgelink.protocol.messages import Hello, Request, Result, TensorMessage
from edgelink.protocol.ops import check_params, check_result
from edgelink.protocol.session import Role, Session


def decode(limits: ProtocolConfig) -> Callable[[bytes], Any]:
    """codec.decode_frame, then the checks that run on what it returns without a model."""
    def target(frame: bytes) -> Any:
        msg = codec.decode_frame(frame, limits)
        follow_up(msg)
        return msg
    return target


def follow_up(msg: Any) -> None:
    """What a receiver does next with a decoded message, short of touching a model."""
    from edgelink.runtime.kvstate import tensors_to_state

    if isinstance(msg, Request):
        check_params(msg.op, msg.params)
    elif isinstance(msg, Result):
        for op in ("generate", "digest", "latent_caps", "label_scores"):
            try:
                check_result(op, msg.body)
            except Exception as exc:  # noqa: BLE001 - re-raised below when untyped
                _typed(exc)
    elif isinstance(msg, TensorMessage):
        codec.verify_checksums(msg)
        if msg.kind in (Kind.KV_CACHE, Kind.KV_CACHE_DELTA, Kind.KV_MEMORY) and "kv" in msg.attrs:
            tensors_to_state({t.name: t for t in msg.tensors}, msg.attrs["kv"])


def _typed(exc: Exception) -> None:
    from edgelink.errors import EdgelinkError

    if not isinstance(exc, EdgelinkError):
        raise exc


def session(signature: dict[str, Any], limits: ProtocolConfig, kinds=tuple(Kind)) -> Callable[[list[bytes]], Any]:
    """A server session fed a whole exchange: a HELLO, then frames; each refusal is typed and
    the session goes on when the refusal allows it."""
    from edgelink.errors import EdgelinkError

    def target(frames: list[bytes]) -> None:
        s = Session(Role.SERVER, signature, limits, kinds=kinds)
        for f in frames:
            try:
                msg = s.receive(f)
                if not isinstance(msg, Hello):
                    follow_up(msg)
            except EdgelinkError:
                pass
            if s.state.value == "closed":
                return
            if s.peer is not None and not s._hello_sent:
                s.hello()
    return target


def seq_state_blob(data: bytes) -> None:
    from edgelink.runtime.kvstate import parse_seq_state

    parse_seq_state(memoryview(data))


def message_file(data: bytes) -> None:
    """A message file (edgelink export): every frame read, decoded and followed up."""
    from edgelink.errors import PeerGone
    from edgelink.transport.file import FileChannelReader

    limits = _default_limits()
    fd, path = tempfile.mkstemp(suffix=".elk")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        with FileChannelReader(path) as r:
            while True:
                try:
                    frame = r.recv(limit_of(limits) + limits.max_control_bytes + 64)
                except PeerGone:
                    return
                follow_up(codec.decode_frame(frame, limits))
    finally:
        os.unlink(path)


def identity_file(data: bytes) -> None:
    from edgelink.identity import load_identity

    fd, path = tempfile.mkstemp(suffix=".key")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(path, 0o600)
        load_identity(path, create=False)
    finally:
        os.unlink(path)


def bridge_files(manifest: bytes, npz: bytes, *, fix_sha: bool = True) -> Any:
    """A bridge manifest and npz pair (the manifest's sha256 fixed to the npz by default, so the
    npz parser is reached, as it would be by anyone who writes both files)."""
    import hashlib
    import json

    from edgelink.bridge import load_bridge

    with tempfile.TemporaryDirectory() as d:
        if fix_sha:
            try:
                meta = json.loads(manifest)
                if isinstance(meta, dict):
                    meta["weights_sha256"] = hashlib.sha256(npz).hexdigest()
                    meta["weights_file"] = "b.npz"
                    manifest = json.dumps(meta).encode()
            except (ValueError, RecursionError):
                pass  # not JSON we can fix up: load_bridge gets it as it is
        with open(os.path.join(d, "b.json"), "wb") as fh:
            fh.write(manifest)
        with open(os.path.join(d, "b.npz"), "wb") as fh:
            fh.write(npz)
        return load_bridge(os.path.join(d, "b"))


def _default_limits() -> ProtocolConfig:
    from edgelink.config import load_config

    return load_config().protocol


__all__ = ["decode", "follow_up", "session", "seq_state_blob", "message_file", "identity_file",
           "bridge_files"]
