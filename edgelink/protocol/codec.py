"""Bytes <-> typed messages for protocol v1. Pure functions: no I/O, no pickle.

Every frame starts with a 64-byte preamble::

    magic "ELNK" | version u16 | frame type u8 | flags u8 | session id 16 B | message id u64
    | header length u32 | reserved u32 | payload length u64 | blake3(preamble[:48] + header)[:16]

then the type's header (JSON for handshake and control frames, a packed binary table for
tensor frames) and, for tensor frames only, the payload: tensors laid out contiguously at
64-byte aligned offsets. Every declared length is checked against ``ProtocolConfig`` limits
and against the frame's real size before anything is allocated or sliced.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import blake3
import numpy as np
import xxhash

from edgelink.config import ProtocolConfig
from edgelink.errors import (
    ChecksumMismatch,
    MessageTooLarge,
    ProtocolError,
    TruncatedMessage,
    UnknownKind,
    UnsupportedVersion,
)
from edgelink.protocol.kinds import (
    CHECKSUM_NAMES,
    MAGIC,
    PROTOCOL_VERSION,
    ApplyMode,
    Checksum,
    DType,
    FrameType,
    Kind,
    tensor_nbytes,
)
from edgelink.protocol.limits import describe_bytes, limit_of
from edgelink.protocol.messages import (
    CHECKSUM_BYTES,
    SESSION_ID_BYTES,
    Ack,
    Close,
    Hello,
    Message,
    Reject,
    Request,
    Result,
    Tensor,
    TensorMessage,
)
from edgelink.protocol.untrusted import (
    I64_MAX,
    U64_MAX,
    Hex,
    Int,
    Json,
    Num,
    Obj,
    Seq,
    Str,
    load_json,
)

PREAMBLE = struct.Struct("<4sHBB16sQIIQ")  # 48 bytes, then a 16-byte header digest
PREAMBLE_BYTES = 64
HEADER_DIGEST_BYTES = 16
TENSOR_FIXED = struct.Struct("<BBHiiiqqII")  # kind, apply, checksum alg, slot, layers, tokens, count, attrs
TENSOR_ENTRY = struct.Struct("<HBB")  # name length, dtype, ndim
TENSOR_TAIL = struct.Struct("<QQ32s")  # offset, byte length, checksum
ALIGN = 64
MAX_PIPELINE = 64  # a HELLO's "pipeline": replies a receiver may have in flight

Buffer = bytes | bytearray | memoryview


# Tensors at least this large are hashed on every core (blake3's tree splits them): 1.4-2x on
# two cores from 256 KiB up; below it thread start-up costs more than it saves.
_PARALLEL_HASH_BYTES = 1 << 18


class _Xxh3:
    """xxh3-128 as a 32-byte checksum (the digest, then 16 zero bytes), blake3's interface."""

    def __init__(self) -> None:
        self._h = xxhash.xxh3_128()

    def update(self, data: Buffer | np.ndarray) -> None:
        self._h.update(data)

    def digest(self) -> bytes:
        return self._h.digest() + bytes(16)


def hasher(alg: Checksum, nbytes: int = 0):
    """An incremental hasher for ``alg`` (``update``, ``digest``): 32-byte digests."""
    if alg is Checksum.XXH3_128:
        return _Xxh3()
    threads = blake3.blake3.AUTO if nbytes >= _PARALLEL_HASH_BYTES else 1
    return blake3.blake3(max_threads=threads)


def checksum(data: Buffer | np.ndarray, alg: Checksum = Checksum.BLAKE3) -> bytes:
    """A tensor's checksum: what the receiver verifies and acknowledges."""
    h = hasher(alg, memoryview(data).nbytes)
    h.update(data)
    return h.digest()


_POOL: ThreadPoolExecutor | None = None
# xxh3 releases the GIL: a message this large is hashed a tensor per thread (two cores: 1.5x).
_POOL_MIN_BYTES = 8 << 20


def checksums(datas: Sequence[Buffer | np.ndarray], alg: Checksum) -> list[bytes]:
    """Every tensor's checksum, in order; xxh3 over a large message uses every core."""
    global _POOL
    sizes = [memoryview(d).nbytes for d in datas]
    if alg is not Checksum.XXH3_128 or sum(sizes) < _POOL_MIN_BYTES or len(datas) < 2:
        return [checksum(d, alg) for d in datas]
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max(1, len(os.sched_getaffinity(0))), thread_name_prefix="edgelink-hash")
    return list(_POOL.map(lambda d: checksum(d, alg), datas))


