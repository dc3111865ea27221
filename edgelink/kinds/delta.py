"""KV_CACHE_DELTA: ship only the cells added since the last sync; the receiver appends them.

Two processes that take turns extending one sequence exchange only what each added, so the
bytes per turn follow the new tokens, not the whole context. llama.cpp has no partial import,
so the receiver rebuilds its sequence locally (its own cells, then the new ones; cells that a
sliding window has masked are dropped exactly as llama.cpp drops them on export) and imports
the result with the same all-or-nothing guard as a snapshot.

The message: the snapshot's tensors restricted to positions [since, end), the token ids of
those positions, the logits after the last one, ``token_range = (since, end)``, apply mode
APPEND, and ``attrs.base`` = blake3 of the ``since`` token ids both sides must already share.
With ``attrs.base_kv`` (a split handoff, where the receiver has just prefilled those tokens
itself: edgelink/wire/plan.py) the receiver also checks that its own cells, as they will stand
in the merged sequence, are bit-identical to the sender's, and refuses the delta otherwise.
"""

from __future__ import annotations

import blake3
import numpy as np

from edgelink.errors import StateError
from edgelink.kinds.snapshot import (
    SnapshotApplier,
    check_state_layout,
    check_target,
    check_tokens_and_logits,
    import_guarded,
    message_state,
    state_message_tensors,
)
from edgelink.protocol.kinds import ApplyMode, Kind
from edgelink.protocol.messages import Tensor, TensorMessage
from edgelink.runtime.kvstate import (
    SeqState,
    append_cells,
    canonical_digest,
    parse_seq_state,
    select_cells,
)
from edgelink.runtime.llama import LlamaRuntime


def tokens_digest(tokens: list[int]) -> str:
    return blake3.blake3(np.asarray(tokens, dtype="<i4").tobytes()).hexdigest()


def prefix_cells_digest(state: SeqState, end: int) -> str:
    """Digest of a sequence's cells before position ``end``: what a split handoff's receiver
    must hold bit for bit (the sender's full state and the receiver's merged one alike)."""
    return canonical_digest(select_cells(state, lambda pos: pos < end)).hex()


def delta_tensors(rt: LlamaRuntime, since: int, verify_base: bool = False,
                  state: SeqState | None = None) -> tuple[list[Tensor], dict, tuple[int, int]]:
    """(tensors, attrs, token range) for the cells at positions ``since`` and later (of
    ``state``, the runtime's parsed export, when the caller already has it); with
    ``verify_base``, also the digest of the cells before it (``attrs.base_kv``)."""
    n = len(rt.tokens)
    if not 0 < since < n:
        raise StateError(f"nothing to send: delta from {since} with {n} tokens in the sequence")
    full = parse_seq_state(rt.export_state()) if state is None else state
    tensors, attrs = state_message_tensors(rt, select_cells(full, lambda pos: pos >= since), rt.tokens[since:])
    attrs["base"] = tokens_digest(rt.tokens[:since])
    if verify_base:
        attrs["base_kv"] = prefix_cells_digest(full, since)
    return tensors, attrs, (since, n)


def merge_delta(rt: LlamaRuntime, own: SeqState, *deltas: SeqState, end: int) -> SeqState:
    """Own cells + each delta's cells, minus what the window caches no longer hold at ``end``."""
    merged = append_cells(own, *deltas)
    if rt.n_swa > 0 and len(merged.caches) == 2:
        # iSWA models (Gemma-3): the second cache is the window cache; llama.cpp keeps a cell
        # while (last position - its position) < n_swa.
        window = SeqState(merged.seq_id, (merged.caches[1],))
        kept = select_cells(window, lambda pos: pos > end - 1 - rt.n_swa)
        merged = SeqState(merged.seq_id, (merged.caches[0], kept.caches[0]))
    return merged


class DeltaApplier:
    """Checks and appends KV_CACHE_DELTA messages to one runtime's sequence."""

    def __init__(self, rt: LlamaRuntime):
        self.rt = rt
        self._assembler = SnapshotApplier(rt)

    def apply(self, msg: TensorMessage) -> None:
        rt = self.rt
        check_target(msg, rt, Kind.KV_CACHE_DELTA, ApplyMode.APPEND)
        since, end = msg.token_range
        if since != len(rt.tokens) or since == 0:
            raise StateError(f"delta starts at token {since}, this sequence holds {len(rt.tokens)}")
        if msg.attrs.get("base") != tokens_digest(rt.tokens):
            raise StateError("the delta extends a different sequence (base tokens differ)")
        new_tokens, logits = check_tokens_and_logits(rt, msg)
        delta = message_state(msg)
        check_state_layout(rt, delta, end, first=since)
        # parse views into the runtime's export buffer; assembling copies them out, and the
        # guard below reuses that buffer as its backup
        merged = merge_delta(rt, parse_seq_state(rt.export_state()), delta, end=end)
        check_state_layout(rt, merged, end)
        if "base_kv" in msg.attrs and msg.attrs["base_kv"] != prefix_cells_digest(merged, since):
            raise StateError(f"this side's own cells for tokens 0..{since} differ from the sender's (its "
                             "prefill of them is not bit-identical to the sender's); nothing was applied")
        blob = self._assembler.assemble(merged)
        import_guarded(rt, blob, rt.tokens + new_tokens, logits)
