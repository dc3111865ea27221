"""The native eval hook: capture and patch llama.cpp's residual stream (``l_out-N``).

This is the only Python module that knows about the hook. ``EvalHook`` owns the C state
(``edgelink._evalhook.Hook``) and the ``cb_eval`` function pointer that ``LlamaRuntime`` puts
into its context parameters when it is created with the hook. Between decodes, Python tells
the hook which layers and absolute positions to capture or patch; during ``llama_decode`` the
C callback does the work without any Python call (ctypes releases the GIL around the decode).

The runtime decodes one micro-batch per ``llama_decode`` while a capture or patch is armed, and
reports each batch's positions to the hook (``set_batch``), so the hook maps the rows of an
``l_out`` tensor to absolute positions. The last layer's ``l_out`` holds only the rows whose
logits were requested; the runtime requests logits for every armed position of that layer.

Usage::

    rt = LlamaRuntime(path, cfg, eval_hook=True)
    acts = capture(rt, tokens, layers=[3, 7])              # {layer: f32[n_tokens, n_embd]}
    with patching(rt, {7: Patch(positions, rows, "add", gain=2.0)}):
        rt.prefill(more_tokens)
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import llama_cpp
import numpy as np

from edgelink.errors import ModelError, StateError

MODES = {"add": 1, "overwrite": 2}
MAX_POSITION = 1 << 24


def _ggml_base() -> ctypes.CDLL:
    lib_dir = Path(llama_cpp.__file__).resolve().parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (lib_dir / name).exists():
            return ctypes.CDLL(str(lib_dir / name))
    raise ModelError(f"libggml-base not found in {lib_dir}")


def _addr(lib: ctypes.CDLL, name: str) -> int:
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value or 0


@dataclasses.dataclass(frozen=True)
class Patch:
    """Rows to add (``gain * rows``) to, or write over, the residual after one layer."""

    positions: np.ndarray  # i32 [n], absolute positions
    rows: np.ndarray  # f32 [n, n_embd]
    mode: str = "add"  # add | overwrite
    gain: float = 1.0


class EvalHook:
    """The C hook's state for one context. Create it before the context; keep it alive as long."""

    def __init__(self, n_layer: int, n_embd: int):
        try:
            from edgelink import _evalhook
        except ImportError as exc:  # pragma: no cover - build problem
            raise ModelError("edgelink._evalhook is not built (pip install -e . or "
                             "python setup.py build_ext --inplace)") from exc
        lib = _ggml_base()
        self.n_layer = n_layer
        self.n_embd = n_embd
        self._lib = lib
        self._hook = _evalhook.Hook(n_layer, n_embd, _addr(lib, "ggml_backend_tensor_get"),
                                    _addr(lib, "ggml_backend_tensor_set"), _addr(lib, "ggml_get_name"),
                                    _addr(lib, "ggml_nelements"))
        # The pointer llama.cpp calls: the C function itself, typed as llama-cpp-python's CFUNCTYPE.
        self.cb_eval = llama_cpp.ggml_backend_sched_eval_callback(_evalhook.callback_address())
        self.user_data = ctypes.c_void_p(self._hook.user_data())
        self._capture_layers: dict[int, np.ndarray] = {}
        self._patch_layers: dict[int, np.ndarray] = {}
        self.last_layer_positions: set[int] = set()

    # ------------------------------------------------------------------ arming

    @property
    def armed(self) -> bool:
        return bool(self._capture_layers or self._patch_layers)

    def _layer(self, layer: int) -> int:
        if not isinstance(layer, (int, np.integer)) or not 0 <= int(layer) < self.n_layer:
            raise StateError(f"layer {layer} outside [0, {self.n_layer})")
        return int(layer)

    @staticmethod
    def _positions(positions: Iterable[int]) -> np.ndarray:
        pos = np.ascontiguousarray(np.asarray(list(positions) if not isinstance(positions, np.ndarray)
                                              else positions, dtype=np.int64))
        if pos.ndim != 1 or pos.size == 0:
            raise StateError("positions must be a non-empty 1-D list")
        if pos.min() < 0 or pos.max() >= MAX_POSITION:  # the C side sizes a map by the largest
            raise StateError("positions out of range")
        if np.unique(pos).size != pos.size:
            raise StateError("positions repeat")
        return pos.astype(np.int32)

    def arm_capture(self, layer: int, positions: Iterable[int]) -> None:
        layer = self._layer(layer)
        pos = self._positions(positions)
        try:
            self._hook.set_capture(layer, pos)
        except ValueError as exc:
            raise StateError(str(exc)) from None
        self._capture_layers[layer] = pos
        self._refresh_last()

    def arm_patch(self, layer: int, patch: Patch) -> None:
        layer = self._layer(layer)
        pos = self._positions(patch.positions)
        rows = np.ascontiguousarray(patch.rows, dtype=np.float32)
        if rows.shape != (pos.size, self.n_embd):
            raise StateError(f"patch rows of shape {rows.shape}, need ({pos.size}, {self.n_embd})")
        if patch.mode not in MODES:
            raise StateError(f"patch mode {patch.mode!r} is not one of {sorted(MODES)}")
        try:
            self._hook.set_patch(layer, pos, rows, MODES[patch.mode], float(patch.gain))
        except ValueError as exc:
            raise StateError(str(exc)) from None
        self._patch_layers[layer] = pos
        self._refresh_last()

    def _refresh_last(self) -> None:
        last = self.n_layer - 1
        self.last_layer_positions = set()
        for d in (self._capture_layers, self._patch_layers):
            if last in d:
                self.last_layer_positions.update(int(p) for p in d[last])

    def stop_after(self, layer: int) -> None:
        """End each decode's graph after ``layer`` (which must have a capture armed) until
        :meth:`disarm`; the decode's logits and upper-layer K/V are then garbage."""
        try:
            self._hook.set_stop(self._layer(layer))
        except ValueError as exc:
            raise StateError(str(exc)) from None

    def disarm(self) -> None:
        """Back to idle: every later node is answered "no" after one integer test."""
        self._hook.clear()
        self._capture_layers.clear()
        self._patch_layers.clear()
        self.last_layer_positions = set()

    # ------------------------------------------------------------------ per decode

    def on_batch(self, positions: np.ndarray, outputs: np.ndarray) -> None:
        """Called by the runtime before each llama_decode while armed (one micro-batch)."""
        if self.last_layer_positions:
            for i, p in enumerate(positions.tolist()):
                if p in self.last_layer_positions:
                    outputs[i] = 1
        pos = np.ascontiguousarray(positions, dtype=np.int32)
        out = np.ascontiguousarray(pos[np.asarray(outputs) != 0])
        self._hook.set_batch(pos, out)

    def stats(self) -> dict:
        return dict(self._hook.stats())

    def check_errors(self) -> None:
        st = self.stats()
        if st["errors"]:
            raise StateError(f"eval hook: {st['error']}")

    # ------------------------------------------------------------------ results

    def take_capture(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows f32 [n, n_embd], captured bool [n]) for an armed capture layer."""
        data, done = self._hook.take_capture(self._layer(layer))
        rows = np.frombuffer(data, dtype=np.float32).reshape(-1, self.n_embd).copy()
        return rows, np.frombuffer(done, dtype=np.uint8).astype(bool)

    def patch_applied(self, layer: int) -> np.ndarray:
        return np.frombuffer(self._hook.patch_done(self._layer(layer)), dtype=np.uint8).astype(bool)


def require_hook(rt) -> EvalHook:
    hook = getattr(rt, "eval_hook", None)
    if hook is None:
        raise StateError("this runtime has no eval hook (set runtime.eval_hook = on, or "
                         "create it with eval_hook=True)")
    return hook


@contextlib.contextmanager
def _armed(rt) -> Iterator[EvalHook]:
    hook = require_hook(rt)
    if hook.armed:
        raise StateError("the eval hook is already armed")
    rt.batch_observer = hook.on_batch
    try:
        yield hook
    finally:
        rt.batch_observer = None
        hook.disarm()


def capture(rt, tokens: list[int], layers: Iterable[int],
            positions: Iterable[int] | None = None, *, stop_early: bool = False
            ) -> dict[int, np.ndarray]:
    """Prefill ``tokens`` (appended to the sequence) and return the residual stream after each
    of ``layers`` at absolute ``positions`` (default: every new token) as f32 [n_pos, n_embd].

    ``stop_early`` ends every decode right after the highest captured layer (the hook tells
    ggml's scheduler to stop), so the layers above it are never computed: a bridge that reads
    layer 15 of 30 pays for half the model. The new positions are then dropped again (their
    upper layers' K/V were never written), so the sequence is what it was before the call."""
    start = len(rt.tokens)
    pos = np.arange(start, start + len(tokens)) if positions is None else EvalHook._positions(positions)
    if pos.size and (pos.min() < start or pos.max() >= start + len(tokens)):
        raise StateError(f"capture positions must lie in [{start}, {start + len(tokens)}), "
                         "the tokens being decoded")
    layers = sorted({int(x) for x in layers})
    if not layers:
        raise StateError("no layer to capture")
    with _armed(rt) as hook:
        for layer in layers:
            hook.arm_capture(layer, pos)
        if stop_early:
            hook.stop_after(layers[-1])
        try:
            rt.prefill(tokens)
        finally:
            if stop_early:
                rt.truncate(start)
        hook.check_errors()
        out = {}
        for layer in layers:
            rows, done = hook.take_capture(layer)
            if not done.all():
                raise StateError(f"layer {layer}: {int((~done).sum())} positions were not captured")
            out[layer] = rows
    return out


@contextlib.contextmanager
def patching(rt, patches: Mapping[int, Patch]) -> Iterator[EvalHook]:
    """Arm ``patches`` (layer -> Patch) for the decodes inside the block; idle again after."""
    with _armed(rt) as hook:
        for layer, patch in patches.items():
            hook.arm_patch(layer, patch)
        yield hook
        hook.check_errors()


@contextlib.contextmanager
def capturing(rt, layers: Iterable[int], positions: Iterable[int]) -> Iterator[EvalHook]:
    """Arm captures of ``layers`` at absolute ``positions`` for the decodes inside the block
    (for example a generation); read them with ``hook.take_capture(layer)`` inside it."""
    with _armed(rt) as hook:
        for layer in sorted({int(x) for x in layers}):
            hook.arm_capture(layer, positions)
        yield hook
        hook.check_errors()


def calibrate_norms(rt, tokens: list[int]) -> np.ndarray:
    """Mean L2 norm of the residual after each layer over ``tokens`` (decoded from an empty
    sequence, which is cleared afterwards): f32 [n_layer]."""
    if rt.tokens:
        raise StateError("calibration needs an empty sequence")
    try:
        acts = capture(rt, tokens, range(rt.n_layer))
    finally:
        rt.clear()
    return np.array([float(np.linalg.norm(acts[layer], axis=1).mean()) for layer in range(rt.n_layer)],
                    dtype=np.float32)
