"""The v1 compatibility rule: two signatures either match exactly on every required field, or
the session is rejected. There is no partial match and no fallback to text."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgelink.errors import BridgeMismatch

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


# What makes a signature another model rather than the same model run another way.
_MODEL_FIELDS = ("architecture", "weights_digest", "n_layer", "n_embd", "n_head", "n_head_kv", "head_dim",
                 "vocab_size", "special_tokens", "n_swa", "norm")
_SETTING_HINTS = {"flash_attn": "runtime.flash_attn", "type_k": "runtime.type_k", "type_v": "runtime.type_v",
                  "llama_cpp": "the llama-cpp-python version", "rope_scaling": "the rope scaling settings",
                  "rope_freq_base": "the rope frequency base", "rope_type": "the rope type"}


def _model(sig: Mapping[str, Any]) -> str:
    digest = str(sig.get("weights_digest") or "")[:12]
    return (f"{sig.get('architecture', '?')} with {sig.get('n_layer', '?')} layers and n_embd "
            f"{sig.get('n_embd', '?')}" + (f", weights {digest}" if digest else ""))


def describe_mismatch(role: str, mine: Mapping[str, Any], theirs: Mapping[str, Any],
                      diff: Mapping[str, tuple[Any, Any]]) -> str:
    """A refused handshake in words that read right on either side: "the sender" and "the
    receiver", not "local" and "remote" (the text travels to the peer in the REJECT), the
    cause first, then what to change. ``role``: "server" (receiver) or "client" (sender)."""
    me, peer = ("receiver", "sender") if role == "server" else ("sender", "receiver")
    side = {me: mine, peer: theirs}
    if any(k in diff for k in _MODEL_FIELDS):
        fields = list(diff)
        named = ", ".join(fields[:6]) + (f" and {len(fields) - 6} more" if len(fields) > 6 else "")
        return (f"the sender and the receiver run different models (sender: {_model(side['sender'])}; "
                f"receiver: {_model(side['receiver'])}; they differ in {named}): start the receiver with "
                "the sender's GGUF, or hand off through a bridge trained for the pair (--bridge)")
    parts = []
    for k, (a, b) in diff.items():
        vals = {me: a, peer: b}
        parts.append(f"{k} is {vals['sender']!s:.24} on the sender and {vals['receiver']!s:.24} on the receiver")
    hints = sorted({_SETTING_HINTS.get(k, k) for k in diff})
    return (f"the same model, set up differently: {'; '.join(parts)}: set {', '.join(hints)} alike on "
            "both sides")


# ---------------------------------------------------------------------------- bridged sessions
#
# A bridge (edgelink/bridge/__init__.py) lets two *different* models talk: the client runs the bridge's
# source model, the server its target, and the only thing exchanged is what the bridge made
# (BRIDGED_PREFIX). For such a session the exact-match rule above is replaced by this one: both
# HELLOs name the same bridge (its sha256 and both weights digests), the client's model is the
# bridge's source and the server's its target. Anything else is a BridgeMismatch at the handshake.

BRIDGE_CLAIM_FIELDS: tuple[str, ...] = ("digest", "source", "target")
_ROLE_SIDE = {"client": "source", "server": "target"}


def _check_claim(claim: Mapping[str, Any], whose: str) -> dict[str, str]:
    if set(claim) != set(BRIDGE_CLAIM_FIELDS) or not all(
            isinstance(claim[k], str) and claim[k] for k in BRIDGE_CLAIM_FIELDS):
        raise BridgeMismatch(f"{whose} bridge field must hold exactly {list(BRIDGE_CLAIM_FIELDS)} "
                             f"as non-empty strings, got {sorted(claim)}")
    return {k: claim[k] for k in BRIDGE_CLAIM_FIELDS}


def bridge_rule(role: str, local: Mapping[str, Any], local_claim: Mapping[str, Any] | None,
                remote: Mapping[str, Any], remote_claim: Mapping[str, Any] | None,
                diff: Mapping[str, tuple[Any, Any]]) -> bool:
    """Whether the session is bridged (True) or ordinary (False: the exact-match rule applies).

    ``role`` is this side's ("client" runs the bridge's source, "server" its target), ``diff``
    the :func:`signature_diff` of both signatures. Raises BridgeMismatch when a bridge is named
    by one side only (a client insisting on one, or the bridge's source model not naming it),
    names differ, or a model is not the one the bridge names for its role."""
    mine = _check_claim(local_claim, "this side's") if local_claim else None
    theirs = _check_claim(remote_claim, "the peer's") if remote_claim else None
    if mine is None and theirs is None:
        return False
    if theirs is None:
        if role == "client":
            raise BridgeMismatch(f"the peer answered without bridge {mine['digest'][:16]}...: "
                                 "it does not serve bridged sessions", {"bridge": (mine["digest"], None)})
        if not diff or remote.get("weights_digest") != mine["source"]:
            return False  # an ordinary session: the exact-match rule decides
        raise BridgeMismatch(
            "the peer runs this side's bridge source model but names no bridge (model signatures "
            f"differ: {describe_diff(diff)}); this side accepts it only through bridge "
            f"{mine['digest'][:16]}...", dict(diff))
    if mine is None:
        raise BridgeMismatch(f"the peer names bridge {theirs['digest'][:16]}... but this side holds "
                             "no bridge (serve it with --bridge FILE)", {"bridge": (None, theirs["digest"])})
    if theirs["digest"] != mine["digest"]:
        raise BridgeMismatch(f"the peer names bridge {theirs['digest'][:16]}..., this side holds "
                             f"{mine['digest'][:16]}...", {"bridge": (mine["digest"], theirs["digest"])})
    for k in ("source", "target"):
        if theirs[k] != mine[k]:
            raise BridgeMismatch(f"the peer's bridge names {k} weights {theirs[k][:16]}..., this side's "
                                 f"{mine[k][:16]}... (same bridge digest)", {f"bridge.{k}": (mine[k], theirs[k])})
    own = _ROLE_SIDE.get(role)
    if own is None:
        raise BridgeMismatch(f"unknown role {role!r}")
    other = "target" if own == "source" else "source"
    for who, sig, side in (("this side's", local, own), ("the peer's", remote, other)):
        got = sig.get("weights_digest")
        if got != mine[side]:
            raise BridgeMismatch(
                f"{who} model ({sig.get('name', '?')}, weights {str(got)[:16]}...) is not the bridge's "
                f"{side} (weights {mine[side][:16]}...)", {"weights_digest": (mine[side], got)})
    return True
