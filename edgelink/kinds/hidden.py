"""HIDDEN_SLICE: the residual stream after chosen layers at chosen positions, captured during
the sender's own forward pass by the native eval hook.

On the wire (kind HIDDEN_SLICE, apply OVERWRITE)::

    positions  i32 [n]             absolute token positions, strictly increasing
    h{L}       f32 [n, n_embd]     residual after layer L (llama.cpp's l_out-L), one per layer
    tokens     i32 [t1 - t0]       (optional) the token ids of the token range
    attrs      {"layers": [L...], "site": "l_out"}
    layer range (min L, max L + 1), token range (positions[0], positions[-1] + 1)

A receiver verifies every tensor against its own model and keeps the slice (newest first, at
most ``latent.hidden_store_slices``) for a bridge to consume; its sequence is not touched.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from edgelink.config import Config
from edgelink.errors import StateError
from edgelink.kinds.common import (
    check_layers,
    check_names,
    check_positions,
    check_rows,
    f32_tensor,
    i32_tensor,
)
from edgelink.kinds.snapshot import check_target
from edgelink.protocol.kinds import ApplyMode, DType, Kind
from edgelink.protocol.messages import Tensor, TensorMessage
from edgelink.runtime.evalhook import capture

SITE = "l_out"


@dataclasses.dataclass(frozen=True)
class HiddenSlice:
    layers: tuple[int, ...]
    positions: np.ndarray  # i32 [n]
    rows: dict[int, np.ndarray]  # layer -> f32 [n, n_embd]
    tokens: np.ndarray | None = None  # i32 token ids of [positions[0], positions[-1] + 1)
    seq_slot: int = 0

    def message_parts(self) -> tuple[list[Tensor], dict, tuple[int, int], tuple[int, int]]:
        """(tensors, attrs, layer range, token range) for Session.encode_tensor_message."""
        pos = np.asarray(self.positions, dtype=np.int32)
        tensors = [i32_tensor("positions", pos)]
        tensors += [f32_tensor(f"h{layer}", self.rows[layer]) for layer in self.layers]
        if self.tokens is not None:
            tensors.append(i32_tensor("tokens", self.tokens))
        layers = list(self.layers)
        return tensors, {"layers": layers, "site": SITE}, (layers[0], layers[-1] + 1), \
            (int(pos[0]), int(pos[-1]) + 1)


def capture_slice(rt, tokens: list[int], layers, positions=None) -> HiddenSlice:
    """Prefill ``tokens`` on ``rt`` (appended to its sequence) and capture a slice from that
    same forward pass. ``positions`` are absolute; default: every new token."""
    start = len(rt.tokens)
    pos = np.arange(start, start + len(tokens), dtype=np.int32) if positions is None else \
        np.asarray(sorted(int(p) for p in positions), dtype=np.int32)
    acts = capture(rt, tokens, layers, pos)
    layers_sorted = tuple(sorted(acts))
    all_tokens = np.asarray(rt.tokens, dtype=np.int32)
    return HiddenSlice(layers_sorted, pos, acts, all_tokens[int(pos[0]):int(pos[-1]) + 1], rt.seq)


class HiddenSliceApplier:
    """Checks a HIDDEN_SLICE against the receiver's model and stores it; never touches state."""

    def __init__(self, rt, cfg: Config):
        self.rt = rt
        self.store: collections.deque[HiddenSlice] = collections.deque(maxlen=max(1, cfg.latent.hidden_store_slices))

    def check(self, msg: TensorMessage) -> HiddenSlice:
        rt = self.rt
        check_target(msg, rt, Kind.HIDDEN_SLICE, ApplyMode.OVERWRITE)
        if msg.attrs.get("site", SITE) != SITE:
            raise StateError(f"unknown capture site {msg.attrs.get('site')!r}")
        layers = check_layers(msg, rt.n_layer)
        by_name = {t.name: t for t in msg.tensors}
        check_names(by_name, {"positions", "tokens"} | {f"h{layer}" for layer in layers})
        pos = check_positions(by_name, rt.n_ctx)
        if msg.token_range != (int(pos[0]), int(pos[-1]) + 1):
            raise StateError(f"token range {msg.token_range} does not match positions "
                             f"{int(pos[0])}..{int(pos[-1])}")
        rows = {layer: check_rows(by_name, f"h{layer}", pos.size, rt.n_embd).copy() for layer in layers}
        tokens = None
        if "tokens" in by_name:
            t = by_name["tokens"]
            n = msg.token_range[1] - msg.token_range[0]
            if t.dtype is not DType.I32 or t.shape != (n,):
                raise StateError(f"'tokens' must be i32[{n}] (the token range)")
            tokens = t.array().copy()
            if tokens.min() < 0 or tokens.max() >= rt.n_vocab:
                raise StateError("token ids outside the vocabulary")
        return HiddenSlice(tuple(layers), pos.copy(), rows, tokens, msg.seq_slot)

    def apply(self, msg: TensorMessage) -> None:
        self.store.appendleft(self.check(msg))
