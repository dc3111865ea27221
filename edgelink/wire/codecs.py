"""The codecs themselves: a KV tensor's bytes <-> its encoded bytes. Pure numpy and zstd.

Every codec works on a 2-D block of f16 rows seen as ``[tokens, channels]`` (a transposed V is
handed over transposed back). Decoding must give the same bits on every machine, because the
sender announces a checksum of what the receiver's decoder will produce: so only elementwise
IEEE operations are used (no BLAS, no float sums whose order could vary), and the sender runs
the very same decoder to compute that checksum.

* ``zstd-shuffle/1`` (lossless): the two byte planes of the f16 values, one after the other,
  then zstd. The high bytes (sign, exponent) are what compresses.
* ``q8/1``: llama.cpp's q8_0 idea (an f16 scale, max |x| / 127, per group of 32 int8 values),
  with KIVI's grouping: K per channel over 32 tokens (K has outlier channels: this halves its
  error), V per token over 32 channels; 8.5 bits per value.
* ``kivi4/1``: 4-bit asymmetric (KIVI): K per channel over groups of 64 tokens, V per token over
  groups of 64 channels, each group an f16 scale and an f16 minimum; 4.5 bits per value.
* ``kivi4h/1``: the same after a Walsh-Hadamard rotation of each token's channels in blocks of
  64 (spreads outlier channels), then per-token groups for K and V alike; undone on decoding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from edgelink.errors import ProtocolError

GROUP = 64  # values per quantization group (kivi4)
Q8_BLOCK = 32
HADAMARD_BLOCK = 64


@dataclasses.dataclass(frozen=True)
class Effort:
    """How hard an encoder works (wire.zstd_level, wire.threads: 0 is every core). It travels
    with each call, so two sessions of one process can differ."""

    zstd_level: int = 1
    threads: int = 0


DEFAULT_EFFORT = Effort()

@dataclasses.dataclass(frozen=True)
class Codec:
    name: str
    lossy: bool
    # encode(x: f16 [T, C], is_k, effort) -> bytes; decode(data, T, C, is_k) -> f16 [T, C]
    encode: Callable[[np.ndarray, bool, Effort], bytes | np.ndarray]
    decode: Callable[[memoryview, int, int, bool], np.ndarray]
    widths: int = 1  # channel counts must be multiples of this
    # For planning a handoff (wire/plan.py): encoded size over f16 size, and encode and decode
    # speed in f16 bytes/s. Lossy sizes are exact; zstd's ratio and all speeds are what
    # `edgelink bench codecs` measured on a 2-core laptop-class VM (docs/benchmarks.md).
    expected_ratio: float = 1.0
    encode_bytes_per_s: float = 1e9
    decode_bytes_per_s: float = 1e9


def _need(data: memoryview, n: int, name: str) -> None:
    if data.nbytes != n:
        raise ProtocolError(f"{name}: {data.nbytes} encoded bytes where {n} are needed")


# ---------------------------------------------------------------------------- lossless


def _shuffle_encode(x: np.ndarray, is_k: bool, effort: Effort) -> bytes:
    import zstandard

    planes = np.ascontiguousarray(x.view(np.uint8).reshape(-1, 2).T)
    threads = effort.threads if effort.threads > 0 else -1
    return zstandard.ZstdCompressor(level=effort.zstd_level, threads=threads,
                                    write_content_size=True).compress(planes)


def _shuffle_decode(data: memoryview, t: int, c: int, is_k: bool) -> np.ndarray:
    import zstandard

    n = 2 * t * c
    try:
        # The frame must declare exactly the size we expect (libzstd enforces the declared size
        # block by block, so output stays bounded), be one whole frame, and nothing after it.
        if zstandard.frame_content_size(data) != n:
            raise ProtocolError(f"zstd-shuffle/1: the frame does not declare the {n} bytes needed")
        obj = zstandard.ZstdDecompressor().decompressobj()
        raw = obj.decompress(data)
        if not obj.eof or obj.unused_data or len(raw) != n:
            raise ProtocolError(f"zstd-shuffle/1: not exactly one frame of {n} bytes")
    except zstandard.ZstdError as exc:
        raise ProtocolError(f"zstd-shuffle/1: {exc}") from None
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(2, -1)
    out = np.empty((t * c, 2), dtype=np.uint8)
    out[:, 0] = planes[0]
    out[:, 1] = planes[1]
    return out.view(np.float16).reshape(t, c)


# ---------------------------------------------------------------------------- q8


def _q8_size(t: int, c: int, is_k: bool) -> int:
    groups = -(-t // Q8_BLOCK) * c if is_k else t * (c // Q8_BLOCK)
    return 2 * groups + t * c


def _q8_groups(x: np.ndarray, is_k: bool) -> np.ndarray:
    """f32 [..., 32] groups: K per channel over 32 tokens (tokens padded by repeating the
    last), V per token over 32 channels."""
    t, c = x.shape
    if is_k:
        tp = -(-t // Q8_BLOCK) * Q8_BLOCK
        xp = np.concatenate([x, np.repeat(x[-1:], tp - t, axis=0)]) if tp > t else x
        return xp.reshape(tp // Q8_BLOCK, Q8_BLOCK, c).transpose(0, 2, 1)
    return x.reshape(t, c // Q8_BLOCK, Q8_BLOCK)


def _q8_encode(x: np.ndarray, is_k: bool, effort: Effort) -> bytes:
    blocks = _q8_groups(x.astype(np.float32), is_k)
    scale = (np.abs(blocks).max(axis=2) / np.float32(127)).astype(np.float16)
    s32 = scale.astype(np.float32)[:, :, None]
    q = np.where(s32 > 0, np.rint(blocks / np.where(s32 > 0, s32, 1)), 0)
    q = np.clip(q, -127, 127).astype(np.int8)
    if is_k:  # values back in [tokens, channels] order, without the padding
        q = q.transpose(0, 2, 1).reshape(-1, x.shape[1])[:x.shape[0]]
    return scale.tobytes() + q.tobytes()


def _q8_decode(data: memoryview, t: int, c: int, is_k: bool) -> np.ndarray:
    _need(data, _q8_size(t, c, is_k), "q8/1")
    ns = _q8_size(t, c, is_k) - t * c
    scale = np.frombuffer(data, dtype=np.float16, count=ns // 2).astype(np.float32)
    q = np.frombuffer(data, dtype=np.int8, offset=ns).reshape(t, c).astype(np.float32)
    if is_k:
        g = _q8_groups(q, True)  # padding rows are copies of the last: harmless, cut below
        x = g * scale.reshape(g.shape[0], c)[:, :, None]
        return x.transpose(0, 2, 1).reshape(-1, c)[:t].astype(np.float16)
    return (q.reshape(t, c // Q8_BLOCK, Q8_BLOCK) * scale.reshape(t, c // Q8_BLOCK, 1)).astype(np.float16).reshape(t, c)


# ---------------------------------------------------------------------------- kivi4


def _groups(n: int) -> int:
    return -(-n // GROUP)


def _pad_tokens(x: np.ndarray) -> np.ndarray:
    t = x.shape[0]
    extra = _groups(t) * GROUP - t
    if not extra:
        return x
    return np.concatenate([x, np.repeat(x[-1:], extra, axis=0)])


def _quant4(g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """g: f32 [..., GROUP] -> (4-bit codes u8 [..., GROUP], scale f16 [...], minimum f16 [...])."""
    lo = g.min(axis=-1).astype(np.float16)
    hi = g.max(axis=-1)
    lo32 = lo.astype(np.float32)
    scale = ((hi - lo32) / np.float32(15)).astype(np.float16)
    s32 = scale.astype(np.float32)[..., None]
    q = np.where(s32 > 0, np.rint((g - lo32[..., None]) / np.where(s32 > 0, s32, 1)), 0)
    return np.clip(q, 0, 15).astype(np.uint8), scale, lo


def _dequant4(q: np.ndarray, scale: np.ndarray, lo: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale.astype(np.float32)[..., None] + lo.astype(np.float32)[..., None]


def _pack4(q: np.ndarray) -> np.ndarray:
    flat = q.reshape(-1)
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def _unpack4(b: np.ndarray, n: int) -> np.ndarray:
    out = np.empty(n, dtype=np.uint8)
    out[0::2] = b & 0x0F
    out[1::2] = b >> 4
    return out


def _hadamard(x: np.ndarray) -> np.ndarray:
    """Orthonormal Walsh-Hadamard transform over the last axis in blocks of 64 (butterflies:
    additions and subtractions only, then one scaling, so every machine gets the same bits)."""
    t, c = x.shape
    y = x.astype(np.float32).reshape(t, c // HADAMARD_BLOCK, HADAMARD_BLOCK).copy()
    h = 1
    while h < HADAMARD_BLOCK:
        y = y.reshape(t, c // HADAMARD_BLOCK, HADAMARD_BLOCK // (2 * h), 2, h)
        a, b = y[:, :, :, 0, :].copy(), y[:, :, :, 1, :].copy()
        y[:, :, :, 0, :] = a + b
        y[:, :, :, 1, :] = a - b
        h *= 2
    return (y.reshape(t, c) * np.float32(0.125)).astype(np.float32)  # 1/sqrt(64)


def _kivi_encode_with(x: np.ndarray, per_channel: bool) -> bytes:
    t, c = x.shape
    if per_channel:  # groups of GROUP tokens within each channel
        xp = _pad_tokens(x.astype(np.float32))
        g = xp.reshape(_groups(t), GROUP, c).transpose(0, 2, 1)  # [token groups, c, GROUP]
        q, scale, lo = _quant4(g)
        codes = q.transpose(0, 2, 1).reshape(-1, c)[:t]  # back to [t, c]
        # metadata for the padded groups: [token groups, c]; keep t*c/GROUP of it (see size)
        meta_s = scale.reshape(-1)
        meta_l = lo.reshape(-1)
    else:  # groups of GROUP channels within each token
        g = x.astype(np.float32).reshape(t, c // GROUP, GROUP)
        q, scale, lo = _quant4(g)
        codes = q.reshape(t, c)
        meta_s, meta_l = scale.reshape(-1), lo.reshape(-1)
    return _pack4(codes).tobytes() + meta_s.tobytes() + meta_l.tobytes()


def _kivi_meta_count(t: int, c: int, per_channel: bool) -> int:
    return _groups(t) * c if per_channel else t * (c // GROUP)


def _kivi_size_for(t: int, c: int, per_channel: bool) -> int:
    return (t * c) // 2 + 4 * _kivi_meta_count(t, c, per_channel)


def _kivi_decode_with(data: memoryview, t: int, c: int, per_channel: bool, name: str) -> np.ndarray:
    _need(data, _kivi_size_for(t, c, per_channel), name)
    nval = (t * c) // 2
    m = _kivi_meta_count(t, c, per_channel)
    codes = _unpack4(np.frombuffer(data, dtype=np.uint8, count=nval), t * c).reshape(t, c)
    scale = np.frombuffer(data, dtype=np.float16, count=m, offset=nval)
    lo = np.frombuffer(data, dtype=np.float16, count=m, offset=nval + 2 * m)
    if per_channel:
        cp = _pad_tokens(codes)
        g = cp.reshape(_groups(t), GROUP, c).transpose(0, 2, 1)
        x = _dequant4(g, scale.reshape(_groups(t), c), lo.reshape(_groups(t), c))
        return x.transpose(0, 2, 1).reshape(-1, c)[:t]
    g = codes.reshape(t, c // GROUP, GROUP)
    return _dequant4(g, scale.reshape(t, c // GROUP), lo.reshape(t, c // GROUP)).reshape(t, c)


def _kivi_encode(x: np.ndarray, is_k: bool, effort: Effort) -> bytes:
    return _kivi_encode_with(x, per_channel=is_k)


def _kivi_decode(data: memoryview, t: int, c: int, is_k: bool) -> np.ndarray:
    return _kivi_decode_with(data, t, c, is_k, "kivi4/1").astype(np.float16)


def _kivih_encode(x: np.ndarray, is_k: bool, effort: Effort) -> bytes:
    return _kivi_encode_with(_hadamard(x), per_channel=False)


def _kivih_decode(data: memoryview, t: int, c: int, is_k: bool) -> np.ndarray:
    y = _kivi_decode_with(data, t, c, False, "kivi4h/1")
    return _hadamard(y).astype(np.float16)  # the orthonormal WHT is its own inverse


CODECS: dict[str, Codec] = {c.name: c for c in (
    # Each decoder checks the encoded length it needs (it differs between K and V).
    Codec("zstd-shuffle/1", False, _shuffle_encode, _shuffle_decode, expected_ratio=0.87,
          encode_bytes_per_s=430e6, decode_bytes_per_s=490e6),
    Codec("q8/1", True, _q8_encode, _q8_decode, widths=Q8_BLOCK, expected_ratio=8.5 / 16,
          encode_bytes_per_s=170e6, decode_bytes_per_s=240e6),
    Codec("kivi4/1", True, _kivi_encode, _kivi_decode, widths=GROUP, expected_ratio=4.5 / 16,
          encode_bytes_per_s=140e6, decode_bytes_per_s=240e6),
    Codec("kivi4h/1", True, _kivih_encode, _kivih_decode, widths=HADAMARD_BLOCK,
          expected_ratio=4.5 / 16, encode_bytes_per_s=40e6, decode_bytes_per_s=58e6),
)}
