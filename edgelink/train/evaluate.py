"""`edgelink bridge eval`: score bridges on the TEST split against baselines and controls that
would expose a bridge that does not carry the sender's information.

Every condition is scored on the same first ``n`` test examples, by the same rule: the receiver
(Gemma-3-270M in llama.cpp) reads the task prompt (edgelink.train.tasks) and answers with the label whose
verbalizer's first token has the highest logit at the last position. The prompt's shared
context (``primer + before``, with BOS) is prefilled once and kept; each read truncates back to
it (``LlamaRuntime.truncate``), so every latency below is measured with that primer cached.

Conditions
    none           the receiver reads the prompt with an empty text (no message): the
                   receiver alone
    text_relay     the sender (SmolLM2-135M Instruct) writes a short message (greedy, at most
                   ``relay_tokens`` tokens, stops at EOG or at the end of the first line), the
                   receiver reads the message as the text
    original_text  the receiver reads the review itself (upper bound)
    prompt_tuning  (with ``soft_prompts``) K trained soft rows, then the review as text
                   (edgelink.train.prompt_tuning: the bridge's labels and budget, no sender)
    sender_alone   the sender (the same SmolLM2-135M Instruct GGUF) reads the same task prompt,
                   two-shot primer included, and answers by its own verbalizer logits
    <base> (offset), <base> (contextual)
                   original_text, text_relay and sender_alone with their label logits
                   calibrated (edgelink.train.calibration): a per-label offset that maximises accuracy
                   on the first ``n_dev`` DEV examples, or Zhao et al.'s contextual calibration
                   from content-free reads ("", "N/A", "[MASK]"); never fitted on test
    per bridge group (manifest kind + K; several files = several training seeds):
    bridged        the receiver reads ``bridge.apply(sender rows of this example)``
    shuffled       ... of ANOTHER test example (a fixed seeded derangement: nobody gets its own)
    zero           K zero vectors
    mean           the mean of ``bridge.apply`` over DEV examples (a constant message)
    random         Gaussian rows rescaled to the norm of the corresponding bridged row
    linear_probe   logistic regression on the standardized, mean-pooled sender rows (the bridge's
                   pooling), trained on the bridge's train subset, C picked on DEV; no receiver
    majority       the most frequent label among the scored test examples (the best constant
                   answer on exactly these examples)

Latency (per message, ms): ``none``/``original_text``/controls: the receiver's read only;
``text_relay``: sender prefill + generation + receiver read (the relay template's constant head
is cached on the sender like the primer on the receiver); ``bridged``: sender prefill with
capture (re-run here on every evaluated example and timed; the rows fed to the bridge come from
the feature cache, and the two are compared) + ``apply`` + receiver read; ``linear_probe``:
sender capture + the probe. Constant inputs (none, zero, mean) are answered once and their read
is timed on the first ``constant_repeats`` examples. Wire bytes: UTF-8 bytes of the text, or
K*d*4 (f32) plus the header of one protocol tensor message for vectors (the controls ship a
message of the same shape).

Every read keeps its label logits (``per_example["label_logits"]``, and the dev and
content-free reads), so any calibration can be recomputed from eval.json.

Statistics: accuracy with a 95% percentile bootstrap CI (1000 resamples of examples, seeded; a
condition with several seeds is averaged over seeds inside each resample); differences are
paired (the same resampled examples for both conditions); ``paired`` holds every bridge group
minus every reference and baseline row.

Relay prompt: chosen per task by the receiver's accuracy on the first 100 DEV examples (never
test), with ``python -m edgelink.train.evaluate --sweep-relay --task T`` (24 tokens; see
``RELAY_PROMPTS``). sentiment: ``primed`` 0.91, ``chat_word`` 0.79, ``chat_pn`` 0.75,
``chat_sum`` 0.68, ``opinion`` 0.63. topic: ``chat_topic`` 0.70, ``chat_word`` 0.69,
``chat_sum`` 0.67, ``primed`` 0.62, ``about`` 0.47. The task-aware prompts make the relay as
strong as we could make it: the sender classifies and says so in words (``primed``: it answers
the receiver's own two-shot prompt, and its answer is the message).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgelink.bridge import Bridge, BridgePrompt, load_bridge
from edgelink.bridge.blas import blas_thread_count, blas_threads
from edgelink.config import Config, load_config
from edgelink.kinds.bridged import feed_vectors
from edgelink.models.resolve import resolve_model
from edgelink.protocol.codec import encode_tensor_message
from edgelink.protocol.kinds import ApplyMode, DType, Kind
from edgelink.protocol.messages import Tensor, TensorMessage
from edgelink.runtime.embeddings import TokenEmbeddings
from edgelink.runtime.evalhook import capture
from edgelink.runtime.label_head import LabelHead
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.signature import model_signature
from edgelink.train.calibration import CONTENT_FREE, contextual_offset, fit_offset, predict
from edgelink.train.data import Example, load_split
from edgelink.train.features import Features, split_features
from edgelink.train.plot import write_svg
from edgelink.train.soft_prompt import load_soft_prompt, tail_ids
from edgelink.train.tasks import task_prompt

SOURCE = "smollm2-135m"
TARGET = "gemma3-270m"

# Sender prompts for the text relay, per task; "{text}" is the input. Special tokens are parsed.
_CHAT = "<|im_start|>user\n{ask}\n\n{{text}}<|im_end|>\n<|im_start|>assistant\n"


def _primed(task: str) -> str:
    """The receiver's own two-shot task prompt, given to the sender: its message is then its
    answer (what ``sender_alone`` scores), which the receiver reads as the text."""
    p = task_prompt(task)
    return f"{p.primer}{p.before} {{text}}{p.after}"


RELAY_PROMPTS: dict[str, dict[str, str]] = {
    "sentiment": {
        "opinion": "Review: {text}\nIn a few words, the reviewer's opinion of the movie is:",
        "chat_pn": _CHAT.format(ask="Is this movie review positive or negative? Answer in a few words."),
        "chat_sum": _CHAT.format(ask="In a few words, what does this reviewer think of the movie?"),
        "chat_word": _CHAT.format(ask="Is this movie review positive or negative? Answer with one word."),
        "primed": _primed("sentiment"),
    },
    "topic": {
        "about": "Article: {text}\nIn a few words, this news article is about",
        "chat_sum": _CHAT.format(ask="In a few words, what is this news article about?"),
        "chat_word": _CHAT.format(ask="Is this news article about business, sports, politics, "
                                      "entertainment or tech? Answer with one word."),
        "chat_topic": _CHAT.format(ask="What is the topic of this news article? Answer with one word."),
        "primed": _primed("topic"),
    },
}
# chosen on DEV by sweep_relay (see the module docstring)
RELAY_PROMPT: dict[str, str] = {"sentiment": "primed", "topic": "chat_topic"}
PROBE_CS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
DEFAULT_N_TRAIN = 2000


# --------------------------------------------------------------------------- statistics


def bootstrap_indices(n: int, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """int [resamples, n]: example indices drawn with replacement (shared by all conditions, so
    differences between conditions are paired)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_ci(values: np.ndarray, idx: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of the mean of per-example ``values`` ([n], or [seeds, n]: averaged over
    seeds first, i.e. inside each resample) over the resamples ``idx``."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 2:
        v = v.mean(axis=0)
    means = v[idx].mean(axis=1)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [a, 1.0 - a])
    return float(lo), float(hi)


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A seeded uniformly random cyclic permutation (Sattolo): ``p[i] != i`` for every i (n >= 2)."""
    if n < 2:
        raise ValueError("a derangement needs at least 2 examples")
    rng = np.random.default_rng(seed)
    p = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))
        p[i], p[j] = p[j], p[i]
    return p


def norm_matched_gaussian(like: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian rows with each row's L2 norm equal to that of the same row of ``like`` ([.., d])."""
    g = rng.standard_normal(like.shape)
    g /= np.linalg.norm(g, axis=-1, keepdims=True)
    return (g * np.linalg.norm(like, axis=-1, keepdims=True)).astype(np.float32)


def _pct(x: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(x, dtype=np.float64), q)) if len(x) else None


