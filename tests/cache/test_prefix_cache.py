"""The prefix cache on real models: a hit continues exactly as a cold run, also past Gemma-3's
512-token window; chunks on disk are shared by processes, verified on every read, and a
damaged one is dropped and recomputed, never applied; both tiers stay within their bounds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import edgelink
from edgelink.bench import context_tokens
from edgelink.cache.prefix import PrefixCache
from edgelink.cache.store import ChunkStore
from edgelink.errors import ConfigError, StateError


@pytest.fixture()
def cache_cfg(cfg, tmp_path):
    return cfg.replace(cache_dir=str(tmp_path / "kv"), cache_chunk_tokens=128)


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_a_hit_continues_exactly_as_a_cold_run(model_paths, cache_cfg, name):
    with edgelink.load(str(model_paths[name]), cache_cfg) as m:
        toks = context_tokens(m.runtime, 700)  # past Gemma's 512-token window
        cache = PrefixCache(cache_cfg)
        cold = cache.prefill(m.runtime, m.signature, toks)
        assert cold.hit_tokens == 0 and cold.stored_chunks == 700 // 128
        cold_digest = m.runtime.state_digest()
        cold_out = m.generate(16, stop_at_eog=False).tokens
        m.reset()
        cache.store.clear_ram()
        warm = cache.prefill(m.runtime, m.signature, toks)
        assert warm.hit_tokens == 640 and warm.hit_tiers == {"disk": 5} and warm.stored_chunks == 0
        assert m.runtime.state_digest() == cold_digest
        assert m.generate(16, stop_at_eog=False).tokens == cold_out
        m.reset()
        again = cache.prefill(m.runtime, m.signature, toks)
        assert again.hit_tiers == {"ram": 5}
        # a longer prompt sharing the prefix reuses it and stores only its new chunks
        m.reset()
        longer = cache.prefill(m.runtime, m.signature, toks + context_tokens(m.runtime, 300)[1:])
        assert longer.hit_tokens == 640 and longer.stored_chunks == 2


def test_a_cold_prefill_in_large_batches_has_the_cells_of_one_chunk_at_a_time(smollm2_path, cfg, tmp_path):
    """The cache prefills the whole chunks before a prompt's last piece in large batches and
    stores them from one export (PrefixCache._bulk); its cells, logits and stored chunks must be
    those of the chunk-by-chunk prefill they replace, bit for bit, from a cold start and from a
    hit. Threads fixed: llama.cpp's bits depend on the thread count."""
    ccfg = cfg.replace(cache_dir=str(tmp_path / "kv"), cache_chunk_tokens=64, runtime_n_threads=2)
    with edgelink.load(str(smollm2_path), ccfg) as m:
        rt = m.runtime
        toks = context_tokens(rt, 700)
        cache = PrefixCache(ccfg)
        for start, n in ((0, 640), (128, 700)):
            m.reset()
            cache.store.clear()
            if start:  # a hit on the first chunks, then the bulk from there
                cache.prefill(rt, m.signature, toks[:start + 1])
                m.reset()
            got = cache.prefill(rt, m.signature, toks[:n])
            assert got.hit_tokens == start and got.stored_chunks == n // 64 - start // 64
            digest, logits = rt.state_digest(), rt.logits.copy()
            m.reset()
            for i in range(0, n, 64):
                rt.prefill(toks[i:min(i + 64, n)])
            assert rt.state_digest() == digest and (rt.logits == logits).all(), (start, n)
            # and the stored chunks restore those cells
            m.reset()
            warm = cache.prefill(rt, m.signature, toks[:n])
            assert warm.hit_tokens == (n - 1) // 64 * 64 and rt.state_digest() == digest


