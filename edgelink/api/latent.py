"""Python API for the latent kinds: HIDDEN_SLICE and RESIDUAL_PATCH (see docs/latent.md), and
BRIDGED_PREFIX handoffs between different models (``bridged_handoff``, docs/protocol.md).

    >>> from edgelink.api import latent as al
    >>> sl = al.capture_hidden("smollm2-135m", "The capital of France is", layers=[15])
    >>> sl.rows[15].shape                                  # (n_tokens, 576)
    >>> out = al.steer("smollm2-135m", "I watched the film and", to="shm:demo", layer=15,
    ...                positive=["I loved it."], negative=["I hated it."], gain=4.0, n_tokens=16)

Sending works over any channel (``latent_session``, or a ``roles.sender.Sender`` made with
``kinds=LATENT_KINDS`` on any transport's Channel); files hold the same frames (``export_hidden``/``export_patch`` then
``apply_file``). The receiver side is an ordinary ``edgelink serve`` whose runtime has the eval
hook (``--set runtime.eval_hook=on``) for patches; hidden slices need no hook there.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgelink.api import Generation, _cfg, connect, load_runtime
from edgelink.api.model import read_messages
from edgelink.bridge import Bridge, load_bridge
from edgelink.config import Config
from edgelink.kinds.bridged import bridge_claim, source_rows
from edgelink.kinds.hidden import HiddenSlice, capture_slice
from edgelink.kinds.patch import ResidualPatch, steering_patch
from edgelink.models.resolve import resolve_model
from edgelink.protocol.codec import MAGIC
from edgelink.protocol.kinds import ApplyMode, Kind
from edgelink.roles.encode import OneWay
from edgelink.roles.sender import Sender, SentMessage
from edgelink.runtime.evalhook import capture
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.signature import model_signature
from edgelink.runtime.sizing import fit_limits
from edgelink.transport.file import FileChannelReader

LATENT_KINDS = (Kind.KV_CACHE, Kind.HIDDEN_SLICE, Kind.RESIDUAL_PATCH)


def _hooked(model: str, cfg: Config) -> LlamaRuntime:
    return LlamaRuntime(resolve_model(model, cfg, pull=True), cfg, eval_hook=True)


# ------------------------------------------------------------------------------ local


def capture_hidden(model: str, prompt: str, layers: Sequence[int], positions: Sequence[int] | None = None,
                   cfg: Config | None = None) -> HiddenSlice:
    """Prefill ``prompt`` and return the residual stream after ``layers`` at ``positions``
    (default: every prompt token), captured during that forward pass."""
    cfg = _cfg(cfg)
    with _hooked(model, cfg) as rt:
        return capture_slice(rt, rt.tokenize(prompt), layers, positions)


def mean_activation(rt: LlamaRuntime, texts: Sequence[str], layer: int) -> np.ndarray:
    """Mean over texts of the mean over their tokens (the first excluded) of the residual after
    ``layer``. The runtime's sequence is cleared before and after each text."""
    rows = []
    for text in texts:
        rt.clear()
        acts = capture(rt, rt.tokenize(text), [layer])[layer]
        rows.append(acts[1:].mean(axis=0) if len(acts) > 1 else acts[0])
    rt.clear()
    return np.mean(rows, axis=0).astype(np.float32)


def steering_vector(rt: LlamaRuntime, positive: Sequence[str], negative: Sequence[str], layer: int) -> np.ndarray:
    """Difference of mean activations, positive minus negative (f32 [n_embd])."""
    return mean_activation(rt, positive, layer) - mean_activation(rt, negative, layer)


# ------------------------------------------------------------------------------ wire


def _sent(sent: SentMessage) -> dict[str, Any]:
    return {"message_id": sent.message_id, "digest": sent.digest, "payload_bytes": sent.payload_bytes,
            "wire_bytes": sent.wire_bytes, "roundtrip_s": sent.roundtrip_s}