# --------------------------------------------------------------------------- linear probe


def fit_logreg(x: np.ndarray, y: np.ndarray, n_classes: int, c: float, iters: int = 500
               ) -> tuple[np.ndarray, np.ndarray]:
    """Softmax regression, mean cross-entropy + |W|^2 / (2 C n) (sklearn's C convention), bias
    unpenalized, by Nesterov-accelerated gradient descent with step 1/L. Returns (W, b)."""
    n, d = x.shape
    lam = 1.0 / (c * n)
    lip = 0.5 * float(np.linalg.norm(x, 2)) ** 2 / n + lam + 0.5
    onehot = np.eye(n_classes)[y]
    w = np.zeros((d, n_classes))
    b = np.zeros(n_classes)
    w_prev, b_prev = w.copy(), b.copy()
    for t in range(1, iters + 1):
        mom = (t - 1) / (t + 2)
        vw, vb = w + mom * (w - w_prev), b + mom * (b - b_prev)
        z = x @ vw + vb
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        g = (p - onehot) / n
        w_prev, b_prev = w, b
        w = vw - (x.T @ g + lam * vw) / lip
        b = vb - g.sum(axis=0) / lip
    return w, b


def fit_probe(x_tr: np.ndarray, y_tr: np.ndarray, x_dev: np.ndarray, y_dev: np.ndarray,
              n_classes: int, cs: Sequence[float] = PROBE_CS) -> dict[str, Any]:
    """Standardize with train statistics, fit one model per C, keep the best on DEV (first max).
    Takes no test data by construction."""
    mean, std = x_tr.mean(axis=0), np.maximum(x_tr.std(axis=0), 1e-6)
    z_tr, z_dev = (x_tr - mean) / std, (x_dev - mean) / std
    scores, models = [], []
    for c in cs:
        w, b = fit_logreg(z_tr, y_tr, n_classes, c)
        scores.append(float(np.mean((z_dev @ w + b).argmax(axis=1) == y_dev)))
        models.append((w, b))
    best = int(np.argmax(scores))
    w, b = models[best]
    return {"C": float(cs[best]), "cs": [float(c) for c in cs], "dev_scores": scores,
            "train_acc": float(np.mean((z_tr @ w + b).argmax(axis=1) == y_tr)),
            "mean": mean, "std": std, "W": w, "b": b}


def probe_predict(probe: dict[str, Any], x: np.ndarray) -> np.ndarray:
    return (((x - probe["mean"]) / probe["std"]) @ probe["W"] + probe["b"]).argmax(axis=-1)


# --------------------------------------------------------------------------- receiver, sender


class Reader:
    """A model reading the task prompt, with its shared context prefilled once. Every read
    returns (label logits [L], seconds) and leaves the primer in place for the next read; the
    logits, not only their argmax, are kept so that any calibration can be recomputed. The
    receiver is one; the sender answering the task on its own is another."""

    def __init__(self, rt: LlamaRuntime, emb: TokenEmbeddings, prompt: BridgePrompt,
                 label_head: bool = False):
        """``label_head``: compute only the labels' logits (edgelink.runtime.label_head; the
        runtime needs the eval hook), not the whole vocabulary's."""
        self.rt, self.emb, self.prompt = rt, emb, prompt
        self.labels = list(prompt.labels)
        self.label_ids = [rt.tokenize(v, add_special=False)[0] for v in prompt.labels.values()]
        if len(set(self.label_ids)) != len(self.label_ids):
            raise ValueError(f"verbalizers share a first token: {prompt.labels}")
        self.head = LabelHead(rt, self.label_ids) if label_head else None
        self.primer_ids = rt.tokenize(prompt.primer + prompt.before)
        self.after_ids = rt.tokenize(prompt.after, add_special=False)
        self.after_rows = emb.rows(self.after_ids) if self.after_ids else None
        self.n_primer = len(self.primer_ids)
        self.fallbacks = 0  # text reads whose tokenization did not start with the primer's
        self._prime()

    def _prime(self) -> None:
        self.rt.clear()
        self.rt.prefill(self.primer_ids)

    def _reset(self) -> None:
        if self.rt.tokens[:self.n_primer] != self.primer_ids:
            self._prime()
        else:
            self.rt.truncate(self.n_primer)

    def _labels_after(self, n_new: int, decode: Callable[[], np.ndarray]) -> np.ndarray:
        """Label logits after ``decode`` appends ``n_new`` positions."""
        if self.head is not None:
            return self.head.read(n_new, decode).astype(np.float32)
        return np.asarray(decode()[self.label_ids], dtype=np.float32).copy()

    def read_text(self, text: str) -> tuple[np.ndarray, float]:
        self._reset()
        t0 = time.perf_counter()
        ids = self.rt.tokenize(self.prompt.text_prompt(text))
        if ids[:self.n_primer] != self.primer_ids or len(ids) <= self.n_primer:
            # the primer's tokens would differ inside the whole string: read it all
            self.fallbacks += 1
            self.rt.clear()
        new = ids[len(self.rt.tokens):]
        out = self._labels_after(len(new), lambda: self.rt.prefill(new))
        return out, time.perf_counter() - t0

    def read_soft_text(self, rows: np.ndarray, text: str) -> tuple[np.ndarray, float]:
        """Soft-prompt rows where a bridge's vectors go, then the text and the prompt's tail
        (the prompt-tuning baseline, ``edgelink.train.prompt_tuning``)."""
        self._reset()
        t0 = time.perf_counter()
        tail = tail_ids(self.rt, text, self.prompt.after)
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        out = self._labels_after(len(rows) + len(tail), lambda: feed_vectors(
            self.rt, rows, tail, self.emb.rows(tail), self.emb.input_scale))
        return out, time.perf_counter() - t0

    def read_vectors(self, v: np.ndarray) -> tuple[np.ndarray, float]:
        self._reset()
        t0 = time.perf_counter()
        v = np.ascontiguousarray(v, dtype=np.float32)
        out = self._labels_after(len(v) + len(self.after_ids), lambda: feed_vectors(
            self.rt, v, self.after_ids, self.after_rows, self.emb.input_scale))
        return out, time.perf_counter() - t0


class TextRelay:
    """The sender writing text-relay messages. The template's constant head (everything before
    ``{text}``) is prefilled once and kept, like the receiver's primer, so the relay is timed
    with its shared context cached too."""

    def __init__(self, rt: LlamaRuntime, template: str, max_tokens: int):
        if "{text}" not in template:
            raise ValueError("a relay template needs a {text} field")
        self.rt, self.template, self.max_tokens = rt, template, max_tokens
        # without trailing whitespace: "\n\n" alone is one token, "\n\nText" is "\n", "\n", ...
        self.primer_ids = rt.tokenize(template.split("{text}")[0].rstrip(), parse_special=True)
        self.n_primer = len(self.primer_ids)
        self.fallbacks = 0

    def _reset(self) -> None:
        if self.rt.tokens[:self.n_primer] != self.primer_ids:
            self.rt.clear()
            self.rt.prefill(self.primer_ids)
        else:
            self.rt.truncate(self.n_primer)

    def message(self, text: str) -> tuple[str, int, float]:
        """The greedy message about ``text``: stops at EOG, at ``max_tokens``, or when a line
        has been completed. Returns (message, tokens generated, seconds incl. prefill)."""
        rt = self.rt
        self._reset()
        t0 = time.perf_counter()
        ids = rt.tokenize(self.template.format(text=text), parse_special=True)
        if ids[:self.n_primer] == self.primer_ids and len(ids) > self.n_primer:
            rt.prefill(ids[self.n_primer:])
        else:
            self.fallbacks += 1
            rt.clear()
            rt.prefill(ids)
        out: list[int] = []
        while len(out) < self.max_tokens:
            tok = int(np.argmax(rt.logits))
            if rt.is_eog(tok):
                break
            out.append(tok)
            if "\n" in rt.detokenize(out).lstrip() or len(out) == self.max_tokens:
                break
            rt.prefill([tok])
        dt = time.perf_counter() - t0
        msg = rt.detokenize(out).strip().split("\n")[0].strip()
        return msg, len(out), dt


