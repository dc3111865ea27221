"""BRIDGED_PREFIX: K vectors that a bridge (edgelink/bridge/__init__.py) made from another model's hidden
state, fed to the receiver inside the prompt the bridge was trained with.

This is the first kind that crosses between *different* models: the sender runs the bridge's
source model (SmolLM2), captures its residual after ``bridge.source_layer`` and applies the
bridge; the receiver runs the target (Gemma) and reads the vectors. The session is bridged
(``compat.bridge_rule``): both HELLOs name the bridge by its digest, so the receiver knows the
vectors mean what its own copy of the bridge says they mean.

The message: one tensor ``embd`` f32 [K, n_embd] in the receiver's token-embedding space (rows
as ``token_embd.weight`` stores them; the receiver applies its input scale, as for
VIRTUAL_PREFIX), apply mode OVERWRITE, layer and token ranges (-1, -1) (the receiver decides the
positions), ``attrs = {"bridge": digest, "source_tokens": n}``.

The receiver replaces its sequence with ``primer + before`` (tokens, BOS first), the K vectors,
then ``after`` (tokens): the layout the bridge's prompt describes (``BridgePrompt``), so a
following ``generate`` or ``label_scores`` request reads the answer position. Everything is
checked before the runtime is touched; if llama.cpp still fails, the previous sequence is
restored.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edgelink.bridge import Bridge
from edgelink.errors import SessionError, StateError
from edgelink.kinds.snapshot import check_target
from edgelink.protocol.kinds import ApplyMode, DType, Kind
from edgelink.protocol.messages import Tensor, TensorMessage
from edgelink.protocol.signature import ModelSignature
from edgelink.runtime.llama import LlamaRuntime

NO_RANGE = (-1, -1)
MAX_LABELS = 64


def bridge_claim(bridge: Bridge) -> dict[str, str]:
    """What a HELLO names: the bridge's digest and both models' weights digests."""
    return {"digest": bridge.digest, "source": str(bridge.meta["source"]["weights_digest"]),
            "target": str(bridge.meta["target"]["weights_digest"])}


def bridged_tensors(vectors: np.ndarray, digest: str, source_tokens: int
                    ) -> tuple[list[Tensor], dict[str, Any], tuple[int, int]]:
    """(tensors, attrs, token range) of a BRIDGED_PREFIX message."""
    v = np.ascontiguousarray(vectors, dtype="<f4")
    if v.ndim != 2 or v.shape[0] == 0:
        raise StateError("a bridged prefix is a non-empty [K, n_embd] array")
    return ([Tensor("embd", DType.F32, v.shape, memoryview(v).cast("B"))],
            {"bridge": digest, "source_tokens": int(source_tokens)}, NO_RANGE)


def source_rows(rt: LlamaRuntime, bridge: Bridge, text: str) -> tuple[np.ndarray, int]:
    """The sender's half: prefill ``text`` (BOS first, as the bridge was trained) on a runtime
    with the eval hook and return its residual rows after ``bridge.source_layer``."""
    from edgelink.runtime.evalhook import capture  # needs the native hook; senders only

    toks = rt.tokenize(text)
    rt.clear()
    try:
        rows = capture(rt, toks, [bridge.source_layer], stop_early=True)[bridge.source_layer]
    finally:
        rt.clear()
    return rows, len(toks)


class BridgedPrefixApplier:
    """Checks and applies BRIDGED_PREFIX messages made by one bridge, on its target model."""

    def __init__(self, rt: LlamaRuntime, bridge: Bridge, signature: ModelSignature):
        # Refuse at startup, not per message, a bridge that was trained for another target.
        bridge.check_pair(bridge.meta["source"], signature)
        if bridge.d_tgt != rt.n_embd:
            raise StateError(f"bridge writes {bridge.d_tgt}-wide rows, this model is {rt.n_embd} wide")
        self.rt = rt
        self.bridge = bridge
        self.scale = rt.token_embeddings().input_scale
        p = bridge.prompt
        self.head = rt.tokenize(p.primer + p.before if p else "", add_special=True)
        self.tail = rt.tokenize(p.after, add_special=False) if p and p.after else []
        self._tail_rows = rt.token_embeddings().rows(self.tail) if self.tail else None
        self.last: dict[str, Any] = {}
        # The head is the same for every message: its cells are computed once and imported
        # afterwards (two thirds of an apply's time for the sentiment prompt on Gemma-3-270M).
        # Importing them gives the cells a fresh prefill would (tests compare the logits exactly).
        self._head_state: tuple[np.ndarray, list[int], np.ndarray] | None = None

    @property
    def n_positions(self) -> int:
        return len(self.head) + self.bridge.k + len(self.tail)

    def check(self, msg: TensorMessage) -> np.ndarray:
        """Everything short of touching the runtime: returns the K vectors."""
        rt, br = self.rt, self.bridge
        check_target(msg, rt, Kind.BRIDGED_PREFIX, ApplyMode.OVERWRITE)
        if msg.layer_range != NO_RANGE or msg.token_range != NO_RANGE:
            raise StateError(f"a bridged prefix carries no layer or token range (got "
                             f"{msg.layer_range}, {msg.token_range}): the receiver places it")
        digest = msg.attrs.get("bridge")
        if digest != br.digest:
            raise StateError(f"prefix made by bridge {str(digest)[:16]}..., this receiver holds "
                             f"{br.digest[:16]}...")
        n_src = msg.attrs.get("source_tokens")
        if not isinstance(n_src, int) or isinstance(n_src, bool) or n_src < 1:
            raise StateError("attrs.source_tokens must be a positive integer")
        if [t.name for t in msg.tensors] != ["embd"]:
            raise StateError("a bridged prefix carries exactly one tensor, 'embd'")
        t = msg.tensors[0]
        if t.dtype is not DType.F32 or tuple(t.shape) != (br.k, rt.n_embd):
            raise StateError(f"'embd' must be f32[{br.k}, {rt.n_embd}] (this bridge's K and this "
                             f"model's width), got {t.dtype.name}{list(t.shape)}")
        if self.n_positions > rt.n_ctx:
            raise StateError(f"{self.n_positions} positions exceed the context of {rt.n_ctx}")
        v = t.array()
        if not np.isfinite(v).all():
            raise StateError("bridged prefix holds NaN or infinite values")
        return v

    def apply(self, msg: TensorMessage) -> None:
        """Check, then rebuild the sequence as head, vectors, tail; on a llama.cpp failure the
        previous sequence is restored exactly."""
        v = self.check(msg)
        rt = self.rt
        t0 = time.perf_counter()
        # A copy: the first apply exports the head's cells, which reuses the export buffer.
        backup = (np.array(rt.export_state(), copy=True), list(rt.tokens), rt.logits) if rt.tokens else None
        try:
            self._start()
            feed_vectors(rt, v, self.tail, self._tail_rows, self.scale)
        except Exception:  # any failure, typed or not: the sequence goes back as it was
            rt.clear()
            if backup is not None:
                rt.import_state(*backup)
            raise
        self.last = {"apply_s": time.perf_counter() - t0, "head_tokens": len(self.head),
                     "vectors": int(v.shape[0]), "tail_tokens": len(self.tail),
                     "context_tokens": len(rt.tokens), "source_tokens": msg.attrs["source_tokens"]}

    def forget(self) -> None:
        """The session is over: its figures are not the next peer's to read."""
        self.last = {}

    def _start(self) -> None:
        """Replace the sequence with the head (primer + before), from the cached cells."""
        rt = self.rt
        if self.head and rt.tokens[:len(self.head)] == self.head:
            rt.truncate(len(self.head))  # the head's cells are already there (the usual case)
            return
        rt.clear()
        if not self.head:
            return
        if self._head_state is not None:
            rt.import_state(*self._head_state)
            return
        rt.prefill(self.head)
        self._head_state = (np.array(rt.export_state(), copy=True), list(rt.tokens), rt.logits.copy())


