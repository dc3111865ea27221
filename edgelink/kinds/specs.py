"""Every message kind declared once: what a receiver needs to accept it, and a valid example.

A receiver's applier table (``roles.receiver.Receiver``), what a message file or snapshot can be read
with (``api.model.Model.restore``, ``api.latent.apply_file``), the kinds a receiver's HELLO offers and
the fuzzers' seeds (``fuzz.seed_frames``) are all built from ``SPECS``. A new kind is a module
in this folder (builder and applier) and one ``KindSpec`` here, beside its wire enum in
``protocol/kinds.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from edgelink.bridge import Bridge
from edgelink.config import Config
from edgelink.kinds.bridged import BridgedPrefixApplier, bridge_claim, label_ops
from edgelink.kinds.common import f32_tensor, i32_tensor
from edgelink.kinds.delta import DeltaApplier
from edgelink.kinds.hidden import HiddenSliceApplier
from edgelink.kinds.memory import MemoryApplier
from edgelink.kinds.patch import PatchApplier
from edgelink.kinds.prefix import PrefixApplier
from edgelink.kinds.snapshot import SnapshotApplier
from edgelink.protocol.kinds import ApplyMode, Kind
from edgelink.protocol.messages import Tensor, TensorMessage
from edgelink.protocol.signature import ModelSignature
from edgelink.runtime.llama import LlamaRuntime

Op = Callable[[dict[str, Any]], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Context:
    """What an applier is made for: one runtime, its settings, its signature, its bridge."""

    rt: LlamaRuntime
    cfg: Config
    signature: ModelSignature
    bridge: Bridge | None = None


@dataclasses.dataclass
class Accepts:
    """What one kind adds to a receiver. ``apply`` checks everything before it touches the
    runtime and leaves the state as it was when it raises; None: this receiver cannot take the
    kind (no eval hook, no bridge) though it may still answer the kind's ``ops``."""

    apply: Callable[[TensorMessage], None] | None
    place: Callable | None = None  # tensors straight into the buffer they are imported from
    release: Callable[[], None] | None = None  # gives memory back after a failed message
    forget: Callable[[], None] | None = None  # drops what a session left beside the sequence
    ops: dict[str, Op] = dataclasses.field(default_factory=dict)  # REQUEST ops it answers
    held: Any = None  # what the applier keeps for the API to read (stored hidden slices)


@dataclasses.dataclass(frozen=True)
class Example:
    """The shapes a fuzz seed is built to (a model's widths, so seeds reach deep checks)."""

    n_embd: int
    n_vocab: int
    kv: list[Tensor]
    layout: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class KindSpec:
    kind: Kind
    accept: Callable[[Context], Accepts]
    example: Callable[[Example], tuple[ApplyMode, list[Tensor], dict, tuple[int, int], tuple[int, int]]]


def _snapshot(ctx: Context) -> Accepts:
    a = SnapshotApplier(ctx.rt)
    return Accepts(a.apply, place=a.place, release=a.release)


def _hidden(ctx: Context) -> Accepts:
    a = HiddenSliceApplier(ctx.rt, ctx.cfg)
    return Accepts(a.apply, forget=a.store.clear, held=a.store)


def _patch(ctx: Context) -> Accepts:
    if getattr(ctx.rt, "eval_hook", None) is None:
        return Accepts(None)  # patches need the eval hook (runtime.eval_hook = on)
    a = PatchApplier(ctx.rt, ctx.cfg)
    return Accepts(a.apply, ops={"latent_caps": a.caps})


def _bridged(ctx: Context) -> Accepts:
    a = BridgedPrefixApplier(ctx.rt, ctx.bridge, ctx.signature) if ctx.bridge else None
    return Accepts(a.apply if a else None, forget=a.forget if a else None,
                   ops=label_ops(ctx.rt, ctx.bridge, a))


def _tokens_logits(tokens: list[int], nv: int) -> list[Tensor]:
    return [i32_tensor("tokens", tokens), f32_tensor("logits", np.zeros(nv))]


