"""Shape twins: GGUF files with the exact KV geometry of a named real model and tiny weights.

No 7B model fits in this project's tests or CI (no model hub, 2 cores), yet the sizes that
matter (131 KB of KV per token for Llama-3-8B, a gigabyte at 8k tokens) come only from real
geometries. A twin keeps what shapes the KV cache and the state llama.cpp exports (layer count,
KV heads, head size, the architecture's cache layout, Gemma-3's sliding window and its 5:1
local/global pattern) and shrinks everything else (width 256, a 512-token vocabulary, random
weights), so it loads in a second and its states are byte-for-byte the size of the real model's.

Its prefill time is NOT the real model's: attention runs over the same KV heads, but every
projection is a fraction of the real width. Use twins for what moves (export, transfer,
import, memory); use real models for anything about compute or quality.

Name a twin anywhere a MODEL is taken as ``twin:<name>`` (``twin:llama-3-8b``); it is written
once, deterministically, into ``<cache_dir>/twins/``. ``edgelink models twins`` lists them.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgelink.config import Config
from edgelink.errors import ModelError

PREFIX = "twin:"
TWIN_WIDTH = 256
TWIN_FF = 256
TWIN_VOCAB = 512
_FORMAT = 1  # bump when the writer changes what it writes (file names carry it)


@dataclasses.dataclass(frozen=True)
class TwinSpec:
    """A real model's geometry (from its published config) and the GGUF architecture its twin
    uses. Only ``n_layer``, ``n_head_kv``, ``head_dim`` and ``n_swa`` shape the KV state."""

    name: str
    real: str
    arch: str  # the twin's GGUF architecture: "llama" or "gemma3"
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_embd: int  # the real model's width (the twin's is TWIN_WIDTH)
    n_vocab: int  # the real model's vocabulary (the twin's is TWIN_VOCAB)
    n_ctx_train: int
    rope_freq_base: float
    n_swa: int = 0
    note: str = ""

    @property
    def kv_bytes_per_token(self) -> int:
        """f16 K and V, all layers (a sliding-window layer holds at most n_swa of them)."""
        return self.n_layer * self.n_head_kv * self.head_dim * 2 * 2


TWINS: dict[str, TwinSpec] = {s.name: s for s in (
    TwinSpec("llama-3-8b", "Meta-Llama-3-8B(-Instruct)", "llama", 32, 32, 8, 128, 4096, 128256, 8192, 500000.0),
    TwinSpec("llama-3.2-1b", "Llama-3.2-1B(-Instruct)", "llama", 16, 32, 8, 64, 2048, 128256, 131072, 500000.0),
    TwinSpec("qwen2.5-7b", "Qwen2.5-7B(-Instruct)", "llama", 28, 28, 4, 128, 3584, 152064, 32768, 1000000.0,
             note="written as the llama architecture: the same K/V cache layout (qwen2 adds q/k/v "
                  "biases, which shape no state)"),
    TwinSpec("mistral-7b", "Mistral-7B-Instruct-v0.3", "llama", 32, 32, 8, 128, 4096, 32768, 32768, 1000000.0),
    TwinSpec("gemma-3-4b", "gemma-3-4b-it", "gemma3", 34, 8, 4, 256, 2560, 262208, 131072, 1000000.0,
             n_swa=1024, note="llama.cpp gives gemma3 its 5 local : 1 global layer pattern"),
)}


def twin_spec(name: str) -> TwinSpec:
    key = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if key not in TWINS:
        raise ModelError(f"no shape twin named {key!r} (known: {', '.join(TWINS)})")
    return TWINS[key]


def twin_path(name: str, cfg: Config) -> Path:
    """The twin's GGUF in the cache, written on first use."""
    spec = twin_spec(name)
    path = Path(cfg.paths.cache_dir) / "twins" / f"{spec.name}-v{_FORMAT}.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            write_twin(spec, tmp)
            os.replace(tmp, path)  # atomic: a concurrent writer produces the same bytes
        finally:
            tmp.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------------------ the writer

