"""GGUF facts: the tiny test model, SmolLM2, parity with gguf.GGUFReader, broken files."""

from __future__ import annotations

import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf_variants import write_tiny_llama_gguf, write_weight_variant

from edgelink.api.interop import make_llama
from edgelink.errors import ModelError
from edgelink.models.gguf_meta import (
    MAX_ARRAY_ITEMS,
    ArraySummary,
    read_gguf_facts,
    read_gguf_header,
)


def _reader_value(field: gguf.ReaderField):
    if field.types[0] == gguf.GGUFValueType.ARRAY and len(field.data) > MAX_ARRAY_ITEMS:
        return len(field.data)
    return field.contents()


def assert_matches_gguf_reader(path: Path) -> None:
    """Every metadata value and tensor info agrees with the gguf package's own reader."""
    ours = read_gguf_header(path)
    ref = gguf.GGUFReader(path)
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(ours.metadata) == keys
    for key in keys:
        expected = _reader_value(ref.fields[key])
        got = ours.metadata[key]
        if isinstance(got, ArraySummary):
            assert got.count == (expected if isinstance(expected, int) else len(expected)), key
        elif isinstance(got, tuple) and got and isinstance(got[0], float):
            assert list(got) == pytest.approx(expected), key
        elif isinstance(got, tuple):
            assert list(got) == expected, key
        elif isinstance(got, float):
            assert got == pytest.approx(float(expected), rel=1e-7), key
        else:
            assert got == expected, key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for mine, theirs in zip(ours.tensors, ref.tensors, strict=True):
        assert mine.shape == tuple(int(x) for x in theirs.shape), mine.name
        assert mine.ggml_type == int(theirs.tensor_type), mine.name
        assert mine.offset == theirs.data_offset, mine.name
        assert mine.nbytes == theirs.n_bytes, mine.name


# ----------------------------------------------------------------------------- tiny model