def _progress(label: str, i: int, n: int, t0: float, every: int = 10) -> None:
    if i == n or i % every == 0:
        el = time.perf_counter() - t0
        eta = el / max(i, 1) * (n - i)
        sys.stderr.write(f"\r{label}: {i}/{n} ({el:.0f} s, ~{eta:.0f} s left)   ")
        if i == n:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def tensor_frame_overhead(k: int, d: int, digest: str = "0" * 64) -> int | None:
    """Bytes of one protocol TENSOR message carrying f32 [k, d] beyond the payload, or None if
    the protocol module cannot encode one here."""
    try:
        arr = np.zeros((k, d), dtype=np.float32)
        msg = TensorMessage(session_id=bytes(16), message_id=1, kind=Kind.BRIDGED_PREFIX,
                            apply=ApplyMode.APPEND, seq_slot=0, layer_range=(0, 0),
                            token_range=(0, k),
                            tensors=(Tensor("prefix", DType.F32, (k, d), memoryview(arr).cast("B")),),
                            attrs={"bridge": digest})
        total = sum(memoryview(p).nbytes for p in encode_tensor_message(msg))
        return int(total - arr.nbytes)
    except Exception:  # noqa: BLE001 - optional figure; the protocol is a moving target
        return None


# --------------------------------------------------------------------------- report


@dataclasses.dataclass
class ConditionResult:
    name: str  # e.g. "bridged (ridge k4)"
    condition: str  # none | text_relay | original_text | bridged | shuffled | zero | mean | ...
    group: str | None  # bridge group (kind kK) or None
    role: str  # reference | baseline | bridge | control
    acc: float
    ci: tuple[float, float]
    per_seed: list[float]
    latency_median_ms: float | None
    latency_p90_ms: float | None
    wire_bytes: float | None
    latency_what: str
    wire_what: str
    n: int
    scored_on: str  # sha256 of the scored examples (text + gold label), the same for all


@dataclasses.dataclass
class EvalReport:
    task: str
    split: str
    n: int
    examples_digest: str
    bridges: list[dict[str, Any]]
    conditions: list[ConditionResult]
    checks: list[dict[str, Any]]
    diagnostics: list[str]
    probe: dict[str, Any]
    relay: dict[str, Any]
    sender: dict[str, Any]
    settings: dict[str, Any]
    derangement: list[int]
    per_example: dict[str, Any]
    wall_s: float
    calibration: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    paired: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    soft_prompts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # Vectors of the first seed of each group (not serialized): for checks and tests.
    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)

    def condition(self, name: str) -> ConditionResult:
        for c in self.conditions:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "arrays"}
        d["conditions"] = [dataclasses.asdict(c) for c in self.conditions]
        return d

    def table_md(self) -> str:
        rows = ["| condition | accuracy [95% CI] | per seed | latency ms median (p90) | wire bytes |",
                "|---|---|---|---|---|"]
        for c in self.conditions:
            seeds = " / ".join(f"{a:.3f}" for a in c.per_seed) if len(c.per_seed) > 1 else ""
            lat = ("" if c.latency_median_ms is None
                   else f"{c.latency_median_ms:.0f} ({c.latency_p90_ms:.0f})")
            wire = "" if c.wire_bytes is None else f"{c.wire_bytes:,.0f}"
            rows.append(f"| {c.name} | {c.acc:.3f} [{c.ci[0]:.3f}, {c.ci[1]:.3f}] | {seeds} | "
                        f"{lat} | {wire} |")
        return "\n".join(rows)

    def paired_md(self) -> str:
        """Bridge minus every baseline, paired over the same examples."""
        rows = ["| bridge | minus | points [95% CI] |", "|---|---|---|"]
        rows += [f"| {p['bridge']} | {p['versus']} | {p['diff']:+.1f} [{p['ci'][0]:+.1f}, "
                 f"{p['ci'][1]:+.1f}] |" for p in self.paired]
        return "\n".join(rows)

    def calibration_text(self) -> str:
        return "\n".join(
            f"* {name}: offset {', '.join(f'{b:+.3f}' for b in c['offset'])} from "
            f"{c['fitted_on']}; dev accuracy {c['dev_acc_raw']:.3f} raw -> {c['dev_acc']:.3f}"
            for name, c in self.calibration.items())

    def checks_text(self) -> str:
        return "\n".join([f"* {c['text']}" for c in self.checks]
                         + [f"* (info) {d}" for d in self.diagnostics])

    def markdown(self) -> str:
        notes = [
            f"# Bridge evaluation: {self.task}, first {self.n} {self.split} examples",
            "",
            self.table_md(),
            "",
            "## Goals",
            "",
            self.checks_text(),
            "",
            "## Paired differences",
            "",
            self.paired_md(),
            "",
            "## Calibration (fitted on dev or content-free reads, never on test)",
            "",
            self.calibration_text(),
            "",
            "## Notes",
            "",
            "* Latency per message, every receiver read with the primer cached: "
            + "; ".join(dict.fromkeys(f"{c.condition}: {c.latency_what}"
                                      for c in self.conditions if c.latency_what)),
            "* Wire bytes: " + "; ".join(dict.fromkeys(f"{c.condition}: {c.wire_what}"
                                                       for c in self.conditions if c.wire_what)),
            f"* Linear probe: C={self.probe['C']:g} picked on {self.probe['n_dev']} dev examples "
            "(dev accuracy per C: "
            + ", ".join(f"{c:g}: {a:.3f}" for c, a in zip(self.probe["cs"], self.probe["dev_scores"],
                                                          strict=True))
            + f"), trained on the first {self.probe['n_train']} train examples, layer "
            f"{self.probe['layer']}.",
            f"* Text relay prompt `{self.relay['prompt_name']}`: {self.relay['prompt']!r}, at most "
            f"{self.relay['max_tokens']} tokens (mean {self.relay['mean_tokens']:.1f}); e.g. "
            + "; ".join(repr(m) for m in self.relay["examples"][:3]) + ".",
            f"* Sender rows: fresh capture vs feature cache, max relative difference "
            f"{self.sender['max_rel_diff']:.2e}. Text reads (receiver and relay sender) that "
            f"fell back to a full prefill: {self.settings['text_fallbacks']}.",
            f"* Bootstrap: {self.settings['resamples']} resamples, seed {self.settings['seed']}; "
            f"threads {self.settings['threads']}; wall time {self.wall_s:.0f} s.",
        ]
        return "\n".join(notes) + "\n"


def _examples_digest(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.text, ex.label]).encode() + b"\n")
    return h.hexdigest()


def _n_train(br: Bridge) -> int:
    tr = br.meta.get("training") or {}
    for v in (tr.get("n_train"), (tr.get("train") or {}).get("n") if isinstance(tr.get("train"), dict)
              else None):
        if isinstance(v, int) and v > 0:
            return v
    return DEFAULT_N_TRAIN


def _group_name(br: Bridge) -> str:
    """Bridges of one group are seeds of one design: kind, K, source layer, and how it is read
    (``direct``: the answer is read at the last bridged vector, without the prompt's tail)."""
    direct = " direct" if br.prompt is not None and not br.prompt.after else ""
    return f"{br.kind} k{br.k} l{br.source_layer}{direct}"


# --------------------------------------------------------------------------- baselines

CALIBRATED = ("original_text", "text_relay", "sender_alone")  # rows that get calibrated twins
# whose content-free reads calibrate each base: the relay's message sits in the receiver's
# text slot, so it shares the receiver's content-free reads with the original text
CONTENT_FREE_OF = {"original_text": "receiver", "text_relay": "receiver", "sender_alone": "sender"}


def scored_majority(examples: Sequence[Example]) -> str:
    """The most frequent gold label among the SCORED examples (first seen wins a tie): the best
    any constant answer can do on exactly these examples."""
    return Counter(e.label for e in examples).most_common(1)[0][0]


