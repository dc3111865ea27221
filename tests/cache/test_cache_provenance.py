"""Where cached chunks came from, who can address them, and what a session leaves behind
(issue 25, parts 3 and 7), with real receivers over shared memory.

- A chunk fetched from a peer is kept apart from the ones computed here: this machine's
  prefills use it, but a receiver on the same cache serves it on only when cache.reshare
  names its source.
- cache.salt makes a trust domain: a peer with another salt (or none) computes other keys,
  misses every chunk, and its misses take as long as misses of keys that exist nowhere.
- A session's stores (hidden slices, shared-memory rings) are empty once it ends.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid

import numpy as np

import edgelink
from edgelink.bench import context_tokens
from edgelink.cache.prefix import PrefixCache
from edgelink.roles.launcher import start_receiver, stop_receiver

CHUNK = 128


def _name(what: str) -> str:
    return f"{what}-{uuid.uuid4().hex[:8]}"


def _filled(smollm2_path, cfg):
    """A cache at ``cfg`` holding the three whole chunks of a prompt; the prompt's tokens."""
    with edgelink.load(str(smollm2_path), cfg) as m:
        toks = context_tokens(m.runtime, 3 * CHUNK + 20)
        PrefixCache(cfg).prefill(m.runtime, m.signature, toks)
    return toks


def test_fetched_chunks_are_used_here_but_passed_on_only_when_reshared(smollm2_path, cfg, tmp_path):
    origin_cfg = cfg.replace(cache_dir=str(tmp_path / "origin"), cache_chunk_tokens=CHUNK)
    toks = _filled(smollm2_path, origin_cfg)
    origin_name = _name("origin")
    origin = start_receiver(str(smollm2_path), origin_cfg, origin_name)
    mid_cfg = cfg.replace(cache_dir=str(tmp_path / "mid"), cache_chunk_tokens=CHUNK)
    try:
        with edgelink.load(str(smollm2_path), mid_cfg) as m:
            assert m.fetch_cache(toks, f"shm:{origin_name}").chunks == 3
            cache = m.prefix_cache()
            keys = cache.keys(m.signature, toks)
            assert cache.held(keys) == 3 and cache.held(keys, for_peer=True) == 0
            kept = sorted((tmp_path / "mid" / "from" / f"shm-{origin_name}").glob("??/*.elk"))
            assert len(kept) == 3 and all(f"shm:{origin_name}".encode() in p.read_bytes() for p in kept)
            assert m.prefill(toks, cache=True).hit_tokens == 3 * CHUNK  # this machine uses them
    finally:
        assert stop_receiver(origin) in (0, -15), origin.stderr_tail()
    rows = edgelink.api.cache_list(mid_cfg)
    assert {r["from"] for r in rows} == {f"shm-{origin_name}"}
    far_cfg = cfg.replace(cache_dir=str(tmp_path / "far"), cache_chunk_tokens=CHUNK)
    for reshare, served in (("", 0), (f"shm:{origin_name}", 3)):
        name = _name("mid")
        mid = start_receiver(str(smollm2_path), mid_cfg.replace(cache_reshare=reshare), name)
        try:
            with edgelink.load(str(smollm2_path), far_cfg) as m:
                got = m.fetch_cache(toks, f"shm:{name}")
                assert got.chunks == served, (reshare, got)
        finally:
            assert stop_receiver(mid) in (0, -15), mid.stderr_tail()
    assert edgelink.api.cache_clear(mid_cfg) == 3 and edgelink.api.cache_list(mid_cfg) == []


def test_a_salted_domain_is_invisible_to_peers_outside_it(smollm2_path, cfg, tmp_path):
    a_cfg = cfg.replace(cache_dir=str(tmp_path / "a"), cache_chunk_tokens=CHUNK, cache_salt="team-a secret")
    toks = _filled(smollm2_path, a_cfg)
    name = _name("salted")
    proc = start_receiver(str(smollm2_path), a_cfg, name)
    try:
        for outsider in ("", "team-b secret"):
            b_cfg = cfg.replace(cache_dir=str(tmp_path / f"b{len(outsider)}"), cache_chunk_tokens=CHUNK,
                                cache_salt=outsider)
            with edgelink.load(str(smollm2_path), b_cfg) as m:
                got = m.fetch_cache(toks, f"shm:{name}")
                assert got.chunks == 0 and got.lacking == 3 and not got.errors, got
                mine = m.prefix_cache().keys(m.signature, toks)
                assert not set(mine) & set(PrefixCache(a_cfg).keys(m.signature, toks))
                # Timing: asking for the prompt's keys (under the outsider's salt) and for keys
                # that exist nowhere, interleaved, costs the same within noise.
                rnd = [uuid.uuid4().hex * 2 for _ in mine]
                with m.connect(f"shm:{name}") as peer:
                    times: dict[str, list[float]] = {"prompt": [], "random": []}
                    for _ in range(40):
                        for label, keys in (("prompt", mine), ("random", rnd)):
                            t0 = time.perf_counter()
                            assert peer.sender.request("cache_has", keys=keys).held == 0
                            times[label].append(time.perf_counter() - t0)
                ratio = statistics.median(times["prompt"]) / statistics.median(times["random"])
                assert 0.5 < ratio < 2.0, ratio
        # the same domain on another machine finds them, and continues exactly
        a2_cfg = a_cfg.replace(cache_dir=str(tmp_path / "a2"))
        with edgelink.load(str(smollm2_path), a2_cfg) as m:
            assert m.fetch_cache(toks, f"shm:{name}").chunks == 3
            assert m.prefill(toks, cache=True).hit_tokens == 3 * CHUNK
    finally:
        assert stop_receiver(proc) in (0, -15), proc.stderr_tail()


def test_a_session_leaves_no_hidden_slices_and_no_bytes_in_the_rings(smollm2_path, cfg):
    from edgelink.api.latent import LATENT_KINDS
    from edgelink.kinds.hidden import capture_slice
    from edgelink.net.endpoint import connect
    from edgelink.roles.receiver import Receiver
    from edgelink.roles.sender import Sender
    from edgelink.runtime.llama import LlamaRuntime
    from edgelink.runtime.signature import model_signature
    from edgelink.transport.shm import ShmListener

    hooked = cfg.replace(runtime_eval_hook="on")
    with LlamaRuntime(smollm2_path, hooked) as srv_rt, LlamaRuntime(smollm2_path, hooked) as cl_rt:
        recv = Receiver(srv_rt, hooked, model_signature(srv_rt, hooked), calibrate=False)
        name = _name("iso")
        with ShmListener(name, hooked) as lst:
            reports = []

            def serve() -> None:
                ch = lst.accept(timeout=60)
                try:
                    reports.append(recv.serve_channel(ch))
                finally:
                    ch.close()

            t = threading.Thread(target=serve, daemon=True)
            t.start()
            sl = capture_slice(cl_rt, cl_rt.tokenize("Client A's private text, in a hidden slice."), [1, 2], None)
            ls = Sender(connect(f"shm:{name}", hooked), hooked, model_signature(cl_rt, hooked), kinds=LATENT_KINDS)
            ls.handshake()
            try:
                ls.send_hidden(sl)
                # during the session the slice is held, and the rings carry its bytes
                assert len(recv.hidden_slices) == 1
            finally:
                ls.close()
            t.join(60)
            assert reports and reports[0].applied == 1
            assert len(recv.hidden_slices) == 0
            for ring in (lst._c2s, lst._s2c):
                data = np.frombuffer(lst._mm, dtype=np.uint8, count=ring.capacity, offset=ring._data)
                assert not data.any()
