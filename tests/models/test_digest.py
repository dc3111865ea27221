"""Weights digest: blake3 of the whole file, cached in a sidecar that size/mtime changes invalidate."""

from __future__ import annotations

import json
import os
import time

import blake3
import pytest
from gguf_variants import write_tiny_llama_gguf, write_weight_variant

import edgelink.models.digest as digest_mod
from edgelink.config import load_config
from edgelink.errors import ModelError
from edgelink.models.digest import sidecar_path, weights_digest

HOUR_NS = 3600 * 10**9


@pytest.fixture
def tmp_cfg(tmp_path):
    return load_config().replace(paths_cache_dir=tmp_path / "cache")


@pytest.fixture
def counter(monkeypatch):
    """Counts real hashing passes (every call of edgelink.models.digest.hash_file)."""
    calls: list[str] = []
    real = digest_mod.hash_file

    def counting(path):
        calls.append(os.fspath(path))
        return real(path)

    monkeypatch.setattr(digest_mod, "hash_file", counting)
    return calls


def _age(path, ns: int = HOUR_NS) -> None:
    """Backdate a file's mtime: freshly written files are deliberately not cached (racy window)."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - ns))


def test_digest_is_blake3_of_the_file(tmp_path, tmp_cfg):
    model = write_tiny_llama_gguf(tmp_path / "m.gguf")
    assert weights_digest(model, tmp_cfg) == blake3.blake3(model.read_bytes()).hexdigest()
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert weights_digest(empty, tmp_cfg) == blake3.blake3(b"").hexdigest()


def test_second_call_uses_the_sidecar(tmp_path, tmp_cfg, counter):
    model = write_tiny_llama_gguf(tmp_path / "m.gguf")
    _age(model)
    first = weights_digest(model, tmp_cfg)
    assert len(counter) == 1
    assert weights_digest(model, tmp_cfg) == first
    assert weights_digest(str(model), tmp_cfg) == first
    assert len(counter) == 1  # not rehashed
    entry = json.loads(sidecar_path(tmp_cfg).read_text())["entries"][str(model.resolve())]
    assert entry == {"size": model.stat().st_size, "mtime_ns": model.stat().st_mtime_ns,
                     "blake3": first}
    # A symlink (or a relative path) to the same file shares the entry.
    link = tmp_path / "link.gguf"
    link.symlink_to(model)
    assert weights_digest(link, tmp_cfg) == first and len(counter) == 1


def test_mtime_change_invalidates(tmp_path, tmp_cfg, counter):
    model = write_tiny_llama_gguf(tmp_path / "m.gguf", seed=0)
    _age(model, 2 * HOUR_NS)
    d0 = weights_digest(model, tmp_cfg)
    # Same architecture, same size, other weights, written in place: the mtime moves.
    write_tiny_llama_gguf(model, seed=1)
    _age(model, HOUR_NS)
    d1 = weights_digest(model, tmp_cfg)
    assert d1 != d0 and len(counter) == 2
    # Touching alone (same bytes) also forces a rehash, giving the same digest.
    _age(model, -10**6)
    assert weights_digest(model, tmp_cfg) == d1 and len(counter) == 3


def test_size_change_invalidates(tmp_path, tmp_cfg, counter):
    model = write_tiny_llama_gguf(tmp_path / "m.gguf")
    _age(model)
    mtime = model.stat().st_mtime_ns
    d0 = weights_digest(model, tmp_cfg)
    with open(model, "ab") as fh:
        fh.write(b"\0")
    os.utime(model, ns=(mtime, mtime))  # same mtime, different size
    d1 = weights_digest(model, tmp_cfg)
    assert d1 != d0 and len(counter) == 2


def test_recently_modified_file_is_not_cached(tmp_path, tmp_cfg, counter):
    model = write_tiny_llama_gguf(tmp_path / "m.gguf")
    weights_digest(model, tmp_cfg)
    weights_digest(model, tmp_cfg)
    assert len(counter) == 2
    assert not sidecar_path(tmp_cfg).exists()


def test_corrupt_sidecar_is_recomputed_and_overwritten(tmp_path, tmp_cfg, counter):
    model = write_tiny_llama_gguf(tmp_path / "m.gguf")
    _age(model)
    side = sidecar_path(tmp_cfg)
    side.parent.mkdir(parents=True)
    for garbage in (b"{not json", b"[1, 2]", b'{"version": 1, "entries": {"x": 1}}', b"\xff\xfe"):
        side.write_bytes(garbage)
        counter.clear()
        d = weights_digest(model, tmp_cfg)
        assert d == blake3.blake3(model.read_bytes()).hexdigest() and len(counter) == 1
        data = json.loads(side.read_text())
        assert data["version"] == 1 and data["entries"][str(model.resolve())]["blake3"] == d
    # A tampered entry whose digest is not hex is ignored.
    data["entries"][str(model.resolve())]["blake3"] = "nope"
    side.write_text(json.dumps(data))
    counter.clear()
    assert weights_digest(model, tmp_cfg) == d and len(counter) == 1
    assert not [n for n in os.listdir(side.parent) if n.endswith(".tmp")]


def test_sidecar_keeps_other_entries_and_drops_vanished_files(tmp_path, tmp_cfg):
    a = write_tiny_llama_gguf(tmp_path / "a.gguf", seed=1)
    b = write_tiny_llama_gguf(tmp_path / "b.gguf", seed=2)
    c = write_tiny_llama_gguf(tmp_path / "c.gguf", seed=3)
    for p in (a, b, c):
        _age(p)
        weights_digest(p, tmp_cfg)
    entries = json.loads(sidecar_path(tmp_cfg).read_text())["entries"]
    assert set(entries) == {str(p.resolve()) for p in (a, b, c)}
    assert len({e["blake3"] for e in entries.values()}) == 3
    b.unlink()
    a2 = write_tiny_llama_gguf(tmp_path / "a.gguf", seed=4)
    _age(a2, HOUR_NS // 2)
    weights_digest(a2, tmp_cfg)
    entries = json.loads(sidecar_path(tmp_cfg).read_text())["entries"]
    assert set(entries) == {str(a.resolve()), str(c.resolve())}


def test_missing_file_is_a_model_error(tmp_path, tmp_cfg):
    with pytest.raises(ModelError, match="cannot read model file"):
        weights_digest(tmp_path / "nope.gguf", tmp_cfg)
    with pytest.raises(ModelError):
        weights_digest(tmp_path, tmp_cfg)


@pytest.mark.slow
def test_smollm2_digest_and_variant(smollm2_path, tmp_path, tmp_cfg, counter):
    # On a fresh machine the model was just pulled: wait out the racy window so it is cached.
    fresh_ns = digest_mod.RACY_WINDOW_NS - (time.time_ns() - smollm2_path.stat().st_mtime_ns)
    if fresh_ns > 0:
        time.sleep(fresh_ns / 1e9 + 0.05)
    t0 = time.perf_counter()
    cold = weights_digest(smollm2_path, tmp_cfg)
    t_cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = weights_digest(smollm2_path, tmp_cfg)
    t_warm = time.perf_counter() - t0
    assert cold == warm and len(counter) == 1
    assert t_warm < 0.05, f"cached digest took {t_warm:.3f}s"
    print(f"SmolLM2 blake3: cold {t_cold * 1e3:.1f} ms, warm {t_warm * 1e3:.2f} ms")
    variant = write_weight_variant(smollm2_path, tmp_path / "variant.gguf")
    assert variant.stat().st_size == smollm2_path.stat().st_size
    assert weights_digest(variant, tmp_cfg) != cold
