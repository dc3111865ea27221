"""VIRTUAL_PREFIX: vectors the receiver feeds as input embeddings (``llama_batch.embd``) at the
next positions of its sequence, before or between real tokens.

The message: one tensor ``embd`` f32 [n, n_embd] in the receiver's token-embedding space (rows as
``token_embd.weight`` stores them; the receiver applies its model's own input scale, e.g.
sqrt(n_embd) for Gemma), apply mode APPEND, ``token_range = (start, start + n)`` where
``start`` is the receiver's current length, and optionally ``attrs.energy_match = true`` to
rescale every row to the receiver's mean token-embedding norm. Feeding a model its own
token rows reproduces the token path's logits bit for bit (tests hold this).
"""

from __future__ import annotations

import numpy as np

from edgelink.errors import StateError
from edgelink.kinds.snapshot import check_target
from edgelink.protocol.kinds import ApplyMode, DType, Kind
from edgelink.protocol.messages import Tensor, TensorMessage
from edgelink.runtime.embeddings import TokenEmbeddings
from edgelink.runtime.llama import LlamaRuntime


def prefix_tensors(vectors: np.ndarray, start: int, energy_match: bool = False
                   ) -> tuple[list[Tensor], dict, tuple[int, int]]:
    v = np.ascontiguousarray(vectors, dtype="<f4")
    if v.ndim != 2 or v.shape[0] == 0:
        raise StateError("a prefix is a non-empty [n, n_embd] array")
    return ([Tensor("embd", DType.F32, v.shape, memoryview(v).cast("B"))],
            {"energy_match": bool(energy_match)}, (start, start + v.shape[0]))


def energy_matched(v: np.ndarray, target_norm: float) -> np.ndarray:
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v * (target_norm / np.maximum(norms, 1e-12))


class PrefixApplier:
    """Checks and feeds VIRTUAL_PREFIX messages into one runtime's sequence."""

    def __init__(self, rt: LlamaRuntime, embeddings: TokenEmbeddings):
        self.rt = rt
        self.embeddings = embeddings

    def check(self, msg: TensorMessage) -> np.ndarray:
        rt = self.rt
        check_target(msg, rt, Kind.VIRTUAL_PREFIX, ApplyMode.APPEND)
        if [t.name for t in msg.tensors] != ["embd"]:
            raise StateError("a prefix carries exactly one tensor, 'embd'")
        t = msg.tensors[0]
        if t.dtype is not DType.F32 or len(t.shape) != 2 or t.shape[1] != self.embeddings.n_embd:
            raise StateError(f"'embd' must be f32[n, {self.embeddings.n_embd}], "
                             f"got {t.dtype.name}{list(t.shape)}")
        n = t.shape[0]
        start = len(rt.tokens)
        if msg.token_range != (start, start + n):
            raise StateError(f"prefix positions {msg.token_range} do not follow this sequence "
                             f"({start} positions)")
        if start + n > rt.n_ctx:
            raise StateError(f"{start + n} positions exceed the context of {rt.n_ctx}")
        v = t.array()
        if not np.isfinite(v).all():
            raise StateError("prefix holds NaN or infinite values")
        if msg.attrs.get("energy_match"):
            v = energy_matched(v, self.embeddings.mean_norm)
        return v

    def apply(self, msg: TensorMessage) -> None:
        self.rt.prefill_embeddings(self.check(msg), self.embeddings.input_scale)