def test_a_damaged_chunk_is_dropped_and_recomputed_never_applied(model_paths, cache_cfg):
    with edgelink.load(str(model_paths["smollm2-135m"]), cache_cfg) as m:
        toks = context_tokens(m.runtime, 400)
        cache = PrefixCache(cache_cfg)
        cache.prefill(m.runtime, m.signature, toks)
        want = m.runtime.state_digest()
        files = sorted(cache.store.dir.glob("??/*.elk"))
        assert len(files) == 3
        key1 = cache.keys(m.signature, toks)[1]
        damaged = cache.store.dir / key1[:2] / f"{key1}.elk"
        data = bytearray(damaged.read_bytes())
        data[len(data) // 2] ^= 0x40
        damaged.write_bytes(bytes(data))
        cache.store.clear_ram()
        m.reset()
        out = cache.prefill(m.runtime, m.signature, toks)
        assert out.dropped_chunks == 1 and out.hit_tokens == 128  # chunk 0 only; 1 and 2 recomputed
        assert m.runtime.state_digest() == want
        assert damaged.exists() and damaged.read_bytes() != bytes(data)  # stored again, whole


def test_a_chunk_of_another_model_or_prompt_is_never_a_hit(model_paths, cache_cfg):
    cache = PrefixCache(cache_cfg)
    with edgelink.load(str(model_paths["smollm2-135m"]), cache_cfg) as m:
        toks = context_tokens(m.runtime, 300)
        cache.prefill(m.runtime, m.signature, toks)
        m.reset()
        other = cache.prefill(m.runtime, m.signature, [toks[0] + 1, *toks[1:]])
        assert other.hit_tokens == 0  # the first token differs: every key differs
        sig = m.signature
    with edgelink.load(str(model_paths["smollm2-135m"]), cache_cfg.replace(runtime_type_k="q8_0")) as q:
        assert q.signature != sig
        assert cache.prefill(q.runtime, q.signature, toks).hit_tokens == 0
    # a file planted under a real key, holding another chunk, is refused by its contents
    keys = cache.keys(sig, toks)
    src = cache.store.dir / keys[1][:2] / f"{keys[1]}.elk"
    dst = cache.store.dir / keys[0][:2] / f"{keys[0]}.elk"
    dst.write_bytes(src.read_bytes())
    cache.store.clear_ram()
    with edgelink.load(str(model_paths["smollm2-135m"]), cache_cfg) as m:
        out = cache.prefill(m.runtime, m.signature, toks)
        assert out.dropped_chunks == 1 and out.hit_tokens == 0


def test_tiers_stay_within_their_bounds_least_recently_used_first(tmp_path):
    store = ChunkStore(tmp_path / "kv", ram_bytes=2500, disk_bytes=3500)
    keys = [f"{i:064x}" for i in range(5)]
    for k in keys:
        store.put(k, os.urandom(1000))
    stats = store.stats()
    assert stats["ram"].bytes <= 2500 and stats["disk"].bytes <= 3500
    assert store.get(keys[0]) is None and store.get(keys[4])[1] == "ram"
    assert store.get(keys[2])[1] == "disk"
    with pytest.raises(ConfigError):
        ChunkStore(tmp_path / "x", ram_bytes=-1, disk_bytes=0)


def test_processes_share_the_disk_tier_and_the_cli_reports_it(smollm2_path, cache_cfg, tmp_path):
    env = {**os.environ, "EDGELINK_CACHE_DIR": str(tmp_path / "shared"), "EDGELINK_CACHE_CHUNK_TOKENS": "128"}
    prompt = " ".join(["The old lighthouse keeper climbed the stairs every evening."] * 40)

    def run(*args):
        out = subprocess.run([sys.executable, "-m", "edgelink", *args], capture_output=True, text=True, env=env,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout

    first = json.loads(run("generate", str(smollm2_path), "-p", prompt, "-n", "8", "--cache", "--json"))
    second = json.loads(run("generate", str(smollm2_path), "-p", prompt, "-n", "8", "--cache", "--json"))
    assert first["cache"]["hit_tokens"] == 0 and second["cache"]["hit_tokens"] > 0
    assert second["tokens"] == first["tokens"]
    stats = json.loads(run("cache", "stats", "--json"))
    assert stats["tiers"]["disk"]["entries"] == first["cache"]["stored_chunks"] > 0
    listing = run("cache", "ls")
    assert "chunk" in listing or "entries" in listing
    run("cache", "clear")
    assert json.loads(run("cache", "stats", "--json"))["tiers"]["disk"]["entries"] == 0


def test_the_cache_refuses_what_it_cannot_do_exactly(model_paths, cache_cfg):
    with pytest.raises(ConfigError, match="chunk_tokens"):
        PrefixCache(cache_cfg.replace(cache_chunk_tokens=100))
    with edgelink.load(str(model_paths["gemma3-270m"]), cache_cfg.replace(cache_chunk_tokens=1024)) as g:
        with pytest.raises(ConfigError, match="window"):
            PrefixCache(g.cfg).prefill(g.runtime, g.signature, context_tokens(g.runtime, 100))
    with edgelink.load(str(model_paths["smollm2-135m"]), cache_cfg) as m:
        m.prefill("Already something here")
        with pytest.raises(StateError, match="reset"):
            PrefixCache(cache_cfg).prefill(m.runtime, m.signature, context_tokens(m.runtime, 100))


def test_a_node_shares_its_cache_with_the_peers_it_accepts(smollm2_path, cfg, tmp_path):
    """A node whose cache holds a prompt's chunks serves them to an authorized client over the
    encrypted channel; the client verifies and stores them, and its prefill then hits its own
    cache and continues exactly as a cold run. A damaged chunk on the node is not sent; a node
    with cache.share = off refuses."""
    from edgelink.roles.launcher import start_node, stop_receiver
    from edgelink.transport import p2p

    node_dir, client_dir = tmp_path / "node-kv", tmp_path / "client-kv"
    node_cfg = cfg.replace(cache_dir=str(node_dir), cache_chunk_tokens=128)
    with edgelink.load(str(smollm2_path), node_cfg) as m:
        toks = context_tokens(m.runtime, 600)
        warm = PrefixCache(node_cfg)
        warm.prefill(m.runtime, m.signature, toks)  # the node's cache, filled before it starts
        want = m.runtime.state_digest()
        cold_out = m.generate(8, stop_at_eog=False).tokens
        keys = warm.keys(m.signature, toks)
    # the node's second chunk is damaged on disk: it must not be sent, the first must; the two
    # after it were asked for ahead (cache.fetch_window) and are refused as they arrive, so the
    # session stays usable
    damaged = node_dir / keys[1][:2] / f"{keys[1]}.elk"
    data = bytearray(damaged.read_bytes())
    data[-50] ^= 1
    damaged.write_bytes(bytes(data))
    env = {"EDGELINK_P2P_IDENTITY_KEY": str(tmp_path / "node.key"), "EDGELINK_NODE_TOKENS": "kv-token"}
    proc = start_node(str(smollm2_path), node_cfg, extra_env=env)
    client_cfg = cfg.replace(cache_dir=str(client_dir), cache_chunk_tokens=128, p2p_identity_key=tmp_path / "client.key")
    try:
        addr = proc.ready["addrs"][0]
        with edgelink.load(str(smollm2_path), client_cfg) as m:
            with m.connect(addr, token="kv-token") as peer:
                with pytest.raises(edgelink.EdgelinkError, match="did not|no cached chunk|checksum|differ"):
                    peer.fetch_cache(toks)
                assert m.prefix_cache().held(keys) == 1  # the good one before it was kept
                assert peer.fetch_cache(toks[:128 + 1]) == 0  # that one is held here now
                assert peer.fetch_cache(toks) == 0  # the node dropped the damaged one: holds 1 too
            used = m.prefill(toks, cache=True)
            assert used.hit_tokens == 128 and used.hit_tiers == {"ram": 1}
            assert m.runtime.state_digest() == want  # the other three computed here, exactly
            assert m.generate(8, stop_at_eog=False).tokens == cold_out
        proc.next_event()
        assert proc.poll() is None and not damaged.exists()  # the node dropped what did not verify
    finally:
        p2p.close_client_hosts()
        assert stop_receiver(proc) in (0, -15), proc.stderr_tail()
    proc = start_node(str(smollm2_path), node_cfg.replace(cache_share="off"),
                      extra_env={"EDGELINK_P2P_IDENTITY_KEY": str(tmp_path / "node2.key")})
    try:
        with edgelink.load(str(smollm2_path), client_cfg) as m, m.connect(proc.ready["addrs"][0]) as peer:
            with pytest.raises(edgelink.EdgelinkError, match="cache.share"):
                peer.fetch_cache(list(reversed(toks)))  # chunks this client does not hold
    finally:
        p2p.close_client_hosts()
        assert stop_receiver(proc) in (0, -15), proc.stderr_tail()


def test_a_fetch_brings_window_cells_only_where_a_restore_needs_them(gemma3_path, cfg, tmp_path):
    """Gemma-3 keeps sliding-window cells for its last 512 positions only: a fetch asks for
    the earlier chunks trimmed (full-attention cells alone), and the restore is still exact.
    A shorter prompt whose run would end in trimmed chunks is cut back and recomputed, exactly,
    and its chunks are then stored whole."""
    from edgelink.cache.prefix import trimmed_key
    from edgelink.roles.launcher import start_node, stop_receiver
    from edgelink.transport import p2p

    node_cfg = cfg.replace(cache_dir=str(tmp_path / "node-kv"), cache_chunk_tokens=128, wire_prefill_tps=500.0)
    with edgelink.load(str(gemma3_path), node_cfg) as m:
        toks = context_tokens(m.runtime, 900)  # 7 whole chunks; the last 4 cover the window
        warm = PrefixCache(node_cfg)
        warm.prefill(m.runtime, m.signature, toks)
        want, cold = m.runtime.state_digest(), m.generate(8, stop_at_eog=False).tokens
        keys = warm.keys(m.signature, toks)
        m.reset()
        short = toks[:5 * 128 + 10]
        PrefixCache(node_cfg.replace(cache_dir=str(tmp_path / "ref-kv"))).prefill(m.runtime, m.signature, short)
        want_short = m.runtime.state_digest()
    proc = start_node(str(gemma3_path), node_cfg, extra_env={"EDGELINK_P2P_IDENTITY_KEY": str(tmp_path / "n.key")})
    client_cfg = cfg.replace(cache_dir=str(tmp_path / "client-kv"), cache_chunk_tokens=128,
                             p2p_identity_key=tmp_path / "client.key")
    try:
        with edgelink.load(str(gemma3_path), client_cfg) as m:
            got = m.fetch_cache(toks, [proc.ready["addrs"][0]])
            assert got.chunks == 7 and not got.errors
            # fetched chunks are kept apart from the ones computed here, under their source
            store = m.prefix_cache().fetched_store(proc.ready["addrs"][0].rpartition("/p2p/")[2])
            assert not m.prefix_cache().store.keys()
            assert [store.has(trimmed_key(k)) for k in keys] == [True] * 3 + [False] * 4
            assert [store.has(k) for k in keys] == [False] * 3 + [True] * 4
            sizes = [len(store.get(k)[0]) for k in keys[3:]] + [len(store.get(trimmed_key(k))[0]) for k in keys[:3]]
            assert max(sizes[4:]) * 4 < min(sizes[:4])  # 3 of 18 layers: about a sixth of the bytes
            used = m.prefill(toks, cache=True)
            assert used.hit_tokens == 7 * 128 and m.runtime.state_digest() == want
            assert m.generate(8, stop_at_eog=False).tokens == cold
            m.reset()
            used = m.prefill(short, cache=True)  # a run of 5 would end in trimmed chunks: cut back
            assert used.hit_tokens == 0 and m.runtime.state_digest() == want_short
            own = m.prefix_cache().store  # computed here now, so kept as this machine's own
            assert used.stored_chunks == 5 and all(own.has(k) for k in keys[:5])
    finally:
        p2p.close_client_hosts()
        assert stop_receiver(proc) in (0, -15), proc.stderr_tail()


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_a_node_keeps_the_prompts_peers_ask_it_to_prefill(model_paths, cfg, tmp_path, name):
    """With cache.keep_prefills, a node stores the chunks of a prompt a peer had it prefill (a
    handoff sent as text): a cache reading its directory later hits and continues exactly as a
    cold run through the cache. For Gemma-3, chunks whose window cells are gone are kept
    trimmed, and a hit is still exact."""
    from edgelink.roles.launcher import start_node, stop_receiver
    from edgelink.transport import p2p

    node_dir = tmp_path / "node-kv"
    node_cfg = cfg.replace(cache_dir=str(node_dir), cache_chunk_tokens=128, wire_prefill_tps=500.0,
                           cache_keep_prefills="on")
    with edgelink.load(str(model_paths[name]), cfg.replace(cache_dir=str(tmp_path / "ref-kv"),
                                                           cache_chunk_tokens=128)) as m:
        toks = context_tokens(m.runtime, 640 + 70)
        PrefixCache(m.cfg).prefill(m.runtime, m.signature, toks)
        want, cold = m.runtime.state_digest(), m.generate(8, stop_at_eog=False).tokens
    proc = start_node(str(model_paths[name]), node_cfg,
                      extra_env={"EDGELINK_P2P_IDENTITY_KEY": str(tmp_path / "n.key")})
    try:
        with edgelink.load(str(model_paths[name]), cfg.replace(p2p_identity_key=tmp_path / "c.key")) as m:
            with m.connect(proc.ready["addrs"][0]) as peer:
                peer.request("prefill", tokens=toks, replace=True)
    finally:
        p2p.close_client_hosts()
        assert stop_receiver(proc) in (0, -15), proc.stderr_tail()
    with edgelink.load(str(model_paths[name]), node_cfg) as m:
        cache = PrefixCache(node_cfg)
        keys = cache.keys(m.signature, toks)
        assert cache.held(keys) == 5  # every whole chunk, kept by the node
        used = cache.prefill(m.runtime, m.signature, toks)
        assert m.runtime.state_digest() == want
        assert m.generate(8, stop_at_eog=False).tokens == cold
        if name == "smollm2-135m":
            assert used.hit_tokens == 5 * 128


def test_a_cache_fetch_over_shared_memory_through_the_portable_wait(smollm2_path, cfg, tmp_path):
    """`serve` on shared memory hands its cached chunks to a client, both sides waiting by
    polling (shm.wait = poll, the macOS path): the client's prefill then hits and continues
    exactly as a cold run."""
    import uuid

    from edgelink.roles.launcher import start_receiver, stop_receiver

    srv_cfg = cfg.replace(cache_dir=str(tmp_path / "srv"), cache_chunk_tokens=128, shm_wait="poll")
    with edgelink.load(str(smollm2_path), srv_cfg) as m:
        toks = context_tokens(m.runtime, 3 * 128 + 20)
        PrefixCache(srv_cfg).prefill(m.runtime, m.signature, toks)
        want, cold = m.runtime.state_digest(), m.generate(8, stop_at_eog=False).tokens
    name = f"cpoll-{uuid.uuid4().hex[:8]}"
    proc = start_receiver(str(smollm2_path), srv_cfg, name)
    try:
        cl_cfg = cfg.replace(cache_dir=str(tmp_path / "cl"), cache_chunk_tokens=128, shm_wait="poll")
        with edgelink.load(str(smollm2_path), cl_cfg) as m:
            got = m.fetch_cache(toks, f"shm:{name}")
            assert got.chunks == 3 and not got.errors, got
            used = m.prefill(toks, cache=True)
            assert used.hit_tokens == 3 * 128
            assert m.runtime.state_digest() == want
            assert m.generate(8, stop_at_eog=False).tokens == cold
    finally:
        assert stop_receiver(proc) in (0, -15), proc.stderr_tail()
