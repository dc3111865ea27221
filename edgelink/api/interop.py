"""Living with the llama-cpp-python code people already run: ``from_llama(llm)`` wraps a
``Llama`` (its model and its context, nothing reloaded) as an edgelink ``Model``, so its
conversation can be handed off, snapshotted or replaced by a received state, after which
``llm.create_completion`` continues from it. (llama.cpp's own state files: kinds/llama_file.py.)
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgelink.api.model import Model
from edgelink.config import Config, load_config
from edgelink.errors import EdgelinkWarning, ModelError
from edgelink.runtime.kvstate import CACHE_TYPE_NAMES
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.system import amx_unsafe_model, extra_buffers, new_llama

if TYPE_CHECKING:
    from edgelink.api.model import Model
    from edgelink.runtime.llama import LlamaRuntime

# ---------------------------------------------------------------------------- llama-cpp-python


_TYPE_NAMES = {v: k for k, v in CACHE_TYPE_NAMES.items()}


def _config_of(llm: Any, cfg: Config) -> Config:
    """``cfg`` with the runtime settings ``llm``'s context was made with."""
    cp = llm.context_params
    flash = {-1: "auto", 0: "off", 1: "on"}.get(int(getattr(cp, "flash_attn_type", -1)), "auto")
    try:
        type_k, type_v = _TYPE_NAMES[int(cp.type_k)], _TYPE_NAMES[int(cp.type_v)]
    except KeyError as exc:
        raise ModelError(f"the Llama's KV cache type {exc} is not one edgelink moves") from None
    return cfg.replace(runtime_n_ctx=int(llm.n_ctx()), runtime_n_batch=int(llm.n_batch),
                       runtime_n_ubatch=int(cp.n_ubatch), runtime_n_threads=int(cp.n_threads),
                       runtime_n_threads_batch=int(cp.n_threads_batch),
                       runtime_flash_attn=flash, runtime_type_k=type_k, runtime_type_v=type_v,
                       runtime_seq_id=0)


def make_llama(model_path: str | Path, cfg: Config | None = None, **kwargs: Any) -> Any:
    """A ``llama_cpp.Llama(model_path, **kwargs)`` loaded the way edgelink loads models: with
    ``runtime.extra_buffers`` deciding whether weights may use llama.cpp's extra buffer types
    (off on builds with the faulting AMX kernels: runtime/system.py)."""

    use = extra_buffers((cfg if cfg is not None else load_config()).runtime.extra_buffers).use
    return new_llama(model_path, use_extra_bufts=use, **kwargs)


def from_llama(llm: Any, cfg: Config | None = None) -> Model:
    """Wrap a ``llama_cpp.Llama`` as an edgelink ``Model`` over the same model and context.

    Its sequence (``llm``'s evaluated tokens and cells) is the model's; after edgelink changes
    it (a restore, a received state, a prefill), ``llm`` knows the new tokens and re-decodes
    the last one before it samples, so ``llm.create_completion(prompt=...)`` with those tokens
    (or their text) continues from the state. Closing the model leaves ``llm`` usable."""

    cfg = _config_of(llm, cfg if cfg is not None else load_config())
    if amx_unsafe_model(getattr(llm, "model_params", None)):
        warnings.warn(EdgelinkWarning(
            "this Llama keeps its weights in llama.cpp's extra buffer types, and this "
            "llama-cpp-python build has AMX kernels, which fault with SIGILL on current Xeons "
            "(llama.cpp PR #26954): the first completion may kill the process. Create it with "
            "edgelink.api.interop.make_llama(path, **kwargs), or load it with edgelink.load(path) "
            "(runtime.extra_buffers = auto keeps weights out of them there), or rebuild llama-cpp-python without AMX: CMAKE_ARGS=\"-DGGML_NATIVE=OFF "
            "-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON\" pip install "
            "--force-reinstall --no-cache-dir llama-cpp-python (see `edgelink doctor`)."), stacklevel=2)
    rt = LlamaRuntime.adopt(llm._model.model, llm._ctx.ctx, Path(llm.model_path), cfg)
    return Model(rt, cfg, Path(llm.model_path).name, binding=LlamaBinding(llm, rt))


class LlamaBinding:
    """Keeps a ``Llama``'s token bookkeeping and edgelink's runtime in step around each
    operation (``Model`` calls ``pull`` before and ``push`` after)."""

    def __init__(self, llm: Any, rt: LlamaRuntime):
        self.llm, self.rt = llm, rt
        self.pull()

    def pull(self) -> None:
        """Take ``llm``'s sequence as the runtime's, when it moved since the last push."""
        llm, rt = self.llm, self.rt
        n = int(llm.n_tokens)
        ids = [int(t) for t in llm.input_ids[:n]]
        if ids == rt.tokens:
            return
        rt.tokens = ids
        rt.batched = 0  # how llama-cpp-python batched them is not ours to vouch for
        rt.logits = rt.context_logits() if n and not getattr(llm, "_requires_eval", True) else None

    def push(self) -> None:
        """Give ``llm`` the runtime's sequence; it re-decodes the last token before sampling."""
        llm, rt = self.llm, self.rt
        n = len(rt.tokens)
        llm.input_ids[:n] = rt.tokens
        llm.n_tokens = n
        llm._requires_eval = True
