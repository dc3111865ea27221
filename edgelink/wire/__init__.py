"""Compressed KV state on the wire: which codec a session uses, and tensor messages encoded
and decoded with it (the codecs themselves are in ``wire.codecs``).

A receiver lists the codecs it takes in its HELLO (``codecs``): every lossless one, and the
lossy ones only with ``wire.allow_lossy = on``. A sender picks one with ``wire.codec``
(``auto``: zstd-shuffle/1 over a network link when the receiver takes it, raw over shared
memory and files, where a codec could only slow the copy). An encoded message carries each
K/V tensor as u8 bytes and, in ``attrs["wire"]``, the codec, the tensor's real dtype and shape
and the checksum of what the receiver's decoder must produce; the session verifies the encoded
bytes as usual, and ``decode_message`` checks every decoded tensor against that checksum
before anything reaches llama.cpp. A decoder that differs in one bit is refused, state
unchanged. Lossless is the default; lossy is never used unless the receiver allowed it.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from edgelink.config import WireConfig
from edgelink.errors import (
    ChecksumMismatch,
    ConfigError,
    MessageTooLarge,
    ProtocolError,
    SessionError,
    UnknownKind,
)
from edgelink.protocol import codec as framing
from edgelink.protocol.kinds import Checksum, DType
from edgelink.protocol.limits import describe_bytes
from edgelink.protocol.messages import Tensor, TensorMessage
from edgelink.protocol.untrusted import Hex, Int, Obj, Seq, Str
from edgelink.wire.codecs import CODECS, DEFAULT_EFFORT, Codec, Effort

__all__ = ["CODECS", "DEFAULT_EFFORT", "Effort", "candidates", "choose", "decode_message", "effort", "encode_tensors", "offered"]

_KV_NAME = re.compile(r"c(\d{1,3})\.s(\d{1,3})\.([kv])\d{1,5}")
_ATTRS = Obj({"codec": Str(32),
              "tensors": Obj(extra=Obj({"shape": Seq(Int(1, 1 << 40), min_items=2, max_items=2),
                                        "checksum": Hex(max_bytes=32)}), max_keys=8192)})


def offered(cfg: WireConfig) -> tuple[str, ...]:
    """The codecs a receiver lists in its HELLO."""
    _check(cfg)
    return tuple(n for n, c in CODECS.items() if not c.lossy or cfg.allow_lossy)


def _check(cfg: WireConfig) -> None:
    if cfg.codec not in ("auto", "raw", "lossless", *CODECS):
        raise ConfigError(f"wire.codec is {cfg.codec!r}: auto, raw, lossless or one of {', '.join(CODECS)}")
    if cfg.split not in ("auto", "off"):
        raise ConfigError(f"wire.split is {cfg.split!r}: auto or off")
    for key in ("probe_bytes", "link_mbit", "prefill_tps"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"wire.{key} is {getattr(cfg, key)}: 0 or more")


def effort(cfg: WireConfig) -> Effort:
    """The encoder effort these settings ask for (handed to ``encode_tensors``)."""
    return Effort(cfg.zstd_level, cfg.threads)


def choose(cfg: WireConfig, peer_codecs: Sequence[str], network: bool) -> str | None:
    """The codec a sender uses with a receiver that lists ``peer_codecs`` (None: raw)."""
    _check(cfg)
    name = "zstd-shuffle/1" if cfg.codec == "lossless" else cfg.codec
    if name == "raw":
        return None
    if name == "auto":
        return "zstd-shuffle/1" if network and "zstd-shuffle/1" in peer_codecs else None
    if name not in peer_codecs:
        lossy = CODECS[name].lossy
        raise SessionError(f"the receiver does not take {name} (it lists {list(peer_codecs) or 'none'}"
                           + ("; a lossy codec needs wire.allow_lossy = on on the receiver" if lossy else "")
                           + "): set wire.codec to auto or raw, or change the receiver")
    return name


def candidates(cfg: WireConfig, peer_codecs: Sequence[str], chosen: str | None) -> list[str | None]:
    """What a handoff's plan may pick from (None: raw). With wire.codec = auto: raw and each
    codec the receiver takes, lossy ones only when this side allows them too (wire.allow_lossy):
    a sender's defaults never trade exactness away. Otherwise only what ``choose`` settled on."""
    if cfg.codec != "auto":
        return [chosen]
    return [None, *(n for n, c in CODECS.items() if n in peer_codecs and (not c.lossy or cfg.allow_lossy))]


def _v_trans(attrs: dict[str, Any], c: int, s: int) -> bool | None:
    try:
        stream = attrs["kv"]["caches"][c][s]
        return bool(stream["v_trans"]) if isinstance(stream, dict) else None
    except (KeyError, IndexError, TypeError):
        return None


def _role(name: str, attrs: dict[str, Any]) -> tuple[bool, bool] | None:
    """(is K, stored transposed) for a K/V tensor of a message with a kv layout, else None."""
    m = _KV_NAME.fullmatch(name)
    if not m:
        return None
    vt = _v_trans(attrs, int(m.group(1)), int(m.group(2)))
    if vt is None:
        return None
    is_k = m.group(3) == "k"
    return is_k, (not is_k and vt)


_POOLS: dict[int, ThreadPoolExecutor] = {}  # by size: threads kept for the process, no setting
_POOLS_LOCK = threading.Lock()


def _map(fn: Callable, items: Sequence, threads: int) -> list:
    """``fn`` over ``items`` on ``threads`` threads (0: every core; numpy and zstd release the GIL)."""
    workers = threads or len(os.sched_getaffinity(0))
    if workers <= 1 or len(items) < 2:
        return [fn(x) for x in items]
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="edgelink-wire")
    return list(pool.map(fn, items))


