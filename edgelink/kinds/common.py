"""Checks shared by HIDDEN_SLICE and RESIDUAL_PATCH: layers, positions, row tensors."""

from __future__ import annotations

import numpy as np

from edgelink.errors import StateError
from edgelink.protocol.kinds import DType
from edgelink.protocol.messages import Tensor, TensorMessage


def f32_tensor(name: str, arr: np.ndarray) -> Tensor:
    a = np.ascontiguousarray(arr, dtype="<f4")
    return Tensor(name, DType.F32, a.shape, memoryview(a).cast("B"))


def i32_tensor(name: str, arr) -> Tensor:
    a = np.ascontiguousarray(np.asarray(arr), dtype="<i4")
    return Tensor(name, DType.I32, a.shape, memoryview(a).cast("B"))


def check_layers(msg: TensorMessage, n_layer: int) -> list[int]:
    layers = msg.attrs.get("layers")
    if not isinstance(layers, list) or not layers or \
            not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise StateError("attrs.layers must be a non-empty list of layer indices")
    if layers != sorted(set(layers)):
        raise StateError("attrs.layers must be strictly increasing")
    if layers[0] < 0 or layers[-1] >= n_layer:
        raise StateError(f"layer {layers[0] if layers[0] < 0 else layers[-1]} outside [0, {n_layer})")
    if msg.layer_range != (layers[0], layers[-1] + 1):
        raise StateError(f"layer range {msg.layer_range} does not cover layers {layers}")
    return layers


def check_positions(by_name: dict[str, Tensor], n_ctx: int) -> np.ndarray:
    t = by_name.get("positions")
    if t is None or t.dtype is not DType.I32 or len(t.shape) != 1 or t.shape[0] == 0:
        raise StateError("'positions' must be a non-empty i32[n]")
    pos = t.array()
    if int(pos.min()) < 0 or int(pos.max()) >= n_ctx:
        raise StateError(f"positions outside the receiver's context [0, {n_ctx})")
    if pos.size > 1 and np.any(np.diff(pos) <= 0):
        raise StateError("positions must be strictly increasing")
    return pos


def check_rows(by_name: dict[str, Tensor], name: str, n: int, n_embd: int) -> np.ndarray:
    t = by_name.get(name)
    if t is None:
        raise StateError(f"missing tensor {name!r}")
    if t.dtype is not DType.F32 or len(t.shape) != 2:
        raise StateError(f"{name!r} must be f32[{n}, {n_embd}]")
    if t.shape[1] != n_embd:
        raise StateError(f"{name!r} rows are {t.shape[1]} wide, this model's residual is {n_embd}")
    if t.shape[0] != n:
        raise StateError(f"{name!r} holds {t.shape[0]} rows for {n} positions")
    rows = t.array()
    if not np.isfinite(rows).all():
        raise StateError(f"{name!r} holds NaN or infinite values")
    return rows


def check_names(by_name: dict[str, Tensor], allowed: set[str]) -> None:
    extra = sorted(set(by_name) - allowed)
    if extra:
        raise StateError(f"unexpected tensors {extra}")
