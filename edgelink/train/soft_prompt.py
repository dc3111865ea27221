"""A soft prompt on disk (numpy only, so the evaluation needs no torch): ``<stem>.npz`` holds
the K rows, f32 [K, d] in the receiver's token-row space, and ``<stem>.json`` says what they
are, which target model they were trained for (its full signature) and how
(``edgelink.train.prompt_tuning``). The receiver reads them where a bridge's vectors go, followed by
the text itself (``tail_ids``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from edgelink.runtime.llama import LlamaRuntime

FORMAT = 1


def tail_ids(rt: LlamaRuntime, text: str, after: str) -> list[int]:
    """The tokens that follow the soft rows: the review, then the prompt's tail."""
    return rt.tokenize(f" {text}{after}", add_special=False)


def save_soft_prompt(stem: str | Path, rows: np.ndarray, target_sig: dict[str, Any],
                     training: dict[str, Any]) -> tuple[Path, Path]:
    """``<stem>.npz`` (rows f32 [K, d]) and ``<stem>.json`` (what they are, for whom, how made)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    npz, manifest = stem.with_suffix(".npz"), stem.with_suffix(".json")
    np.savez(npz, rows=np.asarray(rows, dtype=np.float32))
    meta = {"format": FORMAT, "kind": "soft_prompt", "k": int(rows.shape[0]),
            "d_tgt": int(rows.shape[1]), "target": target_sig, "training": training,
            "weights_file": npz.name,
            "weights_sha256": hashlib.sha256(npz.read_bytes()).hexdigest()}
    manifest.write_text(json.dumps(meta, indent=1, default=str) + "\n")
    return manifest, npz


def load_soft_prompt(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """(rows f32 [K, d], manifest) from either file of a saved soft prompt; the npz must match
    the manifest's sha256."""
    p = Path(path)
    meta = json.loads(p.with_suffix(".json").read_text())
    if meta.get("kind") != "soft_prompt":
        raise ValueError(f"{p}: not a soft prompt (kind {meta.get('kind')!r})")
    npz = p.with_suffix(".json").parent / meta["weights_file"]
    if hashlib.sha256(npz.read_bytes()).hexdigest() != meta["weights_sha256"]:
        raise ValueError(f"{npz}: sha256 differs from the manifest's")
    with np.load(npz) as z:
        rows = z["rows"].astype(np.float32)
    if rows.shape != (meta["k"], meta["d_tgt"]) or not np.isfinite(rows).all():
        raise ValueError(f"{npz}: rows {rows.shape} do not match the manifest, or are not finite")
    return rows, meta
