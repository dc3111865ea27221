"""Test helpers that make GGUF files: a tiny random llama, and a weight variant of a real model.

Imported by tests (not collected itself). Both kinds of file keep an architecture while changing
the weights, which is what the handshake's weights digest must catch.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import gguf
import numpy as np

from edgelink.gguf_meta import read_gguf_header

TINY_NAME = "edgelink-tiny-llama"

# SentencePiece-style vocabulary: <unk>, <s>, </s>, byte tokens <0x00>..<0xF7> (every byte that
# can occur in UTF-8, so any text tokenizes), then plain pieces: the word-boundary mark "\u2581"
# (decoded back to a space) and single characters, then filler words.
_N_SPECIAL = 3
_N_BYTES = 0xF8
_MIN_VOCAB = _N_SPECIAL + _N_BYTES + 1
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_BYTE = 1, 2, 3, 6
_PIECES = ["\u2581", *"etaoinshrdlucmfwypvbgkqjxz", *"ETAOINSHRDLUCMFWYPVBGKQJXZ0123456789.,!?"]


def _tiny_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    if n_vocab < _MIN_VOCAB:
        raise ValueError(f"n_vocab must be >= {_MIN_VOCAB} (specials and byte tokens)")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(_N_BYTES)]
    types = [_TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_CONTROL] + [_TOKEN_BYTE] * _N_BYTES
    n_extra = n_vocab - len(tokens)
    pieces = _PIECES[:n_extra] + [f"\u2581w{i}" for i in range(n_extra - len(_PIECES))]
    tokens += pieces
    types += [_TOKEN_NORMAL] * n_extra
    scores = [0.0] * (_N_SPECIAL + _N_BYTES) + [-float(i + 1) for i in range(n_extra)]
    return tokens, scores, types


def write_tiny_llama_gguf(path: str | os.PathLike[str], *, n_layer: int = 2, n_embd: int = 64,
                          n_head: int = 4, n_head_kv: int = 2, n_vocab: int = 256, seed: int = 0,
                          n_ff: int | None = None, n_ctx_train: int = 4096,
                          dtype: str = "f32") -> Path:
    """Write a tiny, loadable llama-architecture GGUF with random weights.

    ``seed`` changes the weights only: files written with different seeds have identical
    metadata and tensor shapes (and the same size), so only a weights digest tells them apart.
    """
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must divide by n_head, and n_head by n_head_kv")
    if dtype not in ("f32", "f16"):
        raise ValueError("dtype must be 'f32' or 'f16'")
    path = Path(path)
    n_ff = n_ff or 2 * n_embd
    head_dim = n_embd // n_head
    wtype = np.float32 if dtype == "f32" else np.float16
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int) -> np.ndarray:  # numpy (rows, cols) = ggml ne (cols, rows)
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(wtype)

    def norm() -> np.ndarray:  # norms stay f32, as llama.cpp's converters write them
        return (1.0 + 0.1 * rng.standard_normal(n_embd, dtype=np.float32)).astype(np.float32)

    tokens, scores, types = _tiny_vocab(n_vocab)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(TINY_NAME)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    w.add_tensor("token_embd.weight", mat(n_vocab, n_embd))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        w.add_tensor(f"blk.{i}.attn_q.weight", mat(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.attn_k.weight", mat(n_head_kv * head_dim, n_embd))
        w.add_tensor(f"blk.{i}.attn_v.weight", mat(n_head_kv * head_dim, n_embd))
        w.add_tensor(f"blk.{i}.attn_output.weight", mat(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        w.add_tensor(f"blk.{i}.ffn_gate.weight", mat(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", mat(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", mat(n_embd, n_ff))
    w.add_tensor("output_norm.weight", norm())
    w.add_tensor("output.weight", mat(n_vocab, n_embd))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_weight_variant(src_gguf: str | os.PathLike[str], dst_path: str | os.PathLike[str], *,
                         tensor: str | None = None, scale: float = 1.01) -> Path:
    """Copy a GGUF and scale one f32/f16 tensor's values, leaving every other byte as it is.

    The metadata, tensor names, shapes, types and offsets stay identical (so is the file size):
    the architecture facts match the source's while the weights digest differs. By default the
    final norm (``output_norm.weight``) is scaled, which changes the logits slightly but keeps the
    model sane. The bytes are patched in place rather than re-serialized with ``gguf.GGUFWriter``:
    a rewrite would re-derive every metadata value's type and take seconds for a real vocabulary.
    """
    header = read_gguf_header(src_gguf)
    float_types = {int(gguf.GGMLQuantizationType.F32): np.float32,
                   int(gguf.GGMLQuantizationType.F16): np.float16}
    if tensor is None:
        names = [t.name for t in header.tensors if t.ggml_type in float_types]
        if not names:
            raise ValueError(f"{src_gguf} has no f32/f16 tensor to perturb")
        tensor = "output_norm.weight" if "output_norm.weight" in names else names[-1]
    info = header.tensor(tensor)
    if info.ggml_type not in float_types:
        raise ValueError(f"tensor {tensor!r} is not f32/f16")
    dst = Path(dst_path)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src_gguf, tmp)
    with open(tmp, "r+b") as fh:
        fh.seek(info.offset)
        values = np.frombuffer(fh.read(info.nbytes), dtype=float_types[info.ggml_type]).copy()
        changed = (values * scale).astype(values.dtype)
        if np.array_equal(changed, values):  # all zeros: shift instead
            changed = (values + 0.01).astype(values.dtype)
        fh.seek(info.offset)
        fh.write(changed.tobytes())
    os.replace(tmp, dst)
    return dst
