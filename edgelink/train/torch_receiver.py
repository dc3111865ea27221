"""A differentiable copy of a GGUF model's forward pass in plain torch (the bridge's receiver).

A bridge is trained by back-propagating the receiver's loss through the receiver into the
bridge, so the receiver must exist as a torch graph. This module rebuilds it from the same
GGUF file llama.cpp runs: every tensor is dequantized with ``gguf.quants.dequantize`` (the
weights are therefore exactly llama.cpp's, up to the f32 arithmetic) and frozen.

Two architectures, following the pinned llama.cpp sources (``src/models/llama.cpp``,
``src/models/gemma3.cpp``, hparams in ``src/llama-model.cpp`` / ``llama-hparams.cpp``):

``llama`` (SmolLM2)
    RMSNorm (``x / rms * w``), RoPE of type NORM (adjacent pairs ``(x[2i], x[2i+1])``; the
    GGUF converter permuted Q/K for it) with ``llama.rope.freq_base``, grouped-query attention
    (query head ``h`` reads KV head ``h // (n_head / n_head_kv)``), SwiGLU FFN
    (``down(silu(gate(x)) * up(x))``), output weight tied to ``token_embd`` when the file has
    no ``output.weight``.
``gemma3`` (Gemma-3-270M)
    Token embeddings times ``sqrt(n_embd)`` (token input only: raw embedding input is not
    scaled, as in llama.cpp), RMSNorm before and after attention and FFN. The HF weight is
    used as ``(1 + w)``; llama.cpp's converter already adds the 1 when it writes the GGUF, so
    the stored weight multiplies as is. Per-head RMSNorm on Q and K before RoPE of type NEOX
    (halves ``(x[i], x[i + d/2])``), queries scaled by ``1/sqrt(head_dim)`` (``1/sqrt(n_embd /
    n_head)`` for the 27B), GELU(tanh)-gated FFN. Layers follow the sliding-window pattern
    (``gemma3.attention.sliding_window_pattern``, default 6: every 6th layer global); local
    layers see keys at most ``n_swa - 1`` positions back and use
    ``gemma3.rope.freq_base_swa`` (default 10,000), global ones ``gemma3.rope.freq_base``.
    ``gemma3.final_logit_softcapping`` is applied when present (absent in the 270M file).

``TorchReceiver.forward(input_ids=... | inputs_embeds=...)`` takes one sequence (``[T]``) or a
batch (``[B, T]`` / ``[B, T, n_embd]``) starting at position 0 and returns f32 logits
``[.., T, n_vocab]`` (``last_only=True``: the last position only). ``inputs_embeds`` is what
llama.cpp's ``llama_batch.embd`` takes (``LlamaRuntime.prefill_embeddings``): the residual
stream's input, unscaled; ``receiver.embed(ids)`` gives the vectors that stand for tokens.

``TorchReceiver.block(il, x)`` runs one layer, for per-layer checks against llama.cpp's residual
stream (``edgelink.runtime.evalhook.capture``).

Not reproduced: llama.cpp's CPU kernels round activations to 8-bit blocks (Q8_0/Q8_1/Q8_K)
before each quantized matmul and keep K/V in f16 (``kv_f16=True`` rounds K and V to f16
here too). That leaves about 0.5-1% relative error per layer and logits within about one
unit of llama.cpp's; figures in docs/bridges.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize

from edgelink.models.gguf_meta import read_gguf_header

ARCHITECTURES = ("llama", "gemma3")


@dataclass(frozen=True)
class TorchReceiverConfig:
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    norm_eps: float
    rope_base: float
    rope_type: str  # "norm" (adjacent pairs) or "neox" (halves)
    embd_scale: float  # token input scale (sqrt(n_embd) for gemma3)
    attn_scale: float
    rope_base_swa: float | None = None
    n_swa: int = 0  # 0: no sliding window
    swa_layers: tuple[bool, ...] = ()
    softcap: float = 0.0

    def is_swa(self, il: int) -> bool:
        return bool(self.swa_layers) and self.swa_layers[il]


def _config(meta: dict, shapes: dict[str, tuple[int, ...]]) -> TorchReceiverConfig:
    arch = meta["general.architecture"]
    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture {arch!r} is not supported (one of {ARCHITECTURES})")

    def key(name, default=None):
        return meta.get(f"{arch}.{name}", default)

    n_embd = int(key("embedding_length"))
    n_head = int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", n_embd // n_head))
    n_layer = int(key("block_count"))
    common = dict(
        arch=arch, n_layer=n_layer, n_embd=n_embd, n_ff=int(key("feed_forward_length")),
        n_head=n_head, n_head_kv=int(key("attention.head_count_kv", n_head)), head_dim=head_dim,
        n_vocab=shapes["token_embd.weight"][1],
        norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_base=float(key("rope.freq_base", 10000.0)),
    )
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError("partial rotary embeddings are not supported")
    if arch == "llama":
        if key("rope.scaling.type") not in (None, "none") or "rope_freqs.weight" in shapes:
            raise ValueError("rope scaling / rope_freqs are not supported")
        return TorchReceiverConfig(**common, rope_type="norm", embd_scale=1.0,
                              attn_scale=1.0 / math.sqrt(head_dim))
    n_swa = int(key("attention.sliding_window", 0) or 0)
    swa_layers: tuple[bool, ...] = ()
    if n_swa > 0:
        pattern = key("attention.sliding_window_pattern", 6)
        if isinstance(pattern, (list, tuple)):
            swa_layers = tuple(bool(p) for p in pattern)[:n_layer]
        else:
            p = int(pattern)
            swa_layers = tuple(p == 0 or il % p < p - 1 for il in range(n_layer))
    attn_scale = (1.0 / math.sqrt(n_embd / n_head) if n_layer == 62  # the 27B
                  else 1.0 / math.sqrt(head_dim))
    return TorchReceiverConfig(
        **common, rope_type="neox", embd_scale=math.sqrt(n_embd), attn_scale=attn_scale,
        rope_base_swa=float(key("rope.freq_base_swa", 10000.0)), n_swa=n_swa,
        swa_layers=swa_layers, softcap=float(key("final_logit_softcapping", 0.0) or 0.0),
    )


def load_gguf_tensors(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, {name: f32 array in numpy order, i.e. ggml shape reversed})."""
    header = read_gguf_header(path)
    out = {}
    for t in header.tensors:
        raw = np.memmap(path, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.nbytes,))
        qtype = GGMLQuantizationType(t.ggml_type)
        shape = tuple(reversed(t.shape))
        if qtype == GGMLQuantizationType.F32:
            arr = np.frombuffer(raw, dtype=np.float32).reshape(shape)
        elif qtype == GGMLQuantizationType.F16:
            arr = np.frombuffer(raw, dtype=np.float16).reshape(shape)
        else:
            rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            arr = dequantize(np.asarray(raw).reshape(rows, -1), qtype).reshape(shape)
        out[t.name] = np.array(arr, dtype=np.float32, order="C", copy=True)
    return dict(header.metadata), out


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@dataclass
class TorchPrefix:
    """Per-layer (K, V), each [1, n_head_kv, P, head_dim] after RoPE, of a P-token prefix."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def length(self) -> int:
        return int(self.kv[0][0].shape[2])


class TorchReceiver(torch.nn.Module):
    """The frozen forward pass of a llama or gemma3 GGUF model. Gradients flow to the inputs
    (``inputs_embeds``); the weights are buffers, not parameters."""

    def __init__(self, cfg: TorchReceiverConfig, tensors: dict[str, np.ndarray], *,
                 kv_f16: bool = False):
        """``kv_f16``: round K and V to f16 as llama.cpp's default KV cache does (parity
        checks; the rounding passes no gradient to K and V, so leave it off for training)."""
        super().__init__()
        self.cfg = cfg
        self.kv_f16 = kv_f16
        for name, arr in tensors.items():
            self.register_buffer(name.replace(".", "__"), torch.from_numpy(arr), persistent=False)
        self._tied = "output.weight" not in tensors

    @classmethod
    def from_gguf(cls, path: str | Path, *, kv_f16: bool = False) -> TorchReceiver:
        meta, tensors = load_gguf_tensors(path)
        cfg = _config(meta, {k: tuple(reversed(v.shape)) for k, v in tensors.items()})
        return cls(cfg, tensors, kv_f16=kv_f16)

    def _mm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``x @ W.T`` for the GGUF tensor ``name`` (a [out, in] matrix)."""
        return x @ self.w(name).T

    def w(self, name: str) -> torch.Tensor:
        return getattr(self, name.replace(".", "__"))

    @property
    def input_scale(self) -> float:
        """What token embedding rows are multiplied by before the first layer."""
        return self.cfg.embd_scale

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The residual-stream input that stands for ``input_ids`` (rows times input_scale)."""
        return F.embedding(input_ids, self.w("token_embd.weight")) * self.cfg.embd_scale

    # ------------------------------------------------------------------ pieces

    def _rope(self, x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
        """x: [B, H, T, D]."""
        d = x.shape[-1]
        inv = base ** (-torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d)
        ang = pos.to(torch.float32)[:, None] * inv[None, :]  # [T, D/2]
        cos, sin = torch.cos(ang), torch.sin(ang)
        if self.cfg.rope_type == "norm":
            x0, x1 = x[..., 0::2], x[..., 1::2]
            return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
        x0, x1 = x[..., : d // 2], x[..., d // 2:]
        return torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)

    def _mask(self, t: int, past: int, window: int, device) -> torch.Tensor:
        """[t, past + t] bool: query i (position past+i) sees key j iff j <= past+i, within the window."""
        q = torch.arange(past, past + t, device=device)
        k = torch.arange(past + t, device=device)
        diff = q[:, None] - k[None, :]
        keep = diff >= 0
        if window > 0:
            keep &= diff < window
        return keep

    def _attention(self, il: int, x: torch.Tensor, pos: torch.Tensor,
                   cache: TorchPrefix | None = None, record: list | None = None) -> torch.Tensor:
        c = self.cfg
        b, t, _ = x.shape
        p = f"blk.{il}."
        q = self._mm(x, p + "attn_q.weight").view(b, t, c.n_head, c.head_dim)
        k = self._mm(x, p + "attn_k.weight").view(b, t, c.n_head_kv, c.head_dim)
        v = self._mm(x, p + "attn_v.weight").view(b, t, c.n_head_kv, c.head_dim)
        if c.arch == "gemma3":
            q = _rms_norm(q, self.w(p + "attn_q_norm.weight"), c.norm_eps)
            k = _rms_norm(k, self.w(p + "attn_k_norm.weight"), c.norm_eps)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, D]
        swa = c.is_swa(il)
        base = c.rope_base_swa if swa and c.rope_base_swa else c.rope_base
        q, k = self._rope(q, pos, base), self._rope(k, pos, base)
        if self.kv_f16:
            k, v = k.half().float(), v.half().float()
        if record is not None:
            record.append((k, v))
        past = 0
        if cache is not None:
            pk, pv = cache.kv[il]
            past = pk.shape[2]
            k = torch.cat((pk.expand(b, -1, -1, -1), k), dim=2)
            v = torch.cat((pv.expand(b, -1, -1, -1), v), dim=2)
        rep = c.n_head // c.n_head_kv
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        mask = self._mask(t, past, c.n_swa if swa else 0, x.device)
        out = F.scaled_dot_product_attention(q * c.attn_scale, k, v, attn_mask=mask, scale=1.0)
        out = out.transpose(1, 2).reshape(b, t, c.n_head * c.head_dim)
        return self._mm(out, p + "attn_output.weight")

    def _ffn(self, il: int, x: torch.Tensor) -> torch.Tensor:
        p = f"blk.{il}."
        gate = self._mm(x, p + "ffn_gate.weight")
        up = self._mm(x, p + "ffn_up.weight")
        act = F.silu(gate) if self.cfg.arch == "llama" else F.gelu(gate, approximate="tanh")
        return self._mm(act * up, p + "ffn_down.weight")

    # ------------------------------------------------------------------ forward

    def hidden_states(self, input_ids: torch.Tensor | None = None,
                      inputs_embeds: torch.Tensor | None = None, *,
                      cache: TorchPrefix | None = None) -> torch.Tensor:
        """The final-normed hidden states ``[.., T, n_embd]`` (llama.cpp's ``result_norm``);
        with ``cache``, the inputs sit at the positions after the cached prefix."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if input_ids is not None else inputs_embeds.to(torch.float32)
        single = x.dim() == 2
        if single:
            x = x.unsqueeze(0)
        for il in range(self.cfg.n_layer):
            x = self.block(il, x, cache=cache)
        x = _rms_norm(x, self.w("output_norm.weight"), self.cfg.norm_eps)
        return x[0] if single else x

    @torch.no_grad()
    def prefix_cache(self, input_ids: torch.Tensor) -> TorchPrefix:
        """K and V of a fixed prefix (1-D token ids), computed once and shared by every batch
        row that follows it (a primer), so training pays only for the positions after it."""
        x = self.embed(input_ids.reshape(1, -1))
        kv: list = []
        for il in range(self.cfg.n_layer):
            x = self.block(il, x, record=kv)
        return TorchPrefix([(k.detach(), v.detach()) for k, v in kv])

    def block(self, il: int, x: torch.Tensor, *, cache: TorchPrefix | None = None,
              record: list | None = None) -> torch.Tensor:
        """Layer ``il``: residual stream in, residual stream out (llama.cpp's ``l_out-{il}``);
        ``x`` is [B, T, n_embd] at positions 0..T-1, or after ``cache``'s prefix."""
        c, p, eps = self.cfg, f"blk.{il}.", self.cfg.norm_eps
        past = cache.length if cache is not None else 0
        pos = torch.arange(past, past + x.shape[-2], device=x.device)
        h = self._attention(il, _rms_norm(x, self.w(p + "attn_norm.weight"), eps), pos, cache, record)
        if c.arch == "gemma3":
            h = _rms_norm(h, self.w(p + "post_attention_norm.weight"), eps)
        x = x + h
        h = self._ffn(il, _rms_norm(x, self.w(p + "ffn_norm.weight"), eps))
        if c.arch == "gemma3":
            h = _rms_norm(h, self.w(p + "post_ffw_norm.weight"), eps)
        return x + h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._mm(hidden, "token_embd.weight" if self._tied else "output.weight")
        if self.cfg.softcap:
            logits = torch.tanh(logits / self.cfg.softcap) * self.cfg.softcap
        return logits

    def forward(self, input_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, *,
                last_only: bool = False, cache: TorchPrefix | None = None) -> torch.Tensor:
        h = self.hidden_states(input_ids, inputs_embeds, cache=cache)
        if last_only:
            h = h[..., -1:, :]
        return self.logits(h)
