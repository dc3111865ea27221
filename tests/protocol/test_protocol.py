"""Sans-IO tests of the codec: bytes in, typed messages or typed errors out."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from edgelink.errors import (
    ChecksumMismatch,
    MessageTooLarge,
    ProtocolError,
    TruncatedMessage,
    UnknownKind,
    UnsupportedVersion,
)
from edgelink.protocol import codec
from edgelink.protocol.kinds import ApplyMode, DType, Kind, tensor_nbytes
from edgelink.protocol.messages import Ack, Hello, Reject, Request, Result, Tensor, TensorMessage

SID = bytes(range(16))


def _tensor(name, arr, dtype):
    arr = np.ascontiguousarray(arr)
    return Tensor(name, dtype, arr.shape, memoryview(arr).cast("B"))


def _msg(**kw):
    rng = np.random.default_rng(0)
    tensors = (
        _tensor("a", rng.standard_normal((3, 5)).astype("<f2"), DType.F16),
        _tensor("tokens", np.arange(7, dtype="<i4"), DType.I32),
        _tensor("q", rng.integers(0, 255, (2, 34), dtype=np.uint8), DType.Q8_0),
    )
    q = tensors[2]
    tensors = tensors[:2] + (Tensor("q", DType.Q8_0, (2, 32), q.data),)
    base = dict(session_id=SID, message_id=3, kind=Kind.KV_CACHE, apply=ApplyMode.OVERWRITE, seq_slot=0,
                layer_range=(0, 30), token_range=(0, 7), tensors=tensors, attrs={"kv": {"x": 1}})
    base.update(kw)
    return TensorMessage(**base)


def _join(parts):
    return b"".join(bytes(p) for p in parts)


def test_tensor_message_round_trip(cfg):
    msg = _msg()
    frame = _join(codec.encode_tensor_message(msg))
    out = codec.decode_frame(frame, cfg.protocol)
    assert isinstance(out, TensorMessage)
    assert (out.kind, out.apply, out.layer_range, out.token_range, out.attrs) == (
        Kind.KV_CACHE, ApplyMode.OVERWRITE, (0, 30), (0, 7), {"kv": {"x": 1}})
    for a, b in zip(msg.tensors, out.tensors, strict=True):
        assert (a.name, a.dtype, a.shape) == (b.name, b.dtype, b.shape)
        assert bytes(a.data) == bytes(b.data)
    digest = codec.verify_checksums(out)
    assert digest == codec.message_digest([codec.checksum(t.data) for t in msg.tensors])
    assert out.tensor("tokens").array().tolist() == list(range(7))


def test_payload_is_aligned_and_not_copied(cfg):
    frame = bytearray(_join(codec.encode_tensor_message(_msg())))
    out = codec.decode_frame(frame, cfg.protocol)
    t = out.tensor("a")
    base = np.frombuffer(frame, dtype=np.uint8).ctypes.data
    offset = np.frombuffer(t.data, dtype=np.uint8).ctypes.data - base
    assert offset % 64 == 0
    frame[offset] ^= 0xFF  # the view sees the frame's memory: no copy was made
    assert bytes(t.data)[0] == frame[offset]


def test_flipped_payload_byte_fails_checksum(cfg):
    frame = bytearray(_join(codec.encode_tensor_message(_msg())))
    frame[-100] ^= 0x01
    out = codec.decode_frame(frame, cfg.protocol)
    with pytest.raises(ChecksumMismatch):
        codec.verify_checksums(out)


def test_flipped_header_byte_fails_header_digest(cfg):
    frame = bytearray(_join(codec.encode_tensor_message(_msg())))
    frame[70] ^= 0x01  # inside the tensor header (layer range)
    with pytest.raises(ChecksumMismatch):
        codec.decode_frame(frame, cfg.protocol)


def test_truncated_frames(cfg):
    frame = _join(codec.encode_tensor_message(_msg()))
    for cut in (0, 10, 63, 64, len(frame) - 1):
        with pytest.raises(TruncatedMessage):
            codec.decode_frame(frame[:cut], cfg.protocol)


def test_trailing_bytes_rejected(cfg):
    frame = _join(codec.encode_tensor_message(_msg()))
    with pytest.raises(ProtocolError):
        codec.decode_frame(frame + b"\0", cfg.protocol)


def _patch_preamble(frame: bytes, **fields) -> bytes:
    magic, ver, ftype, flags, sid, mid, hlen, res, plen = codec.PREAMBLE.unpack_from(frame, 0)
    vals = dict(magic=magic, ver=ver, ftype=ftype, flags=flags, sid=sid, mid=mid, hlen=hlen, res=res, plen=plen)
    vals.update(fields)
    pre = codec.PREAMBLE.pack(*vals.values())
    return pre + frame[48:]


def test_declared_sizes_over_limits_are_refused_before_allocation(cfg):
    frame = _join(codec.encode_tensor_message(_msg()))
    from edgelink.protocol.limits import UNFITTED_MAX_MESSAGE_BYTES, limit_of

    assert cfg.protocol.max_message_bytes == 0  # derived from the model once one is loaded
    assert limit_of(cfg.protocol) == UNFITTED_MAX_MESSAGE_BYTES
    huge = _patch_preamble(frame, plen=limit_of(cfg.protocol) + 1)
    with pytest.raises(MessageTooLarge, match="protocol.max_message_bytes"):
        codec.decode_frame(huge, cfg.protocol)
    fitted = cfg.protocol.__class__(**{**cfg.protocol.__dict__, "max_message_bytes": 1000})
    with pytest.raises(MessageTooLarge, match=r"1,000 bytes \(protocol.max_message_bytes"):
        codec.decode_frame(_patch_preamble(frame, plen=1001), fitted)
    with pytest.raises(MessageTooLarge):
        codec.decode_frame(_patch_preamble(frame, hlen=2**31), cfg.protocol)
    small = cfg.protocol.__class__(**{**cfg.protocol.__dict__, "max_tensors": 2})
    with pytest.raises(MessageTooLarge):
        codec.decode_frame(frame, small)


def test_unknown_version_and_frame_type(cfg):
    frame = _join(codec.encode_tensor_message(_msg()))
    with pytest.raises(UnsupportedVersion):
        codec.decode_frame(_patch_preamble(frame, ver=2), cfg.protocol)
    with pytest.raises(UnknownKind):
        codec.decode_frame(_patch_preamble(frame, ftype=99), cfg.protocol)
    with pytest.raises(ProtocolError):
        codec.decode_frame(_patch_preamble(frame, magic=b"JUNK"), cfg.protocol)


def test_unknown_message_kind_is_typed(cfg):
    msg = _msg()
    frame = bytearray(_join(codec.encode_tensor_message(msg)))
    frame[64] = 42  # kind byte, then fix the header digest so only the kind is wrong
    hlen = struct.unpack_from("<I", frame, 32)[0]
    import blake3

    frame[48:64] = blake3.blake3(bytes(frame[:48]) + bytes(frame[64:64 + hlen])).digest(length=16)
    with pytest.raises(UnknownKind):
        codec.decode_frame(frame, cfg.protocol)


def test_shape_and_length_must_agree():
    assert tensor_nbytes(DType.F16, (3, 5)) == 30
    assert tensor_nbytes(DType.Q8_0, (2, 64)) == 2 * 2 * 34
    with pytest.raises(ValueError):
        tensor_nbytes(DType.Q4_0, (1, 33))
    arr = np.zeros(10, dtype="<f4")
    bad = Tensor("x", DType.F32, (11,), memoryview(arr).cast("B"))
    with pytest.raises(ProtocolError):
        codec.encode_tensor_message(_msg(tensors=(bad,)))


def test_control_frames_round_trip(cfg):
    msgs = [
        Hello(SID, {"architecture": "llama"}, ("f16",), ("KV_CACHE",), 1 << 20, {"scheme": "none"}, "client"),
        Ack(SID, 4, 3, b"\x01" * 32),
        Reject(SID, 5, 3, "checksum", "tensor k0"),
        Request(SID, 6, "generate", {"n_tokens": 4}),
        Result(SID, 7, 6, {"tokens": [1, 2]}),
    ]
    for m in msgs:
        frame = codec.encode_hello(m) if isinstance(m, Hello) else codec.encode_control(m)
        assert codec.decode_frame(frame, cfg.protocol) == m


def test_json_header_schema_is_checked(cfg):
    bad = codec._frame(codec.FrameType.REQUEST, SID, 1, b'{"op": 3, "params": {}}')
    with pytest.raises(ProtocolError):
        codec.decode_frame(bad, cfg.protocol)
    with pytest.raises(ProtocolError):
        codec.decode_frame(codec._frame(codec.FrameType.ACK, SID, 1, b"[1,2]"), cfg.protocol)
