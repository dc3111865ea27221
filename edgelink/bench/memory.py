"""`edgelink bench memory`: what KV_MEMORY does to continuations, measured against re-prefilling the concatenated text.

For each (fact, question) pair the receiver first reads a fixed preamble, then:
  none     reads the question only (no fact);
  concat   re-prefills the fact text itself, then the question (the baseline a user has);
  memory   gets the fact's K/V cells, computed by another runtime that never saw the preamble,
           as KV_MEMORY, then reads the question.
It reports how often the answer word appears in 8 greedy tokens, how often memory's tokens equal
concat's, and the receiver-side milliseconds (concat: prefilling the fact; memory: applying it).

    edgelink bench memory smollm2-135m gemma3-270m
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from edgelink.config import Config
from edgelink.kinds.memory import MemoryApplier, memory_tensors
from edgelink.models.resolve import resolve_model
from edgelink.protocol.kinds import ApplyMode, Kind
from edgelink.protocol.messages import TensorMessage
from edgelink.runtime.llama import LlamaRuntime

PREAMBLE = "You are a careful assistant. Answer from the notes you were given."
FACTS = [
    ("The secret password for the vault is tangerine.", "What is the password for the vault? The password is", "tangerine"),
    ("Maria keeps her bicycle in the blue garage.", "Where does Maria keep her bicycle? In the", "blue"),
    ("The meeting with the bankers was moved to Thursday.", "When is the meeting with the bankers? On", "Thursday"),
    ("Our ship, the Albatross, sails from Lisbon.", "Which city does the Albatross sail from? It sails from", "Lisbon"),
    ("The recipe needs exactly seven eggs.", "How many eggs does the recipe need? It needs", "seven"),
    ("Professor Okafor teaches astronomy on Mondays.", "What subject does Professor Okafor teach? She teaches", "astronomy"),
    ("The red key opens the cellar door.", "Which key opens the cellar door? The", "red"),
    ("Tom's favourite fruit is the mango.", "What is Tom's favourite fruit? His favourite fruit is the", "mango"),
    ("The train to Vienna leaves from platform nine.", "Which platform does the Vienna train leave from? Platform", "nine"),
    ("The cat that lives in the library is called Pixel.", "What is the library cat called? It is called", "Pixel"),
]


def run_memory_bench(model: str, cfg: Config) -> dict[str, Any]:
    """Every (fact, question) pair of FACTS, three ways, on ``model``."""
    path = resolve_model(model, cfg, pull=True)
    sender, recv = LlamaRuntime(path, cfg), LlamaRuntime(path, cfg)
    hits = {"none": 0, "concat": 0, "memory": 0}
    same, t_concat, t_memory = 0, [], []
    pre = recv.tokenize(PREAMBLE)
    for fact, question, answer in FACTS:
        q = recv.tokenize(" " + question, add_special=False)
        f = recv.tokenize(" " + fact, add_special=False)
        outs = {}
        recv.clear()
        recv.prefill(pre + q)
        outs["none"] = recv.generate(8)
        recv.clear()
        recv.prefill(pre)
        t0 = time.perf_counter()
        recv.prefill(f)
        t_concat.append(time.perf_counter() - t0)
        recv.prefill(q)
        outs["concat"] = recv.generate(8)
        sender.clear()
        sender.prefill(sender.tokenize(fact, add_special=False))
        tensors, attrs, token_range = memory_tensors(sender)
        msg = TensorMessage(b"\0" * 16, 1, Kind.KV_MEMORY, ApplyMode.MEMORY, sender.seq,
                            (0, sender.n_layer), token_range, tuple(tensors), attrs)
        recv.clear()
        recv.prefill(pre)
        t0 = time.perf_counter()
        MemoryApplier(recv).apply(msg)
        t_memory.append(time.perf_counter() - t0)
        recv.prefill(q)
        outs["memory"] = recv.generate(8)
        for k, toks in outs.items():
            hits[k] += answer.lower() in recv.detokenize(toks).lower()
        same += outs["memory"] == outs["concat"]
    sender.close()
    recv.close()
    n = len(FACTS)
    return {"model": model, "n": n, **{f"{k}_correct": v / n for k, v in hits.items()},
            "memory_equals_concat": same / n, "concat_ms": 1e3 * statistics.median(t_concat),
            "memory_ms": 1e3 * statistics.median(t_memory)}


def format_memory_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | no fact | concat (re-prefill) | KV memory | memory tokens == concat | concat ms | memory ms |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['none_correct']:.0%} | {r['concat_correct']:.0%} | {r['memory_correct']:.0%} "
              f"| {r['memory_equals_concat']:.0%} | {r['concat_ms']:.1f} | {r['memory_ms']:.1f} |" for r in rows]
    return "\n".join(lines)
