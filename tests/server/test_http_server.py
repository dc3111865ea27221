"""The OpenAI-compatible server (issue 27), driven by the real `openai` client against a live
`edgelink serve MODEL --http` process on loopback.

Held here: streamed and plain chat and text completions with the model's own chat template,
greedy output equal to the model's own greedy continuation of the same tokens, usage with
cached_tokens, a second turn that hits the prefix cache, a restart that keeps the disk cache,
concurrent clients and a full queue (429 with Retry-After), a disconnect that frees its
context, an API key enforced, and OpenAI-shaped 4xx errors for bad bodies while the server
keeps serving.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")

SYSTEM = ("You are a careful assistant for a lighthouse museum. The museum has three floors: the "
          "ground floor holds the lenses, the first floor the logbooks of the keepers from 1850 to "
          "1990, and the top floor the lamp room, which visitors may enter only with a guide. ") * 3


def _start(model: str, cfg, tmp_path, *args: str, env: dict | None = None):
    from edgelink.config import to_env

    full = {**os.environ, **to_env(cfg), "EDGELINK_HTTP_LISTEN": "127.0.0.1:0", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "edgelink", "serve", model, "--http", "--json", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full)
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"server did not start: {proc.stderr.read()[-3000:]}")
    ready = json.loads(line)
    assert ready["event"] == "ready", ready
    proc.ready = ready
    return proc


def _stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(smollm2_path, cfg, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http")
    scfg = cfg.replace(cache_dir=str(tmp / "kv"), cache_chunk_tokens=64, http_parallel=2, http_queue=1,
                       http_max_body_bytes=1 << 16)
    proc = _start(str(smollm2_path), scfg, tmp)
    proc.cfg, proc.tmp = scfg, tmp
    yield proc
    _stop(proc)


def _client(proc, key: str = "none"):
    return openai.OpenAI(base_url=proc.ready["url"], api_key=key, max_retries=0, timeout=120)


def _reference(smollm2_path, cfg, messages, n, tmp_path):
    """The model's own greedy continuation of the same rendered prompt, in this process, by a
    cold run through an empty prefix cache: what every reply must equal, hit or not."""
    import edgelink
    from edgelink.cache.prefix import PrefixCache
    from edgelink.runtime.chat import ChatTemplate

    cold = cfg.replace(cache_dir=str(tmp_path / f"cold-{len(list(tmp_path.iterdir()))}"), cache_chunk_tokens=64)
    with edgelink.load(str(smollm2_path), cold) as m:
        toks = ChatTemplate(m.runtime).tokens(messages)
        m.prefill(toks, cache=PrefixCache(cold))
        out = m.generate(n, stop_at_eog=True)
        return len(toks), out.text


def test_chat_completion_plain_and_streamed_matches_the_model(server, smollm2_path, cfg, tmp_path):
    c = _client(server)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Which floor has the lenses?"}]
    r = c.chat.completions.create(model=server.ready["model"], messages=messages, max_tokens=24, temperature=0)
    n_prompt, want = _reference(smollm2_path, cfg, messages, 24, tmp_path)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens > 0
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    # the same system prompt with a new question: its whole 64-token chunks come from the cache
    messages2 = [messages[0], {"role": "user", "content": "Who may enter the lamp room?"}]
    stream = c.chat.completions.create(model=server.ready["model"], messages=messages2, max_tokens=24,
                                       temperature=0, stream=True, stream_options={"include_usage": True})
    parts, usage, reasons = [], None, []
    for ev in stream:
        if ev.usage is not None:
            usage = ev.usage
        for ch in ev.choices:
            parts.append(ch.delta.content or "")
            if ch.finish_reason:
                reasons.append(ch.finish_reason)
    _, want2 = _reference(smollm2_path, cfg, messages2, 24, tmp_path)
    assert "".join(parts) == want2 and reasons in (["stop"], ["length"])
    assert usage is not None and usage.prompt_tokens_details.cached_tokens >= 64 * (n_prompt // 64 - 1)


def test_the_next_request_reuses_the_contexts_cells_exactly(smollm2_path, cfg, tmp_path):
    """With the cache's tiers off, what a second request with the same system prompt reuses can
    only be its context's own cells: whole chunks of the last prompt, and the reply is still
    that of a cold run through the cache. A request with another prompt reuses nothing."""
    from edgelink.server.engine import Engine, Outcome, Params

    ecfg = cfg.replace(cache_dir=str(tmp_path / "kv"), cache_chunk_tokens=64, cache_ram_bytes=0,
                       cache_disk_bytes=0, http_parallel=1)
    eng = Engine(str(smollm2_path), ecfg)
    try:
        def ask(messages):
            items = list(eng.run(eng.chat_tokens(messages), Params(max_tokens=16)))
            return "".join(i for i in items if isinstance(i, str)), items[-1]

        first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Which floor has the lenses?"}]
        second = [first[0], {"role": "user", "content": "Who may enter the lamp room?"}]
        _, out1 = ask(first)
        text2, out2 = ask(second)
        assert isinstance(out2, Outcome) and out1.cached_tokens == 0
        assert out2.cached_from == {"context": out2.cached_tokens // 64} and out2.cached_tokens >= 128
        assert text2 == _reference(smollm2_path, cfg, second, 16, tmp_path)[1]
        _, out3 = ask([{"role": "user", "content": "Something else entirely."}])
        assert out3.cached_tokens == 0
    finally:
        eng.close()


def test_prefix_reuse_covers_the_previous_reply_and_a_long_new_part_goes_through_the_cache(smollm2_path, cfg,
                                                                                         tmp_path):
    """``http.reuse = prefix``: a chat's next turn reuses its context's cells token by token, the
    previous reply included (more than the whole chunks exact reuse may keep); a turn whose new
    part is long goes the exact way, whole chunks, so the cache stores what it computes."""
    from edgelink.server.engine import Engine, Params, common_prefix

    ecfg = cfg.replace(cache_dir=str(tmp_path / "kv"), cache_chunk_tokens=64, cache_ram_bytes=0,
                       cache_disk_bytes=0, http_parallel=1, http_reuse="prefix")
    eng = Engine(str(smollm2_path), ecfg)
    try:
        def ask(messages):
            toks = eng.chat_tokens(messages)
            items = list(eng.run(toks, Params(max_tokens=12)))
            return len(toks), "".join(i for i in items if isinstance(i, str)), items[-1]

        chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Which floor has the lenses?"}]
        n1, reply, out1 = ask(chat)
        assert out1.cached_tokens == 0 and reply
        chat += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And the logbooks?"}]
        n2, reply2, out2 = ask(chat)
        # the whole first prompt and some of the reply, where exact reuse stops at a chunk boundary
        assert out2.cached_tokens > n1 and out2.cached_tokens % 64
        assert out2.cached_from == {"context": out2.cached_tokens // 64}
        assert reply2 and out2.prompt_tokens == n2
        chat += [{"role": "assistant", "content": reply2},
                 {"role": "user", "content": "Tell me about the keepers. " * 20}]
        n3, _, out3 = ask(chat)
        assert n3 - n2 > 128 and out3.cached_tokens % 64 == 0 and 0 < out3.cached_tokens <= n2
        other = [{"role": "user", "content": "Something else entirely."}]
        _, _, out4 = ask(other)  # only the template's opening tokens are common
        assert out4.cached_tokens == common_prefix(eng.chat_tokens(chat), eng.chat_tokens(other), 99) < 16
    finally:
        eng.close()


def test_an_unknown_reuse_mode_is_a_config_error_that_names_the_choices(cfg):
    from edgelink.errors import ConfigError
    from edgelink.server.engine import Engine

    with pytest.raises(ConfigError, match="exact, prefix"):
        Engine("no-such-model", cfg.replace(http_reuse="tokens"))


def test_a_text_completion_seed_and_stop(server):
    c = _client(server)
    r = c.completions.create(model=server.ready["model"], prompt="The three floors of the museum are",
                             max_tokens=20, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    a = c.completions.create(model=server.ready["model"], prompt="Once upon a time", max_tokens=16,
                             temperature=0.9, seed=7)
    b = c.completions.create(model=server.ready["model"], prompt="Once upon a time", max_tokens=16,
                             temperature=0.9, seed=7)
    assert a.choices[0].text == b.choices[0].text  # a seed repeats a sampled reply
    full = r.choices[0].text
    cut = full.strip().split(" ")[1]
    s = c.completions.create(model=server.ready["model"], prompt="The three floors of the museum are",
                             max_tokens=20, temperature=0, stop=[cut])
    assert s.choices[0].text == full[:full.index(cut)] and s.choices[0].finish_reason == "stop"
    assert [m.id for m in c.models.list().data] == [server.ready["model"]]
    assert c.models.retrieve(server.ready["model"]).id == server.ready["model"]
    assert server.ready["reuse"] == "exact"  # the default, said at start
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-9")


def test_logprobs_are_the_models_own_plain_streamed_and_for_text(server, smollm2_path, cfg, tmp_path):
    """``logprobs``: each generated token's log probability under the model's distribution (the
    first one equal to the model's own, computed here by a cold run), greedy picks the most
    likely alternative, a stream carries the same entries as a whole reply, and a text
    completion gets the legacy lists."""
    import edgelink
    from edgelink.cache.prefix import PrefixCache
    from edgelink.runtime.chat import ChatTemplate
    from edgelink.runtime.sampling import log_probs

    c = _client(server)
    messages = [{"role": "user", "content": "Name a colour."}]
    r = c.chat.completions.create(model=server.ready["model"], messages=messages, max_tokens=8, temperature=0,
                                  logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3 and bytes(e.bytes).decode() == e.token
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == e.logprob  # greedy
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    cold = cfg.replace(cache_dir=str(tmp_path / "cold"), cache_chunk_tokens=64)
    with edgelink.load(str(smollm2_path), cold) as m:
        m.prefill(ChatTemplate(m.runtime).tokens(messages), cache=PrefixCache(cold))
        first = int(m.runtime.logits.argmax())
        assert abs(log_probs(m.runtime.logits, first)[0] - content[0].logprob) < 1e-6
    streamed = []
    for ev in c.chat.completions.create(model=server.ready["model"], messages=messages, max_tokens=8,
                                        temperature=0, logprobs=True, top_logprobs=3, stream=True):
        for ch in ev.choices:
            streamed += ch.logprobs.content if ch.logprobs else []
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    t = c.completions.create(model=server.ready["model"], prompt="The lamp room is", max_tokens=6, temperature=0,
                             logprobs=2)
    lp = t.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == t.usage.completion_tokens
    assert "".join(lp.tokens) == t.choices[0].text and all(len(d) == 2 for d in lp.top_logprobs)
    assert lp.text_offset == [sum(len(x) for x in lp.tokens[:i]) for i in range(len(lp.tokens))]
    plain = c.chat.completions.create(model=server.ready["model"], messages=messages, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    url = server.ready["url"]

    def post(path: str, body: bytes, headers=None):
        req = urllib.request.Request(url + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    cases = [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, None),
        (json.dumps({"messages": "hi"}).encode(), 400, "invalid_type"),
        (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "invalid_value"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}).encode(), 400, "invalid_type"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}).encode(), 400, "invalid_value"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": 9}).encode(), 400, "invalid_value"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 3}).encode(), 400, "invalid_value"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}).encode(), 400, "invalid_value"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                     "top_logprobs": 21}).encode(), 400, "invalid_value"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "logprobs": 3}).encode(), 400, "invalid_type"),
        (json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).encode(), 404, "model_not_found"),
        (json.dumps({"messages": [{"role": "user", "content": "word " * 5000}]}).encode(), 400, "context_length_exceeded"),
        (b"x" * (server.cfg.http.max_body_bytes + 10), 413, "request_too_large"),
    ]
    for body, status, code in cases:
        got, err = post("/chat/completions", body)
        assert got == status, (body[:60], got, err)
        assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
        if code:
            assert err["error"]["code"] == code, (body[:60], err)
        assert "Traceback" not in err["error"]["message"]
    got, err = post("/nowhere", b"{}")
    assert got == 404 and err["error"]["code"] == "not_found"
    with pytest.raises(openai.BadRequestError):
        _client(server).chat.completions.create(model=server.ready["model"], messages=[], max_tokens=4)
    ok = _client(server).chat.completions.create(model=server.ready["model"], max_tokens=4,
                                                 messages=[{"role": "user", "content": "Hi"}])
    assert ok.choices[0].message.content is not None


def _health(proc) -> dict:
    with urllib.request.urlopen(proc.ready["url"].removesuffix("/v1") + "/health", timeout=30) as r:
        return json.loads(r.read())


def _until(proc, pred, limit: float = 60.0) -> dict:
    """Poll /health until ``pred`` holds for it (the server's own count of busy contexts)."""
    t0 = time.monotonic()
    while not pred(h := _health(proc)):
        assert time.monotonic() - t0 < limit, h
        time.sleep(0.05)
    return h


def test_concurrent_clients_a_full_queue_and_a_disconnect(server):
    """Two contexts and a queue of one: two long streams decode, one request waits, a fourth
    gets 429 with Retry-After. The streams' clients disconnect: their contexts are free at
    once, and the waiting request is served long before the streams would have ended."""
    url, model = server.ready["url"], server.ready["model"]
    c = _client(server)
    streams = []
    for _ in range(2):
        s = c.completions.create(model=model, prompt="Tell me a long story about the sea.", max_tokens=1500,
                                 temperature=0, stream=True, extra_body={"ignore_eos": True})
        next(iter(s))  # decoding now
        streams.append(s)
    done: list = []

    def waiting_request() -> None:
        r = _client(server).completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0)
        done.append((time.monotonic(), r.usage.completion_tokens))

    t = threading.Thread(target=waiting_request, daemon=True)
    t.start()
    _until(server, lambda h: h["decoding"] == 2 and h["waiting"] == 1)
    req = urllib.request.Request(url + "/completions", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": model, "prompt": "x", "max_tokens": 4}).encode())
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=60)
    assert info.value.code == 429 and int(info.value.headers["Retry-After"]) >= 1
    assert json.loads(info.value.read())["error"]["code"] == "rate_limit_exceeded"
    closed = time.monotonic()
    for s in streams:
        s.close()
    t.join(60)
    assert done and done[0][1] > 0
    assert done[0][0] - closed < 20.0  # 1,500 tokens each would take minutes here
    _until(server, lambda h: h["decoding"] == 0 and h["waiting"] == 0)


def test_an_api_key_is_enforced_and_the_disk_cache_survives_a_restart(smollm2_path, cfg, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# clients\nsk-edgelink-test\n")
    scfg = cfg.replace(cache_dir=str(tmp_path / "kv"), cache_chunk_tokens=64, http_parallel=1)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "How many floors?"}]
    cached = []
    for _ in range(2):
        proc = _start(str(smollm2_path), scfg, tmp_path, "--api-key-file", str(keys))
        try:
            with pytest.raises(openai.AuthenticationError):
                _client(proc, "wrong").models.list()
            r = _client(proc, "sk-edgelink-test").chat.completions.create(
                model=proc.ready["model"], messages=messages, max_tokens=8, temperature=0)
            cached.append(r.usage.prompt_tokens_details.cached_tokens)
        finally:
            _stop(proc)
    assert cached[0] == 0 and cached[1] >= 64 * ((r.usage.prompt_tokens - 1) // 64) - 64, cached


def test_beyond_loopback_the_server_needs_a_key(smollm2_path, cfg, tmp_path):
    from edgelink.config import to_env

    env = {**os.environ, **to_env(cfg)}
    r = subprocess.run([sys.executable, "-m", "edgelink", "serve", str(smollm2_path), "--http", "0.0.0.0:0"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "API key" in r.stderr and "Traceback" not in r.stderr, r.stderr
    with socket.socket() as s:  # nothing was left listening
        s.bind(("127.0.0.1", 0))


def test_a_second_server_fetches_the_prefix_from_a_peer(smollm2_path, cfg, tmp_path):
    """Server B lacks the system prompt's chunks; a node on another cache holds them
    (cache.peers): B fetches them before its prefill, and answers as a cold run would."""
    import edgelink
    from edgelink.cache.prefix import PrefixCache
    from edgelink.roles.launcher import start_node, stop_receiver
    from edgelink.runtime.chat import ChatTemplate

    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Who keeps the logbooks?"}]
    holder = cfg.replace(cache_dir=str(tmp_path / "holder"), cache_chunk_tokens=64)
    with edgelink.load(str(smollm2_path), holder) as m:
        m.prefill(ChatTemplate(m.runtime).tokens(messages), cache=PrefixCache(holder))
    node = start_node(str(smollm2_path), holder, extra_env={"EDGELINK_P2P_IDENTITY_KEY": str(tmp_path / "n.key")})
    try:
        bcfg = cfg.replace(cache_dir=str(tmp_path / "b"), cache_chunk_tokens=64, http_parallel=1,
                           cache_peers=node.ready["addrs"][0], p2p_identity_key=tmp_path / "b.key")
        proc = _start(str(smollm2_path), bcfg, tmp_path)
        try:
            r = _client(proc).chat.completions.create(model=proc.ready["model"], messages=messages,
                                                      max_tokens=12, temperature=0)
        finally:
            _stop(proc)
    finally:
        assert stop_receiver(node) in (0, -15), node.stderr_tail()
    assert r.usage.prompt_tokens_details.cached_tokens >= 64 * ((r.usage.prompt_tokens - 1) // 64)
    assert r.choices[0].message.content == _reference(smollm2_path, cfg, messages, 12, tmp_path)[1]


def _post(url: str, body: bytes, ctype: str = "application/json"):
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_handoffs_through_http_state_continue_and_handoff(smollm2_path, cfg, tmp_path):
    """/edgelink/v1/state gives the prompt's KV state as a message file that `edgelink resume`
    continues exactly; /edgelink/v1/continue continues a handed-over state here; a corrupt or
    foreign body is a 4xx with edgelink's reason; /edgelink/v1/handoff hands the prompt to a
    receiver. Every continuation equals the model's own greedy run after the same tokens."""
    import uuid

    import edgelink
    from edgelink.roles.launcher import start_receiver, stop_receiver

    scfg = cfg.replace(cache_dir=str(tmp_path / "kv"), cache_chunk_tokens=64, http_parallel=1)
    proc = _start(str(smollm2_path), scfg, tmp_path)
    name = f"t-httpho-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    rx = start_receiver(str(smollm2_path), cfg, name)
    base = proc.ready["url"].removesuffix("/v1")
    prompt = "The keeper of the lighthouse wrote in his logbook every night, and one night he wrote"
    try:
        with edgelink.load(str(smollm2_path), cfg) as m:
            toks = m.runtime.tokenize(prompt, add_special=True)
            m.prefill(toks)
            want = m.generate(8, stop_at_eog=False)
        status, headers, state = _post(base + "/edgelink/v1/state", json.dumps({"prompt": prompt}).encode())
        assert status == 200 and int(headers["x-edgelink-tokens"]) == len(toks), state[:300]
        path = tmp_path / "from-http.elk"
        path.write_bytes(state)
        resumed = subprocess.run([sys.executable, "-m", "edgelink", "resume", str(smollm2_path), str(path),
                                  "-n", "8", "--json"], capture_output=True, text=True, timeout=300)
        assert json.loads(resumed.stdout)["tokens"] == want.tokens, resumed.stderr
        status, _, body = _post(base + "/edgelink/v1/continue?max_tokens=8&temperature=0", state,
                                "application/octet-stream")
        got = json.loads(body)
        assert status == 200 and got["choices"][0]["text"] == want.text, got
        assert got["usage"]["prompt_tokens"] == len(toks) and got["usage"]["completion_tokens"] == 8
        bad = bytearray(state)
        bad[len(bad) // 2] ^= 0x40
        for blob, code in ((bytes(bad), 422), (b"not an edgelink file at all", 422), (b"", 400)):
            status, _, body = _post(base + "/edgelink/v1/continue?max_tokens=4", blob, "application/octet-stream")
            err = json.loads(body)["error"]
            assert status == code and err["message"], (status, err)
        status, _, body = _post(base + "/edgelink/v1/continue?max_tokens=4&bogus=1", state, "application/octet-stream")
        assert status == 400 and json.loads(body)["error"]["code"] == "unknown_parameter"
        status, _, body = _post(base + "/edgelink/v1/handoff",
                                json.dumps({"prompt": prompt, "to": f"shm:{name}", "max_tokens": 8}).encode())
        out = json.loads(body)
        assert status == 200 and out["tokens"] == want.tokens and out["bytes"]["payload"] > 0, out
        status, _, body = _post(base + "/edgelink/v1/handoff", json.dumps({"prompt": prompt}).encode())
        assert status == 400 and json.loads(body)["error"]["param"] == "to"
        # and the server still serves plain completions
        r = _client(proc).completions.create(model=proc.ready["model"], prompt=prompt, max_tokens=4, temperature=0)
        assert r.choices[0].text
    finally:
        stop_receiver(rx)
        _stop(proc)
