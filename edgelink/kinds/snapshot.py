"""The KV_CACHE snapshot message: build it from a runtime, check it, apply it to a runtime.

A snapshot carries the sequence's KV cells as per-layer K and V tensors (see
``runtime.kvstate``), the token ids and the logits after the last token, so the receiver can
sample its first new token at once and continue exactly as the sender would have.
Applying checks every tensor against the receiver's own model before llama.cpp sees a byte,
and restores the previous sequence if llama.cpp still refuses it: state is never half-applied.
The helpers here are shared with the other state-carrying kinds (``kinds.delta``, ``kinds.memory``).
"""

from __future__ import annotations

import numpy as np

from edgelink.errors import StateError
from edgelink.protocol.buffers import RecvBuffer
from edgelink.protocol.codec import TensorHeader
from edgelink.protocol.kinds import ApplyMode, DType, Kind
from edgelink.protocol.messages import Tensor, TensorMessage
from edgelink.runtime.kvstate import (
    CACHE_TYPE_NAMES,
    SeqState,
    assemble_seq_state,
    blob_offsets,
    parse_seq_state,
    state_to_tensors,
    tensors_to_state,
)
from edgelink.runtime.llama import LlamaRuntime

VIRTUAL_TOKEN = -1  # token id recorded for a position fed by an embedding (VIRTUAL_PREFIX)


def state_message_tensors(rt: LlamaRuntime, state: SeqState, tokens: list[int]) -> tuple[list[Tensor], dict]:
    """Tensors for ``state`` plus the given token ids and the runtime's current logits."""
    if rt.logits is None:
        raise StateError("no logits: the sequence is empty")
    tensors, layout = state_to_tensors(state)
    tok = np.asarray(tokens, dtype="<i4")
    logits = np.ascontiguousarray(rt.logits, dtype="<f4")
    tensors.append(Tensor("tokens", DType.I32, tok.shape, memoryview(tok).cast("B")))
    tensors.append(Tensor("logits", DType.F32, logits.shape, memoryview(logits).cast("B")))
    return tensors, {"kv": layout}


def snapshot_tensors(rt: LlamaRuntime) -> tuple[list[Tensor], dict, tuple[int, int]]:
    """(tensors, attrs, token range) describing the runtime's current sequence."""
    if not rt.tokens or rt.logits is None:
        raise StateError("the sequence is empty: prefill a prompt first")
    tensors, attrs = state_message_tensors(rt, parse_seq_state(rt.export_state()), rt.tokens)
    return tensors, attrs, (0, len(rt.tokens))


def check_target(msg: TensorMessage, rt: LlamaRuntime, kind: Kind, *applies: ApplyMode) -> None:
    """The message is of ``kind``, uses one of ``applies``, and names this runtime's slot."""
    if msg.kind is not kind or msg.apply not in applies:
        raise StateError(f"cannot apply {msg.kind.name}/{msg.apply.name} as {kind.name}")
    if msg.seq_slot != rt.seq:
        raise StateError(f"sequence slot {msg.seq_slot} does not exist here (slot {rt.seq})")


def check_positions(pos: np.ndarray, n_tokens: int, first: int = 0) -> None:
    """Cells are unique positions in [first, n_tokens) that include the last token. They need
    not be sorted: a sliding-window cache reuses freed cells."""
    if pos.size == 0 or pos.size > n_tokens - first:
        raise StateError(f"{pos.size} cells for positions {first}..{n_tokens - 1}")
    if int(pos.min()) < first or int(pos.max()) != n_tokens - 1:
        raise StateError(f"cell positions {int(pos.min())}..{int(pos.max())} are not within "
                         f"{first}..{n_tokens - 1} ending at the last token")
    if np.unique(pos).size != pos.size:
        raise StateError("duplicate cell positions")


def check_tokens_and_logits(rt: LlamaRuntime, msg: TensorMessage) -> tuple[list[int], np.ndarray]:
    """The ``tokens`` and ``logits`` tensors of a state message, validated for this model."""
    by_name = {t.name: t for t in msg.tensors}
    tok_t, log_t = by_name.get("tokens"), by_name.get("logits")
    if tok_t is None or log_t is None:
        raise StateError("a state message needs 'tokens' and 'logits' tensors")
    if tok_t.dtype is not DType.I32 or len(tok_t.shape) != 1:
        raise StateError("'tokens' must be i32[n]")
    start, end = msg.token_range
    if tok_t.shape[0] != end - start or end <= start:
        raise StateError(f"token range {msg.token_range} does not match {tok_t.shape[0]} tokens")
    if end > rt.n_ctx:
        raise StateError(f"{end} tokens do not fit the receiver's context of {rt.n_ctx}")
    tokens = tok_t.array()
    if tokens.min() < VIRTUAL_TOKEN or tokens.max() >= rt.n_vocab:
        raise StateError("token ids outside the vocabulary")
    if log_t.dtype is not DType.F32 or log_t.shape != (rt.n_vocab,):
        raise StateError(f"'logits' must be f32[{rt.n_vocab}]")
    logits = log_t.array()
    if not np.isfinite(logits).all():
        raise StateError("logits hold NaN or infinite values")
    return tokens.tolist(), logits


