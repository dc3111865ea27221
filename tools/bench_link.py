"""KV handoff over links laptops really have: a node in its own network namespace behind a veth
pair shaped with tc tbf, each wire codec against re-prefilling the text, in one run.

    python -m tools.bench_link smollm2-135m --tokens 1024 --rates 100,20 [--json out.json]

Needs root (network namespaces, tc). The node allows lossy codecs so every codec is measured;
lossless rows also check that the continuation is exactly the local one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from edgelink.api import connect
from edgelink.bench import context_tokens
from edgelink.config import load_config
from edgelink.launcher import start_node, stop_receiver
from edgelink.registry import resolve_model
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.sizing import fit_limits
from edgelink.sender import Sender
from edgelink.signature import model_signature
from edgelink.wire.codecs import CODECS
from tools.netns import remote_host, shape


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--rates", default="100,20", help="link rates in Mbit/s")
    ap.add_argument("--codecs", default="raw," + ",".join(CODECS))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cfg = load_config()
    path = resolve_model(args.model, cfg, pull=True)
    rows = []
    with remote_host() as host, LlamaRuntime(path, cfg) as rt:
        node = start_node(str(path), cfg.replace(wire_allow_lossy="on"), listen=f"/ip4/{host.ip}/tcp/0",
                          wrapper=host.wrapper)
        try:
            toks = context_tokens(rt, args.tokens)
            times = []
            for _ in range(args.repeats):
                rt.clear()
                t0 = time.perf_counter()
                rt.prefill(toks)
                times.append(time.perf_counter() - t0)
            prefill_s = statistics.median(times)
            local = rt.generate(16)
            sig = model_signature(rt, cfg).to_dict()
            for rate in (float(r) for r in args.rates.split(",")):
                shape(host, rate)
                for codec in args.codecs.split(","):
                    c = fit_limits(cfg.replace(wire_codec=codec), rt)
                    rt.clear()
                    rt.prefill(toks)
                    s = Sender(connect(node.ready["addrs"][0], c), c, sig)
                    s.handshake()
                    took, sent = [], None
                    for _ in range(args.repeats):
                        sent = s.send_snapshot(rt)
                        took.append(sent.roundtrip_s)
                    remote = s.request("generate", n_tokens=16)["tokens"]
                    s.close()
                    node.next_event()
                    handoff_s = statistics.median(took)
                    row = {"mbit": rate, "codec": codec, "tokens": args.tokens, "wire_mb": sent.wire_bytes / 1e6,
                           "handoff_s": handoff_s, "reprefill_s": prefill_s, "vs_reprefill": prefill_s / handoff_s,
                           "same_continuation": remote == local}
                    rows.append(row)
                    print(f"{rate:5.0f} Mbit/s {codec:15s} {row['wire_mb']:7.2f} MB on the wire  "
                          f"handoff {handoff_s:6.2f} s  re-prefill {prefill_s:5.2f} s  "
                          f"{row['vs_reprefill']:5.2f}x  continuation {'same' if row['same_continuation'] else 'differs'}",
                          flush=True)
        finally:
            stop_receiver(node)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
