"""RESIDUAL_PATCH: rows added to (ADDITIVE, times a gain) or written over (OVERWRITE) the
receiver's residual stream after layer L, at declared positions, during its forward pass.

How a patch applies. The receiver holds a sequence of ``start`` tokens. A patch carries the
next tokens to decode (``tokens``, positions ``start .. start + m``) and, for some of those
positions, one row per patched layer. The receiver decodes the tokens with the patch armed in
its eval hook; the patched residual flows through the later layers, so it is baked into the
KV cells of those positions (and into everything decoded after them) and into the logits after
the last token. Positions before ``start`` cannot be patched: their cells already exist.

On the wire (kind RESIDUAL_PATCH, apply ADDITIVE or OVERWRITE)::

    tokens     i32 [m]              tokens to decode, at positions start .. start + m - 1
    positions  i32 [n]              patched positions, strictly increasing, within the tokens
    p{L}       f32 [n, n_embd]      rows for layer L (llama.cpp's l_out-L), one per layer
    attrs      {"layers": [L...], "gain": g}   (gain: ADDITIVE only, default 1.0)
    layer range (min L, max L + 1), token range (start, start + m)

Checks before the runtime is touched: kind and mode, slot, layers in [0, n_layer), token
range starting exactly at the receiver's sequence length and fitting its context, token ids
in the vocabulary, positions within the tokens, row width == n_embd, all values finite, gain
finite with |gain| <= latent.max_gain, and the norm gate: a row whose norm (times |gain|)
exceeds latent.norm_gate_multiple times the receiver's calibrated residual norm at that layer
is refused (NormGateError) or scaled down to the limit (latent.norm_gate_mode = clamp).
If the decode still fails, the previous sequence is restored.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from edgelink.config import Config
from edgelink.errors import NormGateError, StateError
from edgelink.kinds.calibrate import residual_norms
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
from edgelink.protocol.messages import TensorMessage as TM
from edgelink.runtime.evalhook import Patch, patching, require_hook

MODE_NAMES = {ApplyMode.ADDITIVE: "add", ApplyMode.OVERWRITE: "overwrite"}


@dataclasses.dataclass(frozen=True)
class ResidualPatch:
    start: int  # the receiver's sequence length: tokens[0] decodes at this position
    tokens: np.ndarray  # i32 [m]
    positions: np.ndarray  # i32 [n], absolute, within [start, start + m)
    rows: dict[int, np.ndarray]  # layer -> f32 [n, n_embd]
    mode: ApplyMode = ApplyMode.ADDITIVE
    gain: float = 1.0
    seq_slot: int = 0

    def message_parts(self) -> tuple[list[Tensor], dict, tuple[int, int], tuple[int, int]]:
        layers = sorted(self.rows)
        tensors = [i32_tensor("tokens", self.tokens), i32_tensor("positions", self.positions)]
        tensors += [f32_tensor(f"p{layer}", self.rows[layer]) for layer in layers]
        attrs: dict = {"layers": layers}
        if self.mode is ApplyMode.ADDITIVE:
            attrs["gain"] = float(self.gain)
        return tensors, attrs, (layers[0], layers[-1] + 1), (self.start, self.start + len(self.tokens))


def steering_patch(start: int, tokens: list[int], layer: int, vector: np.ndarray, gain: float = 1.0,
                   positions=None, seq_slot: int = 0) -> ResidualPatch:
    """An additive patch adding the same ``vector`` at ``positions`` (default: every token)."""
    pos = np.arange(start, start + len(tokens), dtype=np.int32) if positions is None else \
        np.asarray(positions, dtype=np.int32)
    rows = np.broadcast_to(np.asarray(vector, dtype=np.float32), (pos.size, np.asarray(vector).shape[-1]))
    return ResidualPatch(start, np.asarray(tokens, dtype=np.int32), pos, {layer: rows.copy()},
                         ApplyMode.ADDITIVE, gain, seq_slot)


class PatchApplier:
    """Checks RESIDUAL_PATCH messages against one hooked runtime and applies them."""

    def __init__(self, rt, cfg: Config, norms: np.ndarray | None = None):
        require_hook(rt)
        self.rt = rt
        self.cfg = cfg
        if cfg.latent.norm_gate_mode not in ("reject", "clamp"):
            raise StateError(f"latent.norm_gate_mode must be reject or clamp, not {cfg.latent.norm_gate_mode!r}")
        self._norms = norms

    @property
    def norms(self) -> np.ndarray:
        if self._norms is None:
            self._norms = residual_norms(self.rt, self.cfg)
        return self._norms

    def caps(self, params: dict | None = None) -> dict:
        """What a sender needs to build an acceptable patch (the ``latent_caps`` request)."""
        lc = self.cfg.latent
        return {"n_layer": self.rt.n_layer, "n_embd": self.rt.n_embd, "n_ctx": self.rt.n_ctx,
                "context_tokens": len(self.rt.tokens), "max_gain": lc.max_gain,
                "norm_gate_multiple": lc.norm_gate_multiple, "norm_gate_mode": lc.norm_gate_mode,
                "residual_norms": [float(x) for x in self.norms],
                "modes": [m.name for m in MODE_NAMES]}

    def check(self, msg: TensorMessage) -> tuple[list[int], dict[int, Patch]]:
        """Everything short of decoding: (tokens, layer -> armed Patch)."""
        rt, lc = self.rt, self.cfg.latent
        check_target(msg, rt, Kind.RESIDUAL_PATCH, *MODE_NAMES)
        layers = check_layers(msg, rt.n_layer)
        by_name = {t.name: t for t in msg.tensors}
        check_names(by_name, {"tokens", "positions"} | {f"p{layer}" for layer in layers})
        tok_t = by_name.get("tokens")
        if tok_t is None or tok_t.dtype is not DType.I32 or len(tok_t.shape) != 1 or tok_t.shape[0] == 0:
            raise StateError("a residual patch needs 'tokens', a non-empty i32[m]: the tokens it applies to")
        tokens = tok_t.array()
        start, m = len(rt.tokens), tokens.shape[0]
        if msg.token_range != (start, start + m):
            raise StateError(f"token range {msg.token_range}: this sequence holds {start} tokens, so "
                             f"the patch must cover ({start}, {start + m})")
        if start + m > rt.n_ctx:
            raise StateError(f"{start + m} tokens exceed the context of {rt.n_ctx}")
        if tokens.min() < 0 or tokens.max() >= rt.n_vocab:
            raise StateError("token ids outside the vocabulary")
        pos = check_positions(by_name, rt.n_ctx)
        if int(pos[0]) < start or int(pos[-1]) >= start + m:
            raise StateError(f"positions {int(pos[0])}..{int(pos[-1])} lie outside the tokens being "
                             f"decoded ({start}..{start + m - 1})")
        gain = msg.attrs.get("gain", 1.0)
        if msg.apply is ApplyMode.OVERWRITE:
            if gain != 1.0:
                raise StateError("an OVERWRITE patch takes no gain")
        elif not isinstance(gain, (int, float)) or isinstance(gain, bool) or not math.isfinite(gain):
            raise StateError(f"gain {gain!r} is not a finite number")
        elif abs(gain) > lc.max_gain:
            raise StateError(f"gain {gain} exceeds this receiver's limit of {lc.max_gain}")
        patches = {}
        for layer in layers:
            rows = check_rows(by_name, f"p{layer}", pos.size, rt.n_embd)
            rows = self._gate(layer, rows, abs(float(gain)))
            patches[layer] = Patch(pos, rows, MODE_NAMES[msg.apply], float(gain))
        return tokens.tolist(), patches

    def _gate(self, layer: int, rows: np.ndarray, gain: float) -> np.ndarray:
        lc = self.cfg.latent
        limit = lc.norm_gate_multiple * float(self.norms[layer])
        norms = np.linalg.norm(rows.astype(np.float64), axis=1) * gain
        over = norms > limit
        if not over.any():
            return rows
        if lc.norm_gate_mode == "reject":
            raise NormGateError(f"layer {layer}: {int(over.sum())} patch rows have norm up to "
                                f"{norms.max():.4g}, over {lc.norm_gate_multiple} x the residual norm "
                                f"{float(self.norms[layer]):.4g}")
        scale = np.where(over, limit / np.maximum(norms, 1e-30), 1.0).astype(np.float32)
        return rows * scale[:, None]

    def apply(self, msg: TensorMessage) -> None:
        tokens, patches = self.check(msg)
        self.apply_checked(tokens, patches)

    def apply_checked(self, tokens: list[int], patches: dict[int, Patch]) -> None:
        rt = self.rt
        backup = (np.array(rt.export_state(), copy=True), list(rt.tokens), rt.logits) if rt.tokens else None
        try:
            with patching(rt, patches) as hook:
                rt.prefill(tokens)
                for layer in patches:
                    done = hook.patch_applied(layer)
                    if not done.all():
                        raise StateError(f"layer {layer}: {int((~done).sum())} patch rows were not applied")
        except Exception:  # any failure, typed or not: the sequence goes back as it was
            rt.clear()
            if backup is not None:
                rt.import_state(*backup)
            raise


def apply_patch(rt, cfg: Config, patch: ResidualPatch, norms: np.ndarray | None = None) -> None:
    """Local use (no wire): check ``patch`` exactly as a receiver would, then apply it."""

    tensors, attrs, lr, tr = patch.message_parts()
    msg = TM(b"\0" * 16, 0, Kind.RESIDUAL_PATCH, patch.mode, patch.seq_slot, lr, tr, tuple(tensors), attrs)
    PatchApplier(rt, cfg, norms).apply(msg)
