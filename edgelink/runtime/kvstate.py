"""llama.cpp's sequence-state blob <-> named per-layer tensors (pure numpy, no llama.cpp calls).

Layout of ``llama_state_seq_get_data`` for the pinned llama.cpp (see docs/protocol.md):

    u32 magic 0xaf143cd8 | i32 seq_id | one or more KV caches (two for sliding-window models:
    the full-attention cache, then the window cache), each:
        u32 n_stream, then per stream: u32 cell_count and, when cell_count > 0,
            cells:  cell_count x (i32 pos, u32 n_seq_id, n_seq_id x i32 seq id)
            data:   u32 v_trans, u32 n_layer,
                    n_layer x (i32 k_type, u64 k_row_bytes, cell_count rows)
                    v_trans == 0: n_layer x (i32 v_type, u64 v_row_bytes, cell_count rows)
                    v_trans == 1: n_layer x (i32 v_type, u32 v_elem_bytes, u32 n_embd_v,
                                              n_embd_v x cell_count elements)

Parsing yields zero-copy views into the blob; assembling writes them back in the same order,
so parse-then-assemble reproduces the blob byte for byte (tests hold this).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import blake3
import numpy as np

from edgelink.errors import StateError
from edgelink.protocol.kinds import DTYPE_LAYOUT, DType, tensor_nbytes
from edgelink.protocol.messages import Tensor
from edgelink.protocol.untrusted import I32_MAX, I32_MIN, Bool, Int, Nullable, Obj, Seq

SEQ_STATE_MAGIC = 0xAF143CD8

T = TypeVar("T")

# ggml type id -> wire dtype (the KV cache types llama.cpp accepts for type_k / type_v)
GGML_TO_DTYPE: dict[int, DType] = {
    0: DType.F32,
    1: DType.F16,
    2: DType.Q4_0,
    3: DType.Q4_1,
    6: DType.Q5_0,
    7: DType.Q5_1,
    8: DType.Q8_0,
    30: DType.BF16,
}
DTYPE_TO_GGML = {v: k for k, v in GGML_TO_DTYPE.items()}
CACHE_TYPE_NAMES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}


@dataclasses.dataclass(frozen=True)
class LayerRows:
    """One layer's K or V rows for one stream, as llama.cpp wrote them."""

    ggml_type: int
    shape: tuple[int, int]  # (cells, width) or, for transposed V, (width, cells)
    data: memoryview

    @property
    def dtype(self) -> DType:
        return GGML_TO_DTYPE[self.ggml_type]


@dataclasses.dataclass(frozen=True)
class StreamState:
    positions: np.ndarray  # int32 [cells]
    seq_ids: np.ndarray  # int32 [cells]
    v_trans: bool
    k: tuple[LayerRows, ...]
    v: tuple[LayerRows, ...]

    @property
    def n_cells(self) -> int:
        return int(self.positions.shape[0])


@dataclasses.dataclass(frozen=True)
class CacheState:
    streams: tuple[StreamState | None, ...]  # None: an empty stream (cell_count == 0)


@dataclasses.dataclass(frozen=True)
class SeqState:
    seq_id: int
    caches: tuple[CacheState, ...]

    @property
    def nbytes(self) -> int:
        return assembled_size(self)


class _Reader:
    def __init__(self, blob: memoryview):
        self.blob = blob
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.blob):
            raise StateError(f"sequence state truncated at byte {self.pos} (needs {n} more)")
        view = self.blob[self.pos:self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: str) -> tuple:
        s = struct.Struct(fmt)
        return s.unpack(self.take(s.size))


def _rows(ggml_type: int, row_bytes: int, cells: int, r: _Reader, what: str) -> LayerRows:
    if ggml_type not in GGML_TO_DTYPE:
        raise StateError(f"{what}: unsupported KV cache type id {ggml_type}")
    block_bytes, block_elems = DTYPE_LAYOUT[GGML_TO_DTYPE[ggml_type]]
    if row_bytes % block_bytes:
        raise StateError(f"{what}: row of {row_bytes} bytes is not whole blocks")
    width = row_bytes // block_bytes * block_elems
    return LayerRows(ggml_type, (cells, width), r.take(cells * row_bytes))


