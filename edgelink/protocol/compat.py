"""The v1 compatibility rule: two signatures either match exactly on every required field, or
the session is rejected. There is no partial match and no fallback to text."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Fields that shape the state: a difference in any of them means the receiver cannot apply it.
REQUIRED_FIELDS: tuple[str, ...] = (
    "architecture",
    "weights_digest",
    "n_layer",
    "n_embd",
    "n_head",
    "n_head_kv",
    "head_dim",
    "rope_type",
    "rope_freq_base",
    "rope_scaling",
    "norm",
    "vocab_size",
    "special_tokens",
    "n_swa",
    "type_k",
    "type_v",
    "flash_attn",
    "llama_cpp",
)


def signature_diff(local: Mapping[str, Any], remote: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every required field on which the two signatures differ, as (local, remote)."""
    missing = object()
    diff: dict[str, tuple[Any, Any]] = {}
    for key in REQUIRED_FIELDS:
        a, b = local.get(key, missing), remote.get(key, missing)
        if a is missing or b is missing or a != b:
            diff[key] = (None if a is missing else a, None if b is missing else b)
    return diff


def describe_diff(diff: Mapping[str, tuple[Any, Any]]) -> str:
    def short(v: Any) -> str:
        s = str(v)
        return s if len(s) <= 24 else s[:21] + "..."

    return "; ".join(f"{k}: local {short(a)} != remote {short(b)}" for k, (a, b) in diff.items())
