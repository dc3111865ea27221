"""Sender features: the source model's residual rows after one layer, captured by llama.cpp
through edgelink's eval hook, cached on disk per (task, split, layer, source weights).

A cache file ``<cache_dir>/data/features/<task>-s<seed>-<split>-l<layer>-<digest12>.npz`` holds
``rows`` f16 [sum T_i, d] (every position of every text, the BOS row included) and ``offsets``
i64 [N + 1]; text i owns ``rows[offsets[i]:offsets[i+1]]``. f16 halves the disk and memory cost.
Training and evaluation therefore see f16-rounded rows, while a live handoff's bridge sees the
hook's f32 rows; the evaluation measures the gap on every test text (relative difference about
4e-4). A cache covers the first N examples of a split; asking for more recomputes it.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from edgelink.runtime.evalhook import capture
from edgelink.runtime.llama import LlamaRuntime
from edgelink.train.data import Example, data_dir, load_split

SKIP = 1  # rows a bridge drops from the front of each text's rows: the BOS row


def mean_pool(rows: np.ndarray) -> np.ndarray:
    """One text's rows [T, d] averaged over every position but the first ``SKIP`` (all of them
    when that is all there is): the pooling of the probe, ridge and the layer curve."""
    return (rows[SKIP:] if len(rows) > SKIP else rows).mean(axis=0)


@dataclasses.dataclass
class Features:
    """Ragged per-text rows; ``rows_of(i)`` is f32 [T_i, d]."""

    rows: np.ndarray
    offsets: np.ndarray
    layer: int

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def rows_of(self, i: int) -> np.ndarray:
        return self.rows[self.offsets[i]:self.offsets[i + 1]].astype(np.float32)

    def subset(self, n: int) -> Features:
        n = min(n, len(self))
        return Features(self.rows[:self.offsets[n]], self.offsets[:n + 1].copy(), self.layer)

    @property
    def d(self) -> int:
        return int(self.rows.shape[1])


def extract(rt: LlamaRuntime, texts: Sequence[str], layer: int,
            progress: Callable[[int, int], None] | None = None) -> Features:
    """Prefill each text alone and keep its rows after ``layer``."""
    chunks, offsets = [], [0]
    for i, text in enumerate(texts):
        rt.clear()
        rows = capture(rt, rt.tokenize(text), [layer], stop_early=True)[layer]
        chunks.append(rows.astype(np.float16))
        offsets.append(offsets[-1] + len(rows))
        if progress:
            progress(i + 1, len(texts))
    rt.clear()
    d = chunks[0].shape[1] if chunks else 0
    rows = np.concatenate(chunks) if chunks else np.zeros((0, d), np.float16)
    return Features(rows, np.asarray(offsets, dtype=np.int64), layer)


def cache_path(cfg, task: str, split: str, layer: int, weights_digest: str, seed: int = 0) -> Path:
    return (data_dir(cfg) / "features"
            / f"{task}-s{seed}-{split}-l{layer}-{weights_digest[:12]}.npz")


def _bar(label: str) -> Callable[[int, int], None]:
    t0 = time.perf_counter()

    def show(i: int, n: int) -> None:
        if i == n or i % 50 == 0:
            rate = i / max(time.perf_counter() - t0, 1e-9)
            sys.stderr.write(f"\r{label}: {i}/{n} texts ({rate:.0f}/s)")
            if i == n:
                sys.stderr.write("\n")
            sys.stderr.flush()
    return show


def split_features(rt: LlamaRuntime, cfg, task: str, split: str, layer: int, n: int,
                   weights_digest: str, seed: int = 0, quiet: bool = False
                   ) -> tuple[list[Example], Features]:
    """The first ``n`` examples of a split and their features, from the cache when it holds
    at least ``n`` of them."""
    examples = load_split(task, split, cfg, seed)[:n]
    path = cache_path(cfg, task, split, layer, weights_digest, seed)
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            feats = Features(z["rows"], z["offsets"], layer)
        if len(feats) >= len(examples):
            return examples, feats.subset(len(examples))
    feats = extract(rt, [ex.text for ex in examples], layer,
                    None if quiet else _bar(f"{task} {split} layer {layer}"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, rows=feats.rows, offsets=feats.offsets)
    tmp.replace(path)
    return examples, feats
