"""`edgelink bench handoff`: what a KV handoff saves against what a user would do instead.

Measured in one run, side by side, per context length:
  (a) text relay: the receiver re-prefills the same tokens (time to its first new token's logits);
  (b) KV handoff over shared memory to a real second process: from the sender's export to the
      receiver's ACK, which it sends only after verifying and importing the state (logits included);
  (c) shared-memory throughput for the same byte count against an in-process memcpy.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from edgelink.bench.rss import PeakWatch
from edgelink.bench.shm import measure_shm_throughput
from edgelink.bench.timing import median_seconds
from edgelink.config import Config
from edgelink.models.resolve import resolve_model
from edgelink.net.endpoint import connect
from edgelink.protocol.signature import ModelSignature
from edgelink.roles.launcher import start_node, start_receiver, stop_receiver
from edgelink.roles.sender import Sender
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.signature import model_signature
from edgelink.runtime.sizing import fit_limits

# Public-domain-style filler: varied enough that the tokenizer does not collapse it.
_TEXT = (
    "The river runs past the old mill, where the miller counts sacks of grain each morning. "
    "Children from the village carry bread to the workers, and the dog sleeps by the door. "
    "In winter the wheel freezes and the miller repairs the gears by lamplight, humming songs "
    "his grandmother taught him about ships, storms and distant harbours. "
)


def context_tokens(rt: LlamaRuntime, n: int) -> list[int]:
    """Exactly ``n`` tokens of ordinary prose for a benchmark context."""
    toks = rt.tokenize(_TEXT)
    while len(toks) < n:
        toks += rt.tokenize(_TEXT, add_special=False)
    return toks[:n]


def _session_handoff(endpoint: str, cfg: Config, rt: LlamaRuntime, signature: ModelSignature):
    """What `edgelink handoff` does after its prefill: connect, HELLO, ship the snapshot (export
    to ACK), close. Returns (seconds of the session around the snapshot, the SentMessage)."""
    t0 = time.perf_counter()
    sender = Sender(connect(endpoint, cfg), cfg, signature)
    try:
        sender.handshake()
        sent = sender.send_snapshot(rt)
    finally:
        sender.close()
    return time.perf_counter() - t0 - sent.roundtrip_s, sent


def _timed_handoffs(sender: Sender, rt: LlamaRuntime, repeats: int) -> tuple[float, float, list]:
    """(first, median) seconds of snapshot round trips on one session. Two untimed messages
    warm every buffer the way a live peer's are: the first fills the receiver's context, the
    second is the first that makes it back up a previous sequence (one more buffer to fault)."""
    first = sender.send_snapshot(rt)
    sender.send_snapshot(rt)
    sent: list = []
    med = median_seconds(lambda: sent.append(sender.send_snapshot(rt)), repeats)
    return first.roundtrip_s, med, sent


def _shm_row(n: int, prefill_s: float, shm: str, cfg: Config, rt: LlamaRuntime, signature: ModelSignature,
             receiver, repeats: int) -> dict[str, Any]:
    """The shm columns of one row: a session per handoff (after two untimed warm-ups), then
    overwriting a live sequence, with both sides' peak memory."""
    fitted = fit_limits(cfg, rt)
    sent, around = [], []
    with PeakWatch() as tx, PeakWatch(receiver.pid) as rx:
        for _ in range(repeats + 2):
            dt, s = _session_handoff(f"shm:{shm}", fitted, rt, signature)
            receiver.next_event()
            around.append(dt)
            sent.append(s)
    first_s, sent = sent[0].roundtrip_s, sent[2:]
    handoff_s = statistics.median(s.roundtrip_s for s in sent)
    # Overwriting a live sequence (a second snapshot in one session) keeps the old one until the
    # new one is in: measured apart (after one untimed overwrite, so the backup buffer is warm
    # too), it holds one more copy.
    sender = Sender(connect(f"shm:{shm}", cfg), fitted, signature)
    sender.handshake()
    sender.send_snapshot(rt)
    sender.send_snapshot(rt)
    with PeakWatch(receiver.pid) as rx_over:
        overwrite_s = sender.send_snapshot(rt).roundtrip_s
    sender.close()
    receiver.next_event()
    return {
        "tokens": n,
        "payload_bytes": sent[-1].payload_bytes,
        "wire_bytes": sent[-1].wire_bytes,
        "reprefill_ms": 1e3 * prefill_s,
        "handoff_ms": 1e3 * handoff_s,
        "export_ms": 1e3 * statistics.median(s.export_s for s in sent),
        "first_handoff_ms": 1e3 * first_s,
        "speedup_vs_reprefill": prefill_s / handoff_s,
        "handoff_gbps": sent[-1].payload_bytes / handoff_s / 1e9,
        # peak RSS over each side's RSS before the first handoff of this row (the receiver's
        # includes filling its own KV cache when its context was smaller)
        "sender_peak_over_mb": tx.over_base / 1e6,
        "receiver_peak_over_mb": rx.over_base / 1e6,
        "overwrite_ms": 1e3 * overwrite_s,
        "session_setup_ms": 1e3 * statistics.median(around[2:]),
        # over the same base as the handoffs: the row's RSS before its first one
        "receiver_overwrite_peak_over_mb": max(0, rx_over.peak - rx.base) / 1e6,
    }


