"""`edgelink bench link`: handoffs over links laptops really have. A node in its own network
namespace behind a veth pair shaped with tc tbf, every way of moving a context side by side in
one run.

    edgelink bench link --models smollm2-135m,gemma3-270m --tokens 1024 --rates 1000,100,20
    edgelink bench link --models twin:llama-3-8b --tokens 256 --rates 1000,100,20 --twin

For each model and link rate: the time from the sender's first byte to the receiver's first new
token (TTFT), for re-prefilling the text on the receiver (the token ids travel, it prefills),
the whole KV state raw and with each codec, a split (the receiver prefills the first tokens
while the KV of the rest travels) with the lossless and the 4-bit codec, and ``auto`` (the
sender measures the link, reads the receiver's prefill speed from its HELLO and plans), once
with a lossless sender and once with one that allows lossy codecs. Each handoff is a fresh
session, as `edgelink handoff` makes (connect and HELLO are reported apart; the link probe of
the planning rows is inside their time). Lossless rows must continue exactly as the sender.

For a shape twin (``--twin``: tiny weights, real KV geometry) the prefill speed means nothing,
so it reports bytes, handoff time and the receiver prefill speed at which KV and text break even.

Needs root (network namespaces, tc). Sender and node share this machine's cores: a split's
sender encodes while the node prefills, which two real machines would not contend for.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from edgelink.api import connect
from edgelink.bench import context_tokens
from edgelink.bench.netns import remote_host, shape
from edgelink.config import Config
from edgelink.models.resolve import resolve_model
from edgelink.protocol.signature import ModelSignature
from edgelink.roles.launcher import start_node, stop_receiver
from edgelink.roles.sender import Sender
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.signature import model_signature
from edgelink.runtime.sizing import fit_limits

# label -> config overrides for the sender ("text" is re-prefilling on the receiver)
OPTIONS: dict[str, dict] = {
    "text (re-prefill)": {},
    "raw": {"wire_codec": "raw", "wire_split": "off"},
    "zstd-shuffle/1": {"wire_codec": "zstd-shuffle/1", "wire_split": "off"},
    "q8/1": {"wire_codec": "q8/1", "wire_split": "off"},
    "kivi4/1": {"wire_codec": "kivi4/1", "wire_split": "off"},
    "split + zstd-shuffle/1": {"wire_codec": "zstd-shuffle/1", "wire_split": "auto"},
    "split + kivi4/1": {"wire_codec": "kivi4/1", "wire_split": "auto"},
    "auto": {"wire_codec": "auto", "wire_split": "auto"},
    "auto, lossy allowed": {"wire_codec": "auto", "wire_split": "auto", "wire_allow_lossy": "on"},
}
LOSSLESS = ("text (re-prefill)", "raw", "zstd-shuffle/1", "split + zstd-shuffle/1", "auto")
TWIN_OPTIONS = ("raw", "zstd-shuffle/1", "kivi4/1")


def _one(addr: str, cfg, rt: LlamaRuntime, sig: ModelSignature, toks: list[int], label: str, check: int) -> dict:
    """One fresh session: setup, then first byte to first new token (and ``check`` more)."""
    t = time.perf_counter()
    s = Sender(connect(addr, cfg), cfg, sig)
    s.handshake()
    setup = time.perf_counter() - t
    out: dict = {"setup_s": setup}
    t0 = time.perf_counter()
    if label.startswith("text"):
        s.request("prefill", tokens=toks, replace=True)
        out.update(wire_mb=4 * len(toks) / 1e6, split=len(toks), codec="tokens")
    else:
        sent = s.send_snapshot(rt)
        out.update(wire_mb=sent.wire_bytes / 1e6, split=sent.split, codec=sent.codec, fallback=sent.fallback,
                   predicted_s=sent.predicted_s, link_mbit=8e-6 * sent.link.bytes_per_s if sent.link else None)
    first = s.request("generate", n_tokens=1, stop_at_eog=False).tokens
    out["ttft_s"] = time.perf_counter() - t0
    out["continuation"] = first + (s.request("generate", n_tokens=check, stop_at_eog=False).tokens if check else [])
    s.close()
    return out


def bench_model(model: str, cfg: Config, tokens: int, rates: list[float], repeats: int, twin: bool,
                say: Callable[[dict], None]) -> list[dict]:
    """Every option of ``model`` at every link rate; each row is passed to ``say`` as it lands."""
    path = resolve_model(model, cfg, pull=True)
    rows: list[dict] = []
    labels = list(TWIN_OPTIONS) if twin else list(OPTIONS)
    with remote_host() as host, LlamaRuntime(path, cfg) as rt:
        node = start_node(str(path), cfg.replace(wire_allow_lossy="on", node_open="on"), listen=f"/ip4/{host.ip}/tcp/0",
                          wrapper=host.wrapper)
        try:
            addr = node.ready["addrs"][0]
            toks = context_tokens(rt, tokens)
            rt.prefill(toks)
            local = rt.generate(16, stop_at_eog=False)
            rt.clear()
            t = time.perf_counter()
            rt.prefill(toks)
            local_prefill_s = time.perf_counter() - t
            sig = model_signature(rt, cfg)
            state_mb = len(rt.export_state()) / 1e6
            for rate in rates:
                shape(host, rate)
                for label in labels:
                    c = fit_limits(cfg.replace(**OPTIONS[label]), rt)
                    runs = [_one(addr, c, rt, sig, toks, label, 15 if i == repeats - 1 else 0)
                            for i in range(repeats)]
                    for _ in runs:
                        node.next_event()
                    last = runs[-1]
                    row = {"model": model, "mbit": rate, "option": label, "tokens": tokens, "state_mb": state_mb,
                           "ttft_s": statistics.median(r["ttft_s"] for r in runs),
                           "setup_s": statistics.median(r["setup_s"] for r in runs),
                           **{k: last.get(k) for k in ("wire_mb", "split", "codec", "fallback", "predicted_s",
                                                       "link_mbit")},
                           "same_continuation": last["continuation"] == local,
                           "local_prefill_s": local_prefill_s}
                    if twin:
                        row["break_even_tps"] = tokens / row["ttft_s"]
                    rows.append(row)
                    say(row)
        finally:
            stop_receiver(node)
    return rows


def summarize(rows: list[dict]) -> list[str]:
    """Per model and rate: each row against text, and auto against the best fixed choice."""
    lines = []
    for key in sorted({(r["model"], r["mbit"]) for r in rows}, key=lambda k: (k[0], -k[1])):
        group = {r["option"]: r for r in rows if (r["model"], r["mbit"]) == key}
        text = group.get("text (re-prefill)")
        for auto, pool in (("auto", LOSSLESS), ("auto, lossy allowed", tuple(OPTIONS))):
            if auto not in group:
                continue
            fixed = [group[o] for o in pool if o in group and not o.startswith("auto")]
            best = min(fixed, key=lambda r: r["ttft_s"])
            lines.append(f"{key[0]} {key[1]:g} Mbit/s: {auto} {group[auto]['ttft_s']:.2f} s, best fixed "
                         f"{best['option']} {best['ttft_s']:.2f} s ({group[auto]['ttft_s'] / best['ttft_s']:.2f}x)"
                         + (f", text {text['ttft_s']:.2f} s" if text else ""))
    return lines


def format_link_row(row: dict, rows: list[dict]) -> str:
    """One measured row, against the text row of its model and rate among ``rows``."""
    text = next((r for r in rows if (r["model"], r["mbit"], r["option"]) ==
                 (row["model"], row["mbit"], "text (re-prefill)")), None)
    vs = f"{text['ttft_s'] / row['ttft_s']:5.2f}x text" if text else ""
    split = f"split {row['split']}" if row.get("split") and row["codec"] != "tokens" else ""
    extra = f"break-even {row['break_even_tps']:.0f} tok/s" if "break_even_tps" in row else ""
    return (f"{row['model']:16s} {row['mbit']:5g} Mbit/s {row['option']:24s} {row['wire_mb']:7.2f} MB  "
            f"TTFT {row['ttft_s']:6.2f} s  {vs}  {split} {extra} "
            f"{'same' if row['same_continuation'] else 'DIFFERS'}" + (" (fallback)" if row.get("fallback") else ""))


def run_link_bench(models: list[str], cfg: Config, tokens: int, rates: list[float], repeats: int,
                   twin: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every model at every rate; ``{"rows": [...], "summary": [...]}`` (auto against the best fixed
    option per model and rate). Rows are logged as they are measured."""
    rows: list[dict] = []

    def say(row: dict) -> None:
        if log:
            log(format_link_row(row, rows))
        rows.append(row)

    for model in models:
        bench_model(model, cfg, tokens, rates, repeats, twin, say)
    return {"rows": rows, "summary": summarize(rows)}
