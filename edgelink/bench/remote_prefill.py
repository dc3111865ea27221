"""`edgelink bench remote-prefill`: a slow laptop that leaves long prompts to a faster desktop.

The laptop is the HTTP server's engine in a child process held to ``laptop_cores`` of CPU by a
cgroup; the desktop is an `edgelink node` in a network namespace behind a veth link shaped to
``mbit`` (edgelink.bench.netns), with the rest of the machine. Side by side, in one run, each
round a new prompt of ``prompt_tokens`` (nothing cached anywhere): time to the first token with
``http.prefill_peer`` unset (prefill here), and set (the plan chooses; the report says what it
chose), and whether both replies are the same.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgelink.bench import context_tokens
from edgelink.bench.cgroup import cpu_limited, joiner
from edgelink.bench.netns import remote_host, shape
from edgelink.config import Config, to_env
from edgelink.errors import EdgelinkError
from edgelink.models.resolve import resolve_model
from edgelink.roles.launcher import start_node, stop_receiver
from edgelink.runtime.llama import BATCHED_MIN, LlamaRuntime
from edgelink.runtime.threads import cpu_count

TOKEN = "bench-remote-prefill"

# The laptop: an Engine (one context) answering each prompt on stdin, one JSON line each.
_LAPTOP = r"""
import dataclasses, json, sys, time
from edgelink.config import load_config
from edgelink.server.engine import Engine, Params
cfg = load_config()
eng = Engine(sys.argv[1], cfg)
print(json.dumps({"ready": True, "local_tps": eng._models[0].runtime.prefill_tps}), flush=True)
for line in sys.stdin:
    tokens = json.loads(line)
    t0 = time.perf_counter()
    first, text, out = None, "", None
    for item in eng.run(tokens, Params(max_tokens=8)):
        if isinstance(item, str):
            first = first or time.perf_counter() - t0
            text += item
        else:
            out = item
    steps = dataclasses.asdict(out.remote_prefill) if out.remote_prefill else None
    print(json.dumps({"ttft_s": first or time.perf_counter() - t0, "text": text, "prefilled_by": out.prefilled_by,
                      "prefill_s": out.prefill_s, "steps": steps}), flush=True)