def message_digest(checksums: Sequence[bytes]) -> bytes:
    """One digest for a whole tensor message: blake3 over its tensors' checksums in order."""
    h = blake3.blake3()
    for c in checksums:
        h.update(c)
    return h.digest()


def pad_bytes(n: int) -> int:
    """Zero bytes after a tensor of ``n`` bytes, so the next one starts 64-byte aligned."""
    return (-n) % ALIGN


def _frame(ftype: FrameType, session_id: bytes, message_id: int, header: bytes,
           payload_len: int = 0) -> bytes:
    if len(session_id) != SESSION_ID_BYTES:
        raise ProtocolError("session id must be 16 bytes")
    pre = PREAMBLE.pack(MAGIC, PROTOCOL_VERSION, int(ftype), 0, session_id, message_id,
                        len(header), 0, payload_len)
    digest = blake3.blake3(pre + header).digest(length=HEADER_DIGEST_BYTES)
    return pre + digest + header


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------- encoding


def encode_hello(h: Hello) -> bytes:
    body = {
        "role": h.role,
        "signature": h.signature,
        "dtypes": list(h.dtypes),
        "kinds": list(h.kinds),
        "max_message_bytes": h.max_message_bytes,
        "encryption": h.encryption,
    }
    if h.auth:
        body["auth"] = h.auth
    if h.bridge:
        body["bridge"] = h.bridge
    if tuple(h.checksums) != ("blake3",):
        body["checksums"] = list(h.checksums)
    if h.codecs:
        body["codecs"] = list(h.codecs)
    if h.prefill_tps > 0:
        body["prefill_tps"] = h.prefill_tps
    if h.pipeline > 1:
        body["pipeline"] = h.pipeline
    return _frame(FrameType.HELLO, h.session_id, h.message_id, _json(body))


def encode_control(msg: Ack | Reject | Request | Result | Close) -> bytes:
    if isinstance(msg, Ack):
        body: dict[str, Any] = {"acked_id": msg.acked_id, "digest": msg.digest.hex()}
    elif isinstance(msg, Reject):
        body = {"about_id": msg.about_id, "code": msg.code, "detail": msg.detail}
    elif isinstance(msg, Request):
        body = {"op": msg.op, "params": msg.params}
    elif isinstance(msg, Result):
        body = {"about_id": msg.about_id, "body": msg.body}
    elif isinstance(msg, Close):
        body = {}
    else:  # pragma: no cover - typing guards this
        raise ProtocolError(f"not a control message: {type(msg).__name__}")
    return _frame(msg.frame_type, msg.session_id, msg.message_id, _json(body))


def encode_tensor_message(msg: TensorMessage) -> list[Buffer]:
    """Frame parts for ``channel.send(*parts)``; tensor bytes are referenced, never copied.

    Tensors whose ``checksum`` is empty are hashed here.
    """
    attrs = _json(msg.attrs) if msg.attrs else b""
    entries: list[bytes] = []
    offset = 0
    layout: list[tuple[Tensor, int, int]] = []
    for t in msg.tensors:
        name = t.name.encode()
        expected = tensor_nbytes(t.dtype, t.shape)
        if expected != t.nbytes:
            raise ProtocolError(f"tensor {t.name}: {t.nbytes} bytes, shape needs {expected}")
        digest = t.checksum or checksum(t.data)
        entries.append(
            TENSOR_ENTRY.pack(len(name), int(t.dtype), len(t.shape))
            + struct.pack(f"<{len(t.shape)}Q", *t.shape)
            + TENSOR_TAIL.pack(offset, t.nbytes, digest)
            + name
        )
        layout.append((t, offset, pad_bytes(t.nbytes)))
        offset += t.nbytes + pad_bytes(t.nbytes)
    fixed = TENSOR_FIXED.pack(int(msg.kind), int(msg.apply), int(msg.checksum_alg), msg.seq_slot, *msg.layer_range,
                              *msg.token_range, len(msg.tensors), len(attrs))
    header = fixed + attrs + b"".join(entries)
    header += b"\0" * pad_bytes(PREAMBLE_BYTES + len(header))
    parts: list[Buffer] = [_frame(FrameType.TENSOR, msg.session_id, msg.message_id, header, offset)]
    for t, _, pad in layout:
        parts.append(t.data)
        if pad:
            parts.append(bytes(pad))
    return parts


