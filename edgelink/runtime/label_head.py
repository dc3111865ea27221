"""Score a few tokens instead of the whole vocabulary.

A receiver that answers a classification only needs the logits of its labels' first tokens,
yet llama.cpp multiplies the last hidden state by the whole output matrix: for Gemma-3-270M
that is 262,144 x 640, measured at 16 ms of a 40 ms read of 4 positions on one thread. A
``LabelHead`` captures the last layer's residual at the last position through the eval hook,
stops the graph right there (every layer's K/V is already written, so the sequence stays
valid), and applies the output norm and just those tokens' output rows in numpy.

The logits agree with llama.cpp's to quantization noise (llama.cpp multiplies q8 activations
by the q8 matrix; this multiplies f32 by the dequantized rows). Only architectures whose head
is exactly ``RMSNorm`` then the output matrix are accepted: a final logit soft-cap or another
norm would make the numbers differ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from gguf.quants import dequantize

from edgelink.errors import ModelError
from edgelink.models.gguf_meta import read_gguf_header
from edgelink.runtime.embeddings import TokenEmbeddings
from edgelink.runtime.evalhook import _armed

# llama.cpp architectures whose output is rms_norm(x) * output_norm then the output matrix.
PLAIN_RMS_HEAD = {"llama", "gemma3"}


class LabelHead:
    """Logits of ``token_ids`` only, for reads decoded through :meth:`read`."""

    def __init__(self, rt, token_ids: Sequence[int]):
        if getattr(rt, "eval_hook", None) is None:
            raise ModelError("a label head needs a runtime with the eval hook (eval_hook=True)")
        arch = rt.meta("general.architecture") or ""
        if arch not in PLAIN_RMS_HEAD:
            raise ModelError(f"no label head for architecture {arch!r} "
                             f"(supported: {sorted(PLAIN_RMS_HEAD)})")
        header = read_gguf_header(rt.path)
        names = {t.name for t in header.tensors}
        matrix = "output.weight" if "output.weight" in names else "token_embd.weight"
        self.rt = rt
        self.token_ids = [int(t) for t in token_ids]
        self.rows = TokenEmbeddings(rt.path, arch, rt.n_embd, tensor=matrix).rows(self.token_ids)
        try:
            info = header.tensor("output_norm.weight")
        except KeyError:
            raise ModelError(f"{rt.path}: no output_norm.weight") from None
        try:
            if info.nbytes <= 0:
                raise ValueError(f"tensor type {info.ggml_type} unknown to gguf")
            raw = np.fromfile(rt.path, dtype=np.uint8, count=info.nbytes, offset=info.offset)
            self.norm = dequantize(raw, info.ggml_type).reshape(-1).astype(np.float32)
        except (ValueError, NotImplementedError, OSError) as exc:
            raise ModelError(f"{rt.path}: output_norm.weight unreadable ({exc})") from None
        if self.norm.shape != (rt.n_embd,):
            raise ModelError(f"output_norm.weight of shape {self.norm.shape}, not ({rt.n_embd},)")
        eps = rt.meta(f"{arch}.attention.layer_norm_rms_epsilon")
        if eps is None:
            raise ModelError(f"{rt.path}: no {arch}.attention.layer_norm_rms_epsilon")
        self.eps = float(eps)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """f32 [len(token_ids)] from the last layer's residual f32 [n_embd]."""
        h = hidden.astype(np.float32)
        h = h / np.sqrt(np.mean(h * h) + self.eps) * self.norm
        return self.rows @ h

    def read(self, n_new: int, decode: Callable[[], object]) -> np.ndarray:
        """Run ``decode`` (which appends exactly ``n_new`` positions to the sequence) with the
        graph stopped after the last layer, and return the label logits at its last position.
        The runtime's own ``logits`` are left unset (None): they were never computed."""
        rt = self.rt
        last, top = len(rt.tokens) + n_new - 1, rt.n_layer - 1
        with _armed(rt) as hook:
            hook.arm_capture(top, [last])
            hook.stop_after(top)
            decode()
            hook.check_errors()
            rows, done = hook.take_capture(top)
        rt.logits = None
        if len(rt.tokens) != last + 1 or not done.all():
            raise ModelError(f"the decode appended {len(rt.tokens) - last - 1 + n_new} positions, "
                             f"not {n_new}")
        return self.logits(rows[0])
