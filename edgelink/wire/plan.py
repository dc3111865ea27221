"""How a handoff travels over a network link: the plan that reaches the receiver's first new
token soonest. Pure arithmetic on measured figures, no I/O (the sender measures, this decides).

The options, for a context of ``n`` tokens:

* the whole state, raw or with a codec the receiver takes (``split = 0``);
* a split at ``k``: the receiver prefills tokens ``0..k`` from their ids while the sender ships
  the KV of ``k..n`` (a KV_CACHE_DELTA); the two run at once, and the receiver merges them when
  both are done. This is the idea of Cake (Jin et al., 2024: "Compute Or Load KV Cache? Why
  Not Both?"), with the split chosen ahead from the link rate and the receiver's prefill speed
  instead of both ends racing;
* the text: the receiver prefills all ``n`` tokens, then its state digest is compared with the
  sender's.

A split is exact only when the receiver's prefill of ``0..k`` gives the sender's cells bit for
bit. Measured with llama.cpp on CPU (SmolLM2, Gemma-3): a prefill of a multiple of 32 tokens, 64
or more, matched the cells of a longer batch prefill at every length tried, while other lengths
often differed, and so did cells the sender made one token at a time or in small batches. So a
split falls on those lengths, inside the prefix the sender computed in large batches
(``LlamaRuntime.batched``); and the receiver checks the digest anyway (``attrs.base_kv``) and
refuses a mismatch, after which the sender ships the whole state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from edgelink.wire.codecs import CODECS

SPLIT_ALIGN = 32  # a split's prefill length is a multiple of this ...
SPLIT_MIN = 64  # ... and at least this
# Measured on a 2-core VM with SmolLM2 and Gemma-3 (`edgelink bench link`, receiver logs):
APPLY_BYTES_PER_S = 1e9  # a whole state imported in place: 1-3 GB/s
MERGE_BYTES_PER_S = 200e6  # a split's merge: own cells exported, joined with the delta, checked, imported
# A receiver's prefill slows while bytes arrive (the encrypted p2p receive path takes CPU; here
# the sender shared the same two cores too): it ran at 0.46x its idle speed while 12.5 MB/s
# arrived and at 0.79x at 2.5 MB/s, that is 1 + 0.1 per MB/s more time for the overlap.
SLOWDOWN_PER_BYTE_PER_S = 0.1 / 1e6


@dataclasses.dataclass(frozen=True)
class Link:
    """A network link as the sender measured it (or as configured)."""

    bytes_per_s: float
    rtt_s: float


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one handoff goes: the codec (None: raw), how many leading tokens the receiver
    prefills itself (0: the whole state travels), and the predicted seconds to its ACK."""

    codec: str | None
    split: int
    seconds: float

    def describe(self, n_tokens: int) -> str:
        codec = self.codec or "raw"
        if self.split == n_tokens:
            return f"text: receiver prefills all {n_tokens} tokens"
        if self.split == 0:
            return f"whole state, {codec}"
        return f"split: receiver prefills {self.split} of {n_tokens} tokens, {codec} KV for the rest"


def estimate(shipped_from: Callable[[int], int], codec: str | None, split: int, link: Link,
             prefill_tps: float) -> float:
    """Predicted seconds from export to the receiver's ACK; ``shipped_from(k)``: the K/V bytes
    of the cells at positions ``k`` and later."""
    c = CODECS.get(codec) if codec else None
    state_bytes = shipped_from(0)
    shipped = shipped_from(split)
    if shipped == 0:  # the text alone: then a digest of the receiver's state is compared
        return split / prefill_tps + state_bytes / APPLY_BYTES_PER_S + 2 * link.rtt_s
    encode = shipped / c.encode_bytes_per_s if c else 0.0
    decode = shipped / c.decode_bytes_per_s if c else 0.0
    on_wire = shipped * (c.expected_ratio if c else 1.0)
    wire = on_wire / link.bytes_per_s
    if not split:
        return encode + wire + decode + state_bytes / APPLY_BYTES_PER_S + link.rtt_s
    idle = split / prefill_tps
    prefill = idle + min(idle, wire) * SLOWDOWN_PER_BYTE_PER_S * link.bytes_per_s
    return max(prefill, encode + wire) + decode + state_bytes / MERGE_BYTES_PER_S + link.rtt_s


def split_points(n_tokens: int, max_split: int) -> range:
    """The prefill lengths a split may use (see the module docstring): at most ``max_split``
    (the sender's cells that a batch prefill reproduces: ``LlamaRuntime.batched``)."""
    return range(SPLIT_MIN, min(n_tokens - 1, max_split) + 1, SPLIT_ALIGN)


def choose_plan(n_tokens: int, shipped_from: Callable[[int], int], codecs: Sequence[str | None], link: Link,
                prefill_tps: float, max_split: int = 0) -> Plan:
    """The soonest plan among ``codecs`` (None: raw), whole or split at most at ``max_split``
    (0: never; a split also needs the receiver's prefill speed)."""
    if not codecs:
        raise ValueError("no codec to plan with")
    points = [0, *split_points(n_tokens, max_split), *([n_tokens] if max_split >= n_tokens else [])] \
        if prefill_tps > 0 else [0]
    best: Plan | None = None
    for codec in codecs:
        for k in points:
            s = estimate(shipped_from, codec, k, link, prefill_tps)
            if best is None or s < best.seconds:
                best = Plan(codec, k, s)
    assert best is not None
    return best
