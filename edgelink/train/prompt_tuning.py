"""The prompt-tuning baseline (issue 16): K learned soft tokens in front of the original text,
trained through the same frozen torch receiver, on the same training examples, with the same
steps, batch, optimizer, schedule and dev early stopping as the perceiver bridge.

The bridge was trained on 2,000 labelled examples; a receiver given the same labels and the
same budget, but no sender, is what separates "the sender's states carry the answer" from
"any supervised adapter in front of Gemma would do". The receiver reads

    primer + "Review:" + K soft rows + " <review>" + "\\nSentiment:"

so the soft rows sit where a bridge's vectors sit, and the review follows them as text. The
rows live in Gemma's token-row space (as stored, before its sqrt(640) input scale), like a
bridge's output, so ``edgelink.kinds.bridged.feed_vectors`` reads them in llama.cpp unchanged.

``python -m edgelink.train.prompt_tuning --out DIR`` trains one seed and writes
``DIR/<task>-prompt-k<K>-s<seed>.{json,npz}``; ``edgelink bridge eval --soft-prompt FILE``
scores it beside the bridge. The test split is never read here.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edgelink.config import Config, load_config
from edgelink.models.resolve import resolve_model
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.signature import model_signature
from edgelink.train.data import Example, load_split
from edgelink.train.soft_prompt import save_soft_prompt, tail_ids
from edgelink.train.tasks import task_prompt
from edgelink.train.torch_receiver import TorchReceiver

TARGET = "gemma3-270m"


@dataclasses.dataclass
class PromptSpec:
    """Everything that decides a soft prompt; the defaults are the shipped bridge's budget
    (models/sentiment-perceiver-k8-l15.json, ``training``)."""

    task: str = "sentiment"
    k: int = 8
    seed: int = 0
    n_train: int = 2000
    n_dev: int = 200
    steps: int = 200
    batch: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    eval_every: int = 50
    target: str = TARGET

    def stem(self) -> str:
        return f"{self.task}-prompt-k{self.k}-s{self.seed}"


class SoftPrompt(torch.nn.Module):
    """K free rows in token-row space, initialised from real token rows (so they start where
    the receiver's inputs live)."""

    def __init__(self, init_rows: np.ndarray):
        super().__init__()
        self.rows = torch.nn.Parameter(torch.from_numpy(np.array(init_rows, dtype=np.float32)))


class TextHead:
    """The frozen torch receiver behind the primer: soft rows + tail tokens -> logits at each
    example's last position. Rows are right-padded; causal attention keeps padding out of
    every real position, so the read is exact."""

    def __init__(self, rx: TorchReceiver, primer_ids: Sequence[int], label_ids: Sequence[int]):
        self.rx = rx
        self.cache = rx.prefix_cache(torch.tensor(list(primer_ids)))
        self.label_ids = torch.tensor(list(label_ids))

    def logits(self, rows: torch.Tensor, tails: Sequence[Sequence[int]]) -> torch.Tensor:
        """rows [K, d] (token-row space), tails: token ids per example -> [B, n_vocab]."""
        k, d = rows.shape
        t = k + max(len(ids) for ids in tails)
        soft = rows * self.rx.input_scale
        xs = []
        for ids in tails:
            emb = self.rx.embed(torch.tensor(list(ids)))
            pad = torch.zeros(t - k - len(ids), d)
            xs.append(torch.cat((soft, emb, pad)))
        h = self.rx.hidden_states(inputs_embeds=torch.stack(xs), cache=self.cache)
        last = torch.tensor([k + len(ids) - 1 for ids in tails])
        return self.rx.logits(h[torch.arange(len(tails)), last])


def _dev_score(head: TextHead, rows: torch.Tensor, tails: list[list[int]], gold: torch.Tensor,
               batch: int = 16) -> dict[str, float]:
    correct, loss = 0, 0.0
    with torch.no_grad():
        for s in range(0, len(tails), batch):
            lg = head.logits(rows, tails[s:s + batch])
            g = gold[s:s + batch]
            loss += float(F.cross_entropy(lg, head.label_ids[g], reduction="sum"))
            correct += int((lg[:, head.label_ids].argmax(dim=1) == g).sum())
    return {"dev_acc": correct / len(tails), "dev_loss": loss / len(tails)}


def _log_default(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def _data(tgt: LlamaRuntime, examples: list[Example], after: str, labels: list[str]
          ) -> tuple[list[list[int]], torch.Tensor]:
    return ([tail_ids(tgt, ex.text, after) for ex in examples],
            torch.tensor([labels.index(ex.label) for ex in examples]))


def train_prompt(spec: PromptSpec, out: str | Path, cfg: Config | None = None,
                 log: Callable[[str], None] = _log_default) -> dict[str, Any]:
    """Train one soft prompt (the perceiver's loop, with K free rows in place of the bridge)
    and write ``<out>/<stem>.{json,npz}``; returns the paths and the training record."""
    cfg = cfg or load_config()
    torch.set_num_threads(cfg.runtime.n_threads or 1)
    torch.manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed)
    prompt = task_prompt(spec.task)
    train = load_split(spec.task, "train", cfg)[:spec.n_train]
    dev = load_split(spec.task, "dev", cfg)[:spec.n_dev]
    labels = sorted({ex.label for ex in train})
    with LlamaRuntime(resolve_model(spec.target, cfg, pull=True), cfg) as tgt:
        sig = model_signature(tgt, cfg)
        primer_ids = tgt.tokenize(prompt.primer + prompt.before)
        label_ids = [tgt.tokenize(prompt.labels[lab], add_special=False)[0] for lab in labels]
        tr_tails, tr_gold = _data(tgt, train, prompt.after, labels)
        dev_tails, dev_gold = _data(tgt, dev, prompt.after, labels)
        init_ids = rng.choice(np.array(primer_ids[1:]), size=spec.k, replace=True)
        init = tgt.token_embeddings().rows(init_ids)
        path = tgt.path
    head = TextHead(TorchReceiver.from_gguf(path), primer_ids, label_ids)
    model = SoftPrompt(init)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.steps,
                                                pct_start=0.1)
    order = np.concatenate([rng.permutation(len(train)) for _ in range(
        spec.steps * spec.batch // len(train) + 1)])
    curve: list[dict[str, float]] = []
    best: tuple[float, int, torch.Tensor] | None = None
    t0 = time.perf_counter()
    for step in range(1, spec.steps + 1):
        idx = order[(step - 1) * spec.batch: step * spec.batch]
        lg = head.logits(model.rows, [tr_tails[i] for i in idx])
        loss = F.cross_entropy(lg, head.label_ids[tr_gold[idx]])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step == 5:  # an early rate, so a run that would not fit is seen in time
            log(f"  step 5: {5 / (time.perf_counter() - t0):.3f} steps/s")
        if step % spec.eval_every == 0 or step == spec.steps:
            score = _dev_score(head, model.rows.detach(), dev_tails, dev_gold)
            curve.append({"step": step, "train_loss": float(loss.detach()), **score})
            log(f"  step {step}/{spec.steps}: loss {float(loss.detach()):.4f}, dev acc "
                f"{score['dev_acc']:.3f} ({step / (time.perf_counter() - t0):.2f} steps/s)")
            if best is None or score["dev_acc"] > best[0]:
                best = (score["dev_acc"], step, model.rows.detach().clone())
    assert best is not None
    record = {**dataclasses.asdict(spec), "labels": labels, "best_step": best[1], "curve": curve,
              "dev_acc": best[0], "train_s": round(time.perf_counter() - t0, 1),
              "subset": f"first {len(train)} of the seed-0 train split",
              "dev": {"n": len(dev), "subset": f"first {len(dev)} of the seed-0 dev split"},
              "init": "token rows of K tokens drawn (seeded) from the primer",
              "torch": torch.__version__}
    paths = save_soft_prompt(Path(out) / spec.stem(), best[2].numpy(), sig.to_dict(), record)
    log(f"{spec.stem()}: best step {best[1]} (dev {best[0]:.3f}); wrote {paths[0]}")
    return {"manifest": paths[0], "npz": paths[1], **record}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m edgelink.train.prompt_tuning",
                                 description="train the prompt-tuning baseline (one seed)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--task", default="sentiment")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-dev", type=int, default=200)
    a = ap.parse_args()
    spec = PromptSpec(task=a.task, k=a.k, seed=a.seed, steps=a.steps, n_train=a.n_train,
                      n_dev=a.n_dev)
    r = train_prompt(spec, a.out)
    print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in r.items()
                      if k != "curve"}, indent=1))