eng.close()
"""


class _Laptop:
    def __init__(self, path: str, cfg: Config, join: Path, env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, "-c", _LAPTOP, path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **to_env(cfg), **env}, preexec_fn=joiner(join))
        self.ready = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise EdgelinkError(f"the laptop process failed: {self.proc.stderr.read()[-1500:]}")
        return json.loads(line)

    def ask(self, tokens: list[int]) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(tokens) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


def run_remote_prefill_bench(model: str, cfg: Config, prompt_tokens: int = 2000, mbit: float = 100,
                             laptop_cores: float = 0.25, repeats: int | None = None,
                             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    say = log or (lambda s: None)
    repeats = cfg.bench.repeats if repeats is None else repeats
    path = str(resolve_model(model, cfg, pull=True))

    n_ctx = max(cfg.runtime.n_ctx, prompt_tokens + 64)
    with LlamaRuntime(path, cfg.replace(runtime_n_ctx=n_ctx)) as rt:
        base = context_tokens(rt, prompt_tokens + 8)
        # a different prompt each round (its first token differs): nothing is reused anywhere
        prompts = [[base[0], *rt.tokenize(f" Round {r}.", add_special=False), *base[1:]][:prompt_tokens]
                   for r in range(repeats)]
    rows: dict[str, list[dict[str, Any]]] = {"here": [], "peer": []}
    with tempfile.TemporaryDirectory(prefix="edgelink-bench-rp-") as tmp, remote_host() as desk:
        t = Path(tmp)
        (t / "tokens").write_text(TOKEN + "\n")
        shape(desk, mbit)
        common = cfg.replace(runtime_n_ctx=n_ctx, cache_ram_bytes=0, cache_disk_bytes=0, cache_dir=str(t / "kv"),
                             http_parallel=1)
        # The desktop's threads are fixed: on one box its adaptive plan (runtime/threads.py) would
        # count the laptop's threads, busy with its 64-token head, as load and prefill the whole
        # prompt on one thread (measured: 13 s became 23 s); a real desktop never sees them.
        cores = cpu_count()
        desk_cfg = common.replace(runtime_n_threads=cores, runtime_n_threads_batch=cores)
        node = start_node(path, desk_cfg, listen=f"/ip4/{desk.ip}/tcp/0", wrapper=desk.wrapper,
                          extra_env={"EDGELINK_P2P_IDENTITY_KEY": str(t / "desk.key")},
                          node_args=("--token-file", str(t / "tokens")))
        try:
            addr = node.ready["addrs"][0]
            with cpu_limited(laptop_cores) as join:
                env = {"EDGELINK_P2P_IDENTITY_KEY": str(t / "laptop.key")}
                here = _Laptop(path, common, join, env)
                peer = _Laptop(path, common.replace(http_prefill_peer=addr, http_prefill_token=TOKEN), join, env)
                say(f"laptop ({laptop_cores:g} core): prefill {peer.ready['local_tps']:.0f} tokens/s; "
                    f"desktop behind a {mbit:g} Mbit/s link")
                try:
                    for r, toks in enumerate(prompts):
                        a, b = here.ask(toks), peer.ask(toks)
                        if a["text"] != b["text"]:
                            raise EdgelinkError(f"round {r}: remote prefill changed the reply: {a['text']!r} "
                                                f"vs {b['text']!r}")
                        rows["here"].append(a)
                        rows["peer"].append(b)
                        say(f"round {r + 1}/{repeats}: here {a['ttft_s']:.2f} s, with the desktop "
                            f"{b['ttft_s']:.2f} s (prefilled {'there' if b['prefilled_by'] != 'here' else 'here'})")
                finally:
                    here.close()
                    peer.close()
        finally:
            stop_receiver(node)
    med = {k: statistics.median(x["ttft_s"] for x in v) for k, v in rows.items()}
    chosen = [x for x in rows["peer"] if x.get("steps")]
    steps = ({k: round(statistics.median(x["steps"][k] for x in chosen), 3) for k in chosen[0]["steps"]}
             if chosen else None)
    return {"model": model, "prompt_tokens": prompt_tokens, "mbit": mbit, "laptop_cores": laptop_cores,
            "repeats": repeats, "cpu": platform.processor() or platform.machine(),
            "local_prefill_tps": round(peer.ready["local_tps"], 1),  # the engine with a peer measures it
            "ttft_here_s": round(med["here"], 3), "ttft_peer_s": round(med["peer"], 3),
            "speedup": round(med["here"] / med["peer"], 2),
            "chose_peer": sum(x["prefilled_by"] != "here" for x in rows["peer"]), "same_replies": True,
            "steps_median": steps, "rows": rows}


def format_remote_prefill_table(rep: dict[str, Any]) -> str:
    return "\n".join([
        f"{rep['model']}, {rep['prompt_tokens']}-token prompts nothing had cached; the laptop at "
        f"{rep['laptop_cores']:g} core ({rep['local_prefill_tps']:.0f} tokens/s prefill), the desktop behind "
        f"{rep['mbit']:g} Mbit/s; median of {rep['repeats']}",
        f"first token, prefilled here:          {rep['ttft_here_s']:.2f} s",
        f"first token, with http.prefill_peer:  {rep['ttft_peer_s']:.2f} s  ({rep['speedup']:.2f}x; the plan "
        f"chose the desktop {rep['chose_peer']} of {rep['repeats']} times; replies identical)",
        *([_steps_line(rep["steps_median"], rep["ttft_peer_s"])] if rep.get("steps_median") else []),
    ])


def _steps_line(st: dict[str, float], ttft: float) -> str:
    """Where the remote prefill's first token went (medians of the rounds that used the desktop)."""
    rest = ttft - st["link_s"] - st["head_s"] - st["peer_wait_s"] - st["pull_s"]
    return (f"  of which: link probe {st['link_s']:.2f} s, the laptop's {BATCHED_MIN}-token head while the desktop "
            f"prefills {st['head_s']:.2f} s, then the rest of the desktop's prefill {st['peer_wait_s']:.2f} s, the "
            f"delta ({st['delta_bytes'] / 1e6:.1f} MB: transfer, verify, import) {st['pull_s']:.2f} s, the rest "
            f"(cache keys, plan, first decode) {rest:.2f} s")
