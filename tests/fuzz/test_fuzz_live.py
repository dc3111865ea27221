"""Receivers never die of a peer: a real `edgelink serve` and a real `edgelink node` take hundreds
of mutated frames (seeded with a real SmolLM2 export), answer every one typed, and then still
hand off exactly. And the receiver's safety net: a fault inside an applier, after llama.cpp
was touched, is answered with a REJECT `internal`, the sequence is restored exactly, and the
same session goes on."""

from __future__ import annotations

import os
import threading
import uuid

import pytest

from edgelink import api
from edgelink.errors import PeerRejected
from edgelink.fuzz import real_export
from edgelink.fuzz.live import fuzz_live
from edgelink.roles.launcher import start_node, start_receiver, stop_receiver
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.signature import model_signature

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def small_cfg(cfg):
    # A small context bounds what a mutated but valid request (generate, prefill) can cost.
    return cfg.replace(runtime_n_ctx=256, protocol_reply_timeout_s=120)


@pytest.fixture(scope="module")
def sender(smollm2_path, small_cfg):
    return real_export(str(smollm2_path), small_cfg, PROMPT)


def _assert_report(report, at_least: int) -> None:
    assert not report.failures, [f.__dict__ for f in report.failures[:5]]
    assert report.cases >= at_least
    # the frames reached the appliers and the request handlers, not only the decoder
    assert {"state", "checksum", "protocol"} & set(report.by_code), report.by_code
    assert "internal" not in report.by_code


def test_serve_survives_mutated_frames_then_hands_off_exactly(smollm2_path, small_cfg, sender):
    sig, extra = sender
    name = f"t-fuzz-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    proc = start_receiver(str(smollm2_path), small_cfg, name)
    try:
        report = fuzz_live(f"shm:{name}", small_cfg, sig, cases=300, seed=21, extra_tensor_messages=extra)
        assert proc.poll() is None, proc.stderr_tail()
        _assert_report(report, 300)
        out = api.handoff(str(smollm2_path), PROMPT, to=f"shm:{name}", n_tokens=8, cfg=small_cfg, verify=True)
        assert out.verified.matches and len(out.tokens) == 8
        assert "Traceback" not in proc.stderr_tail(100_000)
    finally:
        assert stop_receiver(proc) in (0, -15), proc.stderr_tail()


def test_node_survives_mutated_frames_then_hands_off_exactly(smollm2_path, small_cfg, sender, tmp_path):
    from edgelink.transport import p2p

    sig, extra = sender
    client_cfg = small_cfg.replace(p2p_identity_key=tmp_path / "client.key")
    env = {"EDGELINK_P2P_IDENTITY_KEY": str(tmp_path / "node.key"), "EDGELINK_NODE_TOKENS": "fuzz-token",
           "EDGELINK_NODE_MESSAGES_PER_S": "10000", "EDGELINK_NODE_MESSAGES_BURST": "10000"}
    proc = start_node(str(smollm2_path), small_cfg, extra_env=env)
    addr = proc.ready["addrs"][0]
    try:
        report = fuzz_live(addr, client_cfg, sig, cases=150, seed=22, token="fuzz-token",
                           extra_tensor_messages=extra)
        assert proc.poll() is None, proc.stderr_tail()
        _assert_report(report, 150)
        out = api.handoff(str(smollm2_path), PROMPT, to=addr, n_tokens=8, cfg=client_cfg, verify=True,
                          token="fuzz-token")
        assert out.verified.matches
        assert "Traceback" not in proc.stderr_tail(100_000)
    finally:
        p2p.close_client_hosts()
        assert stop_receiver(proc) in (0, -15), proc.stderr_tail()


def test_a_fault_after_llama_cpp_was_touched_is_rejected_and_restored(smollm2_path, small_cfg, monkeypatch):
    """Inject an untyped fault into the import (after llama.cpp holds the new cells): the
    receiver answers REJECT internal, its sequence digest is exactly what it was, and the same
    session then takes a snapshot and continues exactly."""
    from edgelink.roles.receiver import Receiver
    from edgelink.roles.sender import Sender
    from edgelink.transport.shm import ShmListener
    from edgelink.transport.shm import connect as shm_connect

    cfg = small_cfg
    name = f"t-fault-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    with LlamaRuntime(smollm2_path, cfg) as rrt, LlamaRuntime(smollm2_path, cfg) as srt:
        sig = model_signature(rrt, cfg)
        rrt.prefill(rrt.tokenize("Something the receiver already holds"))
        receiver = Receiver(rrt, cfg, sig)
        listener = ShmListener(name, cfg)
        reports = []
        th = threading.Thread(target=lambda: reports.append(receiver.serve_channel(listener.accept())))
        th.start()
        sender = Sender(shm_connect(name, cfg), cfg, sig)
        sender.handshake()
        before = sender.request("digest").digest

        real = LlamaRuntime.import_state
        calls = {"n": 0}

        def faulty(self, *a, **kw):
            calls["n"] += 1
            real(self, *a, **kw)
            if calls["n"] == 1:
                raise RuntimeError("injected fault after the import")

        monkeypatch.setattr(LlamaRuntime, "import_state", faulty)
        srt.prefill(srt.tokenize(PROMPT))
        with pytest.raises(PeerRejected) as err:
            sender.send_snapshot(srt)
        assert err.value.reason == "internal" and "nothing was applied" in err.value.detail
        assert calls["n"] == 2  # the fault, then the restore
        monkeypatch.setattr(LlamaRuntime, "import_state", real)
        assert sender.request("digest").digest == before
        sender.send_snapshot(srt)
        remote = sender.request("generate", n_tokens=8).tokens
        assert list(remote) == srt.generate(8)
        sender.close()
        th.join(30)
        listener.close()
        assert reports and reports[0].rejected == ["internal"] and reports[0].applied == 1
