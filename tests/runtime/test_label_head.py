"""The label head (edgelink/runtime/label_head.py): a classification read that stops llama.cpp
after the last layer and scores only the labels' tokens, on both real models.

It must give llama.cpp's own logits for those tokens (to quantization noise: llama.cpp's head
multiplies q8 activations by the q8 matrix, the label head f32 by the dequantized rows), leave
the sequence as valid as a full read does (every layer's K/V written), and refuse what it
cannot do."""

from __future__ import annotations

import numpy as np
import pytest

from edgelink.errors import ModelError
from edgelink.kinds.bridged import feed_vectors
from edgelink.runtime.label_head import LabelHead
from edgelink.runtime.llama import LlamaRuntime
from edgelink.train.tasks import task_prompt

TEXTS = ["Oil prices rose as the central bank raised interest rates again.",
         "The striker scored twice in the cup final.",
         "A new phone chip doubles battery life, the firm said.",
         "Parliament voted on the budget after a long debate."]


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def rt(request, cfg, smollm2_path, gemma3_path):
    path = {"smollm2": smollm2_path, "gemma3": gemma3_path}[request.param]
    with LlamaRuntime(path, cfg.replace(runtime_n_threads=1), eval_hook=True) as r:
        yield r


def test_label_logits_equal_llama_cpp_and_the_sequence_stays_valid(rt):
    prompt = task_prompt("topic")
    ids = [rt.tokenize(v, add_special=False)[0] for v in prompt.labels.values()]
    head = LabelHead(rt, ids)
    rt.clear()
    rt.prefill(rt.tokenize(prompt.primer + prompt.before))
    n0 = len(rt.tokens)
    agree = 0
    for text in TEXTS:
        new = rt.tokenize(" " + text + prompt.after, add_special=False)
        rt.truncate(n0)
        full = rt.prefill(new)
        after_full = rt.prefill(rt.tokenize(" business", add_special=False))[ids]
        rt.truncate(n0)
        got = head.read(len(new), lambda new=new: rt.prefill(new))
        assert rt.logits is None and len(rt.tokens) == n0 + len(new)
        np.testing.assert_allclose(got, full[ids], atol=0.15)
        agree += int(got.argmax() == full[ids].argmax())
        # the cells the stopped decode wrote are the full read's: the next token reads the same
        np.testing.assert_allclose(rt.prefill(rt.tokenize(" business", add_special=False))[ids],
                                   after_full, atol=1e-3)
    assert agree == len(TEXTS)


def test_vectors_read_through_the_label_head(rt):
    """Embedding input takes the hook's per-ubatch path too (prefill_embeddings)."""
    prompt = task_prompt("sentiment")
    ids = [rt.tokenize(v, add_special=False)[0] for v in prompt.labels.values()]
    head, emb = LabelHead(rt, ids), rt.token_embeddings()
    after = rt.tokenize(prompt.after, add_special=False)
    v = emb.rows(rt.tokenize(" a dull, lifeless mess", add_special=False))
    rt.clear()
    rt.prefill(rt.tokenize(prompt.primer + prompt.before))
    n0 = len(rt.tokens)
    full = feed_vectors(rt, v, after, emb.rows(after), emb.input_scale)[ids]
    rt.truncate(n0)
    got = head.read(len(v) + len(after),
                    lambda: feed_vectors(rt, v, after, emb.rows(after), emb.input_scale))
    np.testing.assert_allclose(got, full, atol=0.15)
    # a decode that appends another number of positions than announced is refused, typed
    rt.truncate(n0)
    with pytest.raises(ModelError, match="positions"):
        head.read(len(v), lambda: feed_vectors(rt, v, after, emb.rows(after), emb.input_scale))


def test_refusals(cfg, smollm2_path):
    with LlamaRuntime(smollm2_path, cfg.replace(runtime_n_threads=1), eval_hook=False) as plain:
        with pytest.raises(ModelError, match="eval hook"):
            LabelHead(plain, [1, 2])
