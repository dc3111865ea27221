"""The pure boundaries that read untrusted bytes, each as ``target(data) -> None`` that must
either return or raise an ``EdgelinkError``: anything else (another exception, a hang, an
allocation beyond the bytes given) is a defect. Used by the test suite (short, seeded) and by
``python -m edgelink.fuzz`` (long, before a release)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

from edgelink import wire
from edgelink.bridge import load_bridge
from edgelink.config import ProtocolConfig, load_config
from edgelink.errors import EdgelinkError, PeerGone
from edgelink.protocol import codec
from edgelink.protocol.kinds import Kind
from edgelink.protocol.limits import limit_of
from edgelink.protocol.messages import Hello, Request, Result, TensorMessage
from edgelink.protocol.ops import check_params, check_result
from edgelink.protocol.reader import FrameReader
from edgelink.protocol.session import Role, Session
from edgelink.protocol.signature import ModelSignature
from edgelink.runtime.kvstate import parse_seq_state, tensors_to_state
from edgelink.transport.file import FileChannelReader
from edgelink.transport.framing import Scatter
from edgelink.transport.identity import load_identity


def decode(limits: ProtocolConfig) -> Callable[[bytes], Any]:
    """codec.decode_frame, then the checks that run on what it returns without a model."""
    def target(frame: bytes) -> Any:
        msg = codec.decode_frame(frame, limits)
        follow_up(msg)
        return msg
    return target


def frame_reader(limits: ProtocolConfig, seed: int = 0) -> Callable[[bytes], Any]:
    """The streaming decoder (protocol/reader.py) against ``decode_frame`` on the same bytes,
    fed in random slices through a ``Scatter`` with a placer that claims every other tensor:
    both refuse with the same error type, or both give the same message, checksums included."""
    import random

    rng = random.Random(seed)

    def place(th: codec.TensorHeader) -> dict[str, memoryview]:
        return {e.name: memoryview(bytearray(e.nbytes)) for e in th.entries[::2]}

    reader = FrameReader(limits, place)

    def outcome(get, verify):
        try:
            msg = get()
            if isinstance(msg, TensorMessage):
                verify(msg)
            return msg
        except Exception as exc:  # noqa: BLE001 - compared, then re-raised if untyped
            _typed(exc)
            return type(exc)

    def target(frame: bytes) -> Any:
        out = Scatter(reader, len(frame))
        view = memoryview(frame)
        while out.remaining:
            k = min(out.remaining, rng.choice((1, 7, 64, 4096, 1 << 20)))
            out.write(view[:k])
            view = view[k:]
        if out.current() is not None:
            raise AssertionError("the reader asked for more bytes than the frame holds")
        got = outcome(reader.message, reader.verify)
        want = outcome(lambda: codec.decode_frame(frame, limits), codec.verify_checksums)
        if isinstance(want, type) or isinstance(got, type):
            if got is not want:
                raise AssertionError(f"streaming decode gave {got}, whole-frame decode {want}")
        elif _comparable(got) != _comparable(want):
            raise AssertionError("streaming and whole-frame decoding disagree")
        return got
    return target


def _comparable(msg: Any) -> Any:
    if isinstance(msg, TensorMessage):
        return (msg.kind, msg.apply, msg.seq_slot, msg.layer_range, msg.token_range, msg.attrs,
                [(t.name, t.dtype, t.shape, bytes(t.data), t.checksum) for t in msg.tensors])
    return msg


def follow_up(msg: Any) -> None:
    """What a receiver does next with a decoded message, short of touching a model."""

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
        if "wire" in msg.attrs:
            msg = wire.decode_message(msg, list(wire.CODECS), 1 << 28)
        if msg.kind in (Kind.KV_CACHE, Kind.KV_CACHE_DELTA, Kind.KV_MEMORY) and "kv" in msg.attrs:
            tensors_to_state({t.name: t for t in msg.tensors}, msg.attrs["kv"])


def _typed(exc: Exception) -> None:
    if not isinstance(exc, EdgelinkError):
        raise exc


def session(signature: ModelSignature, limits: ProtocolConfig, kinds=tuple(Kind)) -> Callable[[list[bytes]], Any]:
    """A server session fed a whole exchange: a HELLO, then frames; each refusal is typed and
    the session goes on when the refusal allows it."""

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
            if s.peer is not None and not s.hello_sent:
                s.hello()
    return target


def seq_state_blob(data: bytes) -> None:
    parse_seq_state(memoryview(data))


def message_file(data: bytes) -> None:
    """A message file (edgelink export): every frame read, decoded and followed up."""

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
    return load_config().protocol


__all__ = ["decode", "follow_up", "session", "seq_state_blob", "message_file", "identity_file",
           "bridge_files"]