@contextlib.contextmanager
def latent_session(rt: LlamaRuntime, to: str, cfg: Config) -> Iterator[Sender]:
    """A handshaken Sender that negotiates the latent kinds with the serving peer at ``to``
    (``send_hidden``, ``send_patch``, ``request("latent_caps")``, ``request("generate")``)."""
    sender = Sender(connect(to, cfg), fit_limits(cfg, rt), model_signature(rt, cfg).to_dict(), kinds=LATENT_KINDS)
    try:
        sender.handshake()
        yield sender
    finally:
        sender.close()


def send_hidden(model: str, prompt: str, to: str, layers: Sequence[int],
                positions: Sequence[int] | None = None, cfg: Config | None = None) -> dict[str, Any]:
    """Capture a hidden slice of ``prompt`` here and ship it; returns the acknowledged digest."""
    cfg = _cfg(cfg)
    with _hooked(model, cfg) as rt:
        sl = capture_slice(rt, rt.tokenize(prompt), layers, positions)
        with latent_session(rt, to, cfg) as ls:
            return _sent(ls.send_hidden(sl))


def steer(model: str, prompt: str, to: str, layer: int, positive: Sequence[str], negative: Sequence[str],
          gain: float = 4.0, n_tokens: int | None = None, cfg: Config | None = None) -> Generation:
    """Build a steering vector (positive minus negative mean activations at ``layer``) here, and
    have the peer decode ``prompt`` with it added at every prompt position (gain negotiated:
    at most the peer's ``max_gain``); returns the peer's greedy continuation."""
    cfg = _cfg(cfg)
    n = cfg.generate.n_tokens if n_tokens is None else n_tokens
    with _hooked(model, cfg) as rt:
        vec = steering_vector(rt, positive, negative, layer)
        toks = rt.tokenize(prompt)
        with latent_session(rt, to, cfg) as ls:
            caps = ls.request("latent_caps")
            g = float(np.clip(gain, -caps["max_gain"], caps["max_gain"]))
            patch = steering_patch(caps["context_tokens"], toks, layer, vec, g, seq_slot=rt.seq)
            sent = ls.send_patch(patch)
            body = ls.request("generate", n_tokens=n)
        return Generation(model, len(toks), list(body["tokens"]), body["text"],
                          {"patch_roundtrip_s": sent.roundtrip_s, "remote_generate_s": body["generate_s"]},
                          {"payload": sent.payload_bytes, "wire": sent.wire_bytes},
                          {"digest": sent.digest, "gain": g, "layer": layer, "to": to})


def bridged_handoff(bridge: str | Path | Bridge, text: str, to: str, model: str | None = None,
                    n_tokens: int | None = None, cfg: Config | None = None, *,
                    token: str | None = None, labels: bool = True) -> Generation:
    """Hand ``text`` to a peer running *another* model, through a bridge (BRIDGED_PREFIX).

    Here: the bridge's source model (``model``, default ``runtime.default_model``; refused
    unless it is the bridge's source) reads ``text`` with the eval hook, its residual after
    ``bridge.source_layer`` goes through ``bridge.apply``, and the K vectors are shipped in a
    session bridged by the bridge's digest. The peer (``edgelink serve/node --bridge`` with the
    same bridge, on its target model) reads them inside the bridge's prompt; with ``labels`` and
    a prompt that has labels it reports its label scores, then it generates ``n_tokens``."""
    cfg = _cfg(cfg)
    n = cfg.generate.n_tokens if n_tokens is None else n_tokens
    br = bridge if isinstance(bridge, Bridge) else load_bridge(bridge)
    model = model or cfg.runtime.default_model
    with _hooked(model, cfg) as rt:
        signature = model_signature(rt, cfg).to_dict()
        br.check_pair(signature, br.meta["target"])  # this model must be the bridge's source
        t0 = time.perf_counter()
        rows, n_src = source_rows(rt, br, text)
        t1 = time.perf_counter()
        vectors = br.apply(rows)
        t2 = time.perf_counter()
        sender = Sender(connect(to, cfg), fit_limits(cfg, rt), signature, auth={"token": token} if token else None,
                        bridge=bridge_claim(br))
        t3 = time.perf_counter()
        try:
            sender.handshake()
            t4 = time.perf_counter()
            sent = sender.send_bridged(vectors, br.digest, n_src, seq_slot=rt.seq)
            scores = sender.request("label_scores") if labels and br.prompt and br.prompt.labels else None
            body = sender.request("generate", n_tokens=n)
        finally:
            sender.close()
    timings = {"capture_s": t1 - t0, "apply_s": t2 - t1, "connect_s": t3 - t2, "handshake_s": t4 - t3,
               "ship_s": sent.roundtrip_s, "remote_generate_s": body["generate_s"]}
    extra: dict[str, Any] = {"digest": sent.digest, "bridge": br.digest, "to": to, "k": br.k,
                             "source_layer": br.source_layer}
    if scores is not None:
        layout = scores.pop("bridged", None)
        if layout:
            timings["remote_apply_s"] = layout.pop("apply_s")
            extra["layout"] = layout
        extra["label_scores"] = scores["scores"]
        extra["label_probs"] = scores["probs"]
        extra["label"] = scores["best"]
    return Generation(model, n_src, list(body["tokens"]), body["text"], timings,
                      {"payload": sent.payload_bytes, "wire": sent.wire_bytes}, extra)


