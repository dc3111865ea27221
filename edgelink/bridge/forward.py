"""The numpy forward pass of each bridge kind, and the array shapes each kind must hold.

Mirrors ``edgelink/train/modules.py`` (torch, training only) op for op; the parity test compares the
two on real sender rows. Everything here is float32 numpy: this is what runs on a CPU at
handoff time, without torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

LN_EPS = 1e-5
_GELU_C = np.float32(np.sqrt(2.0 / np.pi))


def _ln(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + LN_EPS) * w + b


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(_GELU_C * (x + 0.044715 * x ** 3)))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def energy_match(y: np.ndarray, target_norm: float) -> np.ndarray:
    return y * (target_norm / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-6))


def segment_means(z: np.ndarray, k: int) -> np.ndarray:
    """[n, d] -> [K, d]: row t goes to segment floor(t*K/n); an empty segment (n < K) takes the
    row at floor(j*n/K)."""
    n = len(z)
    seg = (np.arange(n) * k) // n
    out = np.empty((k, z.shape[1]), dtype=np.float32)
    for j in range(k):
        rows = z[seg == j]
        out[j] = rows.mean(axis=0) if len(rows) else z[(j * n) // k]
    return out


def perceiver(a: dict[str, np.ndarray], arch: dict[str, Any], z: np.ndarray) -> np.ndarray:
    heads = int(arch["n_heads"])
    kv = _ln(z, a["in_ln_w"], a["in_ln_b"]) @ a["W_in"] + a["b_in"]  # [T, d]
    q = a["queries"]
    d = q.shape[1]
    hd = d // heads
    for i in range(int(arch["n_layers"])):
        p = f"L{i}."
        qq = (_ln(q, a[p + "q_ln_w"], a[p + "q_ln_b"]) @ a[p + "Wq"] + a[p + "bq"])
        kk = kv @ a[p + "Wk"] + a[p + "bk"]
        vv = kv @ a[p + "Wv"] + a[p + "bv"]
        qh = qq.reshape(-1, heads, hd).transpose(1, 0, 2)  # [H, K, hd]
        kh = kk.reshape(-1, heads, hd).transpose(1, 0, 2)  # [H, T, hd]
        vh = vv.reshape(-1, heads, hd).transpose(1, 0, 2)
        att = _softmax(qh @ kh.transpose(0, 2, 1) / np.float32(hd ** 0.5))
        o = (att @ vh).transpose(1, 0, 2).reshape(-1, d)
        q = q + o @ a[p + "Wo"] + a[p + "bo"]
        h = _gelu(_ln(q, a[p + "ff_ln_w"], a[p + "ff_ln_b"]) @ a[p + "W1"] + a[p + "b1"])
        q = q + h @ a[p + "W2"] + a[p + "b2"]
    y = _ln(q, a["out_ln_w"], a["out_ln_b"]) @ a["W_out"] + a["b_out"]
    return energy_match(y, float(arch["target_norm"]))


def lip(a: dict[str, np.ndarray], arch: dict[str, Any], z: np.ndarray, k: int) -> np.ndarray:
    h = segment_means(z, k)
    e = _gelu(_ln(h @ a["W_E"] + a["b_E"], a["enc_ln_w"], a["enc_ln_b"]))
    y = _ln(e @ a["W_D"] + a["b_D"], a["dec_ln_w"], a["dec_ln_b"])
    return energy_match(y, float(arch["target_norm"]))


def _ln_shapes(name: str, d: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}_w": (d,), f"{name}_b": (d,)}


def expected_shapes(kind: str, d_src: int, d_tgt: int, k: int,
                    arch: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every array a bridge of this kind holds, with its shape; ``KeyError`` on a missing arch
    field, ``ValueError`` on a nonsensical one."""
    if kind == "ridge":
        return {"W": (d_src, k * d_tgt), "b": (k * d_tgt,)}
    if kind == "perceiver":
        d, heads, ff, n = (int(arch[f]) for f in ("d_model", "n_heads", "d_ff", "n_layers"))
        if min(d, heads, ff, n) < 1 or d % heads:
            raise ValueError(f"perceiver arch {arch} is not valid")
        out = {**_ln_shapes("in_ln", d_src), "W_in": (d_src, d), "b_in": (d,), "queries": (k, d),
               **_ln_shapes("out_ln", d), "W_out": (d, d_tgt), "b_out": (d_tgt,)}
        for i in range(n):
            p = f"L{i}."
            out.update(_ln_shapes(p + "q_ln", d))
            out.update(_ln_shapes(p + "ff_ln", d))
            for m in "qkvo":
                out[f"{p}W{m}"], out[f"{p}b{m}"] = (d, d), (d,)
            out.update({p + "W1": (d, ff), p + "b1": (ff,), p + "W2": (ff, d), p + "b2": (d,)})
        return out
    if kind == "lip":
        b = int(arch["bottleneck"])
        if b < 1:
            raise ValueError(f"lip arch {arch} is not valid")
        return {"W_E": (d_src, b), "b_E": (b,), **_ln_shapes("enc_ln", b),
                "W_D": (b, d_tgt), "b_D": (d_tgt,), **_ln_shapes("dec_ln", d_tgt)}
    raise ValueError(f"unknown bridge kind {kind!r}")
