"""Test helpers that make GGUF files: a tiny random llama, and a weight variant of a real model.

Imported by tests (not collected itself). Both kinds of file keep an architecture while changing
the weights, which is what the handshake's weights digest must catch.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import gguf
import numpy as np

from edgelink.models.gguf_meta import read_gguf_header
from edgelink.models.twins import write_gguf

TINY_NAME = "edgelink-tiny-llama"

def write_tiny_llama_gguf(path: str | os.PathLike[str], *, n_layer: int = 2, n_embd: int = 64,
                          n_head: int = 4, n_head_kv: int = 2, n_vocab: int = 256, seed: int = 0,
                          n_ff: int | None = None, n_ctx_train: int = 4096,
                          dtype: str = "f32") -> Path:
    """Write a tiny, loadable llama-architecture GGUF with random weights.

    ``seed`` changes the weights only: files written with different seeds have identical
    metadata and tensor shapes (and the same size), so only a weights digest tells them apart.
    """
    if n_embd % n_head:
        raise ValueError("n_embd must divide by n_head")
    return write_gguf(path, arch="llama", name=TINY_NAME, n_layer=n_layer, n_embd=n_embd,
                      n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff, n_vocab=n_vocab,
                      n_ctx_train=n_ctx_train, seed=seed, dtype=dtype)


def write_weight_variant(src_gguf: str | os.PathLike[str], dst_path: str | os.PathLike[str], *,
                         tensor: str | None = None, scale: float = 1.01) -> Path:
    """Copy a GGUF and scale one f32/f16 tensor's values, leaving every other byte as it is.

    The metadata, tensor names, shapes, types and offsets stay identical (so is the file size):
    the architecture facts match the source's while the weights digest differs. By default the
    final norm (``output_norm.weight``) is scaled, which changes the logits slightly but keeps the
    model sane. The bytes are patched in place rather than re-serialized with ``gguf.GGUFWriter``:
    a rewrite would re-derive every metadata value's type and take seconds for a real vocabulary.
    """
    header = read_gguf_header(src_gguf)
    float_types = {int(gguf.GGMLQuantizationType.F32): np.float32,
                   int(gguf.GGMLQuantizationType.F16): np.float16}
    if tensor is None:
        names = [t.name for t in header.tensors if t.ggml_type in float_types]
        if not names:
            raise ValueError(f"{src_gguf} has no f32/f16 tensor to perturb")
        tensor = "output_norm.weight" if "output_norm.weight" in names else names[-1]
    info = header.tensor(tensor)
    if info.ggml_type not in float_types:
        raise ValueError(f"tensor {tensor!r} is not f32/f16")
    dst = Path(dst_path)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src_gguf, tmp)
    with open(tmp, "r+b") as fh:
        fh.seek(info.offset)
        values = np.frombuffer(fh.read(info.nbytes), dtype=float_types[info.ggml_type]).copy()
        changed = (values * scale).astype(values.dtype)
        if np.array_equal(changed, values):  # all zeros: shift instead
            changed = (values + 0.01).astype(values.dtype)
        fh.seek(info.offset)
        fh.write(changed.tobytes())
    os.replace(tmp, dst)
    return dst
