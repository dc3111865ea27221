"""Train a bridge (perceiver or lip) from SmolLM2's hidden states into Gemma-3's input space,
and export it for the numpy runtime.

* Sender rows come from llama.cpp (``edgelink.train.features``, cached), so training sees exactly
  what a handoff sends.
* ``perceiver`` trains through the frozen target: a torch copy of the target built from the
  same GGUF (``edgelink.train.torch_receiver``, checked against llama.cpp's logits) reads
  ``primer + before``, the K bridged vectors, then ``after``, and the loss is the target's
  language-model cross-entropy (over its whole vocabulary) of the answer's first token. The
  primer's K/V are computed once (``TorchReceiver.prefix_cache``), so a step costs only the K + a
  few positions of every example. Early stopping on dev accuracy, read the same way.
* ``lip`` is a regression and needs no receiver: the target's own token rows of the same text,
  pooled into the same K segments, with the hybrid loss MSE + 2 (1 - cos). It never sees a
  label; dev loss picks the best step.

Everything is seeded; two runs with the same arguments on the same machine give the same
bridge. The test split is never read here.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edgelink.bridge import BridgePrompt, export_bridge, load_bridge
from edgelink.config import Config, load_config
from edgelink.errors import ModelError
from edgelink.models.resolve import resolve_model
from edgelink.protocol.signature import ModelSignature
from edgelink.runtime.embeddings import TokenEmbeddings
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.signature import model_signature
from edgelink.train.data import Example
from edgelink.train.features import SKIP, Features, split_features
from edgelink.train.modules import (
    LipAdapter,
    LipArch,
    PerceiverArch,
    PerceiverBridge,
    segment_means,
)
from edgelink.train.tasks import task_prompt
from edgelink.train.torch_receiver import TorchReceiver

SOURCE = "smollm2-135m"
TARGET = "gemma3-270m"


@dataclasses.dataclass
class TrainSpec:
    """Everything that decides a trained bridge (recorded in its manifest)."""

    kind: str = "perceiver"
    task: str = "sentiment"
    k: int = 8
    layer: int = 15
    seed: int = 0
    n_train: int = 2000
    n_dev: int = 300
    steps: int = 300
    batch: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    eval_every: int = 50
    source: str = SOURCE
    target: str = TARGET
    d_model: int = 256
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 512
    bottleneck: int = 256
    # False: the target answers at the last bridged vector, without the prompt's tail (a
    # ``direct`` bridge): its read is K positions, not K + the tail's (3 for both tasks)
    tail: bool = True
    # distillation: a trained bridge (manifest path) of the same task whose answer distribution
    # over the labels (the torch target reading it) the student also matches, with weight
    # ``distill`` (KL at temperature ``temperature``; 1 - distill on the gold label)
    teacher: str = ""
    distill: float = 0.5
    temperature: float = 2.0

    def stem(self) -> str:
        return f"{self.task}-{self.kind}-k{self.k}-l{self.layer}{'' if self.tail else '-direct'}-s{self.seed}"

    def prompt(self) -> BridgePrompt:
        """The prompt the target reads this bridge with (recorded in its manifest)."""
        p = task_prompt(self.task)
        return p if self.tail else dataclasses.replace(p, after="")


def _padded(feats: Features, idx: np.ndarray, mean: np.ndarray, std: np.ndarray
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardized rows (BOS dropped) of the chosen texts, zero-padded: [B, T, d], valid [B, T]."""
    rows = [feats.rows_of(int(i)) for i in idx]
    rows = [r[SKIP:] if len(r) > SKIP else r for r in rows]
    t = max(len(r) for r in rows)
    x = np.zeros((len(rows), t, feats.d), dtype=np.float32)
    valid = np.zeros((len(rows), t), dtype=bool)
    for j, r in enumerate(rows):
        x[j, :len(r)] = (r - mean) / std
        valid[j, :len(r)] = True
    return torch.from_numpy(x), torch.from_numpy(valid)


def row_stats(feats: Features) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std over every training row but each text's BOS row."""
    keep = np.ones(len(feats.rows), dtype=bool)
    keep[feats.offsets[:-1]] = False
    rows = feats.rows[keep].astype(np.float64)
    return rows.mean(axis=0).astype(np.float32), np.maximum(rows.std(axis=0), 1e-6).astype(np.float32)


