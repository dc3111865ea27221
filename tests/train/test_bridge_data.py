"""Bridge data splits (edgelink/train/data.py): built from the PyPI archives, fixed by the seed."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from edgelink.train import data


def _cfg_at(cfg, cache_dir):
    """``cfg`` with another cache dir, holding copies of the archives in the real one."""
    dst = cache_dir / "data"
    dst.mkdir(parents=True, exist_ok=True)
    for package in (data._VADER, data._BBC):
        path = data._fetch(cfg, *package, sdist=package is data._VADER)  # once per machine
        shutil.copy2(path, dst / path.name)
    return dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, cache_dir=cache_dir))


@pytest.fixture(scope="module")
def two_caches(cfg, tmp_path_factory):
    """Two independent cache dirs: splits built in each must be byte-identical."""
    return (_cfg_at(cfg, tmp_path_factory.mktemp("cache_a")),
            _cfg_at(cfg, tmp_path_factory.mktemp("cache_b")))


@pytest.mark.parametrize("task", data.TASKS)
def test_splits_are_deterministic_disjoint_and_plausible(task, two_caches):
    a, b = two_caches
    counts = data.build_splits(task, a, seed=0)
    assert data.build_splits(task, b, seed=0) == counts
    for name in ("train", "dev"):
        assert data.load_split(task, name, a) == data.load_split(task, name, b)
    for name in data.SPLITS:
        assert (data.split_dir(task, a, 0) / f"{name}.jsonl").read_bytes() == \
            (data.split_dir(task, b, 0) / f"{name}.jsonl").read_bytes()

    splits = {name: data.load_split(task, name, a) for name in data.SPLITS}
    assert {k: len(v) for k, v in splits.items()} == counts
    texts = {name: {e.text for e in rows} for name, rows in splits.items()}
    for name, rows in splits.items():
        assert len(texts[name]) == len(rows), f"duplicate texts inside {name}"
    assert not texts["train"] & texts["dev"]
    assert not texts["train"] & texts["test"]
    assert not texts["dev"] & texts["test"]

    total = sum(counts.values())
    if task == "sentiment":  # 10,605 snippets, minus near-neutral ones and duplicates
        assert 9_000 < total <= 10_605
        labels = {"negative", "positive"}
    else:  # 2,225 articles minus about 120 duplicates
        assert 2_000 < total <= 2_225
        labels = {"business", "entertainment", "politics", "sports", "tech"}
    for name, frac in zip(data.SPLITS, data.FRACTIONS, strict=True):
        assert abs(counts[name] / total - frac) < 0.01
    meta = data.split_meta(task, a)
    print(f"\n{task}: counts {counts}")
    for name, rows in splits.items():
        balance = data.label_balance(rows)
        assert set(balance) == labels
        print(f"  {name} balance " + ", ".join(f"{k} {v:.3f}" for k, v in balance.items()))
        assert meta["labels"][name] == {k: sum(e.label == k for e in rows) for k in sorted(labels)}
        # Stratified: each split's label mix matches the whole set's within a point.
        whole = data.label_balance([e for r in splits.values() for e in r])
        assert all(abs(balance[k] - whole[k]) < 0.01 for k in labels)
    assert all(e.text and e.label in labels for e in splits["train"])


def test_seed_changes_the_split_but_not_the_set(two_caches):
    a, _ = two_caches
    data.build_splits("topic", a, seed=0)
    data.build_splits("topic", a, seed=1)
    s0 = {n: data.load_split("topic", n, a, seed=0) for n in data.SPLITS}
    s1 = {n: data.load_split("topic", n, a, seed=1) for n in data.SPLITS}
    assert s0["train"] != s1["train"]
    assert sorted(e.text for r in s0.values() for e in r) == \
        sorted(e.text for r in s1.values() for e in r)


def test_test_split_needs_its_name(two_caches):
    a, _ = two_caches
    with pytest.raises(TypeError):
        data.load_split("topic", cfg=a)  # no default split
    with pytest.raises(ValueError):
        data.load_split("topic", "validation", a)
    with pytest.raises(ValueError):
        data.load_split("nope", "train", a)