def parse_seq_state(blob: bytes | bytearray | memoryview | np.ndarray) -> SeqState:
    """Split a sequence-state blob into per-layer views. Raises StateError if it is malformed."""
    r = _Reader(memoryview(blob).cast("B"))
    magic, seq_id = r.unpack("<Ii")
    if magic != SEQ_STATE_MAGIC:
        raise StateError(f"not a llama.cpp sequence state (magic {magic:#x})")
    caches = []
    while r.pos < len(r.blob):
        (n_stream,) = r.unpack("<I")
        if n_stream == 0 or n_stream > 256:
            raise StateError(f"implausible stream count {n_stream}")
        streams: list[StreamState | None] = []
        for s in range(n_stream):
            (cells,) = r.unpack("<I")
            if cells == 0:
                streams.append(None)
                continue
            meta = np.frombuffer(r.take(cells * 12), dtype="<i4").reshape(cells, 3)
            if np.any(meta[:, 1] != 1):
                raise StateError("cells shared by several sequences are not supported")
            v_trans, n_layer = r.unpack("<II")
            k_rows = []
            for j in range(n_layer):
                k_type, k_row = r.unpack("<iQ")
                k_rows.append(_rows(k_type, k_row, cells, r, f"cache {len(caches)} stream {s} K{j}"))
            v_rows = []
            for j in range(n_layer):
                if not v_trans:
                    v_type, v_row = r.unpack("<iQ")
                    v_rows.append(_rows(v_type, v_row, cells, r, f"cache {len(caches)} stream {s} V{j}"))
                else:
                    v_type, el_bytes, n_embd_v = r.unpack("<iII")
                    if v_type not in GGML_TO_DTYPE or DTYPE_LAYOUT[GGML_TO_DTYPE[v_type]] != (el_bytes, 1):
                        raise StateError(f"transposed V{j}: type {v_type} with {el_bytes}-byte elements")
                    v_rows.append(LayerRows(v_type, (n_embd_v, cells), r.take(n_embd_v * cells * el_bytes)))
            streams.append(StreamState(meta[:, 0].copy(), meta[:, 2].copy(), bool(v_trans),
                                       tuple(k_rows), tuple(v_rows)))
        caches.append(CacheState(tuple(streams)))
    if not caches:
        raise StateError("sequence state holds no KV cache")
    return SeqState(seq_id, tuple(caches))


def assembled_size(state: SeqState) -> int:
    n = 8
    for cache in state.caches:
        n += 4
        for st in cache.streams:
            n += 4
            if st is None:
                continue
            n += 12 * st.n_cells + 8
            n += sum(12 + r.data.nbytes for r in st.k)
            n += sum(12 + r.data.nbytes for r in st.v)  # both V headers are 12 bytes
    return n