# ------------------------------------------------------------------------------ files


def _write(rt: LlamaRuntime, cfg: Config, path: str | Path, kind: Kind, apply: ApplyMode, parts: tuple) -> int:
    tensors, attrs, layer_range, token_range = parts
    msg = OneWay.encode(model_signature(rt, cfg).to_dict(), fit_limits(cfg, rt), kind, apply,
                        (tensors, attrs, token_range), seq_slot=rt.seq, layer_range=layer_range)
    msg.write(path)
    return msg.message.payload_bytes


def export_hidden(model: str, prompt: str, path: str | Path, layers: Sequence[int],
                  positions: Sequence[int] | None = None, cfg: Config | None = None) -> dict[str, Any]:
    """Write the handshake and a HIDDEN_SLICE frame to ``path``."""
    cfg = _cfg(cfg)
    with _hooked(model, cfg) as rt:
        sl = capture_slice(rt, rt.tokenize(prompt), layers, positions)
        return {"payload_bytes": _write(rt, cfg, path, Kind.HIDDEN_SLICE, ApplyMode.OVERWRITE, sl.message_parts())}


def export_patch(model: str, patch: ResidualPatch, path: str | Path, cfg: Config | None = None) -> dict[str, Any]:
    """Write the handshake and a RESIDUAL_PATCH frame to ``path`` (the reader's sequence must
    hold exactly ``patch.start`` tokens when it applies it; 0 for a fresh reader)."""
    cfg = _cfg(cfg)
    with load_runtime(model, cfg) as rt:
        return {"payload_bytes": _write(rt, cfg, path, Kind.RESIDUAL_PATCH, patch.mode, patch.message_parts())}


def apply_file(model: str, path: str | Path, n_tokens: int | None = None,
               cfg: Config | None = None) -> dict[str, Any]:
    """Read a file of frames (handshake, then KV_CACHE / HIDDEN_SLICE / RESIDUAL_PATCH
    messages), verify and apply each in order like a receiver, then continue greedily."""
    cfg = _cfg(cfg)
    n = cfg.generate.n_tokens if n_tokens is None else n_tokens
    with _hooked(model, cfg) as rt:
        with FileChannelReader(path, magic=MAGIC) as r:
            read = read_messages(rt, cfg, model_signature(rt, cfg).to_dict(), r, str(path), only=LATENT_KINDS)
        applied = [kind.name for kind, _ in read.applied]
        out = rt.generate(n) if n and rt.logits is not None else []
        return {"applied": applied, "hidden_slices": len(read.accepting.held.get(Kind.HIDDEN_SLICE, ())), "tokens": out,
                "text": rt.detokenize(out), "digest": rt.state_digest()}