# SentencePiece-style vocabulary: <unk>, <s>, </s>, byte tokens <0x00>..<0xF7> (every byte that
# can occur in UTF-8, so any text tokenizes), then single characters and filler words.
_N_SPECIAL = 3
_N_BYTES = 0xF8
MIN_VOCAB = _N_SPECIAL + _N_BYTES + 1
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_BYTE = 1, 2, 3, 6
_PIECES = ["\u2581", *"etaoinshrdlucmfwypvbgkqjxz", *"ETAOINSHRDLUCMFWYPVBGKQJXZ0123456789.,!?"]


def tiny_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    if n_vocab < MIN_VOCAB:
        raise ValueError(f"n_vocab must be >= {MIN_VOCAB} (specials and byte tokens)")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(_N_BYTES)]
    types = [_TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_CONTROL] + [_TOKEN_BYTE] * _N_BYTES
    n_extra = n_vocab - len(tokens)
    pieces = _PIECES[:n_extra] + [f"\u2581w{i}" for i in range(n_extra - len(_PIECES))]
    tokens += pieces
    types += [_TOKEN_NORMAL] * n_extra
    scores = [0.0] * (_N_SPECIAL + _N_BYTES) + [-float(i + 1) for i in range(n_extra)]
    return tokens, scores, types


@dataclasses.dataclass(frozen=True)
class _Shape:
    """The sizes ``write_gguf`` writes, defaults resolved, so each step takes one argument."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int

    @property
    def q_width(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.n_head_kv * self.head_dim


class _RandomWeights:
    """One generator for every tensor, drawn in file order: the same seed writes the same bytes."""

    def __init__(self, shape: _Shape, seed: int, dtype: str) -> None:
        self.shape = shape
        self.wtype = np.float32 if dtype == "f32" else np.float16
        self.rng = np.random.default_rng(seed)

    def mat(self, rows: int, cols: int) -> np.ndarray:  # numpy (rows, cols) = ggml ne (cols, rows)
        return (self.rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(self.wtype)

    def norm(self, n: int | None = None) -> np.ndarray:  # norms stay f32, as llama.cpp's converters write them
        n = self.shape.n_embd if n is None else n
        base = 0.0 if self.shape.arch == "gemma3" else 1.0  # gemma stores (weight - 1)
        return (base + 0.1 * self.rng.standard_normal(n, dtype=np.float32)).astype(np.float32)


def _check_gguf_args(arch: str, n_head: int, n_head_kv: int, dtype: str) -> None:
    """Refuse what llama.cpp would not load before any file is written."""
    if arch not in ("llama", "gemma3"):
        raise ValueError(f"arch must be 'llama' or 'gemma3', not {arch!r}")
    if n_head % n_head_kv:
        raise ValueError("n_head must divide by n_head_kv")
    if dtype not in ("f32", "f16"):
        raise ValueError("dtype must be 'f32' or 'f16'")


def _add_hparams(w: Any, shape: _Shape, *, name: str, n_ctx_train: int, rope_freq_base: float,
                 n_swa: int, file_type: Any) -> None:
    """The architecture keys llama.cpp reads to build the model (and its KV cache)."""
    w.add_name(name)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    if shape.head_dim != shape.n_embd // shape.n_head or shape.arch == "gemma3":
        w.add_key_length(shape.head_dim)
        w.add_value_length(shape.head_dim)
    if shape.arch == "llama":
        w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_freq_base(rope_freq_base)
    w.add_layer_norm_rms_eps(1e-6 if shape.arch == "gemma3" else 1e-5)
    if n_swa:
        w.add_sliding_window(n_swa)
    w.add_vocab_size(shape.n_vocab)
    w.add_file_type(file_type)


def _add_tokenizer(w: Any, tokens: list[str], scores: list[float], types: list[int]) -> None:
    """A SentencePiece-style tokenizer, so any text tokenizes and BOS is added as llama's is."""
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def _add_block(w: Any, weights: _RandomWeights, i: int) -> None:
    """One transformer block's tensors (gemma3 adds its q/k and post-attention/FFN norms)."""
    shape, mat, norm = weights.shape, weights.mat, weights.norm
    b = f"blk.{i}."
    w.add_tensor(b + "attn_norm.weight", norm())
    w.add_tensor(b + "attn_q.weight", mat(shape.q_width, shape.n_embd))
    w.add_tensor(b + "attn_k.weight", mat(shape.kv_width, shape.n_embd))
    w.add_tensor(b + "attn_v.weight", mat(shape.kv_width, shape.n_embd))
    w.add_tensor(b + "attn_output.weight", mat(shape.n_embd, shape.q_width))
    if shape.arch == "gemma3":
        w.add_tensor(b + "attn_q_norm.weight", norm(shape.head_dim))
        w.add_tensor(b + "attn_k_norm.weight", norm(shape.head_dim))
        w.add_tensor(b + "post_attention_norm.weight", norm())
        w.add_tensor(b + "post_ffw_norm.weight", norm())
    w.add_tensor(b + "ffn_norm.weight", norm())
    w.add_tensor(b + "ffn_gate.weight", mat(shape.n_ff, shape.n_embd))
    w.add_tensor(b + "ffn_up.weight", mat(shape.n_ff, shape.n_embd))
    w.add_tensor(b + "ffn_down.weight", mat(shape.n_embd, shape.n_ff))


