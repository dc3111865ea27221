"""BRIDGED_PREFIX between two different models, across real processes: SmolLM2-135M here (the
bridge's source, read through the eval hook), Gemma-3-270M in `edgelink serve --bridge` (and
`edgelink node --bridge`) processes, shared memory and libp2p in between.

The bridge is exported on the spot from the real models' signatures (a ridge bridge whose bias
is Gemma's rows of " wonderful film", plus a small random map of the source state), with the
sentiment prompt, so no training data is needed. The receiver's label scores and continuation
must equal, bit for bit, what a local Gemma computes from the same vectors in the layout the
bridge's prompt describes; every refusal leaves the receiver's state digest unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest

from edgelink.api import connect
from edgelink.api.latent import bridged_handoff
from edgelink.bridge import export_bridge, load_bridge
from edgelink.config import to_env
from edgelink.errors import EdgelinkError, PeerRejected
from edgelink.kinds.bridged import bridge_claim, source_rows
from edgelink.protocol.kinds import Kind
from edgelink.roles.launcher import start_node, start_receiver, stop_receiver
from edgelink.roles.sender import Sender
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.signature import model_signature
from edgelink.train.tasks import task_prompt

TEXT = "A warm, funny and moving film; I loved every minute of it."
LAYER, K, N = 15, 2, 8


def _name(tag: str) -> str:
    return f"t-{tag}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def cfg1(cfg):
    """One llama.cpp thread per process: these tests run three processes at once, and two
    threads each on a small, shared machine spend their time waiting on each other."""
    return cfg.replace(runtime_n_threads=1)


@pytest.fixture(scope="session")
def bridge_files(tmp_path_factory, model_paths, cfg):
    """Two bridges SmolLM2 -> Gemma with the same arrays and different digests (A, B)."""
    out = tmp_path_factory.mktemp("bridges")
    with LlamaRuntime(model_paths["smollm2-135m"], cfg) as src, \
            LlamaRuntime(model_paths["gemma3-270m"], cfg) as tgt:
        src_sig, tgt_sig = model_signature(src, cfg), model_signature(tgt, cfg)
        bias = tgt.token_embeddings().rows(tgt.tokenize(" wonderful film", add_special=False))
    assert bias.shape == (K, tgt_sig.n_embd)
    rng = np.random.default_rng(0)
    arrays = {"W": rng.normal(0, 0.005, (src_sig.n_embd, K * tgt_sig.n_embd)).astype(np.float32),
              "b": bias.reshape(-1)}
    paths = {}
    for tag in ("a", "b"):
        manifest, _ = export_bridge(
            out / f"sentiment-test-{tag}", kind="ridge", arrays=arrays, source_sig=src_sig,
            target_sig=tgt_sig, source_layer=LAYER, k=K, norm_mean=np.zeros(src_sig.n_embd),
            norm_std=np.full(src_sig.n_embd, 100.0), pool={"kind": "mean", "skip": 1},
            training={"task": "sentiment", "note": f"test bridge {tag}"},
            prompt=task_prompt("sentiment"))
        paths[tag] = manifest
    assert load_bridge(paths["a"]).digest != load_bridge(paths["b"]).digest
    return paths


@pytest.fixture(scope="module")
def runtimes(model_paths, cfg1):
    src = LlamaRuntime(model_paths["smollm2-135m"], cfg1, eval_hook=True)
    tgt = LlamaRuntime(model_paths["gemma3-270m"], cfg1)
    src.signature = model_signature(src, cfg1)
    tgt.signature = model_signature(tgt, cfg1)
    yield src, tgt
    src.close()
    tgt.close()


@pytest.fixture(scope="module")
def reference(runtimes, bridge_files):
    """What the receiver must say: the bridge's vectors in the prompt's layout, computed on a
    local Gemma, spelled out here rather than through the applier."""
    src, tgt = runtimes
    br = load_bridge(bridge_files["a"])
    rows, n_src = source_rows(src, br, TEXT)
    vectors = br.apply(rows)
    p = br.prompt
    tgt.clear()
    tgt.prefill(tgt.tokenize(p.primer + p.before))
    # the vectors and the tail's own token rows in one decode, as the receiver does it
    tail = tgt.tokenize(p.after, add_special=False)
    emb = tgt.token_embeddings()
    tgt.prefill_embeddings(np.concatenate([vectors, emb.rows(tail)]), emb.input_scale)
    tgt.tokens[-len(tail):] = tail
    scores = {lab: float(tgt.logits[tgt.tokenize(v, add_special=False)[0]]) for lab, v in p.labels.items()}
    tokens = tgt.generate(N)
    tgt.clear()
    return {"vectors": vectors, "n_src": n_src, "scores": scores, "tokens": tokens,
            "text": tgt.detokenize(tokens)}


@pytest.fixture(scope="module")
def server(model_paths, cfg1, bridge_files):
    """`edgelink serve gemma3-270m --bridge A` in a child process."""
    name = _name("bridged")
    proc = start_receiver(str(model_paths["gemma3-270m"]), cfg1, name,
                          serve_args=("--bridge", str(bridge_files["a"])))
    proc.endpoint = f"shm:{name}"
    yield proc
    assert stop_receiver(proc) in (0, -15), proc.stderr_tail()


def _bridged_sender(server, runtimes, cfg1, bridge_file) -> Sender:
    src, _ = runtimes
    s = Sender(connect(server.endpoint, cfg1), cfg1, src.signature,
               bridge=bridge_claim(load_bridge(bridge_file)))
    s.handshake()
    return s


def test_bridged_handoff_smollm2_to_gemma_over_shm(server, cfg1, bridge_files, reference):
    out = bridged_handoff(bridge_files["a"], TEXT, server.endpoint, n_tokens=N, cfg=cfg1)
    assert out.bridged.label_scores == reference["scores"]  # bit for bit
    assert out.tokens == reference["tokens"] and out.text == reference["text"] and out.tokens
    assert out.bridged.label == max(reference["scores"], key=reference["scores"].get) == "positive"
    assert out.bridged.layout == {"head_tokens": 29, "vectors": K, "tail_tokens": 3,
                                   "context_tokens": 34, "source_tokens": reference["n_src"]}
    assert out.bytes["payload"] == K * 640 * 4 and out.bytes["wire"] > out.bytes["payload"]
    assert out.bridged.bridge == load_bridge(bridge_files["a"]).digest
    ev = server.next_event()
    assert ev["event"] == "session" and ev["bridged"] and ev["applied"] == 1 and not ev["rejected"]
    t = out.timings
    print(f"\nbridged handoff: capture {t['capture_s'] * 1e3:.1f} ms, apply {t['apply_s'] * 1e3:.2f} ms, "
          f"wire {out.bytes['wire']} B (payload {out.bytes['payload']} B), ship+receiver apply "
          f"{t['ship_s'] * 1e3:.1f} ms (receiver apply {t['remote_apply_s'] * 1e3:.1f} ms), "
          f"receiver generate {N} {t['remote_generate_s'] * 1e3:.1f} ms; {out.text!r} "
          f"scores {out.bridged.label_scores}")


def test_cli_handoff_with_bridge_prints_json(server, cfg1, bridge_files, reference):
    run = subprocess.run(
        [sys.executable, "-m", "edgelink", "handoff", "--bridge", str(bridge_files["a"]), "--to",
         server.endpoint, "-p", TEXT, "-n", str(N), "--json"],
        capture_output=True, text=True, env={**os.environ, **to_env(cfg1)}, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["bridged"]["label_scores"] == reference["scores"] and out["tokens"] == reference["tokens"]
    assert out["model"] == cfg1.runtime.default_model == "smollm2-135m"
    assert {"capture_s", "apply_s", "ship_s", "remote_apply_s", "remote_generate_s"} <= set(out["timings"])
    assert server.next_event()["bridged"]


def test_a_different_bridge_is_rejected_at_the_handshake(server, cfg1, bridge_files):
    with pytest.raises(PeerRejected) as info:
        bridged_handoff(bridge_files["b"], TEXT, server.endpoint, n_tokens=N, cfg=cfg1)
    assert info.value.reason == "bridge"
    assert load_bridge(bridge_files["b"]).digest[:16] in info.value.detail
    ev = server.next_event()
    assert ev["ended_by"] == "handshake" and ev["rejected"] == ["bridge"]


def test_other_model_without_bridge_is_rejected(server, runtimes, cfg1):
    src, _ = runtimes
    s = Sender(connect(server.endpoint, cfg1), cfg1, src.signature)
    with pytest.raises(PeerRejected) as info:
        s.handshake()
    s.ch.close()
    assert info.value.reason == "bridge" and "names no bridge" in info.value.detail
    assert server.next_event()["rejected"] == ["bridge"]


def test_bad_bridged_prefixes_are_rejected_and_state_unchanged(server, runtimes, cfg1, bridge_files,
                                                              reference):
    digest = load_bridge(bridge_files["a"]).digest
    good, n_src = reference["vectors"], reference["n_src"]
    nan = good.copy()
    nan[1, 5] = np.nan
    inf = good.copy()
    inf[0, 0] = np.inf
    s = _bridged_sender(server, runtimes, cfg1, bridge_files["a"])
    try:
        s.send_bridged(good, digest, n_src)  # a non-empty state to protect
        before = s.request("digest")
        assert before.context_tokens == 34
        bad = [
            (np.concatenate([good, good[:1]]), digest, n_src),  # K=3, the bridge's K is 2
            (good[:1], digest, n_src),  # K=1
            (nan, digest, n_src),
            (inf, digest, n_src),
            (np.zeros((K, 576), np.float32), digest, n_src),  # the source's width, not the target's
            (good, "0" * 64, n_src),  # made by another bridge
            (good, digest, 0),  # no source tokens
        ]
        for vectors, dig, n in bad:
            with pytest.raises(PeerRejected) as info:
                s.send_bridged(vectors, dig, n)
            assert info.value.reason == "state", info.value.detail
            assert s.request("digest") == before
    finally:
        s.close()
    ev = server.next_event()
    assert ev["applied"] == 1 and ev["rejected"] == ["state"] * 7 and ev["ended_by"] == "close"


def test_bridge_holder_still_serves_its_own_model(server, runtimes, cfg1):
    _, tgt = runtimes
    s = Sender(connect(server.endpoint, cfg1), cfg1, tgt.signature)
    try:
        s.handshake()
        assert not s.session.bridged and Kind.BRIDGED_PREFIX not in s.session.negotiated_kinds
        assert Kind.KV_CACHE in s.session.negotiated_kinds
        assert s.request("digest").context_tokens >= 0
    finally:
        s.close()
    assert server.next_event()["ended_by"] == "close"


def test_serve_without_bridge_rejects_a_bridged_hello(model_paths, cfg1, bridge_files):
    name = _name("plain")
    proc = start_receiver(str(model_paths["gemma3-270m"]), cfg1, name)
    try:
        with pytest.raises(PeerRejected) as info:
            bridged_handoff(bridge_files["a"], TEXT, f"shm:{name}", n_tokens=N, cfg=cfg1)
        assert info.value.reason == "bridge" and "holds no bridge" in info.value.detail
        assert proc.next_event()["rejected"] == ["bridge"]
    finally:
        assert stop_receiver(proc) in (0, -15), proc.stderr_tail()


def test_serve_refuses_a_bridge_trained_for_another_target(model_paths, cfg1, bridge_files):
    with pytest.raises(EdgelinkError, match="trained for target"):
        start_receiver(str(model_paths["smollm2-135m"]), cfg1, _name("wrongtgt"),
                       serve_args=("--bridge", str(bridge_files["a"])))


def test_sender_refuses_a_model_that_is_not_the_bridges_source(cfg1, bridge_files, model_paths):
    with pytest.raises(EdgelinkError, match="trained for source"):
        bridged_handoff(bridge_files["a"], TEXT, "shm:unused", model=str(model_paths["gemma3-270m"]),
                        cfg=cfg1)


def test_bridged_handoff_to_a_node_over_libp2p(model_paths, cfg1, bridge_files, reference, tmp_path):
    from edgelink.transport import p2p

    env = {"EDGELINK_P2P_IDENTITY_KEY": str(tmp_path / "node.key"), "EDGELINK_NODE_MAX_CLIENTS": "1"}
    proc = start_node(str(model_paths["gemma3-270m"]), cfg1, extra_env=env,
                      node_args=("--bridge", str(bridge_files["a"])))
    try:
        client_cfg = cfg1.replace(p2p_identity_key=tmp_path / "client.key")
        out = bridged_handoff(bridge_files["a"], TEXT, proc.ready["addrs"][0], n_tokens=N, cfg=client_cfg)
        assert out.bridged.label_scores == reference["scores"] and out.tokens == reference["tokens"]
        ev = proc.next_event()
        assert ev["bridged"] and ev["applied"] == 1
    finally:
        p2p.close_client_hosts()
        assert stop_receiver(proc) in (0, -15), proc.stderr_tail()


# ---------------------------------------------------------------------------- in process


def _message(vectors, digest, n_src=3, **changes):
    from edgelink.kinds.bridged import bridged_tensors
    from edgelink.protocol.kinds import ApplyMode
    from edgelink.protocol.messages import TensorMessage

    tensors, attrs, token_range = bridged_tensors(vectors, digest, n_src)
    fields = {"kind": Kind.BRIDGED_PREFIX, "apply": ApplyMode.OVERWRITE, "seq_slot": 0,
              "layer_range": (-1, -1), "token_range": token_range, "attrs": attrs, **changes}
    return TensorMessage(b"\0" * 16, 1, fields["kind"], fields["apply"], fields["seq_slot"],
                         fields["layer_range"], fields["token_range"], tuple(tensors), fields["attrs"])


def test_applier_checks_the_envelope_and_restores_on_a_llama_failure(runtimes, bridge_files, reference,
                                                                      monkeypatch):
    from edgelink.errors import StateError
    from edgelink.kinds.bridged import BridgedPrefixApplier
    from edgelink.protocol.kinds import ApplyMode

    _, tgt = runtimes
    br = load_bridge(bridge_files["a"])
    applier = BridgedPrefixApplier(tgt, br, tgt.signature)
    tgt.clear()
    tgt.prefill(tgt.tokenize("Something else entirely."))
    before = tgt.state_digest()
    v = reference["vectors"]
    for msg in [_message(v, br.digest, apply=ApplyMode.APPEND),
                _message(v, br.digest, seq_slot=3),
                _message(v, br.digest, layer_range=(15, 16)),
                _message(v, br.digest, token_range=(0, K)),
                _message(v, br.digest, attrs={"bridge": br.digest}),
                _message(v.astype(np.float16).astype(np.float32)[:, :-1], br.digest)]:
        with pytest.raises(StateError):
            applier.apply(msg)
        assert tgt.state_digest() == before

    def broken(*_a, **_k):
        raise StateError("llama_decode failed with code 1")

    monkeypatch.setattr(tgt, "prefill_embeddings", broken)
    with pytest.raises(StateError, match="llama_decode"):
        applier.apply(_message(v, br.digest))  # fails after the head was rebuilt
    assert tgt.state_digest() == before
    monkeypatch.undo()
    applier.apply(_message(v, br.digest))
    assert len(tgt.tokens) == 34 and tgt.tokens[29:31] == [-1, -1]
    tgt.clear()


def test_label_scores_request_checks_its_labels(runtimes):
    from edgelink.errors import SessionError
    from edgelink.kinds.bridged import label_scores

    _, tgt = runtimes
    tgt.clear()
    with pytest.raises(SessionError, match="no logits"):
        label_scores(tgt, {"yes": " yes"})
    tgt.prefill(tgt.tokenize("Is the sky blue? Answer:"))
    out = label_scores(tgt, {"yes": " yes", "no": " no"})
    assert set(out["scores"]) == {"yes", "no"} and abs(sum(out["probs"].values()) - 1) < 1e-9
    assert out["best"] in ("yes", "no") and out["context_tokens"] == len(tgt.tokens)
    tgt.clear()