def test_tiny_facts(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    f = read_gguf_facts(path)
    assert (f.architecture, f.name, f.block_count, f.embedding_length) == ("llama", "edgelink-tiny-llama", 2, 64)
    assert (f.head_count, f.head_count_kv, f.key_length, f.value_length, f.head_dim) == (4, 2, 16, 16, 16)
    assert (f.norm_type, f.rope_freq_base, f.rope_dimension_count) == ("rms", 10000.0, 16)
    assert f.norm_eps == pytest.approx(1e-5)
    assert (f.rope_scaling_type, f.rope_scaling_factor, f.sliding_window) == (None, None, None)
    assert (f.vocab_size, f.context_length, f.feed_forward_length) == (256, 4096, 128)
    assert (f.bos_token_id, f.eos_token_id, f.unk_token_id, f.pad_token_id) == (1, 2, 0, None)
    assert (f.file_type, f.file_type_name, f.tensor_count, f.gguf_version) == (0, "ALL_F32", 21, 3)
    assert_matches_gguf_reader(path)


def test_tiny_shapes_follow_arguments(tmp_path):
    f = read_gguf_facts(write_tiny_llama_gguf(tmp_path / "t.gguf", n_layer=3, n_embd=96, n_head=6,
                                              n_head_kv=1, n_vocab=300, dtype="f16"))
    assert (f.block_count, f.embedding_length, f.head_count, f.head_count_kv) == (3, 96, 6, 1)
    assert (f.head_dim, f.vocab_size, f.file_type_name, f.tensor_count) == (16, 300, "MOSTLY_F16", 30)
    with pytest.raises(ValueError):
        write_tiny_llama_gguf(tmp_path / "bad.gguf", n_vocab=100)


def test_seed_changes_weights_only(tmp_path):
    a = write_tiny_llama_gguf(tmp_path / "a.gguf", seed=0)
    b = write_tiny_llama_gguf(tmp_path / "b.gguf", seed=1)
    a2 = write_tiny_llama_gguf(tmp_path / "a2.gguf", seed=0)
    assert read_gguf_facts(a) == read_gguf_facts(b)
    ha, hb = read_gguf_header(a), read_gguf_header(b)
    assert ha.metadata == hb.metadata and ha.tensors == hb.tensors
    assert a.stat().st_size == b.stat().st_size
    assert a.read_bytes() != b.read_bytes()
    assert a.read_bytes() == a2.read_bytes()  # deterministic


def test_weight_variant_of_tiny(tmp_path):
    src = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    dst = write_weight_variant(src, tmp_path / "variant.gguf")
    assert read_gguf_facts(dst) == read_gguf_facts(src)
    old, new = src.read_bytes(), dst.read_bytes()
    assert len(old) == len(new) and old != new
    info = read_gguf_header(src).tensor("output_norm.weight")
    diff = np.nonzero(np.frombuffer(old, np.uint8) != np.frombuffer(new, np.uint8))[0]
    assert info.offset <= diff.min() and diff.max() < info.offset + info.nbytes
    with pytest.raises(ValueError, match="not f32/f16"):
        write_weight_variant(_quantized_copy(tmp_path), tmp_path / "x.gguf", tensor="q")


def _quantized_copy(tmp_path: Path) -> Path:
    """A metadata-only-ish GGUF with one Q8_0 tensor (for the variant's type check)."""
    path = tmp_path / "q.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("q", np.zeros((1, 34), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _metadata_only(tmp_path: Path, arch: str, build) -> Path:
    path = tmp_path / f"{arch}.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    build(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_optional_keys(tmp_path):
    def build(w: gguf.GGUFWriter) -> None:
        w.add_block_count(4)
        w.add_embedding_length(128)
        w.add_head_count(2)  # no head_count_kv: defaults to head_count
        w.add_key_length(80)
        w.add_value_length(48)
        w.add_layer_norm_eps(1e-6)
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)
        w.add_sliding_window(256)
        w.add_vocab_size(1000)  # no tokenizer: vocab_size falls back to {arch}.vocab_size
        w.add_pad_token_id(7)

    f = read_gguf_facts(_metadata_only(tmp_path, "gpt2", build))
    assert (f.architecture, f.head_count_kv, f.key_length, f.value_length) == ("gpt2", 2, 80, 48)
    assert f.norm_type == "layer" and f.norm_eps == pytest.approx(1e-6)
    assert (f.rope_scaling_type, f.rope_scaling_factor, f.sliding_window) == ("linear", 4.0, 256)
    assert (f.rope_freq_base, f.rope_dimension_count, f.context_length) == (None, None, None)
    assert (f.vocab_size, f.pad_token_id, f.bos_token_id, f.name, f.file_type) == (1000, 7, None, None, None)
    assert f.tensor_count == 0


def test_missing_required_keys(tmp_path):
    with pytest.raises(ModelError, match="missing or invalid llama.block_count"):
        read_gguf_facts(_metadata_only(tmp_path, "llama", lambda w: w.add_embedding_length(8)))
    path = tmp_path / "noarch.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.kv_data[0].pop("general.architecture")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(ModelError, match="no general.architecture"):
        read_gguf_facts(path)


# ----------------------------------------------------------------------------- broken files

@pytest.mark.parametrize("content, message", [
    (b"", "not a GGUF file"),
    (b"hello world, this is not a model at all", "not a GGUF file"),
    (b"GGUF", "truncated"),
    (b"GGUF" + (1).to_bytes(4, "little") + bytes(16), "unsupported GGUF version 1"),
    (b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (10**12).to_bytes(8, "little"),
     "truncated"),
])
def test_not_gguf(tmp_path, content, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=message):
        read_gguf_facts(path)