def _add_tensors(w: Any, weights: _RandomWeights) -> None:
    """Every tensor, in the order the generator is drawn (embedding, blocks, output)."""
    shape = weights.shape
    w.add_tensor("token_embd.weight", weights.mat(shape.n_vocab, shape.n_embd))
    for i in range(shape.n_layer):
        _add_block(w, weights, i)
    w.add_tensor("output_norm.weight", weights.norm())
    if shape.arch == "llama":
        w.add_tensor("output.weight", weights.mat(shape.n_vocab, shape.n_embd))  # gemma ties it to token_embd


def write_gguf(path: str | os.PathLike[str], *, arch: str = "llama", name: str, n_layer: int,
               n_embd: int, n_head: int, n_head_kv: int, head_dim: int | None = None,
               n_ff: int | None = None, n_vocab: int = 256, n_ctx_train: int = 4096,
               rope_freq_base: float = 10000.0, n_swa: int = 0, seed: int = 0,
               dtype: str = "f32") -> Path:
    """Write a loadable GGUF (``llama`` or ``gemma3`` architecture) with random weights.

    ``head_dim`` may differ from ``n_embd // n_head`` (written as key/value length), which is
    how a twin keeps a real model's KV heads at a tiny width. ``seed`` changes the weights only.
    """
    import gguf

    _check_gguf_args(arch, n_head, n_head_kv, dtype)
    shape = _Shape(arch=arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
                   head_dim=head_dim or n_embd // n_head, n_ff=n_ff or 2 * n_embd, n_vocab=n_vocab)
    weights = _RandomWeights(shape, seed, dtype)
    tokens, scores, types = tiny_vocab(n_vocab)
    path = Path(path)
    w = gguf.GGUFWriter(str(path), arch)
    file_type = gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16
    _add_hparams(w, shape, name=name, n_ctx_train=n_ctx_train, rope_freq_base=rope_freq_base,
                 n_swa=n_swa, file_type=file_type)
    _add_tokenizer(w, tokens, scores, types)
    _add_tensors(w, weights)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_twin(spec: TwinSpec, path: str | os.PathLike[str]) -> Path:
    """The twin of ``spec``: its KV geometry, tiny f16 weights, a fixed seed."""
    n_head = spec.n_head_kv  # one query head per KV head: the cache is the same, compute is less
    return write_gguf(path, arch=spec.arch, name=f"edgelink-twin-{spec.name}", n_layer=spec.n_layer,
                      n_embd=TWIN_WIDTH, n_head=n_head, n_head_kv=spec.n_head_kv,
                      head_dim=spec.head_dim, n_ff=TWIN_FF, n_vocab=TWIN_VOCAB,
                      n_ctx_train=spec.n_ctx_train, rope_freq_base=spec.rope_freq_base,
                      n_swa=spec.n_swa, seed=0, dtype="f16")
