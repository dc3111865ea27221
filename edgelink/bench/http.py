"""`edgelink bench http`: the OpenAI server against `python -m llama_cpp.server`, side by side.

Both servers run the same GGUF with the same context size and threads, one context each, as
child processes on loopback, driven by the real `openai` client with streaming (time to first
token is the time to the first content chunk). Cases, each in one run:

- shared: N requests sharing one long system prompt, each with a different question (the
  realistic reuse case, not the identical prompt);
- chat: a multi-turn chat, each turn carrying the whole conversation;
- restart: both servers restarted (edgelink's disk cache survives, llama_cpp.server's state
  does not), then the shared case again;
- concurrent: four clients at once, a fixed number of requests each: requests per second and
  p50/p95 time to first token;
- peer: a second edgelink server with an empty cache, whose ``cache.peers`` is an `edgelink node`
  holding the first server's cache in another network namespace behind a tc-shaped link (root;
  on loopback otherwise), against llama_cpp.server's restart case (a server that never saw the
  prompt either);
- shared+prefix, chat+prefix: the shared and chat cases on an edgelink server with
  ``http.reuse = prefix`` (token-granular reuse, as llama_cpp.server does), whose replies are
  compared with the exact server's.

llama_cpp.server reuses its one context's common prefix with the previous request (llama-cpp-
python's prefix match), so "shared" and "chat" compare edgelink's chunked reuse with that, not
with a cold prefill; "restart" is where a persistent cache shows.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from edgelink.bench import context_tokens
from edgelink.bench.netns import remote_host, shape
from edgelink.bench.rss import rss_bytes
from edgelink.config import Config, to_env
from edgelink.errors import EdgelinkError
from edgelink.models.resolve import resolve_model
from edgelink.roles.launcher import start_node, stop_receiver
from edgelink.runtime.llama import LlamaRuntime

QUESTIONS = ["Which floor holds the lenses?", "Who may enter the lamp room?", "What do the logbooks cover?",
             "How many floors are there?", "Is there a guide?", "What is on the top floor?",
             "Name one thing on the ground floor.", "When do the logbooks end?", "Can visitors climb alone?",
             "Summarise the museum in one line."]


CHUNK = 64  # edgelink's cache.chunk_tokens in every case


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, kind: str, model: Path, cfg: Config, cache_dir: Path, threads: int, chat: bool,
                 extra_env: dict[str, str] | None = None):
        self.kind, self.port, self.chat = kind, _free_port(), chat
        env = {**os.environ, **to_env(cfg)}
        if kind == "edgelink":
            env.update({"EDGELINK_CACHE_DIR": str(cache_dir), "EDGELINK_HTTP_PARALLEL": "1",
                        "EDGELINK_RUNTIME_N_THREADS": str(threads), "EDGELINK_CACHE_CHUNK_TOKENS": str(CHUNK),
                        **(extra_env or {})})
            cmd = [sys.executable, "-m", "edgelink", "serve", str(model), "--http", f"127.0.0.1:{self.port}", "--json"]
        else:
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--n_ctx", str(cfg.runtime.n_ctx),
                   "--n_threads", str(threads), "--n_threads_batch", str(threads), "--host", "127.0.0.1",
                   "--port", str(self.port), "--verbose", "False"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.url = f"http://127.0.0.1:{self.port}/v1"
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise EdgelinkError(f"{kind} server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/models", timeout=5) as r:
                    self.model = json.loads(r.read())["data"][0]["id"]
                    break
            except OSError:
                if time.monotonic() - t0 > 300:
                    raise EdgelinkError(f"{kind} server did not answer within 300 s") from None
                time.sleep(0.2)
        self.start_s = time.monotonic() - t0
        self.peak_rss = rss_bytes(self.proc.pid)

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, rss_bytes(self.proc.pid))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _ask(srv: _Server, messages: list[dict], max_tokens: int) -> dict[str, Any]:
    import openai

    c = openai.OpenAI(base_url=srv.url, api_key="none", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    ttft, parts, cached = None, [], None
    common = {"model": srv.model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
              "stream_options": {"include_usage": True}}
    if srv.chat:
        stream = c.chat.completions.create(messages=messages, **common)
    else:  # a model without a chat template: the same conversation as plain text
        text = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\n\nassistant:"
        stream = c.completions.create(prompt=text, **common)
    for ev in stream:
        if ev.usage is not None and ev.usage.prompt_tokens_details is not None:
            cached = ev.usage.prompt_tokens_details.cached_tokens
        for ch in ev.choices:
            piece = ch.delta.content if srv.chat else ch.text
            if piece:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                parts.append(piece)
    srv.sample()
    return {"ttft_s": ttft if ttft is not None else time.perf_counter() - t0,
            "total_s": time.perf_counter() - t0, "text": "".join(parts), "cached_tokens": cached}


def _system(model: Path, cfg: Config, n_tokens: int) -> tuple[str, bool]:
    """The shared system prompt, and whether the model has a chat template."""

    with LlamaRuntime(model, cfg.replace(runtime_n_ctx=max(512, n_tokens + 64))) as rt:
        text = "You answer questions about this text.\n\n" + rt.detokenize(context_tokens(rt, n_tokens)[1:])
        return text, bool(rt.meta("tokenizer.chat_template"))


def _shared(srv: _Server, system: str, n: int, max_tokens: int) -> list[dict]:
    return [_ask(srv, [{"role": "system", "content": system}, {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                 max_tokens) for i in range(n)]


def _chat(srv: _Server, system: str, turns: int, max_tokens: int) -> list[dict]:
    messages = [{"role": "system", "content": system}]
    out = []
    for i in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]})
        r = _ask(srv, messages, max_tokens)
        messages.append({"role": "assistant", "content": r["text"]})
        out.append(r)
    return out


def _concurrent(srv: _Server, system: str, clients: int, per_client: int, max_tokens: int) -> dict[str, Any]:
    ttfts: list[float] = []
    chars: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        for j in range(per_client):
            try:
                r = _ask(srv, [{"role": "system", "content": system},
                               {"role": "user", "content": QUESTIONS[(k * per_client + j) % len(QUESTIONS)]}], max_tokens)
                with lock:
                    ttfts.append(r["ttft_s"])
                    chars.append(len(r["text"]))
            except Exception as exc:  # noqa: BLE001 - a failed request is reported, not fatal
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts.sort()
    pick = (lambda q: ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))]) if ttfts else (lambda q: float("nan"))
    # mean reply length: llama_cpp.server interrupts a streaming reply when the next request
    # arrives (its interrupt_requests default), which raises its request rate by cutting replies
    return {"requests": len(ttfts), "errors": errors[:3], "rps": len(ttfts) / wall, "p50_ttft_s": pick(0.5),
            "p95_ttft_s": pick(0.95), "mean_reply_chars": statistics.mean(chars) if chars else 0.0}


def _peer_case(path: Path, cfg: Config, cache: Path, threads: int, templated: bool, system: str, requests: int,
               max_tokens: int, mbit: float) -> tuple[str, list[dict]]:
    """(d): a node serving ``cache`` (the first server's) and a second server that has only it as
    ``cache.peers``; returns (where the node ran, the shared case on the second server)."""
    with contextlib.ExitStack() as stack:
        node_cfg = cfg.replace(cache_dir=str(cache), cache_chunk_tokens=CHUNK)
        key = {"EDGELINK_P2P_IDENTITY_KEY": str(cache.parent / "node.key")}
        try:
            host = stack.enter_context(remote_host())
        except (OSError, subprocess.SubprocessError, AssertionError):  # not root: no namespaces
            node, where = start_node(str(path), node_cfg, extra_env=key), "a node on loopback"
        else:
            node = start_node(str(path), node_cfg.replace(node_open="on"), listen=f"/ip4/{host.ip}/tcp/0",
                              wrapper=host.wrapper, extra_env=key)
            shape(host, mbit)
            where = f"a node in another network namespace, {mbit:g} Mbit/s"
        stack.callback(stop_receiver, node)
        srv = _Server("edgelink", path, cfg, cache.parent / "second", threads, templated,
                      extra_env={"EDGELINK_CACHE_PEERS": node.ready["addrs"][0],
                                 "EDGELINK_P2P_IDENTITY_KEY": str(cache.parent / "second.key")})
        try:
            return where, _shared(srv, system, requests, max_tokens)
        finally:
            srv.stop()


def run(model: str, cfg: Config, *, prompt_tokens: int = 2000, requests: int = 8, turns: int = 6,
        max_tokens: int = 16, clients: int = 4, per_client: int = 3, threads: int | None = None,
        peer_mbit: float = 100, say=print) -> dict[str, Any]:
    """Every case on both servers; returns the figures (and prints a table)."""
    try:
        import llama_cpp.server  # noqa: F401
        import openai  # noqa: F401
    except ImportError as exc:
        raise EdgelinkError(f"this benchmark needs the openai client and llama_cpp.server ({exc.name}): "
                            "pip install openai 'llama-cpp-python[server]==0.3.36'") from None
    path = resolve_model(model, cfg, pull=True)
    threads = threads or os.cpu_count() or 1
    system, templated = _system(path, cfg, prompt_tokens)
    results: dict[str, Any] = {"model": path.name, "prompt_tokens": prompt_tokens, "threads": threads,
                               "api": "chat" if templated else "completions (no chat template)",
                               "n_ctx": cfg.runtime.n_ctx, "max_tokens": max_tokens, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="edgelink-bench-http-") as tmp:
        cache = Path(tmp) / "kv"
        for kind in ("edgelink", "llama_cpp.server"):
            say(f"{kind}: starting")
            srv = _Server(kind, path, cfg, cache, threads, templated)
            try:
                shared = _shared(srv, system, requests, max_tokens)
                chat = _chat(srv, system, turns, max_tokens)
                conc = _concurrent(srv, system, clients, per_client, max_tokens)
            finally:
                srv.stop()
            srv2 = _Server(kind, path, cfg, cache, threads, templated)
            try:
                restart = _shared(srv2, system, requests, max_tokens)
            finally:
                srv2.stop()
            results["cases"][kind] = {"shared": shared, "chat": chat, "restart": restart, "concurrent": conc,
                                      "peak_rss_mb": max(srv.peak_rss, srv2.peak_rss) / 2**20,
                                      "start_s": srv.start_s}
        say("edgelink, http.reuse = prefix: starting (fresh cache)")
        srv = _Server("edgelink", path, cfg, Path(tmp) / "kv-prefix", threads, templated,
                      extra_env={"EDGELINK_HTTP_REUSE": "prefix"})
        try:
            prefix_shared = _shared(srv, system, requests, max_tokens)
            prefix_chat = _chat(srv, system, turns, max_tokens)
        finally:
            srv.stop()
        say("edgelink: a second server fetching the prefix from a node")
        results["peer_where"], peer = _peer_case(path, cfg, cache, threads, templated, system, requests, max_tokens,
                                                 peer_mbit)
    e, b = results["cases"]["edgelink"], results["cases"]["llama_cpp.server"]
    e["peer"], b["peer"] = peer, b["restart"]  # the baseline: a server that never saw the prompt
    # http.reuse = prefix against llama_cpp.server's same cases; "same" is then against edgelink's
    # exact replies (a cold run's), which is what prefix reuse may change
    e["shared+prefix"], b["shared+prefix"] = prefix_shared, b["shared"]
    e["chat+prefix"], b["chat+prefix"] = prefix_chat, b["chat"]

    def ratio(case: str, i: int) -> float:
        return b[case][i]["ttft_s"] / max(e[case][i]["ttft_s"], 1e-9)

    rows = []
    for case in ("shared", "chat", "restart", "peer", "shared+prefix", "chat+prefix"):
        like = e[case.split("+")[0]] if "+" in case else b[case]
        for i in range(len(e[case])):
            rows.append((case, i, e[case][i]["ttft_s"], b[case][i]["ttft_s"], ratio(case, i),
                         e[case][i]["cached_tokens"], e[case][i]["text"] == like[i]["text"]))
    results["rows"] = [dict(zip(("case", "request", "edgelink_ttft_s", "llama_cpp_server_ttft_s", "ratio",
                                 "edgelink_cached_tokens", "same_text"), r, strict=True)) for r in rows]
    say(f"{path.name}, {prompt_tokens}-token system prompt, {threads} threads, max_tokens {max_tokens}; "
        f"peer: {results['peer_where']} (against llama_cpp.server's restart rows)")
    say("same: the reply equals llama_cpp.server's; in the +prefix rows, edgelink's exact one (a cold run's)")
    say(f"{'case':13} {'#':>2} {'edgelink TTFT':>14} {'llama_cpp.server':>17} {'ratio':>7} {'cached':>7} same")
    for case, i, te, tb, r, cached, same in rows:
        say(f"{case:13} {i:>2} {te * 1000:>11.0f} ms {tb * 1000:>14.0f} ms {r:>6.2f}x {cached!s:>7} {same}")
    for kind, c in results["cases"].items():
        cc = c["concurrent"]
        say(f"{kind}: {clients} clients x {per_client}: {cc['rps']:.2f} req/s, TTFT p50 {cc['p50_ttft_s'] * 1000:.0f} ms, "
            f"p95 {cc['p95_ttft_s'] * 1000:.0f} ms, mean reply {cc['mean_reply_chars']:.0f} chars; "
            f"peak RSS {c['peak_rss_mb']:.0f} MB"
            + (f"; errors {cc['errors']}" if cc["errors"] else ""))
    return results
