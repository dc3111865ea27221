"""The model signature: everything that decides whether a peer's state can be applied here.

Built from the GGUF metadata (through llama.cpp's accessors on the loaded model) and from what
the runtime resolved (KV types, flash attention, the llama.cpp build), plus the weights digest.
The dataclass itself is ``edgelink.protocol.signature.ModelSignature`` (the protocol carries it);
``edgelink.protocol.compat.REQUIRED_FIELDS`` lists the fields that must match exactly.
"""

from __future__ import annotations

import llama_cpp

from edgelink.config import Config
from edgelink.models.digest import weights_digest
from edgelink.protocol.signature import ModelSignature
from edgelink.runtime.llama import LlamaRuntime

_ROPE_NAMES = {-1: "none", 0: "norm", 2: "neox", 8: "mrope", 40: "imrope", 24: "vision"}


def _float(v: str | None) -> float | None:
    try:
        return float(v) if v is not None else None
    except ValueError:
        return None


def model_signature(rt: LlamaRuntime, cfg: Config) -> ModelSignature:
    arch = rt.meta("general.architecture") or "unknown"
    n_embd = llama_cpp.llama_model_n_embd(rt.model)
    n_head = llama_cpp.llama_model_n_head(rt.model)
    rms = rt.meta(f"{arch}.attention.layer_norm_rms_epsilon")
    ln = rt.meta(f"{arch}.attention.layer_norm_epsilon")
    norm = f"rms:{float(rms):g}" if rms else (f"layer:{float(ln):g}" if ln else "unknown")
    scaling = rt.meta(f"{arch}.rope.scaling.type")
    factor = rt.meta(f"{arch}.rope.scaling.factor")
    v = rt.vocab
    specials = {
        "bos": llama_cpp.llama_vocab_bos(v),
        "eos": llama_cpp.llama_vocab_eos(v),
        "eot": llama_cpp.llama_vocab_eot(v),
        "pad": llama_cpp.llama_vocab_pad(v),
    }
    return ModelSignature(
        architecture=arch,
        family=rt.meta("general.basename") or arch,
        name=rt.meta("general.name") or rt.path.stem,
        weights_digest=weights_digest(rt.path, cfg),
        n_layer=llama_cpp.llama_model_n_layer(rt.model),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=rt.n_head_kv,
        head_dim=rt.head_dim,
        rope_type=_ROPE_NAMES.get(llama_cpp.llama_model_rope_type(rt.model), "other"),
        rope_freq_base=_float(rt.meta(f"{arch}.rope.freq_base")),
        rope_scaling=f"{scaling}:{factor}" if scaling else None,
        norm=norm,
        vocab_size=rt.n_vocab,
        special_tokens=specials,
        n_ctx_train=llama_cpp.llama_model_n_ctx_train(rt.model),
        n_swa=llama_cpp.llama_model_n_swa(rt.model),
        type_k=cfg.runtime.type_k,
        type_v=cfg.runtime.type_v,
        flash_attn=rt.flash_attn_resolved(),
        llama_cpp=f"llama-cpp-python {llama_cpp.__version__}",
        file_bytes=rt.path.stat().st_size,
    )
