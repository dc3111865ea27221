"""Enumerations that travel on the wire. Values are part of protocol v1: never renumber."""

from __future__ import annotations

import enum

PROTOCOL_VERSION = 1
MAGIC = b"ELNK"


class FrameType(enum.IntEnum):
    HELLO = 1
    TENSOR = 2
    ACK = 3
    REJECT = 4
    REQUEST = 5
    RESULT = 6
    CLOSE = 7


class Kind(enum.IntEnum):
    """What a tensor message represents."""

    KV_CACHE = 1
    KV_CACHE_DELTA = 2
    HIDDEN_SLICE = 3
    RESIDUAL_PATCH = 4
    VIRTUAL_PREFIX = 5
    BRIDGED_PREFIX = 6
    KV_MEMORY = 7


class ApplyMode(enum.IntEnum):
    """How the receiver applies a tensor message."""

    OVERWRITE = 1
    ADDITIVE = 2
    APPEND = 3
    MEMORY = 4


class Checksum(enum.IntEnum):
    """How a tensor message's per-tensor checksums are computed (the tensor header's u16 that
    was reserved, so 0 is what every earlier peer sent). Both are 32 bytes on the wire."""

    BLAKE3 = 0  # blake3-256: cryptographic; about 2.2 GB/s per core here
    XXH3_128 = 1  # xxh3-128, then 16 zero bytes: not cryptographic; memory speed (about 14 GB/s)


CHECKSUM_NAMES = {Checksum.BLAKE3: "blake3", Checksum.XXH3_128: "xxh3-128"}
CHECKSUM_BY_NAME = {v: k for k, v in CHECKSUM_NAMES.items()}


class DType(enum.IntEnum):
    F32 = 1
    F16 = 2
    BF16 = 3
    I32 = 4
    I64 = 5
    U8 = 6
    Q8_0 = 7
    Q4_0 = 8
    Q4_1 = 9
    Q5_0 = 10
    Q5_1 = 11


# (bytes per block, elements per block): plain types are blocks of one element.
DTYPE_LAYOUT: dict[DType, tuple[int, int]] = {
    DType.F32: (4, 1),
    DType.F16: (2, 1),
    DType.BF16: (2, 1),
    DType.I32: (4, 1),
    DType.I64: (8, 1),
    DType.U8: (1, 1),
    DType.Q8_0: (34, 32),
    DType.Q4_0: (18, 32),
    DType.Q4_1: (20, 32),
    DType.Q5_0: (22, 32),
    DType.Q5_1: (24, 32),
}

# numpy views for the plain types (quantized rows are viewed as raw bytes).
NUMPY_DTYPE: dict[DType, str] = {
    DType.F32: "<f4",
    DType.F16: "<f2",
    DType.BF16: "<u2",
    DType.I32: "<i4",
    DType.I64: "<i8",
    DType.U8: "u1",
}


def tensor_nbytes(dtype: DType, shape: tuple[int, ...]) -> int:
    """Exact byte length of a tensor; quantized types need the last axis to fill whole blocks."""
    block_bytes, block_elems = DTYPE_LAYOUT[dtype]
    if not shape:
        rows, cols = 1, 1
    else:
        rows = 1
        for d in shape[:-1]:
            rows *= d
        cols = shape[-1]
    if cols % block_elems:
        raise ValueError(f"last axis {cols} is not a multiple of the {dtype.name} block size {block_elems}")
    return rows * (cols // block_elems) * block_bytes
