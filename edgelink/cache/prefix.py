"""The prefix cache: prefill a context once, reuse its KV cells in every later process.

A prompt is cut into chunks of ``cache.chunk_tokens`` tokens. A chunk's key is a chained digest:
the root names the model exactly (its signature: weights digest, KV cache types, V layout,
llama.cpp version), and each key hashes its parent key with the chunk's token ids. So a key
names exactly one prefix of one model, and a hit can only be the cells of those very tokens.

Exactness. A prefill through the cache always decodes in the same steps, whether or not it
hits: whole chunks from position 0, then the remainder. Cached cells came from those same steps,
and llama.cpp's CPU kernels give the same bits for the same batches. So a continuation after a
hit is bit-identical to a cold run through the cache. (A plain ``generate`` batches by
``runtime.n_batch`` instead, and may differ from both in the last bits of a logit.)

Sliding-window models (Gemma-3). Each chunk is stored right after it is computed, with its cells
from every cache, the window cache included: a window holds the last ``n_swa`` positions and a
chunk is at most that long. A restore keeps the window cells llama.cpp itself would still hold
at the cut. llama-server's own slot restore gets this wrong (llama.cpp #25913).
A restore needs the window cells of only its last ``ceil(n_swa / chunk)`` chunks, so a fetch
from a peer asks for the earlier chunks *trimmed* (full-attention cells only: a sixth of a
Gemma-3 chunk). A trimmed chunk is kept under a key of its own (``trimmed_key``) and is only
used where no window cell of it is needed: a run ending in one is cut back, and the rest is
recomputed (and stored whole).

A chunk is a verified message file (HELLO with the model's signature, then one tensor message
of the chunk's cells and token ids, each tensor checksummed). A chunk that fails any check
is dropped from the store and recomputed, never applied.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import blake3
import numpy as np

from edgelink.cache.store import ChunkStore, TierStats
from edgelink.config import Config, config_list
from edgelink.errors import ConfigError, EdgelinkError, StateError
from edgelink.kinds.delta import merge_delta
from edgelink.kinds.encode import OneWay
from edgelink.kinds.snapshot import check_state_layout
from edgelink.protocol.kinds import ApplyMode, DType, Kind
from edgelink.protocol.messages import Tensor, TensorMessage
from edgelink.protocol.session import Role, Session
from edgelink.protocol.signature import ModelSignature
from edgelink.runtime.kvstate import (
    CacheState,
    SeqState,
    assemble_seq_state,
    parse_seq_state,
    select_cells,
    state_to_tensors,
    tensors_to_state,
)
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.sizing import fit_limits
from edgelink.transport.file import FileChannelReader

log = logging.getLogger(__name__)
ROOT_TAG = b"edgelink-kv-prefix/1\0"
TRIM_TAG = b"edgelink-kv-trimmed/1\0"


def trimmed_key(key: str) -> str:
    """Where the trimmed form of chunk ``key`` is kept (never the same file as the whole one)."""
    return blake3.blake3(TRIM_TAG + bytes.fromhex(key)).hexdigest()


def trim(state: SeqState) -> SeqState:
    """Only the full-attention cache's cells (an iSWA model's second cache is its window)."""
    if len(state.caches) != 2:
        return state
    return SeqState(state.seq_id, (state.caches[0], CacheState(tuple(None for _ in state.caches[1].streams))))


def is_trimmed(msg: TensorMessage) -> bool:
    chunk = msg.attrs.get("chunk")
    return isinstance(chunk, dict) and chunk.get("trimmed") is True


@dataclasses.dataclass
class CachedPrefill:
    """What one prefill through the cache did."""

    tokens: int
    hit_tokens: int = 0  # leading tokens whose cells came from the cache
    hit_tiers: dict[str, int] = dataclasses.field(default_factory=dict)  # chunks per tier
    stored_chunks: int = 0
    dropped_chunks: int = 0  # chunks that did not verify (removed; recomputed)
    lookup_s: float = 0.0
    prefill_s: float = 0.0


def chunk_tokens_of(cfg: Config) -> int:
    c = cfg.cache.chunk_tokens
    if c < 64 or c % 32:
        raise ConfigError(f"cache.chunk_tokens is {c}: a multiple of 32, at least 64 (the batch sizes "
                          "whose cells llama.cpp reproduces bit for bit)")
    return c


def store_for(cfg: Config) -> ChunkStore:
    """The chunk store ``cfg`` names (``cache.dir``, default ``<paths.cache_dir>/kv``)."""
    directory = Path(cfg.cache.dir).expanduser() if cfg.cache.dir else cfg.paths.cache_dir / "kv"
    return ChunkStore(directory, cfg.cache.ram_bytes, cfg.cache.disk_bytes)


SALT_TAG = b"edgelink cache salt v1\x00"
_SOURCE_TAG = re.compile(r"[A-Za-z0-9_.-]{1,80}")


def source_tag(source: str) -> str:
    """A directory name for the peer chunks came from (a peer id, ``shm:NAME``)."""
    tag = source.replace("shm:", "shm-", 1)
    return tag if _SOURCE_TAG.fullmatch(tag) and tag not in (".", "..") else \
        "h-" + blake3.blake3(source.encode()).hexdigest()[:32]


class PrefixCache:
    """Chunks of KV cells keyed by the prefix they continue, in RAM and on disk."""

    def __init__(self, cfg: Config, store: ChunkStore | None = None):
        self.cfg = cfg
        self.chunk = chunk_tokens_of(cfg)
        self.store = store if store is not None else store_for(cfg)  # chunks computed here
        # Chunks fetched from peers, one store per source (``<dir>/from/<source>``): used by
        # this machine's own prefills, but served to peers (and announced) only when
        # ``cache.reshare`` names their source, since a fetched chunk is verified for shape,
        # tokens and checksum, never recomputed (docs/security.md).
        self._fetched: dict[str, ChunkStore] = {}
        self._reshare = set(config_list(cfg.cache.reshare))
        if self.store.dir is not None and (self.store.dir / "from").is_dir():
            for d in sorted((self.store.dir / "from").iterdir()):
                if d.is_dir():
                    self._fetched[d.name] = self._source_store(d.name)
        self.totals = CachedPrefill(0)  # summed over this process's prefills

    def _source_store(self, tag: str) -> ChunkStore:
        d = None if self.store.dir is None else self.store.dir / "from" / tag
        return ChunkStore(d, self.cfg.cache.ram_bytes, self.cfg.cache.disk_bytes)

    def fetched_store(self, source: str) -> ChunkStore:
        """Where chunks fetched from ``source`` (a peer id, ``shm:NAME``) are kept."""
        tag = source_tag(source)
        if tag not in self._fetched:
            self._fetched[tag] = self._source_store(tag)
        return self._fetched[tag]

    def _stores(self, for_peer: bool) -> list[ChunkStore]:
        """Own chunks first; then, for this machine, every source's; for a peer, only those of
        the sources ``cache.reshare`` names (``*``: all)."""
        if not for_peer or "*" in self._reshare:
            return [self.store, *self._fetched.values()]
        tags = {source_tag(s) for s in self._reshare}
        return [self.store, *(st for tag, st in self._fetched.items() if tag in tags)]

    def _find(self, key: str, for_peer: bool) -> tuple[bytes, str, str, ChunkStore] | None:
        """(data, tier, stored key, store) of ``key``, whole first, then trimmed."""
        for stored in (key, trimmed_key(key)):
            for st in self._stores(for_peer):
                got = st.get(stored)
                if got is not None:
                    return got[0], got[1], stored, st
        return None

    # ------------------------------------------------------------------ keys

    def root_key(self, signature: ModelSignature) -> bytes:
        """The key every chain of chunk keys starts from: the model's signature, and the
        trust domain's ``cache.salt`` when set. Without the salt a peer cannot compute the key
        of any prompt, so it can neither hit nor time another domain's chunks."""
        canon = json.dumps(signature.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        salt = self.cfg.cache.salt
        if not salt:
            return blake3.blake3(ROOT_TAG + canon).digest()
        return blake3.blake3(ROOT_TAG + canon, key=blake3.blake3(SALT_TAG + salt.encode()).digest()).digest()

    def keys(self, signature: ModelSignature, tokens: list[int]) -> list[str]:
        """The key of every whole chunk of ``tokens``, in order."""
        key = self.root_key(signature)
        out = []
        for start in range(0, len(tokens) - self.chunk + 1, self.chunk):
            chunk = np.asarray(tokens[start:start + self.chunk], dtype="<i4").tobytes()
            key = blake3.blake3(key + chunk).digest()
            out.append(key.hex())
        return out

    # ------------------------------------------------------------------ the prefill

    def prefill(self, rt: LlamaRuntime, signature: ModelSignature, tokens: list[int], *,
                keep: int = 0) -> CachedPrefill:
        """Make ``tokens`` the runtime's sequence: the longest cached run of whole chunks
        (always leaving at least one token to decode, so the logits are fresh), then the rest
        decoded chunk by chunk, each new whole chunk stored.

        ``keep``: the runtime's sequence already starts with ``tokens[:keep]`` (whole chunks),
        computed by a prefill through this cache, so its cells are what a restore would give:
        they stay, and are not restored again, unless the cache holds a longer run (a server's
        context reused by the next request with the same system prompt)."""
        if keep:
            if keep % self.chunk or rt.tokens[:keep] != list(tokens[:keep]) or keep > (len(tokens) - 1):
                raise StateError("keep must be whole chunks the sequence already holds, short of the prompt")
            usable = (len(tokens) - 1) // self.chunk
            if self.held(self.keys(signature, tokens)[:usable]) * self.chunk <= keep:
                return self._continue(rt, signature, tokens, keep)
            rt.clear()
        if rt.tokens:
            raise StateError("a prefill through the cache starts a sequence: reset the model first")
        if not tokens:
            raise StateError("nothing to prefill")
        if rt.n_swa and self.chunk > rt.n_swa:
            raise ConfigError(f"cache.chunk_tokens ({self.chunk}) is longer than this model's window of "
                              f"{rt.n_swa}: lower it")
        out = CachedPrefill(len(tokens))
        keys = self.keys(signature, tokens)
        usable = (len(tokens) - 1) // self.chunk  # whole chunks that may come from the cache
        t0 = time.perf_counter()
        states = self._lookup(rt, signature, tokens, keys[:usable], out)
        if states:
            self._restore(rt, tokens, states)
        out.hit_tokens = len(states) * self.chunk
        out.lookup_s = time.perf_counter() - t0
        return self._decode_rest(rt, signature, tokens, keys, out)

    def _continue(self, rt: LlamaRuntime, signature: ModelSignature, tokens: list[int], keep: int) -> CachedPrefill:
        rt.truncate(keep)
        out = CachedPrefill(len(tokens))
        out.hit_tokens = keep
        out.hit_tiers["context"] = keep // self.chunk
        return self._decode_rest(rt, signature, tokens, self.keys(signature, tokens), out)

    def _decode_rest(self, rt: LlamaRuntime, signature: ModelSignature, tokens: list[int], keys: list[str],
                     out: CachedPrefill) -> CachedPrefill:
        """Decode from ``out.hit_tokens`` on, storing each new whole chunk: the whole chunks
        before the last piece in large batches and stored from one export (``_bulk``), then
        that piece alone, as a chunk-by-chunk prefill would."""
        t1 = time.perf_counter()
        pos = self._bulk(rt, signature, tokens, keys, out)
        while pos < len(tokens):
            step = min(self.chunk, len(tokens) - pos)
            rt.prefill(tokens[pos:pos + step])
            index = pos // self.chunk
            if step == self.chunk and not self.store.has(keys[index]):
                out.stored_chunks += self._store(rt, signature, keys[index], index)
            pos += step
        out.prefill_s = time.perf_counter() - t1
        self._add(out)
        return out

    def _bulk(self, rt: LlamaRuntime, signature: ModelSignature, tokens: list[int], keys: list[str],
              out: CachedPrefill) -> int:
        """Prefill the whole chunks from ``out.hit_tokens`` up to the last piece of ``tokens`` in
        the runtime's large batches, and store the new ones from one export of its state;
        returns where the rest starts. Their cells are those of a chunk-by-chunk prefill bit
        for bit (batches of whole 64-token multiples; measured, and held by
        tests/cache/test_prefix_cache.py), at a fraction of the cost: 64-token batches run
        llama.cpp's matrix kernels at about 60% of their speed on 512, and storing each chunk
        after its own batch exported the whole state every time. Not on a sliding-window
        model (early chunks' window cells are gone by the end: they could be stored only
        trimmed), nor where a ubatch would not be whole chunks."""
        pos, end = out.hit_tokens, (len(tokens) - 1) // self.chunk * self.chunk
        if end - pos < 2 * self.chunk or rt.n_swa or rt.n_ubatch % self.chunk or rt.n_batch % rt.n_ubatch:
            return pos
        rt.prefill(tokens[pos:end])
        new = [i for i in range(pos // self.chunk, end // self.chunk) if not self.store.has(keys[i])]
        if new:
            full = parse_seq_state(rt.export_state())
            out.stored_chunks += sum(self._store_cells(rt, signature, full, keys[i], i) for i in new)
        return end

    def window_chunks(self, rt: LlamaRuntime) -> int:
        """How many chunks at the end of a restored run must bring their window cells."""
        return -(-rt.n_swa // self.chunk) if rt.n_swa else 0

    def _lookup(self, rt: LlamaRuntime, signature: ModelSignature, tokens: list[int], keys: list[str],
                out: CachedPrefill) -> list[SeqState]:
        """The longest usable run of cached chunks: whole ones, or trimmed ones wherever the
        restore needs none of their window cells."""
        states: list[SeqState] = []
        trimmed: list[bool] = []
        tiers: list[str] = []
        for index, key in enumerate(keys):
            got = self._find(key, for_peer=False)
            if got is None:
                break
            data, tier, stored, st = got
            try:
                msg = self._open(rt, signature, data, key)
                states.append(self._state(msg, index, tokens[index * self.chunk:(index + 1) * self.chunk],
                                          trimmed=stored != key))
            except EdgelinkError as exc:
                log.warning("cached chunk %s did not verify (%s): dropped, recomputing", key[:16], exc)
                st.drop(stored)
                out.dropped_chunks += 1
                break
            trimmed.append(stored != key)
            tiers.append(tier)
        w, n = self.window_chunks(rt), len(states)
        while n and any(trimmed[max(0, n - w):n]):
            n -= 1
        for tier in tiers[:n]:
            out.hit_tiers[tier] = out.hit_tiers.get(tier, 0) + 1
        return states[:n]

    def _restore(self, rt: LlamaRuntime, tokens: list[int], states: list[SeqState]) -> None:
        end = len(states) * self.chunk
        merged = merge_delta(rt, *states, end=end)
        check_state_layout(rt, merged, end)
        rt.import_state(assemble_seq_state(merged), tokens[:end], None)

    # ------------------------------------------------------------------ chunks as messages

    def _session(self, rt: LlamaRuntime, signature: ModelSignature, role: Role) -> Session:
        return Session(role, signature, fit_limits(self.cfg, rt).protocol, kinds=(Kind.KV_CACHE_DELTA,))

    def _store(self, rt: LlamaRuntime, signature: ModelSignature, key: str, index: int) -> int:
        return self._store_cells(rt, signature, parse_seq_state(rt.export_state()), key, index)

    def _store_cells(self, rt: LlamaRuntime, signature: ModelSignature, full: SeqState, key: str, index: int,
                     allow_trimmed: bool = False) -> int:
        """Store chunk ``index`` from the runtime's parsed state: whole when every cache still
        holds it; with ``allow_trimmed``, trimmed when only the window cache has moved on."""
        start, end = index * self.chunk, (index + 1) * self.chunk
        state = select_cells(full, lambda pos: (pos >= start) & (pos < end))

        def whole(cache: CacheState) -> bool:
            st = next((s for s in cache.streams if s is not None), None)
            return st is not None and st.n_cells == self.chunk

        trimmed = not all(whole(c) for c in state.caches)
        if trimmed and not (allow_trimmed and rt.n_swa and len(state.caches) == 2 and whole(state.caches[0])):
            log.warning("chunk %d is not whole in every cache; not stored", index)
            return 0
        if trimmed:
            if self.store.has(trimmed_key(key)):
                return 0
            state = trim(state)
        tensors, layout = state_to_tensors(state)
        ids = np.asarray(rt.tokens[start:end], dtype="<i4")
        tensors.append(Tensor("tokens", DType.I32, ids.shape, memoryview(ids).cast("B")))
        self._put(rt, signature, key, index, tensors, layout, trimmed=trimmed)
        return 1

    def keep(self, rt: LlamaRuntime, signature: ModelSignature) -> int:
        """Store the whole chunks of the runtime's sequence that it computed in batches of 64
        or more tokens (``LlamaRuntime.batched``), whose cells a cold prefill through the cache
        reproduces bit for bit (measured: identical for SmolLM2 and Gemma-3 at every chunk
        boundary); earlier chunks of a window model whose window cells are gone, trimmed.
        Returns how many were stored."""
        n = min(rt.batched, len(rt.tokens)) // self.chunk
        if n == 0:
            return 0
        keys = self.keys(signature, rt.tokens[:n * self.chunk])
        full = parse_seq_state(rt.export_state())
        return sum(self._store_cells(rt, signature, full, key, index, allow_trimmed=True)
                   for index, key in enumerate(keys) if not self.store.has(key))

    def _put(self, rt: LlamaRuntime, signature: ModelSignature, key: str, index: int, tensors: list[Tensor],
             layout: dict[str, Any], trimmed: bool = False, into: ChunkStore | None = None,
             origin: str | None = None) -> None:
        """Keep chunk ``index``'s tensors (cells and token ids) under ``key`` (or, trimmed, under
        ``trimmed_key(key)``), as a message file, in ``into`` (default: the chunks computed
        here); ``origin`` names the peer it came from, in the chunk's attributes."""
        chunk = {"key": key, "index": index, "trimmed": trimmed, **({"from": origin} if origin else {})}
        start = index * self.chunk
        msg = OneWay.encode(signature, fit_limits(self.cfg, rt), Kind.KV_CACHE_DELTA, ApplyMode.APPEND,
                            (tensors, {"kv": layout, "chunk": chunk}, (start, start + self.chunk)),
                            seq_slot=rt.seq, layer_range=(0, rt.n_layer), kinds=(Kind.KV_CACHE_DELTA,))
        (into or self.store).put(trimmed_key(key) if trimmed else key, msg.to_bytes())

    def _open(self, rt: LlamaRuntime, signature: ModelSignature, data: bytes, key: str) -> TensorMessage:
        """A stored chunk's tensor message, verified: this model's signature, every checksum,
        and the key it names. Raises an EdgelinkError otherwise."""
        session = self._session(rt, signature, Role.SERVER)
        limit = fit_limits(self.cfg, rt).protocol.max_message_bytes + (1 << 20)
        with FileChannelReader(data) as r:
            session.receive(r.recv(limit))
            msg = session.receive(r.recv(limit))
            if not isinstance(msg, TensorMessage):
                raise StateError("a cached chunk holds no tensor message")
            chunk = msg.attrs.get("chunk")
            if not isinstance(chunk, dict) or chunk.get("key") != key:
                raise StateError("a cached chunk names another key")
            # copy out of the reader's buffer, which the next read reuses
            return TensorMessage(msg.session_id, msg.message_id, msg.kind, msg.apply, msg.seq_slot, msg.layer_range,
                                 msg.token_range, tuple(dataclasses.replace(t, data=memoryview(bytes(t.data)))
                                                        for t in msg.tensors), msg.attrs, msg.checksum_alg)

    def _state(self, msg: TensorMessage, index: int, tokens: list[int], trimmed: bool = False) -> SeqState:
        """The cells of chunk ``index`` of ``tokens`` from its message, checked: its positions
        and token ids are exactly that chunk's (``trimmed``: with no window cells, and saying
        so). Raises an EdgelinkError otherwise."""
        if is_trimmed(msg) != trimmed:
            raise StateError("a cached chunk is trimmed where a whole one was expected, or the reverse")
        start, end = index * self.chunk, (index + 1) * self.chunk
        if msg.kind is not Kind.KV_CACHE_DELTA or msg.token_range != (start, end):
            raise StateError(f"a chunk for positions {start}..{end} names others")
        by_name = {t.name: t for t in msg.tensors}
        ids = by_name.get("tokens")
        if ids is None or ids.dtype is not DType.I32 or np.frombuffer(ids.data, "<i4").tolist() != tokens:
            raise StateError("a cached chunk holds other token ids than its key")
        layout = msg.attrs.get("kv")
        if not isinstance(layout, dict):
            raise StateError("a cached chunk lacks its kv layout")
        state = tensors_to_state({n: t for n, t in by_name.items() if n != "tokens"}, layout)
        state = select_cells(state, lambda pos: (pos >= start) & (pos < end))  # a copy
        if trimmed and (len(state.caches) != 2 or any(x is not None for x in state.caches[1].streams)):
            raise StateError("a trimmed chunk holds window cells, or its model has no window cache")
        for cache in state.caches[:1] if trimmed else state.caches:
            st = next((x for x in cache.streams if x is not None), None)
            if st is None or st.n_cells != self.chunk:
                raise StateError("a cached chunk does not hold exactly its positions")
        return state

    # ------------------------------------------------------------------ sharing with peers

    def held(self, keys: list[str], *, for_peer: bool = False) -> int:
        """How many of ``keys``, from the first, this cache holds (whole or trimmed);
        ``for_peer``: only those it may serve a peer (its own, and ``cache.reshare``'s)."""
        stores = self._stores(for_peer)
        n = 0
        for key in keys:
            tk = trimmed_key(key)
            if not any(st.has(key) or st.has(tk) for st in stores):
                break
            n += 1
        return n

    def chunk_message(self, rt: LlamaRuntime, signature: ModelSignature, key: str,
                      window: bool = True) -> TensorMessage:
        """A stored chunk to send a peer (one computed here, or from a ``cache.reshare``
        source), verified here first (a damaged one is dropped); without ``window``, trimmed
        to its full-attention cells (for a sliding-window model)."""
        got = self._find(key, for_peer=True)
        if got is None:
            raise StateError(f"no cached chunk {key[:16]}")
        data, _, stored, st = got
        if stored != key and window and rt.n_swa:
            raise StateError(f"this peer holds only the full-attention cells of chunk {key[:16]}")
        try:
            msg = self._open(rt, signature, data, key)
        except EdgelinkError:
            st.drop(stored)
            raise
        if window or not rt.n_swa or is_trimmed(msg):
            return msg
        by_name = {t.name: t for t in msg.tensors}
        state = tensors_to_state({n: t for n, t in by_name.items() if n != "tokens"}, msg.attrs["kv"])
        tensors, layout = state_to_tensors(trim(state))
        chunk = {**msg.attrs["chunk"], "trimmed": True}
        return dataclasses.replace(msg, tensors=(*tensors, by_name["tokens"]),
                                   attrs={**msg.attrs, "kv": layout, "chunk": chunk})

    def fetch(self, sender: Any, rt: LlamaRuntime, signature: ModelSignature, tokens: list[int],
              source: str = "peer") -> int:
        """Fetch from the peer of ``sender`` the chunks of ``tokens`` this cache lacks, as far
        as the peer holds them, each verified as a local chunk is before it is kept (apart
        from the chunks computed here: ``fetched_store(source)``). Returns how many arrived."""
        keys = self.keys(signature, tokens)[:(len(tokens) - 1) // self.chunk]
        local = self.held(keys)
        if local == len(keys):
            return 0
        held = sender.request("cache_has", keys=keys[local:]).held
        into = self.fetched_store(source)
        whole_from = len(keys) - self.window_chunks(rt)  # the chunks whose window cells a restore needs
        wanted = []
        for index in range(local, local + min(held, len(keys) - local)):
            key, ids = keys[index], tokens[index * self.chunk:(index + 1) * self.chunk]
            window = index >= whole_from or not rt.n_swa

            def keep(msg: TensorMessage, index: int = index, key: str = key, ids: list[int] = ids,
                     trimmed: bool = not window) -> None:
                # refused (and the peer told) unless it is exactly that chunk, in the form asked for
                self._state(msg, index, ids, trimmed=trimmed)
                self._put(rt, signature, key, index, list(msg.tensors), msg.attrs["kv"], trimmed=trimmed,
                          into=into, origin=source)

            wanted.append((key, window, keep))
        sender.pull_chunks(wanted)
        return len(wanted)

    # ------------------------------------------------------------------ reporting

    def _add(self, out: CachedPrefill) -> None:
        t = self.totals
        t.tokens += out.tokens
        t.hit_tokens += out.hit_tokens
        t.stored_chunks += out.stored_chunks
        t.dropped_chunks += out.dropped_chunks
        for tier, n in out.hit_tiers.items():
            t.hit_tiers[tier] = t.hit_tiers.get(tier, 0) + n

    def clear(self) -> int:
        """Remove every chunk, own and fetched, from both tiers; returns the disk files gone."""
        return sum(st.clear() for st in self._stores(for_peer=False))

    def disk_chunks(self) -> list[tuple[str, int, float, str]]:
        """(key, bytes, last use, source) of every chunk on disk; source "self" for the chunks
        computed here, most recently used first."""
        out = [(k, n, t, "self") for k, n, t in self.store.disk_keys()]
        for tag, st in self._fetched.items():
            out += [(k, n, t, tag) for k, n, t in st.disk_keys()]
        return sorted(out, key=lambda c: -c[2])

    def stats(self) -> dict[str, Any]:
        tiers: dict[str, TierStats] = self.store.stats()
        return {"chunk_tokens": self.chunk, "dir": str(self.store.dir) if self.store.dir else None,
                "tiers": {k: dataclasses.asdict(v) for k, v in tiers.items()},
                "fetched": {tag: st.stats()["disk"].entries for tag, st in self._fetched.items()},
                "this_process": dataclasses.asdict(self.totals)}
