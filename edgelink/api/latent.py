"""Python API for the latent kinds: HIDDEN_SLICE and RESIDUAL_PATCH (see docs/latent.md), and
BRIDGED_PREFIX handoffs between different models (``bridged_handoff``, docs/protocol.md).

    >>> from edgelink.api import latent as al
    >>> sl = al.capture_hidden("smollm2-135m", "The capital of France is", layers=[15])
    >>> sl.rows[15].shape                                  # (n_tokens, 576)
    >>> out = al.steer("smollm2-135m", "I watched the film and", to="shm:demo", layer=15,
    ...                positive=["I loved it."], negative=["I hated it."], gain=4.0, n_tokens=16)

Sending works over any session: ``Model.connect(to, kinds=LATENT_KINDS)`` gives a ``Peer``
whose ``sender`` has ``send_hidden`` and ``send_patch`` (or a ``roles.sender.Sender`` made with
``kinds=LATENT_KINDS`` on any transport's Channel); files hold the same frames
(``export_hidden``/``export_patch`` then ``apply_file``). The receiver side is an ordinary ``edgelink serve`` whose runtime has the eval
hook (``--set runtime.eval_hook=on``) for patches; hidden slices need no hook there.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgelink.api import Generation, _cfg
from edgelink.api.model import Model, load, read_messages
from edgelink.api.results import Applied, Bridged, Steering, Written
from edgelink.bridge import Bridge, load_bridge
from edgelink.config import Config
from edgelink.kinds.bridged import bridge_claim, source_rows
from edgelink.kinds.encode import OneWay
from edgelink.kinds.hidden import HiddenSlice, capture_slice
from edgelink.kinds.patch import ResidualPatch, steering_patch
from edgelink.protocol.codec import MAGIC
from edgelink.protocol.kinds import ApplyMode, Kind
from edgelink.roles.sender import SentMessage
from edgelink.runtime.evalhook import capture
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.sizing import fit_limits
from edgelink.transport.file import FileChannelReader

LATENT_KINDS = (Kind.KV_CACHE, Kind.HIDDEN_SLICE, Kind.RESIDUAL_PATCH)


def _hooked(model: str, cfg: Config) -> Model:
    """The model with the eval hook installed (captures residuals as it decodes)."""
    return load(model, cfg.replace(runtime_eval_hook=True))


# ------------------------------------------------------------------------------ local


def capture_hidden(model: str, prompt: str, layers: Sequence[int], positions: Sequence[int] | None = None,
                   cfg: Config | None = None) -> HiddenSlice:
    """Prefill ``prompt`` and return the residual stream after ``layers`` at ``positions``
    (default: every prompt token), captured during that forward pass."""
    with _hooked(model, _cfg(cfg)) as m:
        return capture_slice(m.runtime, m.tokenize(prompt), layers, positions)


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


def send_hidden(model: str, prompt: str, to: str, layers: Sequence[int],
                positions: Sequence[int] | None = None, cfg: Config | None = None) -> SentMessage:
    """Capture a hidden slice of ``prompt`` here and ship it; returns what was acknowledged."""
    with _hooked(model, _cfg(cfg)) as m:
        sl = capture_slice(m.runtime, m.tokenize(prompt), layers, positions)
        with m.connect(to, kinds=LATENT_KINDS) as peer:
            return peer.sender.send_hidden(sl)


def steer(model: str, prompt: str, to: str, layer: int, positive: Sequence[str], negative: Sequence[str],
          gain: float = 4.0, n_tokens: int | None = None, cfg: Config | None = None) -> Generation:
    """Build a steering vector (positive minus negative mean activations at ``layer``) here, and
    have the peer decode ``prompt`` with it added at every prompt position (gain negotiated:
    at most the peer's ``max_gain``); returns the peer's greedy continuation."""
    cfg = _cfg(cfg)
    n = cfg.generate.n_tokens if n_tokens is None else n_tokens
    with _hooked(model, cfg) as m:
        rt = m.runtime
        vec = steering_vector(rt, positive, negative, layer)
        toks = rt.tokenize(prompt)
        with m.connect(to, kinds=LATENT_KINDS) as peer:
            caps = peer.sender.request("latent_caps")
            g = float(np.clip(gain, -caps.max_gain, caps.max_gain))
            patch = steering_patch(caps.context_tokens, toks, layer, vec, g, seq_slot=rt.seq)
            sent = peer.sender.send_patch(patch)
            body = peer.generate(n)
        return Generation(model, len(toks), list(body.tokens), body.text,
                          {"patch_roundtrip_s": sent.roundtrip_s, "remote_generate_s": body.generate_s},
                          {"payload": sent.payload_bytes, "wire": sent.wire_bytes},
                          to=to, digest=sent.digest, steering=Steering(layer, g))


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
    with _hooked(model, cfg) as m:
        rt = m.runtime
        br.check_pair(m.signature, br.meta["target"])  # this model must be the bridge's source
        t0 = time.perf_counter()
        rows, n_src = source_rows(rt, br, text)
        t1 = time.perf_counter()
        vectors = br.apply(rows)
        t2 = time.perf_counter()
        with m.connect(to, token=token, bridge=bridge_claim(br)) as peer:
            sent = peer.sender.send_bridged(vectors, br.digest, n_src, seq_slot=rt.seq)
            scores = peer.sender.request("label_scores") if labels and br.prompt and br.prompt.labels else None
            body = peer.generate(n)
            opened = peer.timings
    timings = {"capture_s": t1 - t0, "apply_s": t2 - t1, **opened,
               "ship_s": sent.roundtrip_s, "remote_generate_s": body.generate_s}
    facts = Bridged(br.digest, br.k, br.source_layer)
    if scores is not None:
        layout = dict(scores.bridged or {})
        if layout:
            timings["remote_apply_s"] = layout.pop("apply_s")
            facts.layout = layout
        facts.label_scores, facts.label_probs, facts.label = scores.scores, scores.probs, scores.best
    return Generation(model, n_src, list(body.tokens), body.text, timings,
                      {"payload": sent.payload_bytes, "wire": sent.wire_bytes},
                      to=to, digest=sent.digest, bridged=facts)


# ------------------------------------------------------------------------------ files


def _write(m: Model, path: str | Path, kind: Kind, apply: ApplyMode, parts: tuple) -> Written:
    tensors, attrs, layer_range, token_range = parts
    msg = OneWay.encode(m.signature, fit_limits(m.cfg, m.runtime), kind, apply,
                        (tensors, attrs, token_range), seq_slot=m.runtime.seq, layer_range=layer_range)
    size = msg.write(path)
    return Written(str(path), "edgelink", kind.name, "raw", payload_bytes=msg.message.payload_bytes, file_bytes=size)


def export_hidden(model: str, prompt: str, path: str | Path, layers: Sequence[int],
                  positions: Sequence[int] | None = None, cfg: Config | None = None) -> Written:
    """Write the handshake and a HIDDEN_SLICE frame to ``path``."""
    with _hooked(model, _cfg(cfg)) as m:
        sl = capture_slice(m.runtime, m.tokenize(prompt), layers, positions)
        return _write(m, path, Kind.HIDDEN_SLICE, ApplyMode.OVERWRITE, sl.message_parts())


def export_patch(model: str, patch: ResidualPatch, path: str | Path, cfg: Config | None = None) -> Written:
    """Write the handshake and a RESIDUAL_PATCH frame to ``path`` (the reader's sequence must
    hold exactly ``patch.start`` tokens when it applies it; 0 for a fresh reader)."""
    with load(model, _cfg(cfg)) as m:
        return _write(m, path, Kind.RESIDUAL_PATCH, patch.mode, patch.message_parts())


def apply_file(model: str, path: str | Path, n_tokens: int | None = None,
               cfg: Config | None = None) -> Applied:
    """Read a file of frames (handshake, then KV_CACHE / HIDDEN_SLICE / RESIDUAL_PATCH
    messages), verify and apply each in order like a receiver, then continue greedily."""
    cfg = _cfg(cfg)
    n = cfg.generate.n_tokens if n_tokens is None else n_tokens
    with _hooked(model, cfg) as m:
        rt = m.runtime
        with FileChannelReader(path, magic=MAGIC) as r:
            read = read_messages(rt, m.cfg, m.signature, r, str(path), only=LATENT_KINDS)
        out = rt.generate(n) if n and rt.logits is not None else []
        return Applied([kind.name for kind, _ in read.applied], len(read.accepting.held.get(Kind.HIDDEN_SLICE, ())),
                       out, rt.detokenize(out), rt.state_digest())
