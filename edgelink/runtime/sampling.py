"""Picking the next token from logits: greedy at temperature 0 (what every handoff checks
against), else softmax at a temperature, cut to the smallest set of tokens whose probability
reaches ``top_p``, drawn from a generator seeded per request so that a seed repeats a reply."""

from __future__ import annotations

import numpy as np


class Sampler:
    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self._rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def pick(self, logits: np.ndarray) -> int:
        if self.greedy:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        z -= z.max()
        p = np.exp(z)
        p /= p.sum()
        if self.top_p < 1.0:
            order = np.argsort(-p)
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, self.top_p)) + 1]
            q = p[keep] / p[keep].sum()
            return int(keep[self._rng.choice(len(keep), p=q)])
        return int(self._rng.choice(len(p), p=p))


def log_probs(logits: np.ndarray, token: int, top: int = 0) -> tuple[float, list[tuple[int, float]]]:
    """The model's log probability of ``token`` under ``logits`` (the raw distribution, before
    temperature and top-p, as OpenAI's ``logprobs`` report it), and the ``top`` most likely
    tokens with theirs, most likely first."""
    z = logits.astype(np.float64)
    z -= z.max()
    lse = float(np.log(np.exp(z).sum()))
    best: list[tuple[int, float]] = []
    if top > 0:
        idx = np.argpartition(-z, top - 1)[:top] if top < len(z) else np.arange(len(z))
        idx = idx[np.argsort(-z[idx], kind="stable")]
        best = [(int(i), float(z[i]) - lse) for i in idx]
    return float(z[token]) - lse, best
