"""The KV_CACHE snapshot message: build it from a runtime, check it, apply it to a runtime.

A snapshot carries the sequence's KV cells as per-layer K and V tensors (see
``runtime.kvstate``), the token ids and the logits after the last token, so the receiver can
sample its first new token at once and continue exactly as the sender would have.
Applying checks every tensor against the receiver's own model before llama.cpp sees a byte,
and restores the previous sequence if llama.cpp still refuses it: state is never half-applied.
"""

from __future__ import annotations

import numpy as np

from edgelink.errors import StateError
from edgelink.protocol.kinds import ApplyMode, DType, Kind
from edgelink.protocol.messages import Tensor, TensorMessage
from edgelink.runtime.kvstate import (
    CACHE_TYPE_NAMES,
    assemble_seq_state,
    parse_seq_state,
    state_to_tensors,
    tensors_to_state,
)
from edgelink.runtime.llama import LlamaRuntime


def snapshot_tensors(rt: LlamaRuntime) -> tuple[list[Tensor], dict, tuple[int, int]]:
    """(tensors, attrs, token range) describing the runtime's current sequence."""
    if not rt.tokens or rt.logits is None:
        raise StateError("the sequence is empty: prefill a prompt first")
    state = parse_seq_state(rt.export_state())
    tensors, layout = state_to_tensors(state)
    tokens = np.asarray(rt.tokens, dtype="<i4")
    logits = np.ascontiguousarray(rt.logits, dtype="<f4")
    tensors.append(Tensor("tokens", DType.I32, tokens.shape, memoryview(tokens).cast("B")))
    tensors.append(Tensor("logits", DType.F32, logits.shape, memoryview(logits).cast("B")))
    return tensors, {"kv": layout}, (0, len(rt.tokens))


def check_positions(pos: np.ndarray, n_tokens: int) -> None:
    """Cells are unique positions within the sequence and include its last token. They need
    not be sorted: a sliding-window cache reuses freed cells, so its cell order wraps."""
    if pos.size == 0 or pos.size > n_tokens:
        raise StateError(f"{pos.size} cells for {n_tokens} tokens")
    if int(pos.min()) < 0 or int(pos.max()) != n_tokens - 1:
        raise StateError(f"cell positions {int(pos.min())}..{int(pos.max())} do not end at token {n_tokens - 1}")
    if np.unique(pos).size != pos.size:
        raise StateError("duplicate cell positions")


class SnapshotApplier:
    """Checks and applies KV_CACHE messages to one runtime; keeps a reusable blob buffer."""

    def __init__(self, rt: LlamaRuntime):
        self.rt = rt
        self._blob = np.empty(0, dtype=np.uint8)

    def check(self, msg: TensorMessage) -> tuple[np.ndarray, list[int], np.ndarray]:
        """Everything short of touching llama.cpp: returns (blob, tokens, logits)."""
        rt = self.rt
        if msg.kind is not Kind.KV_CACHE or msg.apply is not ApplyMode.OVERWRITE:
            raise StateError(f"cannot apply {msg.kind.name}/{msg.apply.name} as a snapshot")
        if msg.seq_slot != rt.seq:
            raise StateError(f"sequence slot {msg.seq_slot} does not exist here (slot {rt.seq})")
        by_name = {t.name: t for t in msg.tensors}
        tok_t, log_t = by_name.get("tokens"), by_name.get("logits")
        if tok_t is None or log_t is None:
            raise StateError("a snapshot needs 'tokens' and 'logits' tensors")
        if tok_t.dtype is not DType.I32 or len(tok_t.shape) != 1:
            raise StateError("'tokens' must be i32[n]")
        n = tok_t.shape[0]
        if not 0 < n <= rt.n_ctx:
            raise StateError(f"{n} tokens do not fit the receiver's context of {rt.n_ctx}")
        if msg.token_range != (0, n):
            raise StateError(f"token range {msg.token_range} does not match {n} tokens")
        tokens = tok_t.array()
        if tokens.min() < 0 or tokens.max() >= rt.n_vocab:
            raise StateError("token ids outside the vocabulary")
        if log_t.dtype is not DType.F32 or log_t.shape != (rt.n_vocab,):
            raise StateError(f"'logits' must be f32[{rt.n_vocab}]")
        logits = log_t.array()
        if not np.isfinite(logits).all():
            raise StateError("logits hold NaN or infinite values")
        layout = msg.attrs.get("kv")
        if not isinstance(layout, dict):
            raise StateError("snapshot attrs lack the 'kv' layout")
        state = tensors_to_state(by_name, layout)
        self._check_layout(state, n)
        size = state.nbytes
        if self._blob.nbytes < size:
            self._blob = np.empty(size, dtype=np.uint8)
        blob = assemble_seq_state(state, self._blob)
        return blob, tokens.tolist(), logits

    def _check_layout(self, state, n_tokens: int) -> None:
        rt = self.rt
        want_k, want_v = CACHE_TYPE_NAMES[rt.cfg.runtime.type_k], CACHE_TYPE_NAMES[rt.cfg.runtime.type_v]
        v_trans = not rt.flash_attn_resolved()
        n_layers = 0
        for cache in state.caches:
            live = [st for st in cache.streams if st is not None]
            if len(cache.streams) != 1 or len(live) != 1:
                raise StateError("expected exactly one non-empty stream per cache")
            st = live[0]
            n_layers += len(st.k)
            if st.v_trans != v_trans:
                raise StateError("V layout differs (flash attention resolved differently)")
            check_positions(st.positions, n_tokens)
            for rows in st.k:
                if rows.ggml_type != want_k:
                    raise StateError(f"K cache type {rows.dtype.name} differs from {rt.cfg.runtime.type_k}")
            for rows in st.v:
                if rows.ggml_type != want_v:
                    raise StateError(f"V cache type {rows.dtype.name} differs from {rt.cfg.runtime.type_v}")
        if n_layers != rt.n_layer:
            raise StateError(f"snapshot holds {n_layers} layers, the model has {rt.n_layer}")

    def apply(self, msg: TensorMessage) -> None:
        """Check, then import; on failure the previous sequence is restored exactly."""
        blob, tokens, logits = self.check(msg)
        rt = self.rt
        # The backup is a view into the runtime's export buffer: import_state never exports,
        # so the view stays intact until we need it, and no copy is paid on the happy path.
        backup = (np.asarray(rt.export_state()), list(rt.tokens), rt.logits) if rt.tokens else None
        try:
            rt.import_state(blob, tokens, logits)
        except StateError:
            if backup is not None:
                rt.import_state(*backup)
            raise