# ---------------------------------------------------------------------------- decoding


_ANY_OBJECT = Obj(extra=Json())
_HELLO = Obj(
    {"role": Str(16, choices=("client", "server")),
     "signature": Obj(extra=Json(), max_keys=128),
     "dtypes": Seq(Str(32), max_items=64),
     "kinds": Seq(Str(64), max_items=64),
     "max_message_bytes": Int(0, I64_MAX),
     "encryption": Obj(extra=Json(), max_keys=32)},
    {"auth": Obj(extra=Json(scalar=True), max_keys=16),
     "bridge": Obj(extra=Json(scalar=True), max_keys=16),  # compat.bridge_rule checks it
     "checksums": Seq(Str(32), min_items=1, max_items=16),
     "codecs": Seq(Str(32), max_items=32),
     "prefill_tps": Num(0, 1e9),
     "pipeline": Int(1, MAX_PIPELINE)},
)
_CONTROL = {
    FrameType.ACK: Obj({"acked_id": Int(0, U64_MAX), "digest": Hex(max_bytes=64)}),
    FrameType.REJECT: Obj({"about_id": Int(-1, U64_MAX), "code": Str(64), "detail": Str(8192)}),
    FrameType.REQUEST: Obj({"op": Str(64, min_len=1), "params": _ANY_OBJECT}),
    FrameType.RESULT: Obj({"about_id": Int(-1, U64_MAX), "body": _ANY_OBJECT}),
    FrameType.CLOSE: Obj(),
}


def _load_json(header: memoryview, what: str, limits: ProtocolConfig, schema: Obj) -> dict[str, Any]:
    return schema(load_json(header, what, max_depth=limits.max_json_depth), what)


@dataclasses.dataclass(frozen=True)
class Preamble:
    """The fixed 64 bytes that open every frame, checked against this side's limits."""

    ftype: FrameType
    session_id: bytes
    message_id: int
    header_len: int
    payload_len: int

    @property
    def total(self) -> int:
        return PREAMBLE_BYTES + self.header_len + self.payload_len


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One row of a tensor frame's table: where a tensor lies in the payload, and its digest."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    checksum: bytes


@dataclasses.dataclass(frozen=True)
class TensorHeader:
    """A tensor frame's header, checked: everything but the tensors' bytes."""

    kind: Kind
    apply: ApplyMode
    seq_slot: int
    layer_range: tuple[int, int]
    token_range: tuple[int, int]
    attrs: dict[str, Any]
    entries: tuple[TensorEntry, ...]
    checksum_alg: Checksum = Checksum.BLAKE3


def parse_preamble(view: memoryview, limits: ProtocolConfig) -> Preamble:
    """Check the first 64 bytes of a frame: magic, version, type and the declared lengths."""
    if len(view) < PREAMBLE_BYTES:
        raise TruncatedMessage(f"frame of {len(view)} bytes is shorter than the preamble")
    magic, version, ftype_raw, _flags, session_id, message_id, header_len, _res, payload_len = (
        PREAMBLE.unpack_from(view, 0)
    )
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"protocol version {version} (this peer speaks {PROTOCOL_VERSION})")
    try:
        ftype = FrameType(ftype_raw)
    except ValueError:
        raise UnknownKind(f"unknown frame type {ftype_raw}") from None
    header_limit = {
        FrameType.HELLO: limits.max_handshake_bytes,
        FrameType.TENSOR: limits.max_control_bytes,
    }.get(ftype, limits.max_control_bytes)
    if header_len > header_limit:
        raise MessageTooLarge(f"{ftype.name} header of {header_len} bytes exceeds {header_limit}")
    if payload_len > limit_of(limits):
        raise MessageTooLarge(f"a message of {describe_bytes(payload_len)} exceeds this side's limit of "
                              f"{describe_bytes(limit_of(limits))} (protocol.max_message_bytes; 0 derives "
                              "it from the model and n_ctx)")
    if ftype != FrameType.TENSOR and payload_len:
        raise ProtocolError(f"{ftype.name} frames carry no payload")
    return Preamble(ftype, bytes(session_id), message_id, header_len, payload_len)