def check_state_layout(rt: LlamaRuntime, state: SeqState, n_tokens: int, first: int = 0) -> None:
    """Every cache, stream and layer matches this runtime's model and cache configuration."""
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
        check_positions(st.positions, n_tokens, first)
        for rows in st.k:
            if rows.ggml_type != want_k:
                raise StateError(f"K cache type {rows.dtype.name} differs from {rt.cfg.runtime.type_k}")
        for rows in st.v:
            if rows.ggml_type != want_v:
                raise StateError(f"V cache type {rows.dtype.name} differs from {rt.cfg.runtime.type_v}")
    if n_layers != rt.n_layer:
        raise StateError(f"state holds {n_layers} layers, the model has {rt.n_layer}")


def message_state(msg: TensorMessage) -> SeqState:
    layout = msg.attrs.get("kv")
    if not isinstance(layout, dict):
        raise StateError("message attrs lack the 'kv' layout")
    return tensors_to_state({t.name: t for t in msg.tensors}, layout)


def import_guarded(rt: LlamaRuntime, blob: np.ndarray, tokens: list[int], logits: np.ndarray) -> None:
    """Import; if llama.cpp refuses, restore the previous sequence exactly and re-raise."""
    # The backup is a view into the runtime's export buffer: import_state never exports, so
    # the view stays intact until we need it, and the happy path pays no copy.
    backup = (np.asarray(rt.export_state()), list(rt.tokens), rt.logits) if rt.tokens else None
    try:
        rt.import_state(blob, tokens, logits)
    except Exception:  # any failure, typed or not: the sequence goes back as it was
        if backup is not None:
            rt.import_state(*backup)
        raise


class SnapshotApplier:
    """Checks and applies KV_CACHE messages to one runtime; keeps a reusable blob buffer.

    ``place`` lets a ``FrameReader`` write a message's K and V tensors straight into that blob
    as they arrive, so receiving a snapshot holds one copy of the state, not two."""

    def __init__(self, rt: LlamaRuntime):
        self.rt = rt
        self._blob = RecvBuffer()

    def place(self, th: TensorHeader) -> dict[str, memoryview]:
        """Destinations in the blob for the K/V tensors of a snapshot this runtime could take.
        Anything else (another kind, a layout that does not check out) is left to scratch;
        the full checks run on the whole message later, as for any other."""
        if th.kind is not Kind.KV_CACHE or th.seq_slot != self.rt.seq or not isinstance(th.attrs.get("kv"), dict):
            return {}
        try:
            size, at = blob_offsets({e.name: e for e in th.entries}, th.attrs["kv"])
        except StateError:
            return {}  # refused with its reason by check(), once the message is in
        by_name = {e.name: e.nbytes for e in th.entries}
        blob = self._blob.view(size)
        return {name: blob[off:off + by_name[name]] for name, off in at.items()}

    def release(self) -> None:
        """Give the blob's memory back (after a message that was not applied); a later snapshot
        grows it again."""
        self._blob.release()

    def assemble(self, state: SeqState) -> np.ndarray:
        return assemble_seq_state(state, self._blob.array(state.nbytes))

    def check(self, msg: TensorMessage) -> tuple[np.ndarray, list[int], np.ndarray]:
        """Everything short of touching llama.cpp: returns (blob, tokens, logits)."""
        check_target(msg, self.rt, Kind.KV_CACHE, ApplyMode.OVERWRITE)
        if msg.token_range[0] != 0:
            raise StateError("a snapshot starts at token 0")
        tokens, logits = check_tokens_and_logits(self.rt, msg)
        state = message_state(msg)
        check_state_layout(self.rt, state, len(tokens))
        return self.assemble(state), tokens, logits

    def apply(self, msg: TensorMessage) -> None:
        """Check, then import; on failure the previous sequence is restored exactly."""
        import_guarded(self.rt, *self.check(msg))
