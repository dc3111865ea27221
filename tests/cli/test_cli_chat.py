"""`edgelink chat` (issue 24): the model's chat template with special tokens parsed as such,
streaming, sampling flags validated, and the next turn reusing the previous turn's cells."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SYSTEM = "You are a patient tutor. Answer in one short sentence. " * 8


def _chat(cfg, tmp_path, *args, stdin=None):
    from edgelink.config import to_env

    env = {**os.environ, **to_env(cfg), "EDGELINK_CACHE_DIR": str(tmp_path / "kv"), "EDGELINK_CACHE_CHUNK_TOKENS": "64"}
    return subprocess.run([sys.executable, "-m", "edgelink", "chat", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=300)


def test_one_question_streams_the_templated_reply(smollm2_path, cfg, tmp_path):
    import edgelink
    from edgelink.cache.prefix import PrefixCache
    from edgelink.runtime.chat import ChatTemplate

    r = _chat(cfg, tmp_path, str(smollm2_path), "-p", "What is 2+2?", "-n", "16", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    cold = cfg.replace(cache_dir=str(tmp_path / "cold"), cache_chunk_tokens=64)
    with edgelink.load(str(smollm2_path), cold) as m:
        toks = ChatTemplate(m.runtime).tokens([{"role": "user", "content": "What is 2+2?"}])
        assert toks[:3] != m.runtime.tokenize("<|im_start|>", add_special=False)[:3]  # parsed as special
        m.prefill(toks, cache=PrefixCache(cold))
        want = m.generate(16).text
    assert got["reply"] == want and got["prompt_tokens"] == len(toks) and got["tokens_per_s"] > 0


def test_an_interactive_chat_reuses_the_previous_turn(smollm2_path, cfg, tmp_path):
    r = _chat(cfg, tmp_path, str(smollm2_path), "--system", SYSTEM, "-n", "12", "--json",
              stdin="What is a noun?\nAnd a verb?\n\n")
    assert r.returncode == 0, r.stderr
    turns = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(turns) == 2 and all(t["reply"] for t in turns)
    assert turns[0]["cached_tokens"] == 0 and turns[1]["cached_tokens"] >= 64


def test_bad_flags_are_refused(smollm2_path, cfg, tmp_path):
    for bad in (["-n", "-5"], ["--temperature", "9"], ["--top-p", "0"]):
        r = _chat(cfg, tmp_path, str(smollm2_path), "-p", "x", *bad)
        assert r.returncode == 2 and "Invalid value" in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)
