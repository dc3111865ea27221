"""Per-model residual norms: the yardstick of the RESIDUAL_PATCH norm gate.

The norm of the residual stream after each layer is measured once per model (weights digest)
on a fixed text and cached as JSON under ``<paths.cache_dir>/latent``. The statistic is the
median over tokens of the L2 norm of each token's row, leaving out the first token: many
models park huge activations on it (an attention sink), which would inflate a mean.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgelink.config import Config
from edgelink.errors import StateError
from edgelink.files import write_atomic
from edgelink.models.digest import weights_digest
from edgelink.runtime.evalhook import capture, require_hook

CALIBRATION_VERSION = 1
CALIBRATION_TEXT = (
    "The river rose slowly through the night, and by morning the fields along the valley were "
    "under water. Farmers moved their animals to higher ground while volunteers stacked sandbags "
    "around the old mill. A teacher wrote a letter to the council asking for a new bridge, and the "
    "council promised to discuss it at the next meeting. In the afternoon the sun came out, the "
    "children counted boats on the flooded road, and somebody played a violin on the church steps."
)


def cache_path(rt, cfg: Config) -> Path:
    digest = weights_digest(rt.path, cfg)
    return cfg.paths.cache_dir / "latent" / f"norms-v{CALIBRATION_VERSION}-{digest[:32]}.json"


def measure_norms(rt) -> np.ndarray:
    """Measure now (the runtime's sequence is saved and restored around the measurement)."""
    require_hook(rt)
    saved = (np.array(rt.export_state(), copy=True), list(rt.tokens), rt.logits) if rt.tokens else None
    rt.clear()
    try:
        tokens = rt.tokenize(CALIBRATION_TEXT)
        acts = capture(rt, tokens, range(rt.n_layer))
    finally:
        rt.clear()
        if saved is not None:
            rt.import_state(*saved)
    return np.array([float(np.median(np.linalg.norm(acts[layer][1:], axis=1))) for layer in range(rt.n_layer)],
                    dtype=np.float64)


def residual_norms(rt, cfg: Config) -> np.ndarray:
    """The cached per-layer norms for this model, measured on first use."""
    path = cache_path(rt, cfg)
    try:
        data = json.loads(path.read_text())
        norms = np.asarray(data["norms"], dtype=np.float64)
        if norms.shape == (rt.n_layer,) and np.isfinite(norms).all() and (norms > 0).all():
            return norms
    except (OSError, ValueError, KeyError, TypeError):
        pass
    norms = measure_norms(rt)
    if not (np.isfinite(norms).all() and (norms > 0).all()):
        raise StateError("residual norm calibration produced non-positive or non-finite norms")
    write_atomic(path, json.dumps({"version": CALIBRATION_VERSION, "model": str(rt.path),
                                   "statistic": "median token L2, first token excluded",
                                   "norms": norms.tolist()}).encode())
    return norms