def assemble_seq_state(state: SeqState, out: np.ndarray | None = None) -> np.ndarray:
    """Write ``state`` back into llama.cpp's blob layout (into ``out`` if it is large enough)."""
    size = assembled_size(state)
    buf = out[:size] if out is not None and out.nbytes >= size else np.empty(size, dtype=np.uint8)
    mv = memoryview(buf).cast("B")
    base = buf.ctypes.data
    pos = 0

    def put(data: bytes | memoryview) -> None:
        nonlocal pos
        n = memoryview(data).nbytes
        # Tensors a receiver wrote straight into place (see ``blob_offsets``) are not copied.
        if n < 4096 or np.frombuffer(data, dtype=np.uint8).ctypes.data != base + pos:
            mv[pos:pos + n] = data
        pos += n

    put(struct.pack("<Ii", SEQ_STATE_MAGIC, state.seq_id))
    for cache in state.caches:
        put(struct.pack("<I", len(cache.streams)))
        for st in cache.streams:
            if st is None:
                put(struct.pack("<I", 0))
                continue
            put(struct.pack("<I", st.n_cells))
            meta = np.empty((st.n_cells, 3), dtype="<i4")
            meta[:, 0] = st.positions
            meta[:, 1] = 1
            meta[:, 2] = st.seq_ids
            put(meta.data.cast("B"))
            put(struct.pack("<II", int(st.v_trans), len(st.k)))
            for rows in st.k:
                put(struct.pack("<iQ", rows.ggml_type, rows.data.nbytes // st.n_cells))
                put(rows.data)
            for rows in st.v:
                if st.v_trans:
                    put(struct.pack("<iII", rows.ggml_type, DTYPE_LAYOUT[rows.dtype][0], rows.shape[0]))
                else:
                    put(struct.pack("<iQ", rows.ggml_type, rows.data.nbytes // st.n_cells))
                put(rows.data)
    assert pos == size
    return buf


# ------------------------------------------------------------------ state <-> message tensors


def state_to_tensors(state: SeqState) -> tuple[list[Tensor], dict]:
    """Name every piece: ``c{cache}.s{stream}.pos|seq|k{layer}|v{layer}``; layout goes in attrs."""
    tensors: list[Tensor] = []
    layout = {"seq_id": state.seq_id, "caches": []}
    for c, cache in enumerate(state.caches):
        streams = []
        for s, st in enumerate(cache.streams):
            if st is None:
                streams.append(None)
                continue
            streams.append({"cells": st.n_cells, "v_trans": st.v_trans, "n_layer": len(st.k)})
            p = f"c{c}.s{s}."
            tensors.append(Tensor(p + "pos", DType.I32, (st.n_cells,), memoryview(st.positions).cast("B")))
            tensors.append(Tensor(p + "seq", DType.I32, (st.n_cells,), memoryview(st.seq_ids).cast("B")))
            for j, rows in enumerate(st.k):
                tensors.append(Tensor(f"{p}k{j}", rows.dtype, rows.shape, rows.data))
            for j, rows in enumerate(st.v):
                tensors.append(Tensor(f"{p}v{j}", rows.dtype, rows.shape, rows.data))
        layout["caches"].append(streams)
    return tensors, layout


# The ``kv`` attrs of a message (untrusted): caches of streams, each empty or described.
_STREAM = Obj({"cells": Int(0, I32_MAX), "v_trans": Bool(), "n_layer": Int(1, 4096)})
_LAYOUT = Obj({"seq_id": Int(I32_MIN, I32_MAX),
               "caches": Seq(Seq(Nullable(_STREAM), max_items=64), min_items=1, max_items=16)})


class _Described(Protocol):
    """What the layout walk needs of a tensor: a ``Tensor`` or a ``codec.TensorEntry``."""

    name: str
    dtype: DType
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class _StreamParts(Generic[T]):
    cells: int
    v_trans: bool
    pos: T
    seq: T
    k: tuple[T, ...]
    v: tuple[T, ...]


def _walk_layout(tensors: dict[str, T], layout: dict) -> tuple[int, list[list[_StreamParts[T] | None]]]:
    """(seq_id, caches of streams): the layout attrs checked, and every tensor they name checked
    for dtype and shape. Extra tensors (beyond tokens and logits) are refused."""
    layout = _LAYOUT(layout, "KV layout attrs", StateError)
    used = set()

    def get(name: str) -> T:
        if name not in tensors:
            raise StateError(f"missing tensor {name}")
        used.add(name)
        return tensors[name]

    caches: list[list[_StreamParts[T] | None]] = []
    for c, streams_layout in enumerate(layout["caches"]):
        streams: list[_StreamParts[T] | None] = []
        for s, sl in enumerate(streams_layout):
            if sl is None:
                streams.append(None)
                continue
            cells, v_trans, n_layer = sl["cells"], sl["v_trans"], sl["n_layer"]
            p = f"c{c}.s{s}."
            pos_t, seq_t = get(p + "pos"), get(p + "seq")
            for t in (pos_t, seq_t):
                if t.dtype != DType.I32 or t.shape != (cells,):
                    raise StateError(f"{t.name}: expected i32[{cells}], got {t.dtype.name}{list(t.shape)}")
            k_rows, v_rows = [], []
            for j in range(n_layer):
                for which, out in (("k", k_rows), ("v", v_rows)):
                    t = get(f"{p}{which}{j}")
                    if t.dtype not in DTYPE_TO_GGML or len(t.shape) != 2:
                        raise StateError(f"{t.name}: {t.dtype.name}{list(t.shape)} is not a KV row block")
                    cell_axis = 1 if (which == "v" and v_trans) else 0
                    if t.shape[cell_axis] != cells:
                        raise StateError(f"{t.name}: {t.shape[cell_axis]} cells, layout says {cells}")
                    if which == "v" and v_trans and DTYPE_LAYOUT[t.dtype][1] != 1:
                        raise StateError(f"{t.name}: a transposed V cannot be block-quantized")
                    if tensor_nbytes(t.dtype, t.shape) != t.nbytes:
                        raise StateError(f"{t.name}: byte length does not match its shape")
                    out.append(t)
            streams.append(_StreamParts(cells, v_trans, pos_t, seq_t, tuple(k_rows), tuple(v_rows)))
        caches.append(streams)
    extra = set(tensors) - used - {"tokens", "logits"}
    if extra:
        raise StateError(f"unexpected tensors: {sorted(extra)[:5]}")
    if not caches:
        raise StateError("KV layout names no cache")
    return layout["seq_id"], caches


def tensors_to_state(tensors: dict[str, Tensor], layout: dict) -> SeqState:
    """Inverse of ``state_to_tensors``; checks every name, dtype and shape against the layout."""
    seq_id, walked = _walk_layout(tensors, layout)

    def rows(t: Tensor) -> LayerRows:
        return LayerRows(DTYPE_TO_GGML[t.dtype], t.shape, t.data)  # type: ignore[arg-type]

    caches = []
    for streams in walked:
        caches.append(CacheState(tuple(
            None if sp is None else StreamState(
                np.frombuffer(sp.pos.data, dtype="<i4"), np.frombuffer(sp.seq.data, dtype="<i4"),
                sp.v_trans, tuple(rows(t) for t in sp.k), tuple(rows(t) for t in sp.v))
            for sp in streams)))
    return SeqState(seq_id, tuple(caches))


def blob_offsets(entries: dict[str, _Described], layout: dict) -> tuple[int, dict[str, int]]:
    """Where ``assemble_seq_state`` will put each K and V tensor a message describes, and the
    blob's size, from the message's header alone: a receiver can then write the tensors' bytes
    there as they arrive and never hold the message and the blob at once."""
    _, walked = _walk_layout(entries, layout)
    at: dict[str, int] = {}
    pos = 8
    for streams in walked:
        pos += 4
        for sp in streams:
            pos += 4
            if sp is None:
                continue
            pos += 12 * sp.cells + 8
            for t in (*sp.k, *sp.v):
                pos += 12  # the layer's type and row size (or, transposed, element size and width)
                at[t.name] = pos
                pos += t.nbytes
    return pos, at


# ------------------------------------------------------------------ cell selection and merging


def _take_cells(rows: LayerRows, idx: np.ndarray, v_trans: bool) -> LayerRows:
    raw = np.frombuffer(rows.data, dtype=np.uint8)
    if v_trans:  # [width, cells] elements: select along the cell axis
        width, cells = rows.shape
        el = rows.data.nbytes // (width * cells)
        picked = raw.reshape(width, cells, el)[:, idx, :]
        return LayerRows(rows.ggml_type, (width, idx.size), memoryview(np.ascontiguousarray(picked)).cast("B"))
    cells = rows.shape[0]
    picked = raw.reshape(cells, -1)[idx]
    return LayerRows(rows.ggml_type, (idx.size, rows.shape[1]), memoryview(np.ascontiguousarray(picked)).cast("B"))


def select_cells(state: SeqState, keep) -> SeqState:
    """A state holding only the cells whose positions satisfy ``keep(positions) -> bool mask``."""
    caches = []
    for cache in state.caches:
        streams: list[StreamState | None] = []
        for st in cache.streams:
            if st is None:
                streams.append(None)
                continue
            idx = np.nonzero(keep(st.positions))[0]
            if idx.size == 0:
                streams.append(None)
                continue
            streams.append(StreamState(
                st.positions[idx], st.seq_ids[idx], st.v_trans,
                tuple(_take_cells(r, idx, False) for r in st.k),
                tuple(_take_cells(r, idx, st.v_trans) for r in st.v)))
        caches.append(CacheState(tuple(streams)))
    return SeqState(state.seq_id, tuple(caches))


def _cat_rows(parts: list[LayerRows], v_trans: bool, what: str) -> LayerRows:
    a = parts[0]
    for b in parts[1:]:
        if a.ggml_type != b.ggml_type:
            raise StateError(f"{what}: cache type {b.dtype.name} differs from {a.dtype.name}")
        if (a.shape[0] != b.shape[0]) if v_trans else (a.shape[1] != b.shape[1]):
            raise StateError(f"{what}: width differs")
    raws = [np.frombuffer(p.data, dtype=np.uint8) for p in parts]
    if v_trans:
        w = a.shape[0]
        out = np.concatenate([r.reshape(w, p.shape[1], -1) for r, p in zip(raws, parts, strict=True)], axis=1)
        return LayerRows(a.ggml_type, (w, sum(p.shape[1] for p in parts)), memoryview(out.reshape(-1)).cast("B"))
    out = np.concatenate(raws)
    return LayerRows(a.ggml_type, (sum(p.shape[0] for p in parts), a.shape[1]), memoryview(out).cast("B"))


def append_cells(base: SeqState, *extras: SeqState) -> SeqState:
    """``base`` with each of ``extras``' cells appended after its own, in order, cache by cache,
    stream by stream (one copy of everything, however many are appended)."""
    states = (base, *extras)
    for extra in extras:
        if len(base.caches) != len(extra.caches):
            raise StateError(f"{len(extra.caches)} caches where this model has {len(base.caches)}")
    caches = []
    for c, cb in enumerate(base.caches):
        if any(len(st.caches[c].streams) != len(cb.streams) for st in extras):
            raise StateError(f"cache {c}: stream count differs")
        streams: list[StreamState | None] = []
        for s in range(len(cb.streams)):
            live = [st.caches[c].streams[s] for st in states if st.caches[c].streams[s] is not None]
            if len(live) <= 1:
                streams.append(live[0] if live else None)
                continue
            what = f"cache {c} stream {s}"
            first = live[0]
            if any(x.v_trans != first.v_trans or len(x.k) != len(first.k) for x in live[1:]):
                raise StateError(f"{what}: layout differs (V transposition or layer count)")
            streams.append(StreamState(
                np.concatenate([x.positions for x in live]),
                np.concatenate([first.seq_ids, *(np.full_like(x.seq_ids, first.seq_ids[0]) for x in live[1:])]),
                first.v_trans,
                tuple(_cat_rows([x.k[j] for x in live], False, f"{what} K{j}") for j in range(len(first.k))),
                tuple(_cat_rows([x.v[j] for x in live], first.v_trans, f"{what} V{j}") for j in range(len(first.v))),
            ))
        caches.append(CacheState(tuple(streams)))
    return SeqState(base.seq_id, tuple(caches))


def bytes_from_position(state: SeqState) -> Callable[[int], int]:
    """A function giving the K/V bytes of the cells at positions ``k`` and later: what a delta
    from ``k`` carries (a window cache holds few old cells, so this is not proportional)."""
    pos, size = [], []
    for cache in state.caches:
        for st in cache.streams:
            if st is None or not st.n_cells:
                continue
            per_cell = sum(r.data.nbytes for r in (*st.k, *st.v)) // st.n_cells
            pos.append(st.positions.astype(np.int64))
            size.append(np.full(st.n_cells, per_cell, dtype=np.int64))
    if not pos:
        return lambda k: 0
    order = np.argsort(np.concatenate(pos), kind="stable")
    p = np.concatenate(pos)[order]
    tail = np.concatenate([np.cumsum(np.concatenate(size)[order][::-1])[::-1], [0]])
    return lambda k: int(tail[np.searchsorted(p, k, side="left")])


def canonical_digest(state: SeqState) -> bytes:
    """blake3 over every cell ordered by position: equal for equal states whatever the cell order
    (a window cache may hold the same cells in a different order after a restore)."""
    h = blake3.blake3()
    for cache in state.caches:
        for st in cache.streams:
            if st is None:
                h.update(b"empty")
                continue
            order = np.argsort(st.positions, kind="stable")
            h.update(st.positions[order].tobytes())
            for r in st.k:
                h.update(np.frombuffer(r.data, dtype=np.uint8).reshape(r.shape[0], -1)[order].tobytes())
            for r in st.v:
                raw = np.frombuffer(r.data, dtype=np.uint8)
                if st.v_trans:
                    h.update(raw.reshape(r.shape[0], r.shape[1], -1)[:, order, :].tobytes())
                else:
                    h.update(raw.reshape(r.shape[0], -1)[order].tobytes())
    return h.digest()