def dev_reads(reader: Reader, relay: TextRelay, sender: Reader, dev: Sequence[Example]
              ) -> tuple[dict[str, np.ndarray], list[str]]:
    """Label logits [n_dev, L] of the calibrated baselines on DEV examples (what their offsets
    are fitted on), and the relay's dev messages."""
    out: dict[str, list[np.ndarray]] = {b: [] for b in CALIBRATED}
    msgs: list[str] = []
    t0 = time.perf_counter()
    for i, ex in enumerate(dev):
        out["original_text"].append(reader.read_text(ex.text)[0])
        msgs.append(relay.message(ex.text)[0])
        out["text_relay"].append(reader.read_text(msgs[-1])[0])
        out["sender_alone"].append(sender.read_text(ex.text)[0])
        _progress("dev (calibration)", i + 1, len(dev), t0)
    return {b: np.stack(v) for b, v in out.items()}, msgs


def calibrate(test_lg: dict[str, np.ndarray], dev_lg: dict[str, np.ndarray],
              cf_lg: dict[str, np.ndarray], y_dev: np.ndarray
              ) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """Offsets for each calibrated base (``offset``: fitted on dev labels; ``contextual``: from
    content-free reads) and the calibrated test predictions [1, n], named ``<base> (<how>)``.
    Test logits are only ever shifted, never looked at to choose a shift."""
    info: dict[str, dict[str, Any]] = {}
    preds: dict[str, np.ndarray] = {}
    for base in CALIBRATED:
        offsets = {"offset": fit_offset(dev_lg[base], y_dev),
                   "contextual": contextual_offset(cf_lg[CONTENT_FREE_OF[base]])}
        for how, b in offsets.items():
            preds[f"{base} ({how})"] = predict(test_lg[base], b)
            info[f"{base} ({how})"] = {
                "base": base, "how": how, "offset": b.tolist(),
                "dev_acc": float(np.mean(predict(dev_lg[base], b) == y_dev)),
                "dev_acc_raw": float(np.mean(predict(dev_lg[base]) == y_dev)),
                "fitted_on": (f"first {len(y_dev)} dev examples" if how == "offset" else
                              f"content-free reads {list(CONTENT_FREE)} by the "
                              f"{CONTENT_FREE_OF[base]}")}
    return info, preds


def _constant(lg: np.ndarray, lat: np.ndarray, j: int, i: int, read: tuple[np.ndarray, float]
              ) -> None:
    """Store one timed read of a constant input; its answer must not change between reads."""
    lg[j, i], lat[j, i] = read
    if i and int(np.argmax(lg[j, i])) != int(np.argmax(lg[j, 0])):
        raise RuntimeError("the receiver's answer to a constant input changed")


def paired_differences(correct: dict[str, np.ndarray], bridge: str, versus: Sequence[str],
                       idx: np.ndarray) -> list[dict[str, Any]]:
    """Bridge minus each baseline in accuracy points, with the paired bootstrap CI (seeds of
    either side averaged per example first)."""
    out = []
    for v in versus:
        d = correct[bridge].mean(axis=0) - correct[v].mean(axis=0)
        lo, hi = bootstrap_ci(d, idx)
        out.append({"bridge": bridge, "versus": v, "diff": float(d.mean()) * 100,
                    "ci": (lo * 100, hi * 100)})
    return out


# --------------------------------------------------------------------------- evaluate


def evaluate(bridge_paths: Sequence[str | Path], cfg: Config | None = None, task: str = "sentiment",
             n: int = 400, *, threads: int | None = 1, **kw: Any) -> EvalReport:
    """Score ``bridge_paths`` and every baseline/control on the first ``n`` TEST examples of
    ``task``; writes ``<out>/eval.{json,md,svg}`` when ``out`` is given. Keywords: see
    :func:`_evaluate`.

    ``threads``: llama.cpp threads for all three runtimes, and numpy's BLAS threads while this
    runs (None: leave both as configured). One by default: on a busy machine llama.cpp's
    spinning thread barriers stall whenever a worker is preempted (on 2 loaded cores, Gemma
    decoded a token in ~2 s with 2 threads and 22 ms with 1), and OpenBLAS workers that keep
    spinning after ``bridge.apply`` slowed the receiver's next read by ~50 ms (125 vs 73 ms):
    either would measure the machine rather than the methods."""
    cfg = cfg or load_config()
    if threads is None:
        return _evaluate(bridge_paths, cfg, task, n, **kw)
    with blas_threads(threads):
        return _evaluate(bridge_paths, cfg.replace(runtime_n_threads=threads), task, n, **kw)


@dataclasses.dataclass(frozen=True)
class _Options:
    """``_evaluate``'s settings, resolved once (the relay's template, the task prompt), so each
    step takes them as one argument instead of seventeen."""

    task: str
    n: int  # test examples asked for (the split may hold fewer)
    relay_tokens: int
    relay_prompt: str
    template: str
    n_dev: int
    probe_cs: Sequence[float]
    resamples: int
    seed: int
    constant_repeats: int
    n_train: int | None
    source: str
    target: str
    soft_prompts: Sequence[str | Path]
    label_head: bool
    prompt: BridgePrompt

    @property
    def labels(self) -> list[str]:
        return list(self.prompt.labels)

    @property
    def lab_index(self) -> dict[str, int]:
        return {lab: i for i, lab in enumerate(self.labels)}


@dataclasses.dataclass
class _Split:
    """The scored TEST examples, and the cached sender rows of TEST and DEV per source layer."""

    examples: list[Example]
    test_feats: dict[int, Features]
    dev_feats: dict[int, Features]
    layers: list[int]
    gold: np.ndarray
    scored_on: str
    perm: np.ndarray

    @property
    def n(self) -> int:
        return len(self.examples)


@dataclasses.dataclass
class _Probe:
    """The linear probe (fitted on train, C on dev) and its test answers; the dev examples it
    was tuned on are the ones calibration reads too."""

    fit: dict[str, Any]
    layer: int
    pred: np.ndarray
    seconds: float  # per test example
    n_train: int
    dev_ex: list[Example]
    y_dev: np.ndarray


@dataclasses.dataclass
class _Readers:
    """The receiver (one reader per distinct prompt tail), the text relay and the sender alone."""

    reader: Reader
    readers: list[Reader]  # per bridge: the way it was trained to be read
    relay: TextRelay
    sender: Reader


class _Reads:
    """What the per-example loop measures, filled in place: label logits and seconds of every
    read (``lg`` [seeds, n, L], ``lat`` [seeds, n]), sender captures, relay messages, applies."""

    def __init__(self, n: int, n_lab: int, n_bridges: int, n_soft: int, layers: list[int]):
        self.n, self.n_lab = n, n_lab
        self.lg: dict[str, np.ndarray] = {}
        self.lat: dict[str, np.ndarray] = {}
        for name in ("original_text", "text_relay", "sender_alone", "none"):
            self._slot(name)
        for c in ("bridged", "shuffled", "random", "zero", "mean"):
            self._slot(c, n_bridges)
        if n_soft:
            self._slot("prompt_tuning", n_soft)
        self.apply_s = np.zeros((n_bridges, n))
        self.capture_s = {layer: np.zeros(n) for layer in layers}  # each layer's own stopped capture
        self.rel_diff = np.zeros(n)
        self.relay_msgs: list[str] = []
        self.relay_ntok = np.zeros(n, dtype=int)
        self.relay_send_s = np.zeros(n)

    def _slot(self, name: str, s: int = 1) -> None:
        self.lg[name] = np.full((s, self.n, self.n_lab), np.nan, dtype=np.float32)
        self.lat[name] = np.full((s, self.n), np.nan)


@dataclasses.dataclass
class _Measured:
    """Everything read while the models are open; the statistics after it need no model."""

    bridges: list[Bridge]
    groups: dict[str, list[int]]
    soft: list[tuple[np.ndarray, dict[str, Any]]]
    split: _Split
    probe: _Probe
    vec: dict[str, list[np.ndarray]]
    means: list[np.ndarray]
    reads: _Reads
    dev_lg: dict[str, np.ndarray]
    dev_msgs: list[str]
    cf_lg: dict[str, np.ndarray]
    n_const: int
    text_fallbacks: int
    threads: dict[str, Any]
    train_majority: str
    majority: str