def feed_vectors(rt: LlamaRuntime, v: np.ndarray, tail: list[int], tail_rows: np.ndarray | None,
                 scale: float) -> np.ndarray:
    """Append the K bridged vectors and then the prompt's tail tokens in ONE decode: the tail
    goes in as its own token rows, which gives the token path's logits exactly (see
    latent/prefix.py) at the cost of one llama_decode instead of two. Returns the logits."""
    if not tail:
        return rt.prefill_embeddings(v, scale)
    logits = rt.prefill_embeddings(np.concatenate([v, tail_rows]).astype(np.float32, copy=False), scale)
    rt.tokens[len(rt.tokens) - len(tail):] = tail
    return logits


def label_scores(rt: LlamaRuntime, labels: dict[str, str]) -> dict[str, Any]:
    """The logit of each label verbalizer's first token at the current position (the scoring
    of ``BridgePrompt``), their softmax over the labels, and the best label."""
    if not labels:
        raise SessionError("label_scores needs labels (a {label: verbalizer} object)")
    if rt.logits is None:
        raise SessionError("no logits at the current position: apply a message or prefill first")
    ids: dict[str, int] = {}
    for label, verbalizer in labels.items():
        toks = rt.tokenize(verbalizer, add_special=False)
        if not toks:
            raise SessionError(f"verbalizer {verbalizer!r} of label {label!r} has no tokens")
        ids[label] = toks[0]
    scores = {label: float(rt.logits[i]) for label, i in ids.items()}
    z = np.array(list(scores.values()), dtype=np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    return {"scores": scores, "probs": dict(zip(scores, p.tolist(), strict=True)), "token_ids": ids,
            "best": max(scores, key=scores.__getitem__), "context_tokens": len(rt.tokens)}


def _labels_param(params: dict[str, Any], default: dict[str, str] | None) -> dict[str, str]:
    labels = params.get("labels", default)
    if not isinstance(labels, dict) or not labels or len(labels) > MAX_LABELS or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in labels.items()):
        raise SessionError(f"label_scores needs 'labels': 1 to {MAX_LABELS} label -> verbalizer "
                           "strings (optional only on a receiver whose bridge has a prompt)")
    return labels


def label_ops(rt: LlamaRuntime, bridge: Bridge | None,
              applier: BridgedPrefixApplier | None) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
    """The ``label_scores`` request, answered with or without a bridge (labels given, or the
    bridge prompt's), with the last bridged prefix's figures when there is one."""
    default = dict(bridge.prompt.labels) if bridge and bridge.prompt else None

    def op(params: dict[str, Any]) -> dict[str, Any]:
        body = label_scores(rt, _labels_param(params, default))
        if applier is not None and applier.last:
            body["bridged"] = dict(applier.last)
        return body

    return {"label_scores": op}
