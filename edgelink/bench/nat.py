"""`edgelink bench nat`: a handoff to a node behind NAT, direct, relayed and hole-punched.

In network namespaces (``edgelink.bench.netns.nat_world``; root): a public segment with a relay,
two home LANs behind masquerading routers, every router's and the relay's public link shaped to
``mbit``. The sender is on the second LAN. Side by side, in one run, each case ``repeats``
times in turn:

* **direct**: a node on the public segment (what a user with a forwarded port has);
* **relayed**: the node behind the first router, reached through the relay (``p2p.hole_punch = off``);
* **hole-punched**: the same node and circuit address, with DCUtR taking the session direct.

Reported per case: the time to the first new token (dial, key exchange, hole punching where it
runs, the probe, the state's trip and one decode step, as the sender measures them), what the
relay carried, and which path the state took; and the time from `edgelink node --via` to a
reserved circuit address.
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
from edgelink.bench.netns import nat_world, shape_iface
from edgelink.config import Config, to_env
from edgelink.errors import EdgelinkError
from edgelink.models.resolve import resolve_model
from edgelink.roles.launcher import start_node, start_relay, stop_receiver
from edgelink.runtime.llama import LlamaRuntime

CASES = ("direct", "relayed", "hole-punched")


def _prompt(path: str, cfg: Config, n: int) -> str:
    """Text of about ``n`` tokens (the handoff reports the exact count)."""

    with LlamaRuntime(path, cfg.replace(runtime_n_ctx=max(512, n + 64))) as rt:
        return rt.detokenize(context_tokens(rt, n)[1:])
TOKEN = "bench-nat"


def _handoff(host, cfg: Config, env: dict[str, str], model: str, to: str, prompt: str) -> dict[str, Any]:
    cmd = [*host.wrapper, sys.executable, "-m", "edgelink", "handoff", model, "--to", to, "-p", prompt, "-n", "1",
           "--verify", "--json", "--token", TOKEN]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **to_env(cfg), **env})
    if out.returncode != 0:
        raise EdgelinkError(f"the bench's handoff to {to} failed: {out.stderr.strip()[-600:]}")
    return json.loads(out.stdout)


def run_nat_bench(model: str, cfg: Config, prompt_tokens: int = 1024, mbit: float = 100, repeats: int | None = None,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    say = log or (lambda s: None)
    repeats = cfg.bench.repeats if repeats is None else repeats
    path = str(resolve_model(model, cfg, pull=True))
    prompt = _prompt(path, cfg, prompt_tokens)
    rows: dict[str, list[dict[str, Any]]] = {c: [] for c in CASES}
    with tempfile.TemporaryDirectory(prefix="edgelink-bench-nat-") as tmp, nat_world() as w:
        t = Path(tmp)
        (t / "tokens").write_text(TOKEN + "\n")
        for host in (w.public, *w.routers):
            shape_iface(host, "wan", mbit)
        relay = start_relay(cfg, f"/ip4/{w.public.ip}/tcp/0", wrapper=w.public.wrapper,
                            extra_env={"EDGELINK_P2P_IDENTITY_KEY": str(t / "relay.key")})
        nodes = []
        try:
            (relay_addr,) = relay.ready["addrs"]
            node_env = {"EDGELINK_RUNTIME_N_THREADS": "1"}
            behind = start_node(path, cfg, listen=f"/ip4/{w.home[0].ip}/tcp/0",
                                extra_env={**node_env, "EDGELINK_P2P_IDENTITY_KEY": str(t / "node.key")},
                                node_args=("--token-file", str(t / "tokens"), "--via", relay_addr),
                                wrapper=w.home[0].wrapper)
            nodes.append(behind)
            relay.next_event()  # its reservation
            public = start_node(path, cfg, listen=f"/ip4/{w.public.ip}/tcp/0",
                                extra_env={**node_env, "EDGELINK_P2P_IDENTITY_KEY": str(t / "public.key")},
                                node_args=("--token-file", str(t / "tokens")), wrapper=w.public.wrapper)
            nodes.append(public)
            reserve_s = behind.ready["reserve_s"]
            say(f"node behind NAT: a circuit address {reserve_s * 1e3:.0f} ms after it dialled the relay")
            targets = {"direct": public.ready["addrs"][0], "relayed": behind.ready["circuit_addrs"][0],
                       "hole-punched": behind.ready["circuit_addrs"][0]}
            for r in range(repeats):
                for case in CASES:
                    # a new client identity each time: nothing of an earlier connection is reused
                    env = {"EDGELINK_P2P_IDENTITY_KEY": str(t / f"client-{case}-{r}.key"),
                           "EDGELINK_P2P_HOLE_PUNCH": "on" if case == "hole-punched" else "off"}
                    g = _handoff(w.home[1], cfg, env, path, targets[case], prompt)
                    if not (g.get("verified") or {}).get("matches"):
                        raise EdgelinkError(f"{case}: the receiver's token differs from the sender's")
                    (public if case == "direct" else behind).next_event()  # its session
                    relayed = relay.next_event()["bytes"] if case != "direct" else 0
                    tm = g["timings"]
                    ttft = tm["connect_s"] + tm["handshake_s"] + tm["export_s"] + tm["snapshot_roundtrip_s"] \
                        + tm["remote_generate_s"]
                    sent_tokens = g["prompt_tokens"]
                    rows[case].append({"ttft_s": ttft, "connect_s": tm["connect_s"], "wire_bytes": g["bytes"]["wire"],
                                       "relay_bytes": relayed, "path": (g.get("wire") or {}).get("path") or "?"})
                    say(f"round {r + 1}/{repeats} {case}: {ttft:.2f} s to the first token "
                        f"({rows[case][-1]['path']}), relay carried {relayed / 1e6:.2f} MB")
        finally:
            for n in nodes:
                stop_receiver(n)
            stop_receiver(relay)
    summary = []
    base = statistics.median(x["ttft_s"] for x in rows["direct"])
    for case in CASES:
        xs = rows[case]
        med = statistics.median(x["ttft_s"] for x in xs)
        summary.append({"case": case, "ttft_s": round(med, 3), "vs_direct": round(med / base, 2),
                        "connect_s": round(statistics.median(x["connect_s"] for x in xs), 3),
                        "wire_mb": round(statistics.median(x["wire_bytes"] for x in xs) / 1e6, 2),
                        "relay_mb": round(statistics.median(x["relay_bytes"] for x in xs) / 1e6, 3),
                        "paths": sorted({x["path"] for x in xs})})
    return {"model": model, "prompt_tokens": prompt_tokens, "mbit": mbit, "repeats": repeats,
            "sent_tokens": sent_tokens, "reserve_s": round(reserve_s, 3), "cpu": platform.processor() or platform.machine(),
            "summary": summary, "rows": rows}


def format_nat_table(rep: dict[str, Any]) -> str:
    lines = [f"{rep['model']}, {rep['sent_tokens']} tokens, every public link {rep['mbit']:g} Mbit/s, "
             f"{rep['repeats']} round(s); median of each",
             f"{'case':14} {'first token':>12} {'vs direct':>10} {'dial':>8} {'state':>9} {'via relay':>10}  path"]
    for s in rep["summary"]:
        lines.append(f"{s['case']:14} {s['ttft_s']:>10.2f} s {s['vs_direct']:>9.2f}x {s['connect_s']:>6.2f} s "
                     f"{s['wire_mb']:>6.2f} MB {s['relay_mb']:>7.3f} MB  {','.join(s['paths'])}")
    lines.append(f"a node behind NAT had a circuit address {rep['reserve_s'] * 1e3:.0f} ms after it dialled the relay")
    return "\n".join(lines)