def check_frame_size(pre: Preamble, size: int) -> None:
    """The frame is exactly as long as its preamble declares."""
    if size < pre.total:
        raise TruncatedMessage(f"frame declares {pre.total} bytes, got {size}")
    if size > pre.total:
        raise ProtocolError(f"{size - pre.total} trailing bytes after the frame")


def check_header_digest(view: memoryview, header: memoryview, ftype: FrameType) -> None:
    """The preamble's digest covers its first 48 bytes and the header."""
    want = blake3.blake3(view[:48]).update(header).digest(length=HEADER_DIGEST_BYTES)
    if want != bytes(view[48:64]):
        raise ChecksumMismatch(f"{ftype.name} header digest mismatch")


def decode_frame(buf: Buffer, limits: ProtocolConfig) -> Message:
    """Decode one whole frame. Raises a ProtocolError subclass on anything malformed."""
    view = memoryview(buf).cast("B")
    pre = parse_preamble(view, limits)
    check_frame_size(pre, len(view))
    header = view[PREAMBLE_BYTES:PREAMBLE_BYTES + pre.header_len]
    check_header_digest(view, header, pre.ftype)
    if pre.ftype == FrameType.TENSOR:
        payload = view[PREAMBLE_BYTES + pre.header_len:]
        th = parse_tensor_header(header, len(payload), limits)
        return tensor_message(pre, th, [payload[e.offset:e.offset + e.nbytes] for e in th.entries])
    return decode_control(pre, header, limits)


def decode_control(pre: Preamble, header: memoryview, limits: ProtocolConfig) -> Message:
    """A HELLO or control frame from its checked preamble and header."""
    sid, message_id, ftype, what = pre.session_id, pre.message_id, pre.ftype, pre.ftype.name
    if ftype == FrameType.HELLO:
        body = _load_json(header, what, limits, _HELLO)
        return Hello(
            session_id=sid,
            message_id=message_id,
            role=body["role"],
            signature=body["signature"],
            dtypes=tuple(body["dtypes"]),
            kinds=tuple(body["kinds"]),
            max_message_bytes=body["max_message_bytes"],
            encryption=body["encryption"],
            auth=body.get("auth", {}),
            bridge=body.get("bridge", {}),
            checksums=tuple(body.get("checksums", ("blake3",))),
            codecs=tuple(body.get("codecs", ())),
            prefill_tps=body.get("prefill_tps", 0.0),
            pipeline=body.get("pipeline", 1),
        )
    body = _load_json(header, what, limits, _CONTROL[ftype])
    if ftype == FrameType.ACK:
        return Ack(sid, message_id, body["acked_id"], body["digest"])
    if ftype == FrameType.REJECT:
        return Reject(sid, message_id, body["about_id"], body["code"], body["detail"])
    if ftype == FrameType.REQUEST:
        return Request(sid, message_id, body["op"], body["params"])
    if ftype == FrameType.RESULT:
        return Result(sid, message_id, body["about_id"], body["body"])
    return Close(sid, message_id)


def tensor_message(pre: Preamble, th: TensorHeader, data: Sequence[memoryview]) -> TensorMessage:
    """The message whose tensors' bytes are ``data`` (one view per table entry, in order)."""
    tensors = tuple(Tensor(e.name, e.dtype, e.shape, d.toreadonly(), e.checksum)
                    for e, d in zip(th.entries, data, strict=True))
    return TensorMessage(pre.session_id, pre.message_id, th.kind, th.apply, th.seq_slot,
                         th.layer_range, th.token_range, tensors, th.attrs, th.checksum_alg)