def _evaluate(bridge_paths: Sequence[str | Path], cfg: Config, task: str = "sentiment",
             n: int = 400, *, out: str | Path | None = None, relay_tokens: int = 24,
             relay_prompt: str | None = None, n_dev: int = 500, probe_cs: Sequence[float] = PROBE_CS,
             resamples: int = 1000, seed: int = 0, constant_repeats: int = 30,
             n_train: int | None = None, source: str = SOURCE, target: str = TARGET,
             soft_prompts: Sequence[str | Path] = (), label_head: bool = True) -> EvalReport:
    """``source``/``target``: registry names or GGUF paths of the two models; ``relay_prompt``: a name in RELAY_PROMPTS or a template with ``{text}``; ``n_dev``: dev
    examples for the probe's C, the ``mean`` control and the calibration offsets; ``n_train``: the probe's train
    examples (default: the first bridge's manifest, else 2000); ``constant_repeats``: timed
    reads of the constant inputs; ``soft_prompts``: prompt-tuning baselines (one row, their
    files as seeds); ``label_head``: every read (receiver and sender alone) computes only the
    labels' logits (edgelink.runtime.label_head) rather than the whole vocabulary's."""
    if not bridge_paths:
        raise ValueError("at least one bridge is needed")
    t_start = time.perf_counter()
    prompt = task_prompt(task)
    relay_prompt = relay_prompt or RELAY_PROMPT[task]
    template = RELAY_PROMPTS[task].get(relay_prompt, relay_prompt)
    opts = _Options(task=task, n=n, relay_tokens=relay_tokens, relay_prompt=relay_prompt, template=template,
                    n_dev=n_dev, probe_cs=probe_cs, resamples=resamples, seed=seed,
                    constant_repeats=constant_repeats, n_train=n_train, source=source, target=target,
                    soft_prompts=soft_prompts, label_head=label_head, prompt=prompt)
    bridges, groups = _load_bridges(bridge_paths, opts)
    report = _report(opts, _measure(cfg, opts, bridges, groups), t_start)
    if out is not None:
        write_outputs(report, out)
    return report


# ---- with the models open


def _load_bridges(bridge_paths: Sequence[str | Path], opts: _Options) -> tuple[list[Bridge], dict[str, list[int]]]:
    """The bridges, refused if trained for another task, and their groups (seeds of one design)."""
    task, prompt = opts.task, opts.prompt
    bridges = [load_bridge(p) for p in bridge_paths]
    for br in bridges:
        bt = (br.meta.get("training") or {}).get("task")
        if bt not in (None, task):
            raise ValueError(f"{br.path} was trained for task {bt!r}, not {task!r}")
    for br in bridges:
        if br.prompt is not None and dataclasses.replace(br.prompt, after=prompt.after) != prompt:
            _log(f"warning: {br.path} was trained with a prompt other than edgelink.train.tasks' "
                 f"{task!r} prompt, which this evaluation uses for every condition")
    groups: dict[str, list[int]] = {}
    for j, br in enumerate(bridges):
        groups.setdefault(_group_name(br), []).append(j)
    return bridges, groups


def _measure(cfg: Config, opts: _Options, bridges: list[Bridge], groups: dict[str, list[int]]) -> _Measured:
    """Every read of the evaluation, in the order the models see them (which their state and
    the timings depend on): features, probe, bridge outputs, calibration reads, then the loop."""
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(LlamaRuntime(resolve_model(opts.source, cfg), cfg, eval_hook=True))
        relay_rt = stack.enter_context(LlamaRuntime(resolve_model(opts.source, cfg), cfg, eval_hook=False))
        tgt = stack.enter_context(LlamaRuntime(resolve_model(opts.target, cfg), cfg, eval_hook=opts.label_head))
        soft, digest = _check_models(cfg, opts, bridges, src, tgt)
        split = _features(src, cfg, opts, bridges, digest)
        probe = _linear_probe(src, cfg, opts, bridges, split, digest)
        train_majority = Counter(e.label for e in load_split(opts.task, "train", cfg)).most_common(1)[0][0]
        majority = scored_majority(split.examples)
        vec, means = _bridge_outputs(bridges, split, opts.seed)
        rd = _make_readers(stack, cfg, opts, bridges, tgt, relay_rt)
        # ---- calibration data: DEV reads and content-free reads (no test example involved)
        dev_lg, dev_msgs = dev_reads(rd.reader, rd.relay, rd.sender, probe.dev_ex)
        cf_lg = {"receiver": np.stack([rd.reader.read_text(t)[0] for t in CONTENT_FREE]),
                 "sender": np.stack([rd.sender.read_text(t)[0] for t in CONTENT_FREE])}
        reads = _Reads(split.n, len(opts.labels), len(bridges), len(soft), split.layers)
        n_const = min(opts.constant_repeats, split.n)
        _example_loop(src, split, rd, soft, bridges, vec, means, reads, n_const)
        text_fallbacks = rd.reader.fallbacks + rd.relay.fallbacks + rd.sender.fallbacks
        threads = {"llama.cpp": cfg.runtime.n_threads or "all cores",
                   "blas": blas_thread_count() or "unknown"}
    return _Measured(bridges=bridges, groups=groups, soft=soft, split=split, probe=probe, vec=vec, means=means,
                     reads=reads, dev_lg=dev_lg, dev_msgs=dev_msgs, cf_lg=cf_lg, n_const=n_const,
                     text_fallbacks=text_fallbacks, threads=threads, train_majority=train_majority,
                     majority=majority)


def _check_models(cfg: Config, opts: _Options, bridges: list[Bridge], src: LlamaRuntime, tgt: LlamaRuntime
                  ) -> tuple[list[tuple[np.ndarray, dict[str, Any]]], str]:
    """Every bridge and soft prompt was trained for these two models; returns the soft prompts
    and the sender's weights digest (the feature cache's key)."""
    src_sig, tgt_sig = model_signature(src, cfg), model_signature(tgt, cfg)
    for br in bridges:
        br.check_pair(src_sig, tgt_sig)
    soft = [load_soft_prompt(p) for p in opts.soft_prompts]
    for p, (_, meta) in zip(opts.soft_prompts, soft, strict=True):
        if meta["target"].get("weights_digest") != tgt_sig.weights_digest:
            raise ValueError(f"{p} was trained for another target model")
    return soft, src_sig.weights_digest


def _features(src: LlamaRuntime, cfg: Config, opts: _Options, bridges: list[Bridge], digest: str) -> _Split:
    """Sender rows of TEST (evaluated) and DEV (mean control, probe's C) for every bridge layer."""
    layers = sorted({br.source_layer for br in bridges})
    test_feats: dict[int, Features] = {}
    dev_feats: dict[int, Features] = {}
    examples: list[Example] = []
    for layer in layers:
        examples, test_feats[layer] = split_features(src, cfg, opts.task, "test", layer, opts.n, digest)
        _, dev_feats[layer] = split_features(src, cfg, opts.task, "dev", layer, opts.n_dev, digest)
    lab_index = opts.lab_index
    gold = np.array([lab_index[ex.label] for ex in examples])
    return _Split(examples=examples, test_feats=test_feats, dev_feats=dev_feats, layers=layers, gold=gold,
                  scored_on=_examples_digest(examples), perm=derangement(len(examples), opts.seed))