def encode_tensors(tensors: list[Tensor], attrs: dict[str, Any], name: str, alg: Checksum,
                   effort: Effort = DEFAULT_EFFORT) -> tuple[list[Tensor], dict[str, Any]]:
    """The message's f16 K/V tensors encoded with codec ``name`` (working as hard as
    ``effort`` says); everything else as it was."""
    codec = CODECS[name]

    def one(t: Tensor) -> tuple[Tensor, dict[str, Any] | None]:
        role = _role(t.name, attrs)
        if role is None or t.dtype is not DType.F16 or len(t.shape) != 2:
            return t, None
        is_k, transposed = role
        x = t.array()
        m = np.ascontiguousarray(x.T) if transposed else x
        if m.shape[1] % codec.widths:
            return t, None
        enc = np.frombuffer(codec.encode(m, is_k, effort), dtype=np.uint8)
        if codec.lossy:
            dec = codec.decode(memoryview(enc), m.shape[0], m.shape[1], is_k)
            dec = np.ascontiguousarray(dec.T) if transposed else dec
            digest = framing.checksum(dec, alg)
        else:
            digest = framing.checksum(t.data, alg)
        return (Tensor(t.name, DType.U8, (enc.size,), memoryview(enc)),
                {"shape": list(t.shape), "checksum": digest.hex()})

    out: list[Tensor] = []
    described: dict[str, Any] = {}
    for t, d in _map(one, tensors, effort.threads):
        out.append(t)
        if d is not None:
            described[t.name] = d
    if not described:
        return tensors, attrs
    return out, {**attrs, "wire": {"codec": name, "tensors": described}}


def decode_message(msg: TensorMessage, accepted: Sequence[str], limit: int,
                   place: Callable[[framing.TensorHeader], dict[str, memoryview]] | None = None,
                   threads: int = 0) -> TensorMessage:
    """The message with its encoded tensors decoded (into ``place``'s buffers where it offers
    them; on ``threads`` threads, wire.threads) and each checked against the checksum the
    sender announced."""
    if "wire" not in msg.attrs:
        return msg
    w = _ATTRS(msg.attrs["wire"], "TENSOR attrs.wire", ProtocolError)
    codec: Codec | None = CODECS.get(w["codec"])
    if codec is None or w["codec"] not in accepted:
        raise UnknownKind(f"codec {w['codec']!r} was not offered by this side (it takes "
                          f"{list(accepted) or 'none'}; wire.allow_lossy gates the lossy ones)")
    attrs = {k: v for k, v in msg.attrs.items() if k != "wire"}
    by_name = {t.name: t for t in msg.tensors}
    plan = []
    total = 0
    for name, d in w["tensors"].items():
        t = by_name.get(name)
        role = _role(name, attrs)
        if t is None or role is None or t.dtype is not DType.U8 or len(t.shape) != 1:
            raise ProtocolError(f"attrs.wire names {name!r}, which is not an encoded K/V tensor here")
        rows, cols = d["shape"]
        is_k, transposed = role
        tokens, width = (cols, rows) if transposed else (rows, cols)
        if width % codec.widths:
            raise ProtocolError(f"{name}: {width} channels is not a multiple of {codec.widths}")
        total += 2 * rows * cols
        if total > limit:
            raise MessageTooLarge(f"decoded, this message would be over {describe_bytes(limit)} "
                                  "(protocol.max_message_bytes)")
        if len(d["checksum"]) != 32:
            raise ProtocolError(f"{name}: a decoded checksum is 32 bytes")
        plan.append((t, (rows, cols), tokens, width, is_k, transposed, d["checksum"]))
    decoded_entries = tuple(
        framing.TensorEntry(t.name, DType.F16, shape, 0, 2 * shape[0] * shape[1], digest)
        for t, shape, *_, digest in plan)
    coded = {e.name: e for e in decoded_entries}
    header = framing.TensorHeader(msg.kind, msg.apply, msg.seq_slot, msg.layer_range, msg.token_range, attrs,
                                  tuple(coded.get(t.name) or framing.TensorEntry(t.name, t.dtype, t.shape, 0,
                                                                                 t.nbytes, t.checksum)
                                        for t in msg.tensors), msg.checksum_alg)
    dest = place(header) if place is not None else {}

    def one(item) -> Tensor:
        t, shape, tokens, width, is_k, transposed, digest = item
        with np.errstate(all="ignore"):  # hostile scales may overflow; the checksum refuses them
            x = codec.decode(t.data, tokens, width, is_k)
        x = x.T if transposed else x
        out = dest.get(t.name)
        arr = np.frombuffer(out, dtype=np.float16).reshape(shape) if out is not None else np.empty(shape, np.float16)
        np.copyto(arr, x)
        if framing.checksum(arr, msg.checksum_alg) != digest:
            raise ChecksumMismatch(f"tensor {t.name}: decoded with {codec.name}, it differs from what the "
                                   "sender's decoder produced (nothing was applied)")
        return Tensor(t.name, DType.F16, shape, memoryview(arr).cast("B").toreadonly(), digest)

    new = {t.name: t for t in _map(one, plan, threads)}
    tensors = tuple(new.get(t.name, t) for t in msg.tensors)
    return TensorMessage(msg.session_id, msg.message_id, msg.kind, msg.apply, msg.seq_slot, msg.layer_range,
                         msg.token_range, tensors, attrs, msg.checksum_alg)