class _ReceiverHead:
    """The frozen torch target behind the prompt: bridged vectors -> answer logits."""

    def __init__(self, rx: TorchReceiver, tgt: LlamaRuntime, prompt: BridgePrompt, labels: list[str]):
        self.rx = rx
        self.cache = rx.prefix_cache(torch.tensor(tgt.tokenize(prompt.primer + prompt.before)))
        after = tgt.tokenize(prompt.after, add_special=False) if prompt.after else []
        self.after = rx.embed(torch.tensor(after)) if after else None  # [A, n_embd]
        self.label_ids = torch.tensor([tgt.tokenize(prompt.labels[lab], add_special=False)[0]
                                       for lab in labels])

    def logits(self, v: torch.Tensor) -> torch.Tensor:
        """v [B, K, n_embd] in token-row space -> full-vocabulary logits [B, n_vocab]."""
        x = v * self.rx.input_scale
        if self.after is not None:
            x = torch.cat((x, self.after.expand(v.shape[0], -1, -1)), dim=1)
        return self.rx(inputs_embeds=x, cache=self.cache, last_only=True)[:, -1]


def _log_default(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


@dataclasses.dataclass
class _Run:
    """What one training run reads once the two runtimes are closed: data, statistics, model."""

    train: list[Example]
    dev: list[Example]
    f_tr: Features
    f_dev: Features
    labels: list[str]
    mean: np.ndarray
    std: np.ndarray
    src_sig: ModelSignature
    tgt_sig: ModelSignature
    emb: TokenEmbeddings
    model: PerceiverBridge | LipAdapter
    loop: _PerceiverLoop | _LipLoop
    t_feat: float


def train_bridge(spec: TrainSpec, out: str | Path, cfg: Config | None = None,
                 log: Callable[[str], None] = _log_default) -> dict[str, Any]:
    """Train one bridge and export ``<out>/<spec.stem()>.{json,npz}``; returns the paths and
    the training record."""
    if spec.kind not in ("perceiver", "lip"):
        raise ValueError(f"train_bridge trains perceiver or lip bridges, not {spec.kind!r}")
    cfg = cfg or load_config()
    t_start = time.perf_counter()
    torch.set_num_threads(cfg.runtime.n_threads or os.cpu_count() or 1)  # runtime.n_threads
    torch.manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed)
    run = _prepare(spec, cfg, t_start, log)
    curve, best, t_train = _optimise(spec, run, rng, log)
    record = _record(spec, run, curve, best[1], t_train)
    ckpt = Path(out) / f"{spec.stem()}.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"spec": dataclasses.asdict(spec), "state": run.model.state_dict(), "mean": run.mean,
                "std": run.std, "source_sig": run.src_sig.to_dict(), "target_sig": run.tgt_sig.to_dict(),
                "record": record, "target_norm": run.emb.mean_norm}, ckpt)
    manifest, npz = export_checkpoint(ckpt, Path(out) / spec.stem())
    log(f"{spec.stem()}: best step {best[1]}, train {t_train:.0f} s; wrote {manifest}")
    return {"manifest": manifest, "npz": npz, "checkpoint": ckpt, "model": run.model, **record}