def _p2p_columns(node, cfg: Config, rt: LlamaRuntime, signature: ModelSignature, repeats: int,
                 prefill_s: float, wire_bytes: int) -> dict[str, Any]:
    """The p2p columns of one row: snapshots on one warm, encrypted connection to a node."""
    sender = Sender(connect(node.ready["addrs"][0], cfg), fit_limits(cfg, rt), signature)
    sender.handshake()
    _, p2p_s, _ = _timed_handoffs(sender, rt, repeats)
    sender.close()
    node.next_event()
    return {"p2p_handoff_ms": 1e3 * p2p_s, "p2p_speedup_vs_reprefill": prefill_s / p2p_s,
            "p2p_codec": sender.codec or "raw", "p2p_mbps": wire_bytes / p2p_s / 1e6}


def _reprefill_s(rt: LlamaRuntime, toks: list[int], repeats: int) -> float:
    """Median seconds of what a text relay's receiver does: prefill the whole context again."""
    def prefill() -> None:
        rt.clear()
        rt.prefill(toks)
    return median_seconds(prefill, repeats)


def run_handoff_bench(model: str, cfg: Config, log: Callable[[str], None] | None = None,
                      p2p: bool = True) -> dict[str, Any]:
    """Re-prefill vs KV handoff over shared memory (and over the encrypted p2p transport to an
    `edgelink node`, with ``p2p``) vs memcpy, per context length, in one run."""
    say = log or (lambda s: None)
    path = resolve_model(model, cfg, pull=True)
    repeats = cfg.bench.repeats
    rows = []
    shm_name = f"bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    receiver = start_receiver(str(path), cfg, shm_name)
    node = start_node(str(path), cfg) if p2p else None
    try:
        with LlamaRuntime(path, cfg) as rt:
            signature = model_signature(rt, cfg)
            for n in cfg.bench.tokens:
                if n >= rt.n_ctx:
                    say(f"skip {n} tokens: context is {rt.n_ctx}")
                    continue
                toks = context_tokens(rt, n)
                say(f"{n} tokens: re-prefill x{repeats}")
                prefill_s = _reprefill_s(rt, toks, repeats)
                say(f"{n} tokens: shm handoff x{repeats}, a session each (after two untimed warm-ups)")
                row = _shm_row(n, prefill_s, shm_name, cfg, rt, signature, receiver, repeats)
                if node is not None:
                    say(f"{n} tokens: p2p handoff x{repeats} (warm connection)")
                    row.update(_p2p_columns(node, cfg, rt, signature, repeats, prefill_s, row["wire_bytes"]))
                say(f"{n} tokens: shm vs memcpy on {row['wire_bytes']:,} bytes")
                thr = measure_shm_throughput(row["wire_bytes"], cfg, repeats)
                row.update(shm_gbps=thr["shm_gbps"], memcpy_gbps=thr["memcpy_gbps"], shm_vs_memcpy=thr["ratio"])
                rows.append(row)
    finally:
        stop_receiver(receiver)
        if node is not None:
            stop_receiver(node)
    return {
        "model": model,
        "model_path": str(path),
        "repeats": repeats,
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, {platform.system()} {platform.release()}",
        "threads": cfg.runtime.n_threads,
        "rows": rows,
    }


def format_handoff_table(report: dict[str, Any]) -> str:
    head = (f"model {report['model']}  (median of {report['repeats']}; {report['machine']})\n"
            f"{'tokens':>7} {'state MB':>9} {'re-prefill ms':>14} {'handoff ms':>11} {'speedup':>8} "
            f"{'shm GB/s':>9} {'memcpy GB/s':>12} {'shm/memcpy':>11} {'p2p ms':>8} {'p2p speedup':>12}")
    lines = [head]
    for r in report["rows"]:
        lines.append(
            f"{r['tokens']:>7} {r['payload_bytes'] / 1e6:>9.2f} {r['reprefill_ms']:>14.1f} "
            f"{r['handoff_ms']:>11.2f} {r['speedup_vs_reprefill']:>7.0f}x {r['shm_gbps']:>9.2f} "
            f"{r['memcpy_gbps']:>12.2f} {r['shm_vs_memcpy']:>10.0%} "
            f"{r.get('p2p_handoff_ms', float('nan')):>8.1f} {r.get('p2p_speedup_vs_reprefill', float('nan')):>11.0f}x")
        lines.append(
            f"{'':>7} handoff {r['handoff_gbps']:.2f} GB/s (export {r['export_ms']:.1f} ms, first/cold "
            f"{r['first_handoff_ms']:.1f} ms); peak RSS over base: sender "
            f"{r['sender_peak_over_mb']:.0f} MB ({r['sender_peak_over_mb'] / (r['payload_bytes'] / 1e6):.2f}x "
            f"state), receiver {r['receiver_peak_over_mb']:.0f} MB "
            f"({r['receiver_peak_over_mb'] / (r['payload_bytes'] / 1e6):.2f}x state); connect, HELLO and "
            f"close around it {r['session_setup_ms']:.1f} ms; overwriting a live "
            f"sequence {r['overwrite_ms']:.1f} ms, receiver peak "
            f"{r['receiver_overwrite_peak_over_mb'] / (r['payload_bytes'] / 1e6):.2f}x state"
            + (f"; p2p {r['p2p_mbps']:.0f} MB/s of state ({r['p2p_codec']} on the wire)" if "p2p_mbps" in r else ""))
    return "\n".join(lines)
