"""The closed-form baseline bridge (issue #5): ridge regression from SmolLM2's pooled hidden
state to K Gemma token-embedding rows that spell the label.

* **Features.** For each text, SmolLM2's residual after ``layer`` (``l_out-15`` by default, the
  middle of 30 layers), captured by llama.cpp through edgelink's eval hook
  (``edgelink.runtime.evalhook.capture``), mean-pooled over positions with the first position
  dropped (it carries the attention-sink outlier; as ``api_latent.mean_activation`` does), then
  standardized with the train subset's per-dimension mean and std.
* **Targets.** Gemma's stored ``token_embd`` rows (before its sqrt(n_embd) input scale, the
  VIRTUAL_PREFIX space) of the last K tokens of ``"Review sentiment: <label>"``: K=1 is the row
  of `` positive`` / `` negative``, K=2 adds ``:`` before it, and so on. The constant rows are
  fitted by the bias; only the label row depends on the input. A receiver fed the prefix reads,
  approximately, "sentiment: positive".
* **Fit.** Y - mean(Y) = Z W by ridge, W = (Z'Z + lambda I)^-1 Z'(Y - mean(Y)), b = mean(Y),
  in float64 numpy; lambda picked on a dev subset by nearest-label accuracy (ties: lower MSE).
  The train subset is the first ``n`` examples of the seeded, already shuffled train split.

    python -m edgelink.train.ridge --out DIR --n 200     # DIR/sentiment-ridge-k1-l15.{json,npz}
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgelink.bridge import export_bridge
from edgelink.config import Config, load_config
from edgelink.models.resolve import resolve_model
from edgelink.runtime.embeddings import TokenEmbeddings
from edgelink.runtime.evalhook import capture
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.signature import model_signature
from edgelink.train.data import Example, load_split
from edgelink.train.features import SKIP, Features, mean_pool, split_features
from edgelink.train.tasks import task_prompt

SOURCE = "smollm2-135m"
TARGET = "gemma3-270m"
LAYER = 15
TEMPLATE = "Review sentiment: {label}"
LAMBDAS = (1.0, 10.0, 100.0, 1_000.0, 10_000.0)


def pooled_features(rt: LlamaRuntime, texts: Sequence[str], layer: int) -> np.ndarray:
    """f64 [N, n_embd]: each text's residual after ``layer``, mean over positions but the first."""
    out = []
    for text in texts:
        rt.clear()
        acts = capture(rt, rt.tokenize(text), [layer])[layer]
        out.append(mean_pool(acts))
    rt.clear()
    return np.asarray(out, dtype=np.float64)


def pooled(feats: Features) -> np.ndarray:
    """f64 [N, d]: :func:`pooled_features` from cached rows (``edgelink.train.features``)."""
    return np.asarray([mean_pool(feats.rows_of(i)) for i in range(len(feats))], dtype=np.float64)


def label_targets(rt: LlamaRuntime, emb: TokenEmbeddings, labels: Sequence[str], k: int
                  ) -> dict[str, np.ndarray]:
    """{label: f32 [K, d_tgt]}: the target's token rows of the last K tokens of the template."""
    out = {}
    for label in labels:
        ids = rt.tokenize(TEMPLATE.format(label=label), add_special=False)
        if k > len(ids):
            raise ValueError(f"K={k} exceeds the {len(ids)} tokens of {TEMPLATE!r}")
        out[label] = emb.rows(ids[-k:])
    return out