def _prepare(spec: TrainSpec, cfg: Config, t_start: float, log: Callable[[str], None]) -> _Run:
    """Features, labels and the model, read while both runtimes are open (closed before the loop)."""
    src = LlamaRuntime(resolve_model(spec.source, cfg, pull=True), cfg, eval_hook=True)
    tgt = LlamaRuntime(resolve_model(spec.target, cfg, pull=True), cfg)
    try:
        src_sig, tgt_sig = model_signature(src, cfg), model_signature(tgt, cfg)
        train, f_tr = split_features(src, cfg, spec.task, "train", spec.layer, spec.n_train,
                                     src_sig.weights_digest)
        dev, f_dev = split_features(src, cfg, spec.task, "dev", spec.layer, spec.n_dev,
                                    src_sig.weights_digest)
        emb = TokenEmbeddings(tgt.path, tgt_sig.architecture, tgt_sig.n_embd)
        labels = sorted({ex.label for ex in train})
        mean, std = row_stats(f_tr)
        d_src, d_tgt = f_tr.d, tgt_sig.n_embd
        t_feat = time.perf_counter() - t_start
        log(f"{spec.stem()}: {len(train)} train / {len(dev)} dev texts, features {t_feat:.0f} s")
        model = build_model(spec, d_src, d_tgt, emb.mean_norm)
        loop = _make_loop(spec, cfg, src, tgt, model, emb, train, dev, labels, log)
        return _Run(train=train, dev=dev, f_tr=f_tr, f_dev=f_dev, labels=labels, mean=mean, std=std,
                    src_sig=src_sig, tgt_sig=tgt_sig, emb=emb, model=model, loop=loop, t_feat=t_feat)
    finally:
        src.close()
        tgt.close()


def _make_loop(spec: TrainSpec, cfg: Config, src: LlamaRuntime, tgt: LlamaRuntime,
               model: PerceiverBridge | LipAdapter, emb: TokenEmbeddings, train: list[Example],
               dev: list[Example], labels: list[str], log: Callable[[str], None]) -> _PerceiverLoop | _LipLoop:
    """The loss and dev score of the bridge kind: through the torch target, or against its token rows."""
    if spec.kind == "perceiver":
        rx = TorchReceiver.from_gguf(tgt.path)
        head = _ReceiverHead(rx, tgt, spec.prompt(), labels)
        loop = _PerceiverLoop(model, head, labels)
        if spec.teacher:
            loop.teach(teacher_label_logits(spec, cfg, src, tgt, rx, train, labels, log),
                       spec.distill, spec.temperature)
        return loop
    return _LipLoop(model, spec.k, _text_rows(tgt, emb, train), _text_rows(tgt, emb, dev))


