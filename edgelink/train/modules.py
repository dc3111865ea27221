"""The trainable bridge kinds in torch, mirrored op for op by the numpy runtime in
``edgelink/bridge/__init__.py`` (the parity test holds them together).

Both take the source's residual rows after one layer, drop the first (BOS) row, which carries
the attention-sink outlier, and standardize every row with per-dimension statistics of the
training rows (the statistical normalizer). Both end with energy matching: every output row is
rescaled to the target's mean token-embedding norm, so the target sees vectors of the size it
was trained on, whatever the bridge's raw scale.

* ``perceiver`` (Telepathy-style): K learned queries cross-attend to the normalized rows
  (pre-norm, multi-head, with a small MLP per layer); a LayerNorm and a linear map take the K
  query states to the target width. Variable-length input, fixed-size output, and no use of
  the source's positions: RoPE conventions need not agree between the two models.
* ``lip`` (LIP-style adapter): the rows are mean-pooled into K contiguous segments, and each
  segment goes through a bottleneck encoder ``gelu(LN(W_E h + b_E))`` and decoder
  ``LN(W_D z + b_D)``. It is trained by regression (MSE + cosine) to the target's own token rows
  of the same text, pooled the same way; it never sees the task's labels.

GELU is the tanh approximation in both runtimes (numpy has no erf).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

LN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class PerceiverArch:
    d_model: int = 256
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 512


@dataclasses.dataclass(frozen=True)
class LipArch:
    bottleneck: int = 256


def _export_linear(lin: torch.nn.Linear, w: str, b: str) -> dict[str, np.ndarray]:
    return {w: lin.weight.detach().T.contiguous().numpy(), b: lin.bias.detach().numpy()}


def _export_ln(ln: torch.nn.LayerNorm, name: str) -> dict[str, np.ndarray]:
    return {f"{name}_w": ln.weight.detach().numpy(), f"{name}_b": ln.bias.detach().numpy()}


def energy_match(y: torch.Tensor, target_norm: float) -> torch.Tensor:
    return y * (target_norm / y.norm(dim=-1, keepdim=True).clamp_min(1e-6))


class _CrossLayer(torch.nn.Module):
    def __init__(self, a: PerceiverArch):
        super().__init__()
        self.a = a
        self.q_ln = torch.nn.LayerNorm(a.d_model, eps=LN_EPS)
        self.q = torch.nn.Linear(a.d_model, a.d_model)
        self.k = torch.nn.Linear(a.d_model, a.d_model)
        self.v = torch.nn.Linear(a.d_model, a.d_model)
        self.o = torch.nn.Linear(a.d_model, a.d_model)
        self.ff_ln = torch.nn.LayerNorm(a.d_model, eps=LN_EPS)
        self.ff1 = torch.nn.Linear(a.d_model, a.d_ff)
        self.ff2 = torch.nn.Linear(a.d_ff, a.d_model)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        b, k, d = q.shape
        h, hd = self.a.n_heads, d // self.a.n_heads
        qq = self.q(self.q_ln(q)).view(b, k, h, hd).transpose(1, 2)  # [B,H,K,hd]
        kk = self.k(kv).view(b, -1, h, hd).transpose(1, 2)  # [B,H,T,hd]
        vv = self.v(kv).view(b, -1, h, hd).transpose(1, 2)
        att = (qq @ kk.transpose(-1, -2)) / hd ** 0.5  # [B,H,K,T]
        att = att.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(dim=-1)
        q = q + self.o((att @ vv).transpose(1, 2).reshape(b, k, d))
        return q + self.ff2(F.gelu(self.ff1(self.ff_ln(q)), approximate="tanh"))

    def export(self, prefix: str) -> dict[str, np.ndarray]:
        out = {**_export_ln(self.q_ln, prefix + "q_ln"), **_export_ln(self.ff_ln, prefix + "ff_ln")}
        for name in ("q", "k", "v", "o"):
            out.update(_export_linear(getattr(self, name), f"{prefix}W{name}", f"{prefix}b{name}"))
        out.update(_export_linear(self.ff1, prefix + "W1", prefix + "b1"))
        out.update(_export_linear(self.ff2, prefix + "W2", prefix + "b2"))
        return out


class PerceiverBridge(torch.nn.Module):
    """Normalized source rows [B, T, d_src] (+ validity mask) -> [B, K, d_tgt], energy-matched."""

    kind = "perceiver"

    def __init__(self, d_src: int, d_tgt: int, k: int, target_norm: float,
                 arch: PerceiverArch = PerceiverArch()):
        super().__init__()
        self.arch, self.k, self.target_norm = arch, k, float(target_norm)
        self.in_ln = torch.nn.LayerNorm(d_src, eps=LN_EPS)
        self.inp = torch.nn.Linear(d_src, arch.d_model)
        self.queries = torch.nn.Parameter(torch.randn(k, arch.d_model) * 0.02)
        self.layers = torch.nn.ModuleList(_CrossLayer(arch) for _ in range(arch.n_layers))
        self.out_ln = torch.nn.LayerNorm(arch.d_model, eps=LN_EPS)
        self.out = torch.nn.Linear(arch.d_model, d_tgt)

    def forward(self, z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        kv = self.inp(self.in_ln(z))
        q = self.queries.unsqueeze(0).expand(z.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, kv, valid)
        return energy_match(self.out(self.out_ln(q)), self.target_norm)

    def export(self) -> dict[str, np.ndarray]:
        out = {**_export_ln(self.in_ln, "in_ln"), **_export_linear(self.inp, "W_in", "b_in"),
               "queries": self.queries.detach().numpy(), **_export_ln(self.out_ln, "out_ln"),
               **_export_linear(self.out, "W_out", "b_out")}
        for i, layer in enumerate(self.layers):
            out.update(layer.export(f"L{i}."))
        return out

    def manifest_arch(self) -> dict:
        return {**dataclasses.asdict(self.arch), "target_norm": self.target_norm}


def segment_means(z: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """[B, T, d] -> [B, K, d]: the mean of each of K contiguous, nearly equal runs of the valid
    rows (row t of n goes to segment floor(t * K / n)); a segment with no row (n < K) takes the
    row at its start, floor(j * n / K)."""
    n = valid.sum(dim=1)  # [B]
    t = torch.arange(z.shape[1], device=z.device)
    seg = (t[None, :] * k) // n[:, None].clamp_min(1)  # [B, T]
    onehot = F.one_hot(seg.clamp_max(k - 1), k).to(z.dtype) * valid[..., None]  # [B,T,K]
    counts = onehot.sum(dim=1)  # [B,K]
    means = onehot.transpose(1, 2) @ z / counts.clamp_min(1)[..., None]
    empty = counts == 0
    if empty.any():
        start = (torch.arange(k, device=z.device)[None, :] * n[:, None]) // k  # [B,K]
        pick = torch.gather(z, 1, start[..., None].expand(-1, -1, z.shape[2]))
        means = torch.where(empty[..., None], pick, means)
    return means


class LipAdapter(torch.nn.Module):
    """Normalized source rows -> K segment means -> bottleneck encoder/decoder -> [B, K, d_tgt]."""

    kind = "lip"

    def __init__(self, d_src: int, d_tgt: int, k: int, target_norm: float, arch: LipArch = LipArch()):
        super().__init__()
        self.arch, self.k, self.target_norm = arch, k, float(target_norm)
        self.enc = torch.nn.Linear(d_src, arch.bottleneck)
        self.enc_ln = torch.nn.LayerNorm(arch.bottleneck, eps=LN_EPS)
        self.dec = torch.nn.Linear(arch.bottleneck, d_tgt)
        self.dec_ln = torch.nn.LayerNorm(d_tgt, eps=LN_EPS)

    def raw(self, z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Before energy matching: what the hybrid loss compares with the target rows."""
        h = segment_means(z, valid, self.k)
        return self.dec_ln(self.dec(F.gelu(self.enc_ln(self.enc(h)), approximate="tanh")))

    def forward(self, z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return energy_match(self.raw(z, valid), self.target_norm)

    def export(self) -> dict[str, np.ndarray]:
        return {**_export_linear(self.enc, "W_E", "b_E"), **_export_ln(self.enc_ln, "enc_ln"),
                **_export_linear(self.dec, "W_D", "b_D"), **_export_ln(self.dec_ln, "dec_ln")}

    def manifest_arch(self) -> dict:
        return {**dataclasses.asdict(self.arch), "target_norm": self.target_norm}
