"""Message limits that fit the model: the largest message a receiver accepts is, by default,
what its own context can hold, not a fixed number.

A fixed limit is wrong both ways: 256 MB refuses a Llama-3-8B state at 2,000 tokens (131 KB of
KV per token), 1 GiB refuses it at 8,000, and either is far more than SmolLM2 with a 4k context
could ever apply. ``protocol.max_message_bytes = 0`` (the default) derives the limit from the
runtime: a full KV snapshot at ``n_ctx`` (every layer's K and V rows in the configured cache
types, cell positions and sequence ids, token ids), the logits, and per-tensor alignment; or a
virtual prefix filling the context, whichever is larger. ``node.max_message_bytes = 0`` takes
the same value. An explicit setting still overrides either.
"""

from __future__ import annotations

from edgelink.config import Config
from edgelink.protocol.kinds import DType, tensor_nbytes

_ALIGN = 64


def _cache_dtype(name: str) -> DType:
    return DType[name.upper()]


def kv_bytes_per_token(rt) -> int:
    """Bytes of K and V one token occupies in this runtime's cache (all layers)."""
    k_width, v_width = rt.kv_widths
    rc = rt.cfg.runtime
    per_layer = tensor_nbytes(_cache_dtype(rc.type_k), (k_width,)) + tensor_nbytes(_cache_dtype(rc.type_v), (v_width,))
    return rt.n_layer * per_layer


def _snapshot_fixed(rt) -> int:
    n_tensors = 2 * rt.n_layer + 4  # K and V per layer, positions, seq ids, tokens, logits
    return rt.n_vocab * 4 + n_tensors * _ALIGN


def snapshot_bytes(rt, n_tokens: int) -> int:
    """The payload of a full KV snapshot of ``n_tokens`` (KV rows, pos + seq + token as i32)."""
    return n_tokens * (kv_bytes_per_token(rt) + 3 * 4) + _snapshot_fixed(rt)


def snapshot_tokens_within(rt, max_bytes: int) -> int:
    """The most tokens whose snapshot fits in ``max_bytes``: a receiver's context, read from the
    message limit it announced (its n_ctx when the limit is derived, as by default)."""
    return max(0, (max_bytes - _snapshot_fixed(rt)) // (kv_bytes_per_token(rt) + 3 * 4))


def largest_message_bytes(rt) -> int:
    """The payload of the largest message this runtime could apply (see the module doc)."""
    return max(snapshot_bytes(rt, rt.n_ctx), rt.n_ctx * rt.n_embd * 4 + _ALIGN)


def fit_limits(cfg: Config, rt) -> Config:
    """``cfg`` with concrete message limits for this runtime (0 settings derived from it)."""
    derived = None
    proto = cfg.protocol.max_message_bytes
    if not proto:
        derived = largest_message_bytes(rt)
        proto = derived
    node = cfg.node.max_message_bytes or proto
    if (proto, node) == (cfg.protocol.max_message_bytes, cfg.node.max_message_bytes):
        return cfg
    return cfg.replace(protocol_max_message_bytes=proto, node_max_message_bytes=node)