SPECS: tuple[KindSpec, ...] = (
    KindSpec(Kind.KV_CACHE, _snapshot,
             lambda e: (ApplyMode.OVERWRITE, e.kv + _tokens_logits([1, 2, 3], e.n_vocab), {"kv": e.layout},
                        (0, 2), (0, 3))),
    KindSpec(Kind.KV_CACHE_DELTA, lambda ctx: Accepts(DeltaApplier(ctx.rt).apply),
             lambda e: (ApplyMode.APPEND, e.kv + _tokens_logits([4, 5, 6], e.n_vocab),
                        {"kv": e.layout, "base": "00" * 32, "base_kv": "11" * 32}, (0, 2), (3, 6))),
    KindSpec(Kind.VIRTUAL_PREFIX, lambda ctx: Accepts(PrefixApplier(ctx.rt, ctx.rt.token_embeddings()).apply),
             lambda e: (ApplyMode.APPEND, [f32_tensor("embd", np.ones((2, e.n_embd)))], {"energy_match": True},
                        (-1, -1), (0, 2))),
    KindSpec(Kind.KV_MEMORY, lambda ctx: Accepts(MemoryApplier(ctx.rt).apply),
             lambda e: (ApplyMode.MEMORY, e.kv + _tokens_logits([1, 2, 3], e.n_vocab), {"kv": e.layout},
                        (0, 2), (0, 3))),
    KindSpec(Kind.HIDDEN_SLICE, _hidden,
             lambda e: (ApplyMode.OVERWRITE, [f32_tensor("h1", np.ones((2, e.n_embd))),
                                              i32_tensor("positions", [0, 1])],
                        {"layers": [1], "site": "l_out"}, (1, 2), (0, 2))),
    KindSpec(Kind.RESIDUAL_PATCH, _patch,
             lambda e: (ApplyMode.ADDITIVE, [i32_tensor("tokens", [1, 2]), i32_tensor("positions", [0, 1]),
                                             f32_tensor("p1", np.ones((2, e.n_embd)))],
                        {"layers": [1], "gain": 2.0}, (1, 2), (0, 2))),
    KindSpec(Kind.BRIDGED_PREFIX, _bridged,
             lambda e: (ApplyMode.OVERWRITE, [f32_tensor("embd", np.ones((2, e.n_embd)))],
                        {"bridge": "cd" * 32, "source_tokens": 5}, (-1, -1), (-1, -1))),
)


@dataclasses.dataclass
class Acceptance:
    """Everything one receiver accepts, built from ``SPECS`` for its runtime. The session
    negotiates exactly ``kinds``."""

    appliers: dict[Kind, Callable[[TensorMessage], None]]
    placers: dict[Kind, Callable]
    release: list[Callable[[], None]]
    forget: list[Callable[[], None]]
    ops: dict[str, Op]
    held: dict[Kind, Any]
    bridge_claim: dict[str, str] | None

    @property
    def kinds(self) -> tuple[Kind, ...]:
        return tuple(self.appliers)


def acceptance(rt: LlamaRuntime, cfg: Config, signature: ModelSignature,
               bridge: Bridge | None = None, only: tuple[Kind, ...] | None = None) -> Acceptance:
    """What a receiver of ``rt`` takes: every kind of ``SPECS`` it can apply (``only``: just
    those kinds), with their placers, cleanups and REQUEST ops."""
    ctx = Context(rt, cfg, signature, bridge)
    out = Acceptance({}, {}, [], [], {}, {}, bridge_claim(bridge) if bridge else None)
    for spec in SPECS:
        if only is not None and spec.kind not in only:
            continue
        a = spec.accept(ctx)
        out.ops.update(a.ops)
        if a.apply is None:
            continue
        out.appliers[spec.kind] = a.apply
        if a.place is not None:
            out.placers[spec.kind] = a.place
        if a.release is not None:
            out.release.append(a.release)
        if a.forget is not None:
            out.forget.append(a.forget)
        if a.held is not None:
            out.held[spec.kind] = a.held
    return out