def _linear_probe(src: LlamaRuntime, cfg: Config, opts: _Options, bridges: list[Bridge], split: _Split,
                  digest: str) -> _Probe:
    """Logistic regression on the first bridge's pooled sender rows: trained on train, C picked
    on dev, no receiver (what the sender's rows carry, read by the simplest reader)."""
    lab_index, n = opts.lab_index, split.n
    probe_layer = bridges[0].source_layer
    pool = bridges[0].pool
    n_tr = opts.n_train or _n_train(bridges[0])
    train_ex, train_f = split_features(src, cfg, opts.task, "train", probe_layer, n_tr, digest)
    dev_ex = load_split(opts.task, "dev", cfg)[:len(split.dev_feats[probe_layer])]
    x_tr = np.stack([pool(train_f.rows_of(i)) for i in range(len(train_f))]).astype(np.float64)
    x_dev = np.stack([pool(split.dev_feats[probe_layer].rows_of(i))
                      for i in range(len(dev_ex))]).astype(np.float64)
    x_te = np.stack([pool(split.test_feats[probe_layer].rows_of(i)) for i in range(n)]).astype(np.float64)
    y_tr = np.array([lab_index[e.label] for e in train_ex])
    y_dev = np.array([lab_index[e.label] for e in dev_ex])
    _log(f"probe: {len(y_tr)} train, {len(y_dev)} dev examples, layer {probe_layer}")
    probe = fit_probe(x_tr, y_tr, x_dev, y_dev, len(opts.labels), opts.probe_cs)
    t0 = time.perf_counter()
    probe_pred = probe_predict(probe, x_te)
    probe_s = (time.perf_counter() - t0) / n
    return _Probe(fit=probe, layer=probe_layer, pred=probe_pred, seconds=probe_s, n_train=len(y_tr),
                  dev_ex=dev_ex, y_dev=y_dev)


def _bridge_outputs(bridges: list[Bridge], split: _Split, seed: int
                    ) -> tuple[dict[str, list[np.ndarray]], list[np.ndarray]]:
    """Each bridge's vectors for every test example, with the shuffled and random controls
    made from them, and the mean over DEV (the constant ``mean`` control)."""
    n = split.n
    vec: dict[str, list[np.ndarray]] = {c: [] for c in ("bridged", "shuffled", "random")}
    means, rng = [], np.random.default_rng(seed + 1)
    for br in bridges:
        f = split.test_feats[br.source_layer]
        v = np.stack([br.apply(f.rows_of(i)) for i in range(n)])  # timed again in the loop
        vec["bridged"].append(v)
        vec["shuffled"].append(v[split.perm])
        vec["random"].append(norm_matched_gaussian(v, rng))
        fd = split.dev_feats[br.source_layer]
        means.append(np.mean([br.apply(fd.rows_of(i)) for i in range(len(fd))], axis=0))
    return vec, means


def _make_readers(stack: contextlib.ExitStack, cfg: Config, opts: _Options, bridges: list[Bridge],
                  tgt: LlamaRuntime, relay_rt: LlamaRuntime) -> _Readers:
    """The receiver's readers, the relay and the sender alone (its own runtime: capture clears ``src``)."""
    prompt, label_head = opts.prompt, opts.label_head
    sender_rt = stack.enter_context(LlamaRuntime(resolve_model(opts.source, cfg), cfg,
                                                 eval_hook=label_head))
    emb = tgt.token_embeddings()
    reader = Reader(tgt, emb, prompt, label_head)
    # a bridge trained to be read without the prompt's tail (``TrainSpec.tail``) is read,
    # with its controls, the way it was trained; every other condition reads the task prompt
    by_after, readers = {prompt.after: reader}, []
    for br in bridges:  # one reader per distinct tail
        after = prompt.after if br.prompt is None else br.prompt.after
        if after not in by_after:
            by_after[after] = Reader(tgt, emb, dataclasses.replace(prompt, after=after), label_head)
        readers.append(by_after[after])
    relay = TextRelay(relay_rt, opts.template, opts.relay_tokens)
    sender = Reader(sender_rt, sender_rt.token_embeddings(), prompt, label_head)
    return _Readers(reader=reader, readers=readers, relay=relay, sender=sender)


def _example_loop(src: LlamaRuntime, split: _Split, rd: _Readers, soft: list[tuple[np.ndarray, dict[str, Any]]],
                  bridges: list[Bridge], vec: dict[str, list[np.ndarray]], means: list[np.ndarray],
                  reads: _Reads, n_const: int) -> None:
    """Every condition on one example, then the next (interleaved, so load drifts hit all alike)."""
    n = split.n
    t_loop = time.perf_counter()
    for i, ex in enumerate(split.examples):
        _capture_sender(src, split, reads, i, ex)
        _read_texts(rd, soft, reads, i, ex)
        _read_bridged(bridges, split, rd, vec, reads, i)
        # constant inputs: answered once, timed on the first n_const examples
        if i < n_const:
            _read_constants(bridges, rd, means, reads, i)
        _progress("eval", i + 1, n, t_loop)
    for name in ("none", "zero", "mean"):
        reads.lg[name][:, n_const:] = reads.lg[name][:, :1]


def _capture_sender(src: LlamaRuntime, split: _Split, reads: _Reads, i: int, ex: Example) -> None:
    """The sender's capture (timed, stopped at each layer), compared with the cached rows the bridges read."""
    for layer in split.layers:
        src.clear()
        t0 = time.perf_counter()
        rows = capture(src, src.tokenize(ex.text), [layer], stop_early=True)[layer]
        reads.capture_s[layer][i] = time.perf_counter() - t0
        cached = split.test_feats[layer].rows_of(i)
        reads.rel_diff[i] = max(reads.rel_diff[i], float(np.linalg.norm(rows - cached)
                                                         / max(np.linalg.norm(cached), 1e-12)))
    src.clear()


def _read_texts(rd: _Readers, soft: list[tuple[np.ndarray, dict[str, Any]]], reads: _Reads, i: int,
                ex: Example) -> None:
    """The text conditions: the original text, the relay's message, the sender alone, soft prompts."""
    lg, lat = reads.lg, reads.lat
    lg["original_text"][0, i], lat["original_text"][0, i] = rd.reader.read_text(ex.text)
    msg, reads.relay_ntok[i], reads.relay_send_s[i] = rd.relay.message(ex.text)
    reads.relay_msgs.append(msg)
    lg["text_relay"][0, i], lat["text_relay"][0, i] = rd.reader.read_text(msg)
    lg["sender_alone"][0, i], lat["sender_alone"][0, i] = rd.sender.read_text(ex.text)
    for j, (rows_sp, _) in enumerate(soft):
        lg["prompt_tuning"][j, i], lat["prompt_tuning"][j, i] = \
            rd.reader.read_soft_text(rows_sp, ex.text)


def _read_bridged(bridges: list[Bridge], split: _Split, rd: _Readers, vec: dict[str, list[np.ndarray]],
                  reads: _Reads, i: int) -> None:
    """The vector conditions: each bridge's apply (timed, checked against the precomputed output),
    then its vectors and the shuffled and random controls read by the receiver."""
    lg, lat = reads.lg, reads.lat
    for j, br in enumerate(bridges):
        rows_i = split.test_feats[br.source_layer].rows_of(i)
        t0 = time.perf_counter()
        out_ij = br.apply(rows_i)
        reads.apply_s[j, i] = time.perf_counter() - t0
        if not np.allclose(out_ij, vec["bridged"][j][i], rtol=1e-5, atol=1e-6):
            raise RuntimeError("bridge.apply gave a different output for the same rows")
        for c in ("bridged", "shuffled", "random"):
            lg[c][j, i], lat[c][j, i] = rd.readers[j].read_vectors(vec[c][j][i])


def _read_constants(bridges: list[Bridge], rd: _Readers, means: list[np.ndarray], reads: _Reads, i: int) -> None:
    """The constant inputs (no message, zero vectors, the dev mean), timed on this example."""
    lg, lat = reads.lg, reads.lat
    _constant(lg["none"], lat["none"], 0, i, rd.reader.read_text(""))
    for j, br in enumerate(bridges):
        _constant(lg["zero"], lat["zero"], j, i,
                  rd.readers[j].read_vectors(np.zeros((br.k, br.d_tgt), np.float32)))
        _constant(lg["mean"], lat["mean"], j, i, rd.readers[j].read_vectors(means[j]))


# ---- statistics (no model)