def solve_ridge(z: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """W [d, m], b [m] minimizing |Z W + b - Y|^2 + lam |W|^2 for standardized (centered) Z."""
    b = y.mean(axis=0)
    a = z.T @ z + lam * np.eye(z.shape[1])
    w = np.linalg.solve(a, z.T @ (y - b))
    return w, b


def _nearest(pred: np.ndarray, targets: dict[str, np.ndarray]) -> list[str]:
    labels = sorted(targets)
    t = np.stack([targets[lab].reshape(-1) for lab in labels])  # [L, K*d]
    d = ((pred[:, None, :] - t[None]) ** 2).sum(axis=-1)
    return [labels[i] for i in d.argmin(axis=1)]


def train_ridge(out: str | Path, cfg: Config | None = None, *, task: str = "sentiment", n: int = 200,
                n_dev: int = 100, k: int = 1, layer: int = LAYER,
                lambdas: Sequence[float] = LAMBDAS, log=print, source: str = SOURCE,
                target: str = TARGET) -> dict[str, Any]:
    """Fit on the first ``n`` train examples, pick lambda on the first ``n_dev`` dev examples,
    export ``<out>/<task>-ridge-k<K>-l<layer>.{json,npz}``; returns the paths and figures."""
    cfg = cfg or load_config()
    t0 = time.perf_counter()
    train: list[Example] = load_split(task, "train", cfg)[:n]
    dev: list[Example] = load_split(task, "dev", cfg)[:n_dev]
    labels = sorted({ex.label for ex in train} | {ex.label for ex in dev})

    src = LlamaRuntime(resolve_model(source, cfg, pull=True), cfg, eval_hook=True)
    tgt = LlamaRuntime(resolve_model(target, cfg, pull=True), cfg)
    try:
        src_sig, tgt_sig = model_signature(src, cfg), model_signature(tgt, cfg)
        emb = TokenEmbeddings(tgt.path, tgt_sig.architecture, tgt_sig.n_embd)
        targets = label_targets(tgt, emb, labels, k)
        _, f_tr = split_features(src, cfg, task, "train", layer, n, src_sig.weights_digest)
        _, f_dev = split_features(src, cfg, task, "dev", layer, n_dev, src_sig.weights_digest)
        x_tr, x_dev = pooled(f_tr), pooled(f_dev)
    finally:
        src.close()
        tgt.close()
    t_feat = time.perf_counter() - t0

    mean = x_tr.mean(axis=0)
    std = np.maximum(x_tr.std(axis=0), 1e-6)
    z_tr, z_dev = (x_tr - mean) / std, (x_dev - mean) / std
    y_tr = np.stack([targets[ex.label].reshape(-1) for ex in train]).astype(np.float64)
    y_dev = np.stack([targets[ex.label].reshape(-1) for ex in dev]).astype(np.float64)
    gold = [ex.label for ex in dev]
    scores = []
    for lam in lambdas:
        w, b = solve_ridge(z_tr, y_tr, lam)
        pred = z_dev @ w + b
        acc = float(np.mean([p == g for p, g in zip(_nearest(pred, targets), gold, strict=True)]))
        mse = float(((pred - y_dev) ** 2).mean())
        scores.append({"lambda": float(lam), "dev_acc": acc, "dev_mse": mse})
        log(f"lambda={lam:g}: dev acc {acc:.3f}, mse {mse:.3e}")
    best = max(scores, key=lambda s: (s["dev_acc"], -s["dev_mse"]))
    w, b = solve_ridge(z_tr, y_tr, best["lambda"])
    train_acc = float(np.mean([p == ex.label for p, ex in zip(_nearest(z_tr @ w + b, targets), train, strict=True)]))
    majority = max(np.mean([g == lab for g in gold]) for lab in labels)

    training = {
        "task": task, "split": "train", "n_train": len(train), "subset": f"first {len(train)} of the "
        "seed-0 train split", "dev": {"n": len(dev), "subset": f"first {len(dev)} of the seed-0 dev split",
                                      "lambdas": scores, "majority_acc": float(majority)},
        "labels": labels, "target": f"{target} token_embd rows of the last {k} tokens of {TEMPLATE!r}",
        "method": "closed-form ridge on standardized mean-pooled features", "lambda": best["lambda"],
        "train_acc": train_acc, "dev_acc": best["dev_acc"], "dev_mse": best["dev_mse"],
    }
    manifest, npz = export_bridge(
        Path(out) / f"{task}-ridge-k{k}-l{layer}", kind="ridge", arrays={"W": w, "b": b}, source_sig=src_sig, target_sig=tgt_sig,
        source_layer=layer, k=k, norm_mean=mean, norm_std=std, pool={"kind": "mean", "skip": SKIP},
        training=training, prompt=task_prompt(task))
    log(f"lambda {best['lambda']:g}: train acc {train_acc:.3f}, dev acc {best['dev_acc']:.3f} "
        f"(majority {majority:.3f}); features {t_feat:.1f} s; wrote {manifest} and {npz.name}")
    return {"manifest": manifest, "npz": npz, "features_s": t_feat, **training}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m edgelink.train.ridge", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=int, default=200, help="train examples (first n of the split)")
    p.add_argument("--n-dev", type=int, default=100, help="dev examples for picking lambda")
    p.add_argument("--k", type=int, default=1, help="soft tokens per message (1..4)")
    p.add_argument("--layer", type=int, default=LAYER, help="SmolLM2 layer (l_out)")
    p.add_argument("--task", default="sentiment")
    args = p.parse_args(argv)
    train_ridge(args.out, task=args.task, n=args.n, n_dev=args.n_dev, k=args.k, layer=args.layer)


if __name__ == "__main__":
    main()