def parse_tensor_header(header: memoryview, payload_len: int, limits: ProtocolConfig) -> TensorHeader:
    """Check a tensor frame's header against the payload length it declares."""
    if len(header) < TENSOR_FIXED.size:
        raise TruncatedMessage("tensor header shorter than its fixed part")
    (kind_raw, apply_raw, alg_raw, slot, l0, l1, t0, t1, count, attrs_len) = TENSOR_FIXED.unpack_from(header, 0)
    try:
        kind = Kind(kind_raw)
    except ValueError:
        raise UnknownKind(f"unknown message kind {kind_raw}") from None
    try:
        apply = ApplyMode(apply_raw)
    except ValueError:
        raise UnknownKind(f"unknown apply mode {apply_raw}") from None
    try:
        alg = Checksum(alg_raw)
    except ValueError:
        raise UnknownKind(f"unknown checksum algorithm {alg_raw}") from None
    if count > limits.max_tensors:
        raise MessageTooLarge(f"{count} tensors exceed the limit of {limits.max_tensors}")
    pos = TENSOR_FIXED.size
    if pos + attrs_len > len(header):
        raise TruncatedMessage("tensor attributes run past the header")
    attrs = (_load_json(header[pos:pos + attrs_len], "TENSOR attrs", limits, _ANY_OBJECT)
             if attrs_len else {})
    pos += attrs_len
    entries: list[TensorEntry] = []
    expected_offset = 0
    names: set[str] = set()
    for _ in range(count):
        if pos + TENSOR_ENTRY.size > len(header):
            raise TruncatedMessage("tensor table runs past the header")
        name_len, dtype_raw, ndim = TENSOR_ENTRY.unpack_from(header, pos)
        pos += TENSOR_ENTRY.size
        if name_len > limits.max_name_bytes or name_len == 0:
            raise ProtocolError(f"tensor name length {name_len} outside 1..{limits.max_name_bytes}")
        if ndim > limits.max_ndim:
            raise ProtocolError(f"tensor rank {ndim} exceeds {limits.max_ndim}")
        try:
            dtype = DType(dtype_raw)
        except ValueError:
            raise ProtocolError(f"unknown dtype {dtype_raw}") from None
        need = 8 * ndim + TENSOR_TAIL.size + name_len
        if pos + need > len(header):
            raise TruncatedMessage("tensor table runs past the header")
        shape = struct.unpack_from(f"<{ndim}Q", header, pos)
        pos += 8 * ndim
        offset, nbytes, digest = TENSOR_TAIL.unpack_from(header, pos)
        pos += TENSOR_TAIL.size
        try:
            name = bytes(header[pos:pos + name_len]).decode()
        except UnicodeDecodeError:
            raise ProtocolError("tensor name is not UTF-8") from None
        pos += name_len
        if name in names:
            raise ProtocolError(f"duplicate tensor name {name!r}")
        names.add(name)
        try:
            want = tensor_nbytes(dtype, shape)
        except ValueError as exc:
            raise ProtocolError(f"tensor {name}: {exc}") from None
        if want != nbytes:
            raise ProtocolError(f"tensor {name}: declares {nbytes} bytes, {dtype.name}{list(shape)} needs {want}")
        if offset != expected_offset:
            raise ProtocolError(f"tensor {name}: offset {offset}, expected {expected_offset}")
        if offset + nbytes > payload_len:
            raise TruncatedMessage(f"tensor {name} runs past the payload")
        entries.append(TensorEntry(name, dtype, tuple(shape), offset, nbytes, bytes(digest)))
        expected_offset = offset + nbytes + pad_bytes(nbytes)
    if any(header[pos:]):
        raise ProtocolError("non-zero bytes in tensor header padding")
    if expected_offset != payload_len:
        raise ProtocolError(f"payload holds {payload_len} bytes, tensors account for {expected_offset}")
    if CHECKSUM_BYTES != 32:  # pragma: no cover - layout guard
        raise AssertionError
    return TensorHeader(kind, apply, slot, (l0, l1), (t0, t1), attrs, tuple(entries), alg)


def tensor_message_digest(msg: TensorMessage) -> bytes:
    """The digest of a message whose checksums are filled in (sender side, or verified)."""
    return message_digest([t.checksum for t in msg.tensors])


def verify_checksums(msg: TensorMessage) -> bytes:
    """Recompute every tensor's checksum; return the message digest or raise ChecksumMismatch."""
    for t in msg.tensors:
        if checksum(t.data, msg.checksum_alg) != t.checksum:
            raise ChecksumMismatch(f"tensor {t.name}: {CHECKSUM_NAMES[msg.checksum_alg]} checksum "
                                   "mismatch (payload corrupted)")
    return tensor_message_digest(msg)