class _Scorer:
    """The condition rows, in order, each with its accuracy, bootstrap CI (over the shared
    resamples ``idx``), latency percentiles and wire bytes; ``correct`` keeps the 0/1 answers
    [seeds, n] for paired differences."""

    def __init__(self, idx: np.ndarray, n: int, scored_on: str):
        self.idx, self.n, self.scored_on = idx, n, scored_on
        self.conditions: list[ConditionResult] = []
        self.correct: dict[str, np.ndarray] = {}

    def add(self, name: str, cond: str, group: str | None, role: str, ok: np.ndarray,
            lat_s: np.ndarray | None, wire: float | None, lat_what: str, wire_what: str) -> None:
        ok = np.atleast_2d(ok).astype(np.float64)
        self.correct[name] = ok
        ms = None if lat_s is None else np.asarray(lat_s, dtype=np.float64).ravel() * 1e3
        ms = None if ms is None else ms[np.isfinite(ms)]
        self.conditions.append(ConditionResult(
            name=name, condition=cond, group=group, role=role, acc=float(ok.mean()),
            ci=bootstrap_ci(ok, self.idx), per_seed=[float(r.mean()) for r in ok],
            latency_median_ms=None if ms is None else _pct(ms, 50),
            latency_p90_ms=None if ms is None else _pct(ms, 90),
            wire_bytes=wire, latency_what=lat_what, wire_what=wire_what, n=self.n, scored_on=self.scored_on))

    def diff(self, a: str, b: str) -> tuple[float, tuple[float, float]]:
        """``a`` minus ``b`` in accuracy points, with the paired bootstrap CI."""
        da = self.correct[a].mean(axis=0) - self.correct[b].mean(axis=0)
        lo, hi = bootstrap_ci(da, self.idx)
        return float(da.mean()) * 100, (lo * 100, hi * 100)


def _report(opts: _Options, m: _Measured, t_start: float) -> EvalReport:
    """Predictions (raw and calibrated), every condition row, the goals and the report."""
    reads, split = m.reads, m.split
    pred = {name: v.argmax(axis=-1) for name, v in reads.lg.items()}
    calib, cal_pred = calibrate(reads.lg, m.dev_lg, m.cf_lg, m.probe.y_dev)
    pred.update(cal_pred)
    sc = _Scorer(bootstrap_indices(split.n, opts.resamples, opts.seed), split.n, split.scored_on)
    _add_baselines(sc, opts, m, pred)
    bridge_info = _add_bridges(sc, opts, m, pred)
    by_name = {c.name: c for c in sc.conditions}
    checks = [c for g in m.groups for c in _group_checks(sc, by_name, g)]
    versus = [c.name for c in sc.conditions if c.role in ("reference", "baseline")]
    paired = [row for g in m.groups for row in paired_differences(sc.correct, f"bridged ({g})", versus, sc.idx)]
    return EvalReport(
        task=opts.task, split="test", n=split.n, examples_digest=split.scored_on, bridges=bridge_info,
        conditions=sc.conditions, checks=checks, diagnostics=_diagnostics(opts, m, pred),
        probe={"C": m.probe.fit["C"], "cs": m.probe.fit["cs"], "dev_scores": m.probe.fit["dev_scores"],
               "train_acc": m.probe.fit["train_acc"], "n_train": m.probe.n_train, "n_dev": len(m.probe.y_dev),
               "layer": m.probe.layer, "selected_on": "dev"},
        soft_prompts=[{"path": str(p), "k": meta["k"], "seed": meta["training"].get("seed"),
                       "dev_acc": meta["training"].get("dev_acc"),
                       "best_step": meta["training"].get("best_step")}
                      for p, (_, meta) in zip(opts.soft_prompts, m.soft, strict=True)],
        relay={"prompt_name": opts.relay_prompt if opts.relay_prompt in RELAY_PROMPTS[opts.task] else "custom",
               "prompt": opts.template, "max_tokens": opts.relay_tokens,
               "mean_tokens": float(reads.relay_ntok.mean()), "examples": reads.relay_msgs[:5],
               "stop": "EOG, max tokens, or the end of the first line"},
        sender={"max_rel_diff": float(reads.rel_diff.max()), "layers": split.layers,
                "capture_median_ms": {str(layer): _pct(c * 1e3, 50) for layer, c in reads.capture_s.items()}},
        settings={"resamples": opts.resamples, "seed": opts.seed, "n_dev": opts.n_dev,
                  "constant_repeats": m.n_const, "train_majority": m.train_majority,
                  "scored_majority": m.majority, "text_fallbacks": m.text_fallbacks, "threads": m.threads,
                  "label_head": opts.label_head, "apply_median_ms": _pct(reads.apply_s.ravel() * 1e3, 50)},
        derangement=split.perm.tolist(), per_example=_per_example(opts, m, pred),
        wall_s=time.perf_counter() - t_start, calibration=calib, paired=paired, arrays=_first_seed_arrays(m))


def _add_baselines(sc: _Scorer, opts: _Options, m: _Measured, pred: dict[str, np.ndarray]) -> None:
    """The reference and baseline rows: majority, none, the text rows (raw and calibrated),
    prompt tuning and the linear probe."""
    lat, reads, gold, examples = m.reads.lat, m.reads, m.split.gold, m.split.examples
    lab_index, majority = opts.lab_index, m.majority
    sc.add("majority", "majority", None, "reference",
           np.array([lab_index[majority] == g for g in gold]), None, 0.0, "",
           f"none (always {majority!r}, the most frequent label of the scored examples)")
    sc.add("none", "none", None, "reference", pred["none"] == gold, lat["none"], 0.0,
           "receiver read", "nothing sent")
    text_rows = {  # role, latency [1, n] s, wire bytes, what the latency is, what the bytes are
        "original_text": ("reference", lat["original_text"],
                          float(np.mean([len(e.text.encode()) for e in examples])),
                          "receiver read", "UTF-8 bytes of the text"),
        "text_relay": ("baseline", reads.relay_send_s[None, :] + lat["text_relay"],
                       float(np.mean([len(msg.encode()) for msg in reads.relay_msgs])),
                       "sender prefill + generation + receiver read", "UTF-8 bytes of the message"),
        "sender_alone": ("baseline", lat["sender_alone"], None,
                         "sender read of the task prompt (no receiver)", ""),
    }
    for base, (role, lat_s, wire, lat_what, wire_what) in text_rows.items():
        sc.add(base, base, None, role, pred[base] == gold, lat_s, wire, lat_what, wire_what)
        for how in ("offset", "contextual"):
            sc.add(f"{base} ({how})", f"{base} ({how})", None, role, pred[f"{base} ({how})"] == gold,
                   lat_s, wire, lat_what, wire_what)
    if m.soft:
        sc.add(f"prompt_tuning (k{m.soft[0][0].shape[0]})", "prompt_tuning", None, "baseline",
               pred["prompt_tuning"] == gold, lat["prompt_tuning"], text_rows["original_text"][2],
               "receiver read of K soft rows + the text", "UTF-8 bytes of the text")
    sc.add("linear_probe", "linear_probe", None, "baseline", m.probe.pred == gold,
           reads.capture_s[m.probe.layer] + m.probe.seconds, None, "sender capture + probe", "")