def _optimise(spec: TrainSpec, run: _Run, rng: np.random.Generator, log: Callable[[str], None]
              ) -> tuple[list[dict[str, float]], tuple[float, int, dict], float]:
    """AdamW with a one-cycle schedule over seeded batches; the best dev step's weights are kept."""
    model, train = run.model, run.train
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.steps,
                                                pct_start=0.1)
    curve: list[dict[str, float]] = []
    best: tuple[float, int, dict] | None = None
    order = np.concatenate([rng.permutation(len(train)) for _ in range(
        spec.steps * spec.batch // len(train) + 1)])
    t0 = time.perf_counter()
    for step in range(1, spec.steps + 1):
        idx = order[(step - 1) * spec.batch: step * spec.batch]
        model.train()
        x, valid = _padded(run.f_tr, idx, run.mean, run.std)
        loss = run.loop.loss(x, valid, idx, train)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % spec.eval_every == 0 or step == spec.steps:
            best = _checkpoint_step(spec, run, step, loss, t0, curve, best, log)
    assert best is not None
    model.load_state_dict(best[2])
    return curve, best, time.perf_counter() - t0


def _checkpoint_step(spec: TrainSpec, run: _Run, step: int, loss: torch.Tensor, t0: float,
                     curve: list[dict[str, float]], best: tuple[float, int, dict] | None,
                     log: Callable[[str], None]) -> tuple[float, int, dict]:
    """Score the dev split, add it to the curve, and keep the weights if they are the best yet."""
    model = run.model
    model.eval()
    with torch.no_grad():
        score = run.loop.dev_score(run.f_dev, run.dev, run.mean, run.std)
    rate = step / (time.perf_counter() - t0)
    curve.append({"step": step, "train_loss": float(loss.detach()), **score})
    log(f"  step {step}/{spec.steps}: loss {float(loss.detach()):.4f}, "
        + ", ".join(f"{k} {v:.4f}" for k, v in score.items()) + f" ({rate:.2f} steps/s)")
    key = score["dev_acc"] if "dev_acc" in score else -score["dev_loss"]
    if best is None or key > best[0]:
        best = (key, step, {n: t.detach().clone() for n, t in model.state_dict().items()})
    return best


def _record(spec: TrainSpec, run: _Run, curve: list[dict[str, float]], best_step: int,
            t_train: float) -> dict[str, Any]:
    """The training record a bridge's manifest carries: the spec, the data, the curve, the best step."""
    return {
        **dataclasses.asdict(spec), "split": "train", "labels": run.labels,
        "subset": f"first {len(run.train)} of the seed-0 train split",
        "dev": {"n": len(run.dev), "subset": f"first {len(run.dev)} of the seed-0 dev split"},
        "best_step": best_step, "curve": curve, "features_s": round(run.t_feat, 1),
        "train_s": round(t_train, 1), "torch": torch.__version__,
        **{k: v for k, v in next(c for c in curve if c["step"] == best_step).items() if k.startswith("dev_")},
    }


def build_model(spec: TrainSpec, d_src: int, d_tgt: int, target_norm: float
                ) -> PerceiverBridge | LipAdapter:
    if spec.kind == "perceiver":
        return PerceiverBridge(d_src, d_tgt, spec.k, target_norm,
                               PerceiverArch(spec.d_model, spec.n_heads, spec.n_layers, spec.d_ff))
    return LipAdapter(d_src, d_tgt, spec.k, target_norm, LipArch(spec.bottleneck))


def export_checkpoint(ckpt: str | Path, stem: str | Path) -> tuple[Path, Path]:
    """A training checkpoint (``<stem>.pt``, torch) -> the numpy bridge ``<stem>.{json,npz}``."""
    c = torch.load(ckpt, weights_only=False)
    spec = TrainSpec(**c["spec"])
    model = build_model(spec, int(c["source_sig"]["n_embd"]), int(c["target_sig"]["n_embd"]),
                        float(c["target_norm"]))
    model.load_state_dict(c["state"])
    return export_bridge(
        stem, kind=spec.kind, arrays=model.export(), source_sig=c["source_sig"],
        target_sig=c["target_sig"], source_layer=spec.layer, k=spec.k, norm_mean=c["mean"],
        norm_std=c["std"], pool={"kind": "none" if spec.kind == "perceiver" else "segments",
                                 "skip": SKIP},
        training=c["record"], prompt=spec.prompt(), arch=model.manifest_arch())


def teacher_label_logits(spec: TrainSpec, cfg: Config, src: LlamaRuntime, tgt: LlamaRuntime,
                         rx: TorchReceiver, train: list[Example], labels: list[str],
                         log: Callable[[str], None], batch: int = 32) -> torch.Tensor:
    """The teacher bridge's label logits [N, n_labels] on the training examples: the torch
    target reading the teacher's vectors with the teacher's own prompt. Kept for the process,
    so the seeds of one ``bridge train`` run compute them once."""
    teacher = load_bridge(spec.teacher)
    t_task = (teacher.meta.get("training") or {}).get("task")
    if t_task != spec.task or teacher.prompt is None:
        raise ModelError(f"teacher {spec.teacher} was trained for task {t_task!r}, not "
                         f"{spec.task!r}: distil from a bridge of the same task")
    teacher.check_pair(model_signature(src, cfg), model_signature(tgt, cfg))
    key = (teacher.digest, spec.task, tuple(e.text for e in train), tuple(labels))
    if key in _TEACHER_LOGITS:
        return _TEACHER_LOGITS[key]
    _, feats = split_features(src, cfg, spec.task, "train", teacher.source_layer, len(train),
                              model_signature(src, cfg).weights_digest)
    head = _ReceiverHead(rx, tgt, teacher.prompt, labels)
    t0, out = time.perf_counter(), []
    for s in range(0, len(train), batch):
        v = np.stack([teacher.apply(feats.rows_of(i)) for i in range(s, min(s + batch, len(train)))])
        with torch.no_grad():
            out.append(head.logits(torch.from_numpy(v))[:, head.label_ids])
    logits = torch.cat(out)
    acc = float((logits.argmax(dim=1) == torch.tensor([labels.index(e.label) for e in train])).float().mean())
    log(f"teacher {Path(spec.teacher).name}: train accuracy {acc:.3f} ({time.perf_counter() - t0:.0f} s)")
    _TEACHER_LOGITS[key] = logits
    return logits


_TEACHER_LOGITS: dict[tuple, torch.Tensor] = {}


class _PerceiverLoop:
    def __init__(self, model: PerceiverBridge, head: _ReceiverHead, labels: list[str]):
        self.model, self.head, self.labels = model, head, labels
        self.teacher: torch.Tensor | None = None
        self.distill, self.temperature = 0.0, 1.0

    def teach(self, teacher_logits: torch.Tensor, weight: float, temperature: float) -> None:
        if not 0.0 <= weight <= 1.0 or temperature <= 0:
            raise ValueError("distill must lie in [0, 1] and temperature be positive")
        self.teacher, self.distill, self.temperature = teacher_logits, weight, temperature

    def _gold(self, idx, examples: list[Example]) -> torch.Tensor:
        return torch.tensor([self.labels.index(examples[int(i)].label) for i in idx])

    def loss(self, x, valid, idx, examples) -> torch.Tensor:
        logits = self.head.logits(self.model(x, valid))
        ce = F.cross_entropy(logits, self.head.label_ids[self._gold(idx, examples)])
        if self.teacher is None:
            return ce
        t = self.temperature
        student = F.log_softmax(logits[:, self.head.label_ids] / t, dim=1)
        teacher = F.softmax(self.teacher[torch.as_tensor(idx)] / t, dim=1)
        kl = F.kl_div(student, teacher, reduction="batchmean") * t * t
        return (1 - self.distill) * ce + self.distill * kl

    def dev_score(self, feats: Features, examples, mean, std, batch: int = 32) -> dict[str, float]:
        correct, losses = 0, []
        for s in range(0, len(examples), batch):
            idx = np.arange(s, min(s + batch, len(examples)))
            x, valid = _padded(feats, idx, mean, std)
            logits = self.head.logits(self.model(x, valid))
            gold = self._gold(idx, examples)
            losses.append(float(F.cross_entropy(logits, self.head.label_ids[gold], reduction="sum")))
            correct += int((logits[:, self.head.label_ids].argmax(dim=1) == gold).sum())
        return {"dev_acc": correct / len(examples), "dev_loss": sum(losses) / len(examples)}


def _text_rows(tgt: LlamaRuntime, emb: TokenEmbeddings, examples: list[Example]) -> list[np.ndarray]:
    """The target's own token rows of each text (no BOS): what LIP learns to produce."""
    return [emb.rows(tgt.tokenize(ex.text, add_special=False) or [tgt.token_bos()])
            for ex in examples]


class _LipLoop:
    LAMBDA = 2.0

    def __init__(self, model: LipAdapter, k: int, train_rows: list[np.ndarray], dev_rows: list[np.ndarray]):
        self.model, self.k = model, k
        self.y_train = self._targets(train_rows)
        self.y_dev = self._targets(dev_rows)

    def _targets(self, rows: list[np.ndarray]) -> torch.Tensor:
        out = []
        for r in rows:
            t = torch.from_numpy(np.asarray(r, dtype=np.float32))[None]
            out.append(segment_means(t, torch.ones(t.shape[:2], dtype=torch.bool), self.k)[0])
        return torch.stack(out)  # [N, K, d_tgt]

    def _hybrid(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mse = ((pred - y) ** 2).mean()
        cos = F.cosine_similarity(pred, y, dim=-1).mean()
        return mse + self.LAMBDA * (1 - cos)

    def loss(self, x, valid, idx, examples) -> torch.Tensor:
        return self._hybrid(self.model.raw(x, valid), self.y_train[torch.from_numpy(idx)])

    def dev_score(self, feats: Features, examples, mean, std, batch: int = 64) -> dict[str, float]:
        total = 0.0
        cos = 0.0
        for s in range(0, len(examples), batch):
            idx = np.arange(s, min(s + batch, len(examples)))
            x, valid = _padded(feats, idx, mean, std)
            pred, y = self.model.raw(x, valid), self.y_dev[torch.from_numpy(idx)]
            total += float(self._hybrid(pred, y)) * len(idx)
            cos += float(F.cosine_similarity(pred, y, dim=-1).mean()) * len(idx)
        return {"dev_loss": total / len(examples), "dev_cos": cos / len(examples)}
