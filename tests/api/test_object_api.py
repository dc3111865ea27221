"""The object API (edgelink.load, Model, Peer, Snapshot), llama-cpp-python's Llama wrapped with
edgelink.from_llama, and llama.cpp's own sequence-state files, each checked against what
llama.cpp or llama-cpp-python itself does with the same state."""

from __future__ import annotations

import ctypes
import json
import os
import struct
import subprocess
import sys
import uuid

import llama_cpp
import numpy as np
import pytest

import edgelink
from edgelink.api.interop import make_llama
from edgelink.errors import EdgelinkError, StateError
from edgelink.roles.launcher import start_receiver, stop_receiver

PROMPT = "The old lighthouse keeper climbed the stairs every evening, and"


@pytest.fixture(scope="module")
def receiver(smollm2_path, cfg):
    name = f"t-obj-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    proc = start_receiver(str(smollm2_path), cfg, name)
    yield f"shm:{name}"
    assert stop_receiver(proc) in (0, -15), proc.stderr_tail()


@pytest.fixture(scope="module")
def reference(smollm2_path, cfg):
    with edgelink.load(str(smollm2_path), cfg) as m:
        m.prefill(PROMPT)
        return m.tokens, m.generate(12, stop_at_eog=False).tokens


def test_one_model_serves_many_operations_and_one_peer_many_calls(smollm2_path, cfg, receiver, reference):
    prompt_tokens, continuation = reference
    with edgelink.load(str(smollm2_path), cfg) as m:
        assert "smollm2" in repr(m).lower() or str(smollm2_path.name) in repr(m)
        assert m.prefill(PROMPT) == len(prompt_tokens) and m.tokens == prompt_tokens
        with m.connect(receiver) as peer:
            out = peer.handoff(n_tokens=12, stop_at_eog=False)
            assert out.tokens == continuation
            assert out.wire.codec == "raw" and out.bytes["payload"] > 0
            first = peer.converse(" Then he lit the lamp.", n_tokens=6)
            # the handoff's reply stayed in the conversation, and only the new turn's cells went
            n0 = len(prompt_tokens)
            assert m.tokens[n0:n0 + len(out.tokens)] == out.tokens
            assert first.sent_kind == "KV_CACHE_DELTA" and first.sent_bytes < out.bytes["payload"]
            second = peer.converse(" The ships came home.", n_tokens=6)
            assert second.sent_kind == "KV_CACHE_DELTA"
            assert peer.same_state()
        assert m.generate(4, stop_at_eog=False).tokens  # the model is still ours to use


def _wire_of(peer) -> list[bytes]:
    """Every frame this peer's sender writes from now on, as bytes."""
    frames: list[bytes] = []
    send = peer.sender.ch.send

    def record(*parts):
        frames.append(b"".join(bytes(p) for p in parts))
        return send(*parts)

    peer.sender.ch.send = record
    return frames


@pytest.mark.parametrize("token_ids", [True, False])
def test_without_token_ids_the_receiver_continues_but_never_gets_ours(smollm2_path, cfg, receiver, reference,
                                                                       token_ids):
    """Token ids are -1 on the wire (the receiver's bookkeeping only needs how many), and the
    continuation is still exact; each turn then ships the whole state, and the reply is read
    here again. With ids (the control) the prompt's ids are on the wire."""
    prompt_tokens, continuation = reference
    turn = " Then he lit the lamp."
    with edgelink.load(str(smollm2_path), cfg) as m:
        m.prefill(PROMPT)
        with m.connect(receiver, token_ids=token_ids) as peer:
            wire = _wire_of(peer)
            out = peer.handoff(n_tokens=12, stop_at_eog=False)
            assert out.tokens == continuation
            r = peer.converse(turn, n_tokens=6, stop_at_eog=False)
            assert len(r.reply_tokens) == 6 and m.tokens[-6:] == r.reply_tokens
            assert m.tokens[len(prompt_tokens):len(prompt_tokens) + 12] == continuation  # reply kept
            assert r.sent_kind == ("KV_CACHE_DELTA" if token_ids else "KV_CACHE")
            sent = b"".join(wire)
            ids = [np.asarray(t, "<i4").tobytes() for t in (prompt_tokens[1:9], m.tokenize(turn)[:6])]
            assert all((i in sent) == token_ids for i in ids)
            if not token_ids:
                assert r.sent_bytes > out.bytes["payload"]  # the whole state, grown by two turns
                with pytest.raises(StateError, match="without token ids"):
                    peer.sender.send_delta(m.runtime, len(prompt_tokens))


