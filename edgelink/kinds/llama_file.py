"""llama.cpp's own sequence-state files (``llama_state_seq_save_file``; llama-server's
``--slot-save-path`` slots are these): read one, verified against a model, into a runtime, and
write one that ``llama_state_seq_load_file`` accepts.

The format of the pinned llama.cpp: u32 magic ``ggsq``, u32 version 3, u32 token count, that
many i32 token ids, then the sequence's per-cache data, which is what
``llama_state_seq_get_data`` returns after its own 8-byte header (magic, sequence id).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from edgelink.errors import StateError
from edgelink.files import write_atomic
from edgelink.kinds.snapshot import check_state_layout
from edgelink.runtime.kvstate import SEQ_STATE_MAGIC, parse_seq_state
from edgelink.runtime.llama import LlamaRuntime

SEQ_FILE_MAGIC = 0x67677371  # "ggsq"
SEQ_FILE_VERSION = 3
_FILE_HEADER = struct.Struct("<III")


def read_seq_file(path: str | Path, rt: LlamaRuntime) -> tuple[list[int], np.ndarray]:
    """(token ids, a state blob ``import_state`` takes) from a llama.cpp sequence-state file,
    checked against ``rt``'s model before anything is imported: magic, version, a token count
    that fits the context, ids inside the vocabulary, and cells that are exactly this model's
    layout. Untrusted bytes: every failure is a StateError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except (OSError, ValueError) as exc:
        raise StateError(f"cannot read {str(path)[:200]!r}: {getattr(exc, 'strerror', None) or exc}") from None
    if len(data) < _FILE_HEADER.size:
        raise StateError(f"{path}: {len(data)} bytes is too short for a llama.cpp sequence-state file")
    magic, version, n_tokens = _FILE_HEADER.unpack_from(data)
    if magic != SEQ_FILE_MAGIC:
        raise StateError(f"{path}: not a llama.cpp sequence-state file (magic {magic:#x}, expected 'ggsq')")
    if version != SEQ_FILE_VERSION:
        raise StateError(f"{path}: sequence-state version {version}; this llama.cpp writes and reads "
                         f"version {SEQ_FILE_VERSION}")
    if not 0 < n_tokens <= rt.n_ctx:
        raise StateError(f"{path}: {n_tokens} tokens (this context holds 1..{rt.n_ctx}; raise runtime.n_ctx)")
    end = _FILE_HEADER.size + 4 * n_tokens
    if len(data) < end:
        raise StateError(f"{path}: the file ends inside its {n_tokens} token ids")
    tokens = np.frombuffer(data, dtype="<i4", count=n_tokens, offset=_FILE_HEADER.size)
    if tokens.min() < 0 or tokens.max() >= rt.n_vocab:
        raise StateError(f"{path}: token ids outside this model's vocabulary of {rt.n_vocab}")
    blob = np.empty(8 + len(data) - end, dtype=np.uint8)
    blob[:8] = np.frombuffer(struct.pack("<Ii", SEQ_STATE_MAGIC, rt.seq), dtype=np.uint8)
    blob[8:] = np.frombuffer(data, dtype=np.uint8, offset=end)
    check_state_layout(rt, parse_seq_state(blob), n_tokens)
    return [int(t) for t in tokens], blob


def load_seq_file(path: str | Path, rt: LlamaRuntime) -> int:
    """Replace ``rt``'s sequence by a llama.cpp sequence-state file's. The file holds no logits,
    so the last token is decoded again (as llama-server does when it restores a slot); the
    cells before it are the file's, bit for bit. Returns the token count."""
    tokens, blob = read_seq_file(path, rt)
    rt.import_state(blob, tokens, None)
    rt.truncate(len(tokens) - 1)
    rt.prefill(tokens[-1:])
    return len(tokens)


def save_seq_file(path: str | Path, rt: LlamaRuntime) -> int:
    """Write ``rt``'s sequence as a llama.cpp sequence-state file (what
    ``llama_state_seq_load_file`` reads), atomically. Returns the bytes written."""
    if not rt.tokens:
        raise StateError("the sequence is empty: prefill a prompt first")
    if min(rt.tokens) < 0:
        raise StateError("the sequence holds embedding positions, which a llama.cpp state file cannot name")
    blob = rt.export_state()
    head = _FILE_HEADER.pack(SEQ_FILE_MAGIC, SEQ_FILE_VERSION, len(rt.tokens))
    write_atomic(path, (head, np.asarray(rt.tokens, dtype="<i4").tobytes(), blob[8:]))
    return len(head) + 4 * len(rt.tokens) + blob.nbytes - 8
