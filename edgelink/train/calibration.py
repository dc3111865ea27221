"""Calibration of a few-shot classifier's label logits, fitted without the test split.

A prompted model read through its verbalizers' first-token logits has a prior: Gemma-3-270M with
the sentiment primer leans "positive". A bridge trained on labelled examples can learn to cancel
that prior, so comparing it with raw argmax baselines partly measures supervision. These two
corrections give the text baselines the same chance; both are a per-label offset ``b`` added to
the label logits, so a calibrated answer is ``argmax(logits + b)``:

``offset``
    ``b`` chosen to maximise accuracy on labelled DEV examples (label 0's offset fixed at 0;
    exact for two labels, coordinate ascent for more). Among the offsets that reach the best
    dev accuracy, the middle one (the median of the tied candidates) is kept, so the boundary
    does not hug a dev example.
``contextual``
    Zhao et al. (ICML 2021), "Calibrate before use": read content-free inputs (the empty text,
    ``N/A``, ``[MASK]``) in the same prompt, average their label probabilities ``p_cf`` (softmax
    over the label logits only), and divide them out: ``b = -log p_cf``. It uses no labels.

The functions take arrays only: nothing here can open a split, and the caller decides what
they are fitted on (``edgelink.train.evaluate`` passes dev logits and content-free reads).
"""

from __future__ import annotations

import numpy as np

CONTENT_FREE = ("", "N/A", "[MASK]")  # Zhao et al.'s content-free inputs


def label_log_probs(logits: np.ndarray) -> np.ndarray:
    """Log-softmax over the label axis (the last): the label-restricted distribution."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def predict(logits: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    """``argmax(logits + offset)`` over the last axis (ties go to the lower label index)."""
    z = np.asarray(logits, dtype=np.float64)
    return (z if offset is None else z + np.asarray(offset, dtype=np.float64)).argmax(axis=-1)


def accuracy(logits: np.ndarray, gold: np.ndarray, offset: np.ndarray | None = None) -> float:
    return float(np.mean(predict(logits, offset) == np.asarray(gold)))


def _best_offset_for(logits: np.ndarray, gold: np.ndarray, b: np.ndarray, j: int) -> float:
    """The value of ``b[j]`` that maximises accuracy with the other offsets held: every
    boundary where some example's answer flips is a candidate, tried at the midpoints."""
    z = logits + b
    others = np.delete(z, j, axis=1).max(axis=1)
    flips = np.unique(others - logits[:, j])  # b[j] above this -> label j wins example i
    cands = np.concatenate(([flips[0] - 1.0], (flips[1:] + flips[:-1]) / 2, [flips[-1] + 1.0]))
    trial = np.repeat(b[None, :], len(cands), axis=0)
    trial[:, j] = cands
    acc = (predict(logits[None, :, :], trial[:, None, :]) == gold[None, :]).mean(axis=1)
    best = np.flatnonzero(acc == acc.max())
    return float(cands[best[len(best) // 2]])


def fit_offset(logits: np.ndarray, gold: np.ndarray, rounds: int = 10) -> np.ndarray:
    """Per-label offsets [L] that maximise accuracy on (``logits`` [n, L], ``gold`` [n]), which
    must be DEV data. ``b[0] = 0``; only differences between offsets matter."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(gold)
    if z.ndim != 2 or len(z) != len(y) or len(y) == 0:
        raise ValueError(f"need logits [n, L] and gold [n], got {z.shape} and {y.shape}")
    b = np.zeros(z.shape[1])
    for _ in range(rounds):  # each step keeps or raises dev accuracy; two labels need one
        prev = b.copy()
        for j in range(1, z.shape[1]):
            b[j] = _best_offset_for(z, y, b, j)
        if np.array_equal(b, prev):
            break
    return b


def contextual_offset(content_free_logits: np.ndarray) -> np.ndarray:
    """``-log p_cf`` [L], where ``p_cf`` is the mean label distribution of the content-free
    reads ([m, L] label logits)."""
    p = np.exp(label_log_probs(np.atleast_2d(content_free_logits))).mean(axis=0)
    return -np.log(p)