def test_a_snapshot_restores_exactly_in_memory_and_from_a_file(smollm2_path, cfg, reference, tmp_path):
    prompt_tokens, continuation = reference
    with edgelink.load(str(smollm2_path), cfg) as a, edgelink.load(str(smollm2_path), cfg) as b:
        a.prefill(PROMPT)
        snap = a.snapshot()
        assert snap.tokens == len(prompt_tokens) and snap.payload_bytes > 0
        b.prefill("Something else entirely")
        assert b.restore(snap) == snap.payload_bytes
        assert b.runtime.state_digest() == a.runtime.state_digest()
        assert b.generate(12, stop_at_eog=False).tokens == continuation
        path = snap.save(tmp_path / "snap.elk")
        b.reset()
        b.restore(path)
        assert b.generate(12, stop_at_eog=False).tokens == continuation
        # the file is what `edgelink resume` reads
        out = subprocess.run([sys.executable, "-m", "edgelink", "resume", str(smollm2_path), str(path), "-n", "12",
                              "--json"], capture_output=True, text=True, timeout=300, check=True)
        assert json.loads(out.stdout)["tokens"] == continuation


def test_load_takes_settings_and_names_what_is_wrong(smollm2_path, cfg):
    with edgelink.load(str(smollm2_path), cfg, runtime_n_ctx=512) as m:
        assert m.runtime.n_ctx == 512
    with pytest.raises(EdgelinkError, match="model"):
        edgelink.load("no-such-model-anywhere", cfg)


# ---------------------------------------------------------------------------- llama-cpp-python


def _llama(path, n_ctx=1024):
    # flash attention on: the V layout edgelink's default (auto) resolves to on CPU
    return make_llama(str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, flash_attn=True, verbose=False, seed=1)


def _greedy(llm, prompt_tokens, n):
    out = llm.create_completion(prompt_tokens, max_tokens=n, temperature=0.0, top_k=1)
    return llm.tokenize(out["choices"][0]["text"].encode(), add_bos=False, special=True), out


def test_from_llama_hands_off_a_llama_conversation(smollm2_path, cfg, receiver, reference):
    """A Llama that evaluated the prompt itself: edgelink reads its sequence (no reload) and
    hands it off; the receiver continues exactly as edgelink's own runtime does."""
    prompt_tokens, continuation = reference
    llm = _llama(smollm2_path)
    llm.eval(prompt_tokens)
    m = edgelink.from_llama(llm, cfg)
    assert m.tokens == prompt_tokens and m.runtime.model is llm._model.model
    with m.connect(receiver) as peer:
        assert peer.handoff(n_tokens=12, stop_at_eog=False).tokens == continuation
    m.close()
    llm.close()


def _continuation(path, cfg, tokens, n=8):
    """What edgelink's own runtime says after ``tokens``: the reference for every order below."""
    with edgelink.load(str(path), cfg) as m:
        m.prefill(tokens)
        return m.generate(n, stop_at_eog=False).tokens


def _restored_continuation(path, cfg, snap, n=8):
    with edgelink.load(str(path), cfg) as b:
        b.restore(snap)
        return b.tokens, b.generate(n, stop_at_eog=False).tokens


def test_from_llama_stays_in_step_whatever_the_order(smollm2_path, cfg, receiver, reference):
    """Wrap then use, use then wrap, edgelink then llama-cpp-python then edgelink: after each, the
    wrapped model's sequence is the Llama's, its snapshot carries the cells (a receiver accepts it),
    and every continuation is what edgelink's own runtime says after the same tokens."""
    prompt_tokens, _ = reference
    half = len(prompt_tokens) // 2
    # 1. wrap, then llama-cpp-python's own eval, then a snapshot
    llm = _llama(smollm2_path)
    m = edgelink.from_llama(llm, cfg)
    llm.eval(prompt_tokens)
    snap = m.snapshot()
    assert snap.payload_bytes > 0 and m.tokens == prompt_tokens
    assert _restored_continuation(smollm2_path, cfg, snap) == (prompt_tokens, _continuation(smollm2_path, cfg, prompt_tokens))
    # 2. edgelink prefills, llama-cpp-python completes, then a handoff carries both
    m.reset()
    m.prefill(prompt_tokens)
    said, _ = _greedy(llm, prompt_tokens, 5)
    seq = list(llm.input_ids[: llm.n_tokens])
    assert seq[: len(prompt_tokens)] == prompt_tokens and m.tokens == seq
    with m.connect(receiver) as peer:
        got = peer.handoff(n_tokens=8, stop_at_eog=False).tokens
    assert got == _continuation(smollm2_path, cfg, seq)
    # 3. edgelink, then llama-cpp-python, then edgelink again on one sequence
    m.reset()
    m.prefill(prompt_tokens[:half])
    llm.eval(prompt_tokens[half:])
    assert m.tokens == prompt_tokens
    assert m.generate(8, stop_at_eog=False).tokens == _continuation(smollm2_path, cfg, prompt_tokens)
    # and llama-cpp-python continues from what edgelink generated
    seq = m.tokens
    _, out = _greedy(llm, seq, 4)
    assert out["choices"][0]["text"] == m.runtime.detokenize(_continuation(smollm2_path, cfg, seq, 4))
    m.close()
    # 4. use, then wrap: the wrapped model starts from the Llama's sequence
    m2 = edgelink.from_llama(llm, cfg)
    assert m2.tokens == list(llm.input_ids[: llm.n_tokens])
    assert _restored_continuation(smollm2_path, cfg, m2.snapshot())[0] == m2.tokens
    m2.close()
    llm.close()