def test_truncated_anywhere_is_a_model_error(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    data = path.read_bytes()
    header = read_gguf_header(path)
    cut = tmp_path / "cut.gguf"
    # In the kv section, in a string array, in the tensor infos, in the data, the last byte.
    for n in (30, 200, 3000, header.data_offset - 10, header.data_offset + 100, len(data) - 1):
        cut.write_bytes(data[:n])
        with pytest.raises(ModelError, match="truncated"):
            read_gguf_facts(cut)


def test_unreadable_paths(tmp_path):
    with pytest.raises(ModelError):
        read_gguf_facts(tmp_path / "missing.gguf")
    with pytest.raises(ModelError):
        read_gguf_facts(tmp_path)


def test_big_endian_file(tmp_path):
    path = tmp_path / "be.gguf"
    w = gguf.GGUFWriter(str(path), "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_token_list([f"t{i}" for i in range(2000)])
    w.add_tensor("x", np.arange(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = read_gguf_facts(path)
    assert (f.block_count, f.embedding_length, f.head_count, f.vocab_size, f.tensor_count) == (2, 64, 4, 2000, 1)


# ----------------------------------------------------------------------------- SmolLM2

@pytest.mark.slow
def test_smollm2_facts(smollm2_path):
    read_gguf_facts(smollm2_path)  # page the header in once
    t0 = time.perf_counter()
    f = read_gguf_facts(smollm2_path)
    elapsed = time.perf_counter() - t0
    print(f"read_gguf_facts(SmolLM2): {elapsed * 1e3:.1f} ms")
    assert elapsed < 1.0
    assert (f.architecture, f.block_count, f.embedding_length) == ("llama", 30, 576)
    assert (f.head_count, f.head_count_kv, f.head_dim, f.key_length) == (9, 3, 64, 64)
    assert (f.vocab_size, f.context_length, f.rope_freq_base, f.rope_dimension_count) == (49152, 8192, 100000.0, 64)
    assert (f.norm_type, f.basename, f.file_type_name, f.tensor_count) == ("rms", "smollm2", "MOSTLY_Q4_1", 272)
    assert (f.bos_token_id, f.eos_token_id, f.pad_token_id, f.unk_token_id) == (1, 2, 2, 0)
    assert f.sliding_window is None and f.rope_scaling_type is None


@pytest.mark.slow
def test_smollm2_matches_gguf_reader(smollm2_path):
    assert_matches_gguf_reader(smollm2_path)  # GGUFReader itself takes seconds here


@pytest.mark.slow
def test_smollm2_weight_variant(smollm2_path, tmp_path):
    variant = write_weight_variant(smollm2_path, tmp_path / "variant.gguf")
    assert read_gguf_facts(variant) == read_gguf_facts(smollm2_path)
    assert read_gguf_header(variant).metadata == read_gguf_header(smollm2_path).metadata


# ----------------------------------------------------------------------------- llama.cpp

@pytest.mark.slow
def test_llama_cpp_loads_tiny_and_variant(smollm2_path, tmp_path):
    files = {
        "tiny0": write_tiny_llama_gguf(tmp_path / "tiny0.gguf", seed=0),
        "tiny1": write_tiny_llama_gguf(tmp_path / "tiny1.gguf", seed=1),
        "tiny_f16": write_tiny_llama_gguf(tmp_path / "tiny16.gguf", dtype="f16", n_vocab=300),
        "smollm2": smollm2_path,
        "variant": write_weight_variant(smollm2_path, tmp_path / "variant.gguf"),
    }
    text = "Hello, world! ünïcode ✓\n"
    logits = {}
    for key, path in files.items():
        model = make_llama(str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False)
        try:
            tokens = model.tokenize(text.encode())
            assert model.detokenize(tokens) == text.encode(), key
            model.eval(tokens)
            row = np.array(model.scores[model.n_tokens - 1])
            assert np.isfinite(row).all() and np.abs(row).max() > 0, key
            logits[key] = row
        finally:
            model.close()
    assert not np.allclose(logits["tiny0"], logits["tiny1"])
    assert not np.allclose(logits["smollm2"], logits["variant"])
