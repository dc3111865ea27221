"""Facts about a GGUF model file: architecture, shapes, rope, norm, vocabulary, special tokens.

The facts come from the GGUF header only. ``gguf.GGUFReader`` builds a numpy view per array
element, which takes seconds for a 49k-token vocabulary; this module instead walks the header of a
memory-mapped file with ``struct`` (skipping big arrays, keeping their length) and uses the
``gguf`` package for the format's constants. Parsing SmolLM2's header takes a few tens of ms.
A file that is not GGUF, or is cut short (header or tensor data), raises :class:`ModelError`.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from edgelink.errors import ModelError

# Arrays longer than this are not materialized: metadata holds an ArraySummary instead.
MAX_ARRAY_ITEMS = 1024
MAX_TENSOR_DIMS = 8

_VT = gguf.GGUFValueType
_SCALAR_FORMATS = {
    _VT.UINT8: "B", _VT.INT8: "b", _VT.UINT16: "H", _VT.INT16: "h", _VT.UINT32: "I",
    _VT.INT32: "i", _VT.FLOAT32: "f", _VT.BOOL: "?", _VT.UINT64: "Q", _VT.INT64: "q",
    _VT.FLOAT64: "d",
}


@dataclass(frozen=True)
class ArraySummary:
    """Stands in for an array too long to keep (a vocabulary, merges, scores)."""

    item_type: int  # a gguf.GGUFValueType value
    count: int

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class GgufTensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order (ne0 first), as GGUF stores it
    ggml_type: int  # a gguf.GGMLQuantizationType value
    offset: int  # absolute offset of the data in the file
    nbytes: int  # -1 when the type is unknown to the installed gguf package


@dataclass(frozen=True)
class GgufHeader:
    version: int
    byte_order: str  # "<" or ">"
    alignment: int
    metadata: Mapping[str, Any]
    tensors: tuple[GgufTensorInfo, ...]
    data_offset: int
    file_size: int

    def tensor(self, name: str) -> GgufTensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)


@dataclass(frozen=True)
class GgufFacts:
    """What a GGUF header says about the model (None: the key is absent from the file)."""

    architecture: str
    name: str | None  # general.name
    basename: str | None  # general.basename
    block_count: int  # layers
    embedding_length: int
    feed_forward_length: int | tuple[int, ...] | None
    head_count: int | tuple[int, ...]
    head_count_kv: int | tuple[int, ...]  # defaults to head_count, as in llama.cpp
    key_length: int  # per-head K size; embedding_length // head_count when absent
    value_length: int
    rope_freq_base: float | None
    rope_dimension_count: int | None
    rope_scaling_type: str | None
    rope_scaling_factor: float | None
    norm_type: str | None  # "rms" or "layer"
    norm_eps: float | None
    context_length: int | None  # trained context
    vocab_size: int | None  # length of tokenizer.ggml.tokens ({arch}.vocab_size if absent)
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    unk_token_id: int | None
    sliding_window: int | None
    file_type: int | None  # general.file_type, a gguf.LlamaFileType value
    tensor_count: int
    gguf_version: int

    @property
    def head_dim(self) -> int:
        return self.key_length

    @property
    def file_type_name(self) -> str | None:
        if self.file_type is None:
            return None
        try:
            return gguf.LlamaFileType(self.file_type).name
        except ValueError:
            return str(self.file_type)


class _Truncated(Exception):
    pass


class _Parser:
    def __init__(self, buf: Any, size: int):
        self.buf = buf
        self.size = size
        self.off = 0
        self.e = "<"

    def need(self, n: int) -> None:
        if n < 0 or self.off + n > self.size:
            raise _Truncated(f"needs {n} bytes at offset {self.off}, file has {self.size}")

    def scalar(self, fmt: str) -> Any:
        st = struct.Struct(self.e + fmt)
        self.need(st.size)
        (value,) = st.unpack_from(self.buf, self.off)
        self.off += st.size
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        self.need(n)
        raw = self.buf[self.off:self.off + n]
        self.off += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _VT.STRING:
            return self.string()
        if vtype == _VT.ARRAY:
            return self.array()
        fmt = _SCALAR_FORMATS.get(vtype)
        if fmt is None:
            raise ModelError(f"unknown GGUF value type {vtype} at offset {self.off}")
        return self.scalar(fmt)

    def array(self) -> Any:
        item_type = self.scalar("I")
        count = self.scalar("Q")
        if item_type == _VT.STRING:
            self.need(8 * count)  # every string has at least its length
            if count <= MAX_ARRAY_ITEMS:
                return tuple(self.string() for _ in range(count))
            unpack_len = struct.Struct(self.e + "Q").unpack_from
            buf, off, size = self.buf, self.off, self.size
            for _ in range(count):
                if off + 8 > size:
                    raise _Truncated(f"string array runs past the end of the file ({size} bytes)")
                off += 8 + unpack_len(buf, off)[0]
            if off > size:
                raise _Truncated(f"string array runs past the end of the file ({size} bytes)")
            self.off = off
            return ArraySummary(int(item_type), count)
        if item_type == _VT.ARRAY:
            self.need(12 * count)
            return tuple(self.array() for _ in range(count))
        fmt = _SCALAR_FORMATS.get(item_type)
        if fmt is None:
            raise ModelError(f"unknown GGUF array item type {item_type} at offset {self.off}")
        st = struct.Struct(f"{self.e}{count}{fmt}") if count <= MAX_ARRAY_ITEMS else None
        itemsize = struct.calcsize("<" + fmt)
        self.need(itemsize * count)
        if st is None:
            self.off += itemsize * count
            return ArraySummary(int(item_type), count)
        values = st.unpack_from(self.buf, self.off)
        self.off += st.size
        return values


def _tensor_nbytes(shape: tuple[int, ...], ggml_type: int) -> int:
    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        return -1
    n = 1
    for d in shape:
        n *= d
    return n // block * type_size


def _parse(buf: Any, size: int, where: str) -> GgufHeader:
    p = _Parser(buf, size)
    p.need(4)
    if bytes(buf[0:4]) != b"GGUF":
        raise ModelError(f"{where} is not a GGUF file (bad magic {bytes(buf[0:4])!r})")
    p.off = 4
    version = p.scalar("I")
    if version & 0xFFFF == 0:  # written by a big-endian host
        p.e = ">"
        version = struct.unpack_from(">I", buf, 4)[0]
    if version not in (2, 3):
        raise ModelError(f"{where}: unsupported GGUF version {version}")
    tensor_count = p.scalar("Q")
    kv_count = p.scalar("Q")
    # Each kv needs at least 12 bytes and each tensor info 24: bounds before looping on them.
    p.need(12 * kv_count + 24 * tensor_count)
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = p.string()
        metadata[key] = p.value(p.scalar("I"))
    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelError(f"{where}: invalid general.alignment {alignment!r}")
    raw_tensors = []
    for _ in range(tensor_count):
        name = p.string()
        n_dims = p.scalar("I")
        if n_dims > MAX_TENSOR_DIMS:
            raise ModelError(f"{where}: tensor {name!r} has {n_dims} dimensions")
        shape = tuple(p.scalar("Q") for _ in range(n_dims))
        ggml_type = p.scalar("I")
        offset = p.scalar("Q")
        raw_tensors.append((name, shape, ggml_type, offset))
    data_offset = -(-p.off // alignment) * alignment
    if data_offset > size and tensor_count:
        raise _Truncated(f"tensor data starts at {data_offset}, file has {size} bytes")
    tensors = []
    for name, shape, ggml_type, offset in raw_tensors:
        nbytes = _tensor_nbytes(shape, ggml_type)
        start = data_offset + offset
        if start > size or (nbytes >= 0 and start + nbytes > size):
            raise _Truncated(
                f"tensor {name!r} ends at {start + max(nbytes, 0)}, file has {size} bytes"
            )
        tensors.append(GgufTensorInfo(name, shape, ggml_type, start, nbytes))
    return GgufHeader(version, p.e, alignment, metadata, tuple(tensors), data_offset, size)


def read_gguf_header(path: str | os.PathLike[str]) -> GgufHeader:
    """Parse the header of a GGUF file (metadata and tensor infos); check the data is all there."""
    where = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 24:
                head = fh.read(4)
                if head != b"GGUF":
                    raise ModelError(f"{where} is not a GGUF file")
                raise ModelError(f"{where}: truncated GGUF file ({size} bytes)")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _parse(mm, size, where)
    except _Truncated as exc:
        raise ModelError(f"{where}: truncated or corrupt GGUF file: {exc}") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read GGUF file {where}: {exc}") from exc


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _float(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _int_or_tuple(v: Any) -> int | tuple[int, ...] | None:
    if isinstance(v, tuple) and all(isinstance(x, int) for x in v):
        return v
    return _int(v)


def _first(v: int | tuple[int, ...]) -> int:
    if isinstance(v, tuple):
        return next((x for x in v if x), 0)
    return v


def facts_from_header(header: GgufHeader, where: str = "GGUF file") -> GgufFacts:
    md = header.metadata
    arch = md.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelError(f"{where}: no general.architecture in the GGUF metadata")

    def need_int(key: str) -> int | tuple[int, ...]:
        value = _int_or_tuple(md.get(f"{arch}.{key}"))
        if value is None:
            raise ModelError(f"{where}: missing or invalid {arch}.{key}; not a language model?")
        return value

    block_count = need_int("block_count")
    embedding_length = need_int("embedding_length")
    head_count = need_int("attention.head_count")
    if isinstance(block_count, tuple) or isinstance(embedding_length, tuple):
        raise ModelError(f"{where}: per-layer block_count/embedding_length are not supported")
    head_count_kv = _int_or_tuple(md.get(f"{arch}.attention.head_count_kv"))
    if head_count_kv is None:
        head_count_kv = head_count
    n_head = _first(head_count)
    derived = embedding_length // n_head if n_head else 0
    key_length = _int(md.get(f"{arch}.attention.key_length"))
    value_length = _int(md.get(f"{arch}.attention.value_length"))

    if f"{arch}.attention.layer_norm_rms_epsilon" in md:
        norm_type: str | None = "rms"
        norm_eps = _float(md[f"{arch}.attention.layer_norm_rms_epsilon"])
    elif f"{arch}.attention.layer_norm_epsilon" in md:
        norm_type = "layer"
        norm_eps = _float(md[f"{arch}.attention.layer_norm_epsilon"])
    else:
        norm_type, norm_eps = None, None

    tokens = md.get("tokenizer.ggml.tokens")
    if isinstance(tokens, (tuple, ArraySummary)):
        vocab_size: int | None = len(tokens)
    else:
        vocab_size = _int(md.get(f"{arch}.vocab_size"))

    scaling_type = md.get(f"{arch}.rope.scaling.type")
    name = md.get("general.name")
    basename = md.get("general.basename")
    return GgufFacts(
        architecture=arch,
        name=name if isinstance(name, str) else None,
        basename=basename if isinstance(basename, str) else None,
        block_count=block_count,
        embedding_length=embedding_length,
        feed_forward_length=_int_or_tuple(md.get(f"{arch}.feed_forward_length")),
        head_count=head_count,
        head_count_kv=head_count_kv,
        key_length=key_length if key_length is not None else derived,
        value_length=value_length if value_length is not None else derived,
        rope_freq_base=_float(md.get(f"{arch}.rope.freq_base")),
        rope_dimension_count=_int(md.get(f"{arch}.rope.dimension_count")),
        rope_scaling_type=scaling_type if isinstance(scaling_type, str) else None,
        rope_scaling_factor=_float(md.get(f"{arch}.rope.scaling.factor")),
        norm_type=norm_type,
        norm_eps=norm_eps,
        context_length=_int(md.get(f"{arch}.context_length")),
        vocab_size=vocab_size,
        bos_token_id=_int(md.get("tokenizer.ggml.bos_token_id")),
        eos_token_id=_int(md.get("tokenizer.ggml.eos_token_id")),
        pad_token_id=_int(md.get("tokenizer.ggml.padding_token_id")),
        unk_token_id=_int(md.get("tokenizer.ggml.unknown_token_id")),
        sliding_window=_int(md.get(f"{arch}.attention.sliding_window")),
        file_type=_int(md.get("general.file_type")),
        tensor_count=len(header.tensors),
        gguf_version=header.version,
    )


def read_gguf_facts(path: str | os.PathLike[str]) -> GgufFacts:
    """The :class:`GgufFacts` of a GGUF file; a non-GGUF or truncated file is a ModelError."""
    return facts_from_header(read_gguf_header(path), where=str(Path(path)))
