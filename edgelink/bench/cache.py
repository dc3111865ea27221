"""`edgelink bench cache`: the prefix cache against prefilling. A long shared prefix, then a short
question, time to the first new token, side by side in one run.

    edgelink bench cache --models smollm2-135m,gemma3-270m --prefix 2000 --question 50

Rows per model: no cache (a plain prefill, what a user does today); cold through the cache (the
same work plus storing the chunks); the first hit after it (from RAM, paying the page faults of
fresh buffers); a RAM hit and a disk hit in steady state (for the disk hit the RAM tier is
emptied first: the chunks are read, verified and imported from the directory); then, with an empty local cache, fetching
every chunk from an ``edgelink node`` that holds them (on loopback, and behind a tc-shaped link
of ``--peer-rates`` Mbit/s in another network namespace: root; ``dht``: a node found through
the cache DHT, the lookup timed too), then the local hit. Each hit
must continue exactly as the cold run. Medians of ``--repeats``.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import edgelink
from edgelink.bench import context_tokens
from edgelink.bench.netns import remote_host, shape
from edgelink.cache.prefix import PrefixCache
from edgelink.config import Config
from edgelink.roles.launcher import start_node, stop_receiver
from edgelink.transport import p2p

QUESTION = " Question: in one sentence, what happened to the keeper after the storm? Answer:"


def _peer_rows(m, cache, toks: list[int], cfg, node_dir: Path, rates: list[str], repeats: int,
               timed, fetched_bytes: dict[str, int]) -> None:
    """Fetch every chunk from a node (loopback, a tc-shaped link to another namespace, or
    found through the DHT on loopback)."""

    n_chunks = len(cache.keys(m.signature, toks)[:(len(toks) - 1) // cache.chunk])
    for rate in rates:
        dht = rate == "dht"
        label = ("found through the DHT, fetched, loopback" if dht else "fetched from a node, loopback"
                 if float(rate) == 0 else f"fetched from a node, {float(rate):g} Mbit/s")
        with contextlib.ExitStack() as stack:
            node_cfg = cfg.replace(cache_dir=str(node_dir))
            keys = {name: {"EDGELINK_P2P_IDENTITY_KEY": str(node_dir.with_name(f"{name}.key"))}
                    for name in ("entry", "node")}  # each node its own peer id
            if dht:  # a DHT of two nodes: the asker knows only the one that holds nothing
                entry = start_node(m.name, cfg.replace(cache_dir=str(node_dir.with_name("entry"))),
                                   node_args=("--dht",), extra_env=keys["entry"])
                stack.callback(stop_receiver, entry)
                node = start_node(m.name, node_cfg, node_args=("--dht", "--bootstrap", entry.ready["addrs"][0]),
                                  extra_env=keys["node"])
            elif float(rate) == 0:
                node = start_node(m.name, node_cfg, extra_env=keys["node"])
            else:
                host = stack.enter_context(remote_host())
                node = start_node(m.name, node_cfg.replace(node_open="on"), listen=f"/ip4/{host.ip}/tcp/0",
                                  wrapper=host.wrapper,
                                  extra_env=keys["node"])
                shape(host, float(rate))
            try:
                if dht:
                    while not (ev := node.next_event()).get("event") == "cache_announced" or ev["total"] < n_chunks:
                        pass
                    m.cfg = m.cfg.replace(cache_bootstrap=entry.ready["addrs"][0], cache_trust="*")
                for _ in range(repeats):
                    cache.store.clear()

                    def fetch_then_prefill(node=node, dht=dht, label=label):
                        if dht:
                            got = m.fetch_cache(toks, "dht")
                            assert got.chunks == n_chunks, got
                        else:
                            with m.connect(node.ready["addrs"][0]) as peer:
                                peer.fetch_cache(toks)
                        fetched_bytes[label] = cache.store.stats()["disk"].bytes
                        return cache.prefill(m.runtime, m.signature, toks)

                    timed(label, fetch_then_prefill)
                    node.next_event()
            finally:
                p2p.close_client_hosts()
                stop_receiver(node)


def bench_model(model: str, base: Config, prefix: int, question: int, repeats: int, chunk: int,
                peer_rates: list[str]) -> list[dict]:
    """Every case for ``model``, in a cache directory of its own that is removed afterwards."""
    with tempfile.TemporaryDirectory() as d:
        cfg = base.replace(cache_dir=str(Path(d) / "local"), cache_chunk_tokens=chunk)
        with edgelink.load(model, cfg) as m:
            rt = m.runtime
            q = (rt.tokenize(QUESTION, add_special=False) * 8)[:question]
            toks = context_tokens(rt, prefix) + q
            cache = PrefixCache(cfg)
            rows: dict[str, list[float]] = {"no cache": [], "cold, through the cache": [],
                                             "first hit after it": [], "RAM hit": [], "disk hit": []}
            m._cache = cache  # noqa: SLF001 - the model's fetches land in this very cache
            outs: dict[str, list[int]] = {}
            hits: dict[str, int] = {}

            def timed(label: str, fn) -> None:
                rt.clear()
                t0 = time.perf_counter()
                res = fn()
                first = rt.generate(1, stop_at_eog=False)
                rows[label].append(time.perf_counter() - t0)
                outs[label] = first + rt.generate(15, stop_at_eog=False)
                if hasattr(res, "hit_tokens"):
                    hits[label] = res.hit_tokens

            def timed_any(label: str, fn) -> None:
                rows.setdefault(label, [])
                timed(label, fn)

            for _ in range(repeats):
                timed("no cache", lambda: rt.prefill(toks) is None)
                cache.store.clear()
                timed("cold, through the cache", lambda: cache.prefill(rt, m.signature, toks))
                # the first restore after a cold run faults in fresh buffers (tens of MB); the
                # rows after it are the steady state of a process that serves many prompts
                timed("first hit after it", lambda: cache.prefill(rt, m.signature, toks))
                timed("RAM hit", lambda: cache.prefill(rt, m.signature, toks))
                cache.store.clear_ram()
                timed("disk hit", lambda: cache.prefill(rt, m.signature, toks))
            stored = cache.store.stats()["disk"].bytes
            fetched: dict[str, int] = {}
            if peer_rates:
                node_dir = Path(d) / "node"
                shutil.copytree(cache.store.dir, node_dir)  # the node's cache holds this prompt
                _peer_rows(m, cache, toks, cfg, node_dir, peer_rates, repeats, timed_any, fetched)
    cold = statistics.median(rows["no cache"])
    out = []
    for label, times in rows.items():
        t = statistics.median(times)
        out.append({"model": model, "case": label, "tokens": len(toks), "ttft_s": t, "vs_no_cache": cold / t,
                    "hit_tokens": hits.get(label, 0), "disk_bytes": stored, "fetched_bytes": fetched.get(label, 0),
                    "same_as_cold_cache_run": outs[label] == outs["cold, through the cache"]})
    return out


def format_cache_row(row: dict) -> str:
    fetched = f"fetched {row['fetched_bytes'] / 1e6:5.1f} MB  " if row["fetched_bytes"] else ""
    return (f"{row['model']:14s} {row['case']:40s} {row['tokens']} tokens  TTFT {row['ttft_s']:7.3f} s  "
            f"{row['vs_no_cache']:6.1f}x  hit {row['hit_tokens']:5d}  {fetched}"
            f"{'same' if row['same_as_cold_cache_run'] else 'DIFFERS'}")


def run_cache_bench(models: list[str], cfg: Config, prefix: int, question: int, repeats: int, chunk: int,
                    peer_rates: list[str], log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``{"rows": [...]}``: every case of every model, logged per model as it is measured.
    ``peer_rates``: 0 is a node on loopback, a number a tc-shaped link of that many Mbit/s (root),
    ``dht`` a node found through the cache DHT."""
    rows: list[dict] = []
    for model in models:
        got = bench_model(model, cfg, prefix, question, repeats, chunk, peer_rates)
        for row in got:
            if log:
                log(format_cache_row(row))
        rows += got
    return {"rows": rows}