def test_a_state_restored_into_a_llama_continues_in_llama_cpp_pythons_own_generation(smollm2_path, cfg, reference):
    """edgelink imports a snapshot into a Llama's context; then llama-cpp-python's own
    create_completion, not edgelink, continues from it: the same tokens as edgelink's runtime."""
    prompt_tokens, continuation = reference
    with edgelink.load(str(smollm2_path), cfg) as a:
        a.prefill(PROMPT)
        snap = a.snapshot()
    llm = _llama(smollm2_path)
    llm.eval(llm.tokenize(b"Unrelated words first, to be replaced"))
    m = edgelink.from_llama(llm, cfg)
    m.restore(snap)
    assert list(llm.input_ids[: llm.n_tokens]) == prompt_tokens
    got, out = _greedy(llm, prompt_tokens, 12)
    assert out["usage"]["prompt_tokens"] == len(prompt_tokens)
    assert llm.tokenize(llm.detokenize(continuation), add_bos=False, special=True) == got
    m.close()
    llm.close()


# ---------------------------------------------------------------------------- llama.cpp's state files


def _llama_cpp_load(rt, path) -> list[int]:
    """llama.cpp's own llama_state_seq_load_file into ``rt``'s context; the token ids it read."""
    cap = rt.n_ctx
    toks = (llama_cpp.llama_token * cap)()
    n_out = ctypes.c_size_t(0)
    rt.clear()
    n = llama_cpp.llama_state_seq_load_file(rt.ctx, str(path).encode(), rt.seq, toks, cap, ctypes.byref(n_out))
    assert n > 0, "llama.cpp refused the file"
    return list(toks[: n_out.value])


def test_a_file_edgelink_writes_is_what_llama_cpp_reads(smollm2_path, cfg, reference, tmp_path):
    prompt_tokens, continuation = reference
    path = tmp_path / "slot.bin"
    subprocess.run([sys.executable, "-m", "edgelink", "export", str(smollm2_path), "-p", PROMPT, "-o", str(path),
                    "--format", "llama"], capture_output=True, text=True, timeout=300, check=True)
    with edgelink.load(str(smollm2_path), cfg) as m:
        toks = _llama_cpp_load(m.runtime, path)
        assert toks == prompt_tokens
        m.reset()
        m.prefill(prompt_tokens)  # the same prompt computed here, for its cells
        mine = bytes(m.runtime.export_state())
        m.reset()
        _llama_cpp_load(m.runtime, path)
        assert bytes(m.runtime.export_state()) == mine  # llama.cpp holds exactly those cells
        m.reset()
    with edgelink.load(str(smollm2_path), cfg) as m:
        assert m.load_llama_file(path) == len(prompt_tokens)
        assert m.generate(12, stop_at_eog=False).tokens == continuation


