"""Issue 16, part 1: the baselines a reviewer would demand (edgelink/train/calibration.py and the
helpers in edgelink/train/evaluate.py), on constructed logits: calibration fitted on dev moves
predictions the way it should and never reads test, the majority row is the scored examples'
majority, and the paired differences are bridge minus baseline. No model is loaded; the real
run's versions of these checks are in tests/train/test_bridge_eval.py."""

from __future__ import annotations

import numpy as np
import pytest

import edgelink.train.calibration as cal
import edgelink.train.evaluate as ev
from edgelink.train.data import Example


def _biased_binary(n: int, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Label logits [n, 2] whose true boundary is at logit difference ``shift`` (a model that
    leans towards label 1 by ``shift``), and the gold labels."""
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 2, n)
    d = np.where(gold == 1, 1.0, -1.0) * rng.uniform(0.2, 3.0, n) + shift
    return np.stack([np.zeros(n), d], axis=1), gold


def test_offset_fitted_on_dev_cancels_a_constant_lean():
    dev, y_dev = _biased_binary(400, shift=2.0, seed=0)
    test, y_test = _biased_binary(400, shift=2.0, seed=1)
    raw = cal.accuracy(test, y_test)
    b = cal.fit_offset(dev, y_dev)
    assert b[0] == 0.0 and -2.4 < b[1] < -1.6  # the lean, learnt from dev alone
    pred_raw, pred_cal = cal.predict(test), cal.predict(test, b)
    flipped = pred_raw != pred_cal
    assert flipped.any() and (pred_raw[flipped] == 1).all()  # only "1" answers move, to "0"
    assert raw < 0.85 and cal.accuracy(test, y_test, b) > 0.97


def test_offset_takes_the_middle_of_the_best_gap():
    # differences -1, 0.5, 1 (label 0) and 3, 4 (label 1): any boundary in (1, 3) is perfect
    d = np.array([-1.0, 0.5, 1.0, 3.0, 4.0])
    logits = np.stack([np.zeros(5), d], axis=1)
    b = cal.fit_offset(logits, np.array([0, 0, 0, 1, 1]))
    assert b[1] == pytest.approx(-2.0)
    assert cal.accuracy(logits, [0, 0, 0, 1, 1], b) == 1.0


def test_offset_leaves_an_unbiased_model_nearly_alone():
    dev, y_dev = _biased_binary(400, shift=0.0, seed=2)
    b = cal.fit_offset(dev, y_dev)
    assert abs(b[1]) < 0.3


def test_offset_with_three_labels_never_lowers_dev_accuracy():
    rng = np.random.default_rng(3)
    gold = rng.integers(0, 3, 300)
    logits = rng.normal(0, 1, (300, 3)) + 2.0 * np.eye(3)[gold]
    logits[:, 2] += 2.5  # leans to label 2
    b = cal.fit_offset(logits, gold)
    assert cal.accuracy(logits, gold, b) >= cal.accuracy(logits, gold) + 0.2
    assert b[2] < b[0] and b[2] < b[1]


def test_fit_offset_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        cal.fit_offset(np.zeros((3, 2)), np.zeros(4, dtype=int))
    with pytest.raises(ValueError):
        cal.fit_offset(np.zeros(3), np.zeros(3, dtype=int))


def test_contextual_calibration_divides_out_the_content_free_prediction():
    cf = np.array([[0.0, 2.0], [0.0, 1.0]])  # two content-free reads, both lean to label 1
    b = cal.contextual_offset(cf)
    p_cf = np.exp(cal.label_log_probs(cf)).mean(axis=0)
    np.testing.assert_allclose(b, -np.log(p_cf))
    shift = np.log(p_cf[1] / p_cf[0])  # the boundary moves from 0 to this difference
    assert 1.0 < shift < 2.0
    x = np.array([[0.0, shift - 0.1], [0.0, shift + 0.1], [0.0, -0.5]])
    assert cal.predict(x).tolist() == [1, 1, 0]
    assert cal.predict(x, b).tolist() == [0, 1, 0]
    # a content-free read that is already uniform changes nothing
    same = cal.contextual_offset(np.array([[3.0, 3.0]]))
    assert same[0] == pytest.approx(same[1])


def test_calibrate_fits_on_dev_only_and_names_its_rows():
    dev, y_dev = _biased_binary(300, shift=1.5, seed=4)
    test, y_test = _biased_binary(200, shift=1.5, seed=5)
    cf = {"receiver": np.array([[0.0, 1.5]]), "sender": np.array([[0.0, -1.0]])}
    dev_lg = {b: dev for b in ev.CALIBRATED}
    info, preds = ev.calibrate({b: test[None] for b in ev.CALIBRATED}, dev_lg, cf, y_dev)
    want = {f"{b} ({h})" for b in ev.CALIBRATED for h in ("offset", "contextual")}
    assert set(info) == set(preds) == want
    # other test logits (even their negation) give the same offsets: test is never fitted on
    info2, _ = ev.calibrate({b: -test[None] for b in ev.CALIBRATED}, dev_lg, cf, y_dev)
    assert all(info[k]["offset"] == info2[k]["offset"] for k in want)
    assert info["text_relay (offset)"]["fitted_on"] == "first 300 dev examples"
    assert info["sender_alone (contextual)"]["offset"] != info["original_text (contextual)"]["offset"]
    for name in want:
        assert preds[name].shape == (1, 200)
        np.testing.assert_array_equal(preds[name][0], cal.predict(test, info[name]["offset"]))
    assert (preds["original_text (offset)"] == y_test).mean() > (cal.predict(test) == y_test).mean()
    assert info["original_text (offset)"]["dev_acc"] > info["original_text (offset)"]["dev_acc_raw"]


def test_majority_is_that_of_the_scored_examples():
    scored = [Example("a", "positive"), Example("b", "positive"), Example("c", "negative")]
    assert ev.scored_majority(scored) == "positive"
    assert ev.scored_majority(scored[2:]) == "negative"


def test_paired_differences_are_bridge_minus_baseline():
    rng = np.random.default_rng(6)
    n = 300
    base = (rng.random(n) < 0.6).astype(float)[None]
    bridge = np.stack([np.maximum(base[0], rng.random(n) < 0.5) for _ in range(3)]).astype(float)
    idx = ev.bootstrap_indices(n, 500, seed=0)
    (row,) = ev.paired_differences({"b": bridge, "t": base}, "b", ["t"], idx)
    assert row["bridge"] == "b" and row["versus"] == "t"
    assert row["diff"] == pytest.approx((bridge.mean() - base.mean()) * 100)
    assert 0 < row["ci"][0] <= row["diff"] <= row["ci"][1]
    (same,) = ev.paired_differences({"b": base, "t": base}, "b", ["t"], idx)
    assert same["diff"] == 0 and same["ci"] == (0.0, 0.0)


# --------------------------------------------------------------------------- prompt tuning


def test_soft_prompt_round_trip_and_tamper(tmp_path):
    from edgelink.train.soft_prompt import load_soft_prompt, save_soft_prompt

    rows = np.random.default_rng(7).standard_normal((4, 640)).astype(np.float32)
    manifest, npz = save_soft_prompt(tmp_path / "sp", rows, {"weights_digest": "ab"}, {"seed": 3})
    got, meta = load_soft_prompt(npz)
    np.testing.assert_array_equal(got, rows)
    assert (meta["kind"], meta["k"], meta["d_tgt"], meta["training"]["seed"]) == ("soft_prompt", 4, 640, 3)
    np.savez(npz, rows=rows * 2)  # the rows change under the manifest
    with pytest.raises(ValueError, match="sha256"):
        load_soft_prompt(manifest)


def test_text_head_pads_exactly_and_trains_only_the_rows(gemma3_path, cfg):
    """A right-padded batch gives each example the logits it gets alone (causal attention keeps
    the padding out), and the loss's gradient reaches the soft rows, not the receiver."""
    torch = pytest.importorskip("torch")
    from edgelink.runtime.llama import LlamaRuntime
    from edgelink.train.prompt_tuning import SoftPrompt, TextHead
    from edgelink.train.soft_prompt import tail_ids
    from edgelink.train.torch_receiver import TorchReceiver

    torch.set_num_threads(1)
    prompt = ev.task_prompt("sentiment")
    with LlamaRuntime(gemma3_path, cfg.replace(runtime_n_threads=1)) as rt:
        primer = rt.tokenize(prompt.primer + prompt.before)
        labels = [rt.tokenize(v, add_special=False)[0] for v in prompt.labels.values()]
        tails = [tail_ids(rt, t, prompt.after) for t in ("Awful.", "A warm, funny and moving film.")]
        init = rt.token_embeddings().rows(primer[1:4])
    assert len(tails[0]) < len(tails[1])  # the first is padded in the batch
    head = TextHead(TorchReceiver.from_gguf(gemma3_path), primer, labels)
    sp = SoftPrompt(init)
    both = head.logits(sp.rows, tails)
    for i, t in enumerate(tails):
        alone = head.logits(sp.rows, [t])[0]
        torch.testing.assert_close(both[i], alone, rtol=1e-4, atol=1e-3)
    loss = torch.nn.functional.cross_entropy(both, head.label_ids[torch.tensor([0, 1])])
    loss.backward()
    assert sp.rows.grad is not None and float(sp.rows.grad.abs().sum()) > 0
    assert not any(p.requires_grad for p in head.rx.parameters())
