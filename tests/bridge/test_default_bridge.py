"""The bridges shipped under models/: each fits the registry's models, and llama.cpp's Gemma-3
reading its vectors (with the bridge's own prompt) answers dev examples of its task far better
than when it reads another example's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgelink.bridge import load_bridge
from edgelink.errors import ModelError
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.signature import model_signature
from edgelink.train.data import load_split
from edgelink.train.evaluate import Reader, derangement
from edgelink.train.features import extract
from edgelink.train.tasks import task_prompt

MODELS = Path(__file__).resolve().parents[2] / "models"
DEFAULT = MODELS / "sentiment-perceiver-k8-l15.json"
SHIPPED = sorted(MODELS.glob("*.json"))
N = 24


def test_the_default_bridge_is_shipped():
    assert DEFAULT in SHIPPED


@pytest.fixture(scope="module", params=SHIPPED, ids=lambda p: p.stem)
def shipped(request):
    return load_bridge(request.param)


def test_shipped_bridge_is_intact_and_fits_the_registry_models(shipped, cfg, model_paths):
    training = shipped.meta["training"]
    task = task_prompt(training["task"])
    assert shipped.kind == "perceiver" and shipped.prompt is not None
    assert (shipped.prompt.primer, shipped.prompt.before, shipped.prompt.labels) == (
        task.primer, task.before, task.labels)
    sigs = {}
    for name in ("smollm2-135m", "gemma3-270m"):
        with LlamaRuntime(model_paths[name], cfg) as rt:
            sigs[name] = model_signature(rt, cfg)
    shipped.check_pair(sigs["smollm2-135m"], sigs["gemma3-270m"])
    with pytest.raises(ModelError, match="source"):
        shipped.check_pair(sigs["gemma3-270m"], sigs["gemma3-270m"])
    assert training["split"] == "train" and training["dev_acc"] > 0.8


def test_gemma_reads_the_shipped_bridge(shipped, cfg, model_paths):
    examples = load_split(shipped.meta["training"]["task"], "dev", cfg)[:N]
    with LlamaRuntime(model_paths["smollm2-135m"], cfg, eval_hook=True) as src:
        feats = extract(src, [ex.text for ex in examples], shipped.source_layer)
    vectors = [shipped.apply(feats.rows_of(i)) for i in range(N)]
    with LlamaRuntime(model_paths["gemma3-270m"], cfg) as tgt:
        reader = Reader(tgt, tgt.token_embeddings(), shipped.prompt)
        gold = [reader.labels.index(ex.label) for ex in examples]
        perm = derangement(N, seed=1)
        def answer(v: np.ndarray) -> int:  # a read returns the label logits
            return int(np.argmax(reader.read_vectors(v)[0]))

        own = np.mean([answer(vectors[i]) == gold[i] for i in range(N)])
        other = np.mean([answer(vectors[perm[i]]) == gold[i] for i in range(N)])
    assert own >= 0.75, f"bridged accuracy {own:.2f} on {N} dev examples"
    assert own - other >= 0.2, f"bridged {own:.2f} vs shuffled {other:.2f}"
