"""KV_MEMORY: another process's K/V rows for another text, appended as extra cells the
receiver attends to, placed after its own context (cross-attention-like memory).

The message is a snapshot of the sender's sequence (same tensors as KV_CACHE) with kind
KV_MEMORY and apply mode MEMORY. The receiver, holding ``n`` positions of its own, moves the
memory cells to positions n.. (llama.cpp re-rotates their keys for the new positions), keeps its
own cells in front, and records the memory positions as token id -1. The memory was computed
without seeing the receiver's context, so this is not the same as reading the concatenated
text; `edgelink bench memory` measures how it differs. There are no logits after a memory
(nothing was decoded after it): the receiver prefills its next tokens before generating.
"""

from __future__ import annotations

import numpy as np

from edgelink.errors import StateError
from edgelink.kinds.delta import merge_delta
from edgelink.kinds.snapshot import (
    VIRTUAL_TOKEN,
    SnapshotApplier,
    check_state_layout,
    check_target,
    check_tokens_and_logits,
    message_state,
    snapshot_tensors,
)
from edgelink.protocol.kinds import ApplyMode, Kind
from edgelink.protocol.messages import Tensor, TensorMessage
from edgelink.runtime.kvstate import append_cells, parse_seq_state
from edgelink.runtime.llama import LlamaRuntime


def memory_tensors(rt: LlamaRuntime) -> tuple[list[Tensor], dict, tuple[int, int]]:
    """The sender's sequence, to be used as memory by a receiver (same tensors as a snapshot)."""
    return snapshot_tensors(rt)


class MemoryApplier:
    """Checks and appends KV_MEMORY messages after one runtime's own context."""

    def __init__(self, rt: LlamaRuntime):
        self.rt = rt
        self._assembler = SnapshotApplier(rt)

    def apply(self, msg: TensorMessage) -> None:
        rt = self.rt
        check_target(msg, rt, Kind.KV_MEMORY, ApplyMode.MEMORY)
        if msg.token_range[0] != 0:
            raise StateError("a memory is a whole sequence starting at position 0")
        mem_tokens, mem_logits = check_tokens_and_logits(rt, msg)
        memory = message_state(msg)
        m, n = len(mem_tokens), len(rt.tokens)
        check_state_layout(rt, memory, m)
        if n + m + 1 > rt.n_ctx:
            raise StateError(f"{n} + {m} positions (and one to apply the shift) exceed the "
                             f"context of {rt.n_ctx}")
        if n == 0:
            rt.import_state(self._assembler.assemble(memory), [VIRTUAL_TOKEN] * m, None)
            return
        # Keep a private copy of our own sequence: the steps below export and import again.
        own_blob = np.array(rt.export_state(), copy=True)
        own_tokens, own_logits = list(rt.tokens), rt.logits
        try:
            rt.import_state(self._assembler.assemble(memory), mem_tokens, mem_logits)
            rt.shift_positions(0, m, n)  # memory now sits at n .. n+m-1, keys re-rotated
            shifted = parse_seq_state(rt.export_state())
            own = parse_seq_state(own_blob)
            merged = merge_delta(rt, own, shifted, end=n + m) if rt.n_swa > 0 else append_cells(own, shifted)
            check_state_layout(rt, merged, n + m)
            rt.import_state(self._assembler.assemble(merged), own_tokens + [VIRTUAL_TOKEN] * m, None)
        except Exception:  # any failure, typed or not: the sequence goes back as it was
            rt.import_state(own_blob, own_tokens, own_logits)
            raise