def _add_bridges(sc: _Scorer, opts: _Options, m: _Measured, pred: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per bridge group: the bridged row (its seeds as rows) and its four controls; returns
    what the report says about each bridge file."""
    bridges, reads, gold = m.bridges, m.reads, m.split.gold
    bridge_info = []
    for g, members in m.groups.items():
        k, d = bridges[members[0]].k, bridges[members[0]].d_tgt
        payload = k * d * 4
        over = tensor_frame_overhead(k, d)
        wire = float(payload + (over or 0))
        wire_what = (f"f32 K*d*4 = {payload} + {over} bytes of TENSOR message header"
                     if over is not None else f"f32 K*d*4 = {payload} (payload only)")
        mi = np.array(members)
        b_lat = (np.stack([reads.capture_s[bridges[j].source_layer] for j in members])
                 + reads.apply_s[mi] + reads.lat["bridged"][mi])
        sc.add(f"bridged ({g})", "bridged", g, "bridge", pred["bridged"][mi] == gold, b_lat, wire,
               "sender capture + apply + receiver read", wire_what)
        for c in ("shuffled", "zero", "mean", "random"):
            sc.add(f"{c} ({g})", c, g, "control", pred[c][mi] == gold, reads.lat[c][mi], wire,
                   "receiver read", "same message shape as bridged")
        for j in members:
            br = bridges[j]
            bridge_info.append({"path": str(br.path), "digest": br.digest, "kind": br.kind, "k": br.k,
                                "layer": br.source_layer, "group": g,
                                "prompt_matches": br.prompt is None or br.prompt == task_prompt(opts.task),
                                "seed": (br.meta.get("training") or {}).get("seed"),
                                "dev_acc": (br.meta.get("training") or {}).get("dev_acc")})
    return bridge_info


def _group_checks(sc: _Scorer, by_name: dict[str, ConditionResult], g: str) -> list[dict[str, Any]]:
    """The headline goals of one bridge group: beats shuffled by 20 points, matches the text
    relay, at a fifth of its latency."""
    b = f"bridged ({g})"
    d_sh, ci_sh = sc.diff(b, f"shuffled ({g})")
    d_tr, ci_tr = sc.diff(b, "text_relay")
    ok_sh, ok_tr = d_sh >= 20.0, d_tr >= 0.0
    lb, lr = by_name[b].latency_median_ms, by_name["text_relay"].latency_median_ms
    ratio = (lr / lb) if lb else float("inf")
    return [
        {"group": g, "goal": "bridged - shuffled >= 20 points", "value": d_sh,
         "ci": ci_sh, "holds": ok_sh, "ci_holds": ci_sh[0] >= 20.0,
         "text": f"[{g}] bridge beats shuffled by >= 20 points: "
                 f"{'HOLDS' if ok_sh else 'FAILS'} ({d_sh:+.1f} points, 95% CI "
                 f"[{ci_sh[0]:+.1f}, {ci_sh[1]:+.1f}]"
                 f"{'' if ci_sh[0] >= 20 or not ok_sh else '; CI reaches below 20'})"},
        {"group": g, "goal": "bridged >= text_relay", "value": d_tr, "ci": ci_tr,
         "holds": ok_tr, "ci_holds": ci_tr[0] >= 0.0,
         "text": f"[{g}] bridge accuracy >= text relay: "
                 f"{'HOLDS' if ok_tr else 'FAILS'} ({d_tr:+.1f} points, 95% CI "
                 f"[{ci_tr[0]:+.1f}, {ci_tr[1]:+.1f}]"
                 f"{'' if ci_tr[0] >= 0 or not ok_tr else '; CI reaches below 0'})"},
        {"group": g, "goal": "latency(text_relay) / latency(bridged) >= 5",
         "value": ratio, "holds": ratio >= 5.0,
         "text": f"[{g}] bridge latency <= 1/5 of text relay: "
                 f"{'HOLDS' if ratio >= 5 else 'FAILS'} (median {lb:.0f} ms vs "
                 f"{lr:.0f} ms, ratio {ratio:.1f}x)"},
    ]


def _diagnostics(opts: _Options, m: _Measured, pred: dict[str, np.ndarray]) -> list[str]:
    """What each group's bridged answers are, and how often they move with the message."""
    labels = opts.labels
    diagnostics = []
    for g, members in m.groups.items():
        mi = np.array(members)
        b, sh, no = pred["bridged"][mi], pred["shuffled"][mi], pred["none"][0]
        distinct = sorted({labels[a] for a in b.ravel()})
        diagnostics.append(
            f"[{g}] bridged answers: {', '.join(distinct)}; the answer changes when the message "
            f"is swapped for another example's on {float((b != sh).mean()):.1%} of examples, and "
            f"differs from the no-message answer on {float((b != no).mean()):.1%}")
    return diagnostics


def _first_seed_arrays(m: _Measured) -> dict[str, np.ndarray]:
    """The vectors of each group's first seed (kept on the report for checks and tests)."""
    arrays = {}
    for g, members in m.groups.items():
        j = members[0]
        for c in ("bridged", "shuffled", "random"):
            arrays[f"{c} ({g})"] = m.vec[c][j]
        arrays[f"mean ({g})"] = m.means[j]
    return arrays


def _per_example(opts: _Options, m: _Measured, pred: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per-example answers, label logits, messages and timings: enough to recompute any row."""
    labels, reads = opts.labels, m.reads
    return {
        "gold": [labels[g] for g in m.split.gold],
        "pred": {name: [[labels[a] if a >= 0 else None for a in row] for row in pred[name]]
                 for name in pred},
        "linear_probe": [labels[a] for a in m.probe.pred],
        "labels": labels,
        # label logits [seeds][n][L] of every condition the receiver (or the sender) read;
        # a calibrated row is its base's logits plus ``calibration[name]["offset"]``
        "label_logits": {name: np.round(v, 4).tolist() for name, v in reads.lg.items()},
        "relay_messages": reads.relay_msgs,
        "dev": {"gold": [labels[y] for y in m.probe.y_dev], "relay_messages": m.dev_msgs,
                "label_logits": {b: np.round(v, 4).tolist() for b, v in m.dev_lg.items()}},
        "content_free": {"inputs": list(CONTENT_FREE),
                         **{who: np.round(v, 4).tolist() for who, v in m.cf_lg.items()}},
        "latency_ms": {"capture": {str(layer): (c * 1e3).round(2).tolist()
                                   for layer, c in reads.capture_s.items()},
                       "relay_sender": (reads.relay_send_s * 1e3).round(2).tolist(),
                       "apply": (reads.apply_s * 1e3).round(3).tolist(),
                       **{f"read_{c}": (reads.lat[c] * 1e3).round(2).tolist() for c in reads.lat}},
    }


def write_outputs(report: EvalReport, out: str | Path) -> dict[str, Path]:
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    paths = {"json": d / "eval.json", "md": d / "eval.md", "svg": d / "eval.svg"}
    paths["json"].write_text(json.dumps(report.to_dict(), indent=1, default=_jsonable) + "\n")
    paths["md"].write_text(report.markdown())
    chance = next((c.acc for c in report.conditions if c.condition == "majority"), None)
    write_svg(paths["svg"], [dataclasses.asdict(c) for c in report.conditions],
              title=f"{report.task}: first {report.n} test examples (dashed: majority)",
              chance=chance)
    return paths


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# --------------------------------------------------------------------------- relay prompt sweep


def sweep_relay(cfg: Config | None = None, task: str = "sentiment", n_dev: int = 100,
                relay_tokens: int = 24, prompts: dict[str, str] | None = None,
                threads: int | None = 1) -> dict[str, float]:
    """TorchReceiver accuracy of the text relay for each candidate prompt on the first ``n_dev`` DEV
    examples (never test): how ``RELAY_PROMPT`` was chosen."""
    cfg = cfg or load_config()
    if threads is not None:
        cfg = cfg.replace(runtime_n_threads=threads)
    prompts = prompts or RELAY_PROMPTS[task]
    prompt = task_prompt(task)
    dev = load_split(task, "dev", cfg)[:n_dev]
    labels = list(prompt.labels)
    out = {}
    with LlamaRuntime(resolve_model(SOURCE, cfg), cfg) as s, \
            LlamaRuntime(resolve_model(TARGET, cfg), cfg) as t:
        reader = Reader(t, t.token_embeddings(), prompt)
        for name, template in prompts.items():
            ok, t0 = [], time.perf_counter()
            relay = TextRelay(s, template, relay_tokens)
            for i, ex in enumerate(dev):
                msg, _, _ = relay.message(ex.text)
                ok.append(labels[int(np.argmax(reader.read_text(msg)[0]))] == ex.label)
                _progress(f"relay {name}", i + 1, len(dev), t0)
            out[name] = float(np.mean(ok))
            _log(f"relay prompt {name}: dev accuracy {out[name]:.3f}")
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m edgelink.train.evaluate",
                                 description="choose the text relay prompt on DEV")
    ap.add_argument("--sweep-relay", action="store_true", required=True)
    ap.add_argument("--n-dev", type=int, default=100)
    ap.add_argument("--task", default="sentiment")
    ap.add_argument("--prompts", nargs="*", help="names from RELAY_PROMPTS (default: all)")
    a = ap.parse_args()
    chosen = {k: RELAY_PROMPTS[a.task][k] for k in a.prompts} if a.prompts else None
    print(json.dumps(sweep_relay(task=a.task, n_dev=a.n_dev, prompts=chosen), indent=1))
