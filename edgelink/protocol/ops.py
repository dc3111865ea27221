"""The REQUEST/RESULT contract: for every built-in op, the schema of its params (checked by the
receiver before it does anything) and of its result body (checked by the sender before any
caller indexes it). Both sides read the other's JSON through these, so a hostile peer meets a
typed error on either end, and a new op is one entry here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from edgelink.errors import SessionError
from edgelink.protocol.untrusted import I32_MAX, Bool, Hex, Int, Json, Num, Obj, Seq, Str

_TOKEN_IDS = Seq(Int(0, I32_MAX), max_items=1 << 20)
_CONTEXT = {"context_tokens": Int(0, I32_MAX)}
_LABELS = Obj(extra=Str(256, min_len=1), max_keys=64)

PARAMS: dict[str, Obj] = {
    "generate": Obj({"n_tokens": Int(0, I32_MAX)}, {"stop_at_eog": Bool()}),
    "digest": Obj(),
    "reset": Obj(),
    # background: answer at once and prefill while the session reads on (a split handoff:
    # edgelink/wire/plan.py); the next message waits for it. replace: clear the sequence first.
    "prefill": Obj({"tokens": Seq(Int(0, I32_MAX), max_items=1 << 20, min_items=1)},
                   {"background": Bool(), "replace": Bool()}),
    # Padding the receiver reads and answers with its length: a sender measures the link rate.
    "probe": Obj({"pad": Str(1 << 24)}),
    # The prefix cache (edgelink/cache): how many of these chain keys, from the first, the
    # receiver holds; and one chunk, answered by a KV_CACHE_DELTA tensor message (window:
    # false, only the cells of the full-attention cache: an asker that restores past this
    # chunk needs none of its sliding-window cells).
    "cache_has": Obj({"keys": Seq(Hex(n_bytes=32), max_items=4096)}),
    "cache_get": Obj({"key": Hex(n_bytes=32)}, {"window": Bool()}),
    "delta": Obj({"since": Int(0, I32_MAX)}),
    "latent_caps": Obj(),
    "label_scores": Obj(optional={"labels": _LABELS}),
}



def _result(required: dict[str, Any], optional: dict[str, Any] | None = None) -> Obj:
    """Results may grow fields in later versions: unknown ones are passed through unread."""
    return Obj({**required, **_CONTEXT}, optional, extra=Json(), max_keys=64)


# What ``check_result`` turns each op's checked body into: the sender and everything above it
# read attributes, never the peer's JSON. Fields a later version adds stay in the wire body
# (the schema passes them) but not here, so nothing comes to depend on them unchecked.
@dataclasses.dataclass(frozen=True)
class OpResult:
    """Every RESULT (``reset`` has nothing more): how many tokens the receiver's sequence holds after the op."""

    context_tokens: int


@dataclasses.dataclass(frozen=True)
class PrefillResult(OpResult):
    """``background``: the receiver answered at once and prefills while it reads on (a split
    handoff); its next message waits for the prefill."""

    background: bool = False


@dataclasses.dataclass(frozen=True)
class GenerateResult(OpResult):
    """The receiver's greedy continuation."""

    tokens: list[int]
    text: str
    generate_s: float


@dataclasses.dataclass(frozen=True)
class DigestResult(OpResult):
    """The blake3 digest of the receiver's state (what a handoff is checked against)."""

    digest: str


@dataclasses.dataclass(frozen=True)
class ProbeResult(OpResult):
    """How much padding the receiver read (the sender times it to measure the link)."""

    bytes: int


@dataclasses.dataclass(frozen=True)
class CacheHasResult(OpResult):
    """How many of the asked chain keys, from the first, the receiver's prefix cache holds."""

    held: int


@dataclasses.dataclass(frozen=True)
class LatentCapsResult(OpResult):
    """What the receiver's model takes as a residual patch (edgelink/kinds/patch.py)."""

    n_layer: int
    n_embd: int
    n_ctx: int
    max_gain: float
    norm_gate_multiple: float
    norm_gate_mode: str
    residual_norms: list[float]
    modes: list[str]


@dataclasses.dataclass(frozen=True)
class LabelScoresResult(OpResult):
    """The receiver's scores for each label's first token; ``bridged``: the last bridged
    prefix's figures, when there was one."""

    scores: dict[str, float]
    probs: dict[str, float]
    token_ids: dict[str, int]
    best: str
    bridged: dict[str, Any] | None = None


RESULTS: dict[str, tuple[Obj, type[OpResult]]] = {
    "generate": (_result({"tokens": _TOKEN_IDS, "text": Str(1 << 22), "generate_s": Num(0)}), GenerateResult),
    "digest": (_result({"digest": Str(256)}), DigestResult),
    "reset": (_result({}), OpResult),
    "prefill": (_result({}, {"background": Bool()}), PrefillResult),
    "probe": (_result({"bytes": Int(0, I32_MAX)}), ProbeResult),
    "cache_has": (_result({"held": Int(0, 4096)}), CacheHasResult),
    "latent_caps": (_result({"n_layer": Int(1, 4096), "n_embd": Int(1, 1 << 20),
                             "n_ctx": Int(1, I32_MAX), "max_gain": Num(0),
                             "norm_gate_multiple": Num(0), "norm_gate_mode": Str(32),
                             "residual_norms": Seq(Num(), max_items=4096),
                             "modes": Seq(Str(32), max_items=16)}), LatentCapsResult),
    "label_scores": (_result({"scores": Obj(extra=Num(), max_keys=64),
                              "probs": Obj(extra=Num(0, 1), max_keys=64),
                              "token_ids": Obj(extra=Int(0, I32_MAX), max_keys=64),
                              "best": Str(256)},
                             {"bridged": Obj(extra=Json(), max_keys=64)}), LabelScoresResult),
}


def check_params(op: str, params: dict[str, Any]) -> dict[str, Any]:
    """The params of a known op, checked; an unknown op's params are passed on as they are
    (its handler checks them, and the receiver refuses ops it does not know)."""
    schema = PARAMS.get(op)
    return params if schema is None else schema(params, f"REQUEST {op} params", SessionError)


def check_result(op: str, body: dict[str, Any]) -> OpResult:
    """The body of the peer's RESULT for ``op``, checked against the op's schema and typed.
    Every op a sender asks for has a contract here; any other is a SessionError."""
    contract = RESULTS.get(op)
    if contract is None:
        raise SessionError(f"no RESULT contract for op {op!r} (edgelink/protocol/ops.py)")
    schema, cls = contract
    checked = schema(body, f"RESULT of {op}", SessionError)
    return cls(**{f.name: checked[f.name] for f in dataclasses.fields(cls) if f.name in checked})
