"""The CLI as a user runs it: real subprocesses, real model, JSON output, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgelink.errors import ModelError, ProtocolError, SessionError, StateError

PROMPT = "The old lighthouse keeper climbed the stairs and"


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "edgelink", *args], capture_output=True, text=True,
                          timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def reference(smollm2_path):
    return json.loads(run("generate", str(smollm2_path), "-p", PROMPT, "-n", "12", "--json").stdout)


def test_export_then_resume_matches_generate(reference, smollm2_path, tmp_path):
    snap = tmp_path / "state.elk"
    out = json.loads(run("export", "smollm2-135m", "-p", PROMPT, "-o", str(snap), "--json").stdout)
    assert snap.stat().st_size == out["bytes"]["file"] > out["bytes"]["payload"] > 0
    resumed = json.loads(run("resume", str(smollm2_path), str(snap), "-n", "12", "--json").stdout)
    assert resumed["tokens"] == reference["tokens"]
    assert resumed["text"] == reference["text"]


def test_export_with_a_codec_resumes_exactly_and_a_lossy_file_needs_consent(reference, smollm2_path, tmp_path):
    raw, packed, lossy = tmp_path / "raw.elk", tmp_path / "zstd.elk", tmp_path / "kivi4.elk"
    long = " ".join([PROMPT] * 30)  # enough KV for compression to show over the codec's attrs
    run("export", str(smollm2_path), "-p", long, "-o", str(raw), "--wire", "raw")
    out = json.loads(run("export", str(smollm2_path), "-p", long, "-o", str(tmp_path / "long.elk"),
                         "--wire", "lossless", "--json").stdout)
    assert out["written"]["codec"] == "zstd-shuffle/1"
    assert (tmp_path / "long.elk").stat().st_size < 0.95 * raw.stat().st_size
    run("export", str(smollm2_path), "-p", PROMPT, "-o", str(packed), "--wire", "lossless")
    resumed = json.loads(run("resume", str(smollm2_path), str(packed), "-n", "12", "--json").stdout)
    assert resumed["tokens"] == reference["tokens"]
    made = run("export", str(smollm2_path), "-p", PROMPT, "-o", str(lossy), "--wire", "kivi4/1")
    assert "lossy" in made.stderr and "wire.allow_lossy=on" in made.stderr  # said at export time
    proc = run("resume", str(smollm2_path), str(lossy), ok=False)
    assert proc.returncode == ProtocolError.exit_code and "kivi4/1" in proc.stderr and "allow_lossy" in proc.stderr
    ok = run("--set", "wire.allow_lossy=on", "resume", str(smollm2_path), str(lossy), "-n", "4", "--json")
    assert len(json.loads(ok.stdout)["tokens"]) == 4


def test_resume_into_another_model_is_refused(smollm2_path, gemma3_path, tmp_path):
    snap = tmp_path / "state.elk"
    run("export", str(smollm2_path), "-p", PROMPT, "-o", str(snap))
    proc = run("resume", str(gemma3_path), str(snap), ok=False)
    assert proc.returncode == SessionError.exit_code
    assert "error (signature)" in proc.stderr and "different models" in proc.stderr and "gemma3" in proc.stderr


def test_corrupted_file_is_refused(smollm2_path, tmp_path):
    snap = tmp_path / "state.elk"
    run("export", str(smollm2_path), "-p", PROMPT, "-o", str(snap))
    data = bytearray(snap.read_bytes())
    data[len(data) // 2] ^= 0x80
    snap.write_bytes(bytes(data))
    proc = run("resume", str(smollm2_path), str(snap), ok=False)
    assert proc.returncode == ProtocolError.exit_code and "error (checksum)" in proc.stderr
    snap.write_bytes(bytes(data[: len(data) // 3]))
    proc = run("resume", str(smollm2_path), str(snap), ok=False)
    assert proc.returncode == ProtocolError.exit_code and "error (truncated)" in proc.stderr


def test_info_and_models(smollm2_path):
    sig = json.loads(run("info", "smollm2-135m", "--json").stdout)
    assert (sig["architecture"], sig["n_layer"], sig["n_embd"], sig["n_head_kv"]) == ("llama", 30, 576, 3)
    assert len(sig["weights_digest"]) == 64
    listed = json.loads(run("models", "list", "--json").stdout)
    names = {m["entry"]["name"] for m in listed}
    assert {"smollm2-135m", "gemma3-270m", "tinyllama-1.1b-chat", "llama3-8b-instruct"} <= names


def test_flags_override_config(smollm2_path):
    proc = run("--set", "runtime.n_ctx=8", "generate", str(smollm2_path), "-p", "word " * 300, "-n", "2",
               ok=False)
    assert proc.returncode == StateError.exit_code and "context" in proc.stderr
    proc = run("--set", "nonsense", "generate", "-p", "x", ok=False)
    assert proc.returncode != 0 and "SECTION.KEY=VALUE" in proc.stderr


def test_unknown_model_lists_known_names():
    proc = run("info", "no-such-model", ok=False)
    assert proc.returncode == ModelError.exit_code and "smollm2-135m" in proc.stderr


def test_inspect_describes_a_message_file(smollm2_path, tmp_path):
    snap = tmp_path / "state.elk"
    run("export", str(smollm2_path), "-p", PROMPT, "-o", str(snap))
    frames = json.loads(run("inspect", str(snap), "--json").stdout)
    assert [f["frame"] for f in frames] == ["HELLO", "TENSOR"]
    hello, msg = frames
    assert hello["model"]["architecture"] == "llama" and "KV_CACHE" in hello["kinds"]
    assert (msg["kind"], msg["apply"], msg["layers"]) == ("KV_CACHE", "OVERWRITE", [0, 30])
    n = msg["tokens"][1]
    k0 = next(t for t in msg["tensors"] if t["name"] == "c0.s0.k0")
    assert k0["dtype"] == "f16" and k0["shape"] == [n, 192] and msg["verified"]
    # a flipped payload byte shows up as a tensor that fails its checksum
    data = bytearray(snap.read_bytes())
    data[-300] ^= 0x01
    snap.write_bytes(bytes(data))
    corrupt = run("inspect", str(snap), "--json", ok=False)
    assert corrupt.returncode == ProtocolError.exit_code and "do not verify" in corrupt.stderr  # a corrupt file fails
    frames = json.loads(corrupt.stdout)
    assert not frames[1]["verified"]
    assert sum(not t["verified"] for t in frames[1]["tensors"]) == 1
    assert "CORRUPT" in run("inspect", str(snap), ok=False).stdout


def test_every_kind_goes_through_the_file_transport(reference, smollm2_path, tmp_path):
    prefix = tmp_path / "prefix.elk"
    run("export", str(smollm2_path), "-p", PROMPT, "-o", str(prefix), "--as", "prefix")
    out = json.loads(run("resume", str(smollm2_path), str(prefix), "-n", "12", "--json").stdout)
    assert out["tokens"] == reference["tokens"]  # embedding rows read like the text itself
    mem = tmp_path / "memory.elk"
    run("export", str(smollm2_path), "-p", "The vault password is tangerine.", "-o", str(mem),
        "--as", "memory")
    assert json.loads(run("inspect", str(mem), "--json").stdout)[1]["kind"] == "KV_MEMORY"
    proc = run("resume", str(smollm2_path), str(mem), "-n", "4", ok=False)
    assert proc.returncode == StateError.exit_code and "no logits" in proc.stderr  # a memory needs something after it
    out = json.loads(run("resume", str(smollm2_path), str(mem), "-p", " The password is", "-n", "4",
                         "--json").stdout)
    assert len(out["tokens"]) == 4


def test_one_grammar_global_options_anywhere_and_typos_named(smollm2_path, tmp_path):
    """--set after the subcommand works; a misspelt key or EDGELINK_* variable is an error that
    suggests the right name; -n -5 is refused; --json errors are JSON; models --json list is JSON."""
    import json as _json
    import os as _os

    ok = run("generate", str(smollm2_path), "-p", "Hi", "-n", "2", "--json", "--set", "runtime.n_ctx=512")
    assert ok.returncode == 0 and _json.loads(ok.stdout)["tokens"]
    bad = run("generate", str(smollm2_path), "-p", "Hi", "--set", "runtime.n_ctxx=512", ok=False)
    assert bad.returncode == 2 and "did you mean runtime.n_ctx?" in bad.stderr, bad.stderr
    env = {**_os.environ, "EDGELINK_RUNTIME_N_CTXX": "512"}
    typo = subprocess.run([sys.executable, "-m", "edgelink", "info", str(smollm2_path), "--json"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert typo.returncode == 2 and "EDGELINK_RUNTIME_N_CTX?" in typo.stderr, typo.stderr
    assert _json.loads(typo.stdout)["error"]["code"] == "config"
    neg = run("generate", str(smollm2_path), "-p", "Hi", "-n", "-5", ok=False)
    assert neg.returncode == 2 and "Invalid value" in neg.stderr
    listed = run("models", "--json", "list")
    assert isinstance(_json.loads(listed.stdout), list)
