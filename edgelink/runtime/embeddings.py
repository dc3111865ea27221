"""Token-embedding rows straight from the GGUF file (dequantized with `gguf`), and the input
scale the model applies to them, so a vector fed through ``llama_batch.embd`` means exactly what
the token it stands for would mean."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from edgelink.errors import ModelError
from edgelink.models.gguf_meta import read_gguf_header

# Architectures whose graph multiplies token embeddings by sqrt(n_embd) but leaves raw
# embedding input unscaled (llama.cpp src/models/gemma*.cpp).
_SQRT_SCALED = {"gemma", "gemma2", "gemma3", "gemma3n"}


class TokenEmbeddings:
    """Reads rows of ``token_embd.weight`` on demand through a memory map."""

    def __init__(self, path: str | Path, architecture: str, n_embd: int,
                 tensor: str = "token_embd.weight"):
        """``tensor``: another [n_vocab, n_embd] matrix to read rows of (``output.weight``)."""
        header = read_gguf_header(path)
        try:
            info = header.tensor(tensor)
        except KeyError:
            raise ModelError(f"{path}: no {tensor} tensor") from None
        self.qtype = GGMLQuantizationType(info.ggml_type)
        block, type_size = GGML_QUANT_SIZES[self.qtype]
        self.n_embd, self.n_vocab = info.shape[0], info.shape[1]
        if self.n_embd != n_embd:
            raise ModelError(f"{tensor} width {self.n_embd} != n_embd {n_embd}")
        self.row_bytes = self.n_embd // block * type_size
        self._raw = np.memmap(path, dtype=np.uint8, mode="r", offset=info.offset,
                              shape=(self.n_vocab, self.row_bytes))
        self.input_scale = math.sqrt(n_embd) if architecture in _SQRT_SCALED else 1.0

    def rows(self, token_ids: list[int] | np.ndarray) -> np.ndarray:
        """f32 [n, n_embd]: the embedding rows as stored (before the model's input scale)."""
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_vocab):
            raise ModelError("token id outside the vocabulary")
        raw = np.ascontiguousarray(self._raw[ids])
        return dequantize(raw, self.qtype).reshape(len(ids), self.n_embd).astype(np.float32)

    @functools.cached_property
    def mean_norm(self) -> float:
        """Mean L2 norm of the rows (a fixed sample of up to 4,096), for energy matching."""
        ids = np.linspace(0, self.n_vocab - 1, num=min(4096, self.n_vocab)).astype(np.int64)
        return float(np.linalg.norm(self.rows(ids), axis=1).mean())