def test_a_file_llama_cpp_writes_becomes_an_edgelink_message(smollm2_path, cfg, reference, tmp_path):
    prompt_tokens, continuation = reference
    path = tmp_path / "slot.bin"
    with edgelink.load(str(smollm2_path), cfg) as m:
        m.prefill(prompt_tokens)
        arr = (llama_cpp.llama_token * len(prompt_tokens))(*prompt_tokens)
        assert llama_cpp.llama_state_seq_save_file(m.runtime.ctx, str(path).encode(), m.runtime.seq, arr,
                                                   len(prompt_tokens)) > 0
    msg = tmp_path / "slot.elk"
    out = subprocess.run([sys.executable, "-m", "edgelink", "import-llama", str(smollm2_path), str(path), "-o",
                          str(msg), "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["prompt_tokens"] == len(prompt_tokens)
    resumed = subprocess.run([sys.executable, "-m", "edgelink", "resume", str(smollm2_path), str(msg), "-n", "12",
                              "--json"], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(resumed.stdout)["tokens"] == continuation


def test_hostile_or_foreign_state_files_are_refused_typed(smollm2_path, gemma3_path, cfg, tmp_path):
    good = tmp_path / "good.bin"
    with edgelink.load(str(gemma3_path), cfg) as g:
        g.prefill(PROMPT)
        g.save_llama_file(tmp_path / "gemma.bin")
    with edgelink.load(str(smollm2_path), cfg) as m:
        m.prefill(PROMPT)
        m.save_llama_file(good)
        data = good.read_bytes()
        n = struct.unpack_from("<I", data, 8)[0]
        cases = {
            "empty": b"",
            "magic": b"xxxx" + data[4:],
            "version": data[:4] + struct.pack("<I", 99) + data[8:],
            "too many tokens": data[:8] + struct.pack("<I", 1 << 30) + data[12:],
            "ids cut": data[: 12 + 2 * n],
            "id outside vocab": data[:12] + struct.pack("<i", 10_000_000) + data[16:],
            "cells cut": data[:-100],
            "cells extra": data + b"\0" * 64,
            "another model": (tmp_path / "gemma.bin").read_bytes(),
        }
        before = m.runtime.state_digest()
        for what, blob in cases.items():
            bad = tmp_path / "bad.bin"
            bad.write_bytes(blob)
            with pytest.raises(StateError):
                m.load_llama_file(bad)
            if what in ("empty", "magic", "version", "too many tokens", "ids cut", "id outside vocab"):
                assert m.runtime.state_digest() == before, what  # refused before any import
        rng = np.random.default_rng(5)
        for _ in range(40):  # random damage anywhere: a typed error or a valid state, nothing else
            blob = bytearray(data)
            for i in rng.integers(0, len(blob), 4):
                blob[i] ^= int(rng.integers(1, 256))
            (tmp_path / "fuzz.bin").write_bytes(bytes(blob))
            try:
                m.load_llama_file(tmp_path / "fuzz.bin")
            except StateError:
                pass
    proc = subprocess.run([sys.executable, "-m", "edgelink", "import-llama", str(smollm2_path),
                           str(tmp_path / "gemma.bin"), "-o", str(tmp_path / "x.elk")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == StateError.exit_code and "error" in proc.stderr and not (tmp_path / "x.elk").exists()


def test_a_prompt_longer_than_the_receivers_context_is_refused_before_prefill(smollm2_path, cfg):
    """The receiver's HELLO says how much it can take; a handoff that could never fit fails at
    once, naming the setting to change, before the sender spends a prefill on it."""
    name = f"t-room-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    proc = start_receiver(str(smollm2_path), cfg, name, extra_args=("--set", "runtime.n_ctx=512"))
    try:
        long = " ".join(["lighthouse"] * 700)
        out = subprocess.run([sys.executable, "-m", "edgelink", "handoff", str(smollm2_path), "-p", long,
                              "--to", f"shm:{name}", "-n", "2"], capture_output=True, text=True, timeout=300)
        assert out.returncode == StateError.exit_code, out.stderr
        assert "takes at most 512" in out.stderr and "runtime.n_ctx" in out.stderr
        with edgelink.load(str(smollm2_path), cfg) as m, m.connect(f"shm:{name}") as peer:
            assert peer.room == 512
            with pytest.raises(StateError, match=r"596 tokens.*at most 512.*runtime\.n_ctx"):
                peer.check_room(596)
            m.prefill(PROMPT)  # a sequence that fits still goes
            assert peer.handoff(n_tokens=2).tokens
    finally:
        assert stop_receiver(proc) in (0, -15), proc.stderr_tail()


def test_a_turn_ends_at_end_of_turn_and_control_tokens_are_tokens(smollm2_path, cfg, receiver):
    """A chat turn written with the template's control tokens reads them as tokens, and the
    peer's reply ends at its end-of-turn token by default (not '...\\nassistant\\n...')."""
    turn = "<|im_start|>user\nWhat is 2+2? Answer in one word.<|im_end|>\n<|im_start|>assistant\n"
    with edgelink.load(str(smollm2_path), cfg) as m:
        toks = m.tokenize(turn)
        assert len(toks) < len(m.tokenize(turn, parse_special=False)) - 10  # not '<', '|', 'im', ...
        with m.connect(receiver) as peer:
            r = peer.converse(turn, n_tokens=64)
            assert 0 < len(r.reply_tokens) < 64 and "assistant" not in r.reply_text  # it ended itself
            assert peer.same_state()
        m.reset()
        with m.connect(receiver) as peer:
            on = peer.converse(turn, n_tokens=len(r.reply_tokens) + 8, stop_at_eog=False)
            assert len(on.reply_tokens) == len(r.reply_tokens) + 8
