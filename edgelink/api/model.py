"""The object API: a model and its llama.cpp context, loaded once and reused by every
operation a script performs (the way llama-cpp-python has ``Llama``)::

    import edgelink

    with edgelink.load("smollm2-135m") as m:
        m.prefill("The capital of France is")
        with m.connect("shm:demo") as peer:     # one session, reused
            out = peer.handoff(n_tokens=16)     # ship the state, get the continuation
            peer.converse(" And of Germany?", n_tokens=8)
        snap = m.snapshot()                     # a verified message in memory
        snap.save("france.elk")

The one-shot functions of ``edgelink.api`` are thin wrappers over these objects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from edgelink import wire
from edgelink.api.results import CacheFetch, Generation, Progress
from edgelink.cache.prefix import PrefixCache as _PrefixCache
from edgelink.config import Config, config_list, load_config
from edgelink.errors import EdgelinkError, PeerGone, StateError
from edgelink.files import write_atomic
from edgelink.kinds.encode import OneWay
from edgelink.kinds.llama_file import load_seq_file, save_seq_file
from edgelink.kinds.snapshot import snapshot_tensors
from edgelink.kinds.specs import Acceptance, acceptance
from edgelink.models.resolve import resolve_model
from edgelink.net.dht import client_dht
from edgelink.protocol.codec import MAGIC
from edgelink.protocol.kinds import ApplyMode, Kind
from edgelink.protocol.limits import limit_of
from edgelink.protocol.messages import TensorMessage
from edgelink.protocol.session import Role, Session
from edgelink.protocol.signature import ModelSignature
from edgelink.roles.receiver import frame_limit
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.signature import model_signature
from edgelink.runtime.sizing import fit_limits
from edgelink.transport.file import FileChannelReader

if TYPE_CHECKING:
    from edgelink.api.peer import Peer
    from edgelink.cache.prefix import CachedPrefill, PrefixCache



def load(model: str | Path | None = None, cfg: Config | None = None, *, progress: Progress | None = None,
         **settings: Any) -> Model:
    """Load ``model`` (a registry name such as ``"smollm2-135m"``, or a path to a .gguf file;
    default ``runtime.default_model``) into one context, pulling it into the cache if needed.
    ``settings`` override the configuration as ``section_key=value`` (``runtime_n_ctx=8192``).

    >>> with edgelink.load("smollm2-135m", runtime_n_ctx=2048) as m:  # doctest: +SKIP
    ...     m.prefill("Once upon a time")
    ...     print(m.generate(8).text)
    """
    cfg = cfg if cfg is not None else load_config()
    if settings:
        cfg = cfg.replace(**settings)
    name = str(model) if model is not None else cfg.runtime.default_model
    return Model(LlamaRuntime(resolve_model(name, cfg, pull=True, progress=progress), cfg), cfg, name)


@dataclasses.dataclass(frozen=True)
class AppliedFile:
    """What reading a message file did: (kind, payload bytes) per message, in order, and the
    appliers that took them (``accepting.held``: what they kept, such as hidden slices)."""

    applied: list[tuple[Kind, int]]
    accepting: Acceptance


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A model's sequence as a verified message file in memory (HELLO + one KV_CACHE message,
    what ``edgelink export`` writes): ``save`` it, or ``Model.restore`` it into a context of
    the same model."""

    frames: bytes
    tokens: int
    payload_bytes: int

    def save(self, path: str | Path) -> Path:
        """Write it as a message file (atomically: a temporary name, then a rename)."""
        path = Path(path)
        write_atomic(path, self.frames)
        return path


class Model:
    """One model and one llama.cpp context, reused across prefills, generations, snapshots
    and peers. Not thread-safe: one operation at a time, as with llama-cpp-python's ``Llama``."""

    def __init__(self, rt: LlamaRuntime, cfg: Config, name: str, binding: Any = None):
        """``binding``: whoever else holds this context (``interop.LlamaBinding`` for a
        llama-cpp-python ``Llama``): told before and after each operation."""
        self.runtime = rt
        self.cfg = cfg
        self.name = name
        self.binding = binding
        self._signature: ModelSignature | None = None
        self._cache: PrefixCache | None = None

    @contextlib.contextmanager
    def step(self) -> Iterator[LlamaRuntime]:
        """One operation on the sequence, in step with a bound ``Llama`` (if any)."""
        if self.binding is not None:
            self.binding.pull()
        try:
            yield self.runtime
        finally:
            if self.binding is not None:
                self.binding.push()

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self.runtime.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<edgelink.Model {self.name} n_ctx={self.runtime.n_ctx} tokens={len(self.runtime.tokens)}>"

    # ------------------------------------------------------------------ the sequence

    @property
    def tokens(self) -> list[int]:
        """The token ids of the sequence (a copy; a bound ``Llama``'s, if it moved since)."""
        if self.binding is not None:
            self.binding.pull()
        return list(self.runtime.tokens)

    @property
    def signature(self) -> ModelSignature:
        """What a peer checks before it accepts this model's state (``edgelink info``)."""
        if self._signature is None:
            # in step: reading the signature may probe the context (flash attention "auto"),
            # which must save and restore the cells a bound Llama evaluated meanwhile
            with self.step():
                self._signature = model_signature(self.runtime, self.cfg)
        return self._signature

    def tokenize(self, text: str, *, add_special: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``; BOS only at the start of a sequence unless ``add_special``
        says otherwise. Control tokens written in the text (``<|im_start|>``) are read as those
        tokens, as llama-cpp-python's ``create_completion`` reads a prompt, unless
        ``parse_special`` is off."""
        add = not self.runtime.tokens if add_special is None else add_special
        return self.runtime.tokenize(text, add_special=add, parse_special=parse_special)

    @overload
    def prefill(self, prompt: str | Sequence[int], *, cache: Literal[False] = False) -> int: ...

    @overload
    def prefill(self, prompt: str | Sequence[int], *, cache: Literal[True] | PrefixCache) -> CachedPrefill: ...

    def prefill(self, prompt: str | Sequence[int], *, cache: bool | PrefixCache = False) -> int | CachedPrefill:
        """Append ``prompt`` (text, or token ids) to the sequence; returns its token count.
        With ``cache`` (True: the configured prefix cache, or a ``PrefixCache``), a prompt that
        starts the sequence goes through the prefix cache; returns what it did (``CachedPrefill``)."""
        with self.step() as rt:
            toks = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
            if cache:
                return (self.prefix_cache() if cache is True else cache).prefill(rt, self.signature, toks)
            rt.prefill(toks)
        return len(toks)

    def generate(self, n_tokens: int | None = None, *, stop_at_eog: bool = True) -> Generation:
        """Greedy continuation here (appended to the sequence)."""
        n = self.cfg.generate.n_tokens if n_tokens is None else n_tokens
        t0 = time.perf_counter()
        with self.step() as rt:
            out = rt.generate(n, stop_at_eog=stop_at_eog)
        return Generation(self.name, len(rt.tokens) - len(out), out, rt.detokenize(out),
                          {"generate_s": time.perf_counter() - t0})

    def prefix_cache(self) -> PrefixCache:
        """This model's prefix cache (the ``cache`` settings; docs/cache.md), made on first use."""
        if self._cache is None:
            self._cache = _PrefixCache(self.cfg)
        return self._cache

    def fetch_cache(self, prompt: str | Sequence[int], sources: str | Sequence[str] | None = None, *,
                    token: str | None = None) -> CacheFetch:
        """Fetch from peers the prefix-cache chunks of ``prompt`` (as the start of a sequence)
        that this model's cache lacks, each verified before it is stored; a later
        ``prefill(prompt, cache=True)`` finds them. ``sources``: peers (``shm:NAME`` or
        multiaddrs, a list or comma-separated), asked in order while chunks are lacking; ``"dht"``
        (the peers in ``cache.trust`` that the DHT says hold the deepest chunk); default
        ``cache.peers``. A peer that fails is skipped (the chunks are then prefilled here);
        ``token``: a bearer token for nodes that require one."""
        t0 = time.perf_counter()
        toks = self.tokenize(prompt, add_special=True) if isinstance(prompt, str) else [int(t) for t in prompt]
        cache = self.prefix_cache()
        keys = cache.keys(self.signature, toks)[:(len(toks) - 1) // cache.chunk]
        before = cache.held(keys)
        out = CacheFetch(lacking=len(keys) - before)
        names = config_list(sources) if isinstance(sources, str) else list(sources or config_list(self.cfg.cache.peers))
        for name in names:
            if cache.held(keys) == len(keys):
                break
            peers = self._dht_holders(keys, cache.held(keys), out) if name == "dht" else [[name]]
            for addrs in peers:
                for addr in addrs:  # one peer's addresses, in order, until one of them serves
                    out.sources.append(addr)
                    try:
                        with self.connect(addr, token=self._token_for(addr, name, token)) as peer:
                            peer.fetch_cache(toks)
                    except EdgelinkError as exc:  # what arrived before the failure is kept
                        out.errors.append(f"{addr}: {exc}")
                        continue
                    break
                if cache.held(keys) == len(keys):
                    break
        out.chunks = cache.held(keys) - before
        out.seconds = time.perf_counter() - t0
        return out

    def _token_for(self, addr: str, source: str, token: str | None) -> str | None:
        """The bearer token goes to a peer named by the user (``cache.peers``, ``--cache-from``)
        or, for a holder the DHT named, only to one listed by its peer id in ``cache.trust``:
        ``*`` lets anyone's chunks be fetched, never the token be handed to whoever announced."""
        if token is None or source != "dht":
            return token
        pid = addr.rpartition("/p2p/")[2]
        return token if pid in config_list(self.cfg.cache.trust) else None

    def _dht_holders(self, keys: list[str], held: int, out: CacheFetch) -> list[list[str]]:
        """The addresses of each trusted peer the DHT names as a holder of the deepest of
        ``keys`` (beyond the ``held`` this cache has), in the order to try them (a holder behind
        NAT: its circuits through relays first, docs/nat.md)."""

        dht = client_dht(self.cfg)
        trust = set(config_list(self.cfg.cache.trust))
        n, found = dht.deepest(keys, lambda p: "*" in trust or p.peer_id in trust)
        out.providers += [p.peer_id for p in found]
        if not found:  # say who holds it, if anyone, so the user can decide to trust them
            out.untrusted += [p.peer_id for p in dht.providers(keys[held])] if held < len(keys) else []
            return []
        return [list(p.addrs) for p in found] if n > held else []

    def reset(self) -> None:
        """Forget the sequence."""
        with self.step() as rt:
            rt.clear()

    # ------------------------------------------------------------------ state

    def snapshot(self) -> Snapshot:
        """The sequence as a verified KV_CACHE message, in memory."""
        with self.step():
            msg = OneWay.encode(self.signature, fit_limits(self.cfg, self.runtime), Kind.KV_CACHE,
                                ApplyMode.OVERWRITE, snapshot_tensors(self.runtime), seq_slot=self.runtime.seq,
                                layer_range=(0, self.runtime.n_layer))
            frames = msg.to_bytes()  # a copy: the tensors view the runtime's export buffer
        return Snapshot(frames, len(self.runtime.tokens), msg.message.payload_bytes)

    def restore(self, snapshot: Snapshot | str | Path) -> int:
        """Apply a snapshot (or a message file written by ``export``/``Snapshot.save``): every
        message verified against this model before anything changes. Returns payload bytes."""

        where = "the snapshot" if isinstance(snapshot, Snapshot) else str(snapshot)
        with FileChannelReader(snapshot.frames if isinstance(snapshot, Snapshot) else snapshot, magic=MAGIC) as r, \
                self.step():
            applied = read_messages(self.runtime, self.cfg, self.signature, r, where).applied
        if not applied:
            raise StateError(f"{where} holds no tensor message")
        return sum(n for _, n in applied)

    def load_llama_file(self, path: str | Path) -> int:
        """Replace the sequence by a llama.cpp sequence-state file's (``llama_state_seq_save_file``,
        llama-server's saved slots), verified against this model first. Returns its tokens."""

        with self.step() as rt:
            return load_seq_file(path, rt)

    def save_llama_file(self, path: str | Path) -> int:
        """Write the sequence as a llama.cpp sequence-state file (``llama_state_seq_load_file``
        reads it). Returns the bytes written."""

        with self.step() as rt:
            return save_seq_file(path, rt)

    # ------------------------------------------------------------------ peers

    def connect(self, to: str, *, token: str | None = None, token_ids: bool = True,
                kinds: Sequence[Kind] = tuple(Kind), bridge: dict[str, str] | None = None) -> Peer:
        """A session with the receiver at ``to`` (``shm:NAME``, a multiaddr, or ``/p2p/ID``),
        reused by every call on the returned ``Peer`` until it is closed. ``token_ids=False``
        sends -1 for every token id (``Peer.open``); ``kinds``: the message kinds to offer
        (every kind by default; ``api.latent.LATENT_KINDS`` for a latent session); ``bridge``: a
        bridge claim (``kinds.bridged.bridge_claim``) for a session with another model."""
        from edgelink.api.peer import Peer  # peer imports this module (Model is its type)

        return Peer.open(self, to, token=token, token_ids=token_ids, kinds=kinds, bridge=bridge)


def read_messages(rt: LlamaRuntime, cfg: Config, signature: ModelSignature, reader: Any, where: str,
                  only: tuple[Kind, ...] | None = None) -> AppliedFile:
    """Apply every tensor message a one-way ``reader`` holds (a message file's, a snapshot's), in
    order, through the same appliers a receiver of ``rt`` has (edgelink/kinds/specs.py; ``only``:
    just those kinds): the writer's HELLO checked against this model, each message verified,
    decoded (the codecs this side takes) and applied. The limits fitted to ``rt`` bound every
    frame: a file holds what this context can, so much is read."""

    cfg = fit_limits(cfg, rt)
    accepting = acceptance(rt, cfg, signature, only=only)
    session = Session(Role.SERVER, signature, cfg.protocol, kinds=tuple(Kind))
    codecs = wire.offered(cfg.wire)
    limit = frame_limit(cfg)
    session.receive(reader.recv(limit))  # the writer's HELLO: checked against this model
    applied = []
    while True:
        try:
            frame = reader.recv(limit)
        except PeerGone:  # a clean end between frames
            break
        msg = session.receive(frame)
        if not isinstance(msg, TensorMessage):
            raise EdgelinkError(f"{where}: unexpected {msg.frame_type.name} frame")
        if msg.kind not in accepting.appliers:
            raise EdgelinkError(f"{where}: this runtime cannot apply {msg.kind.name}")
        msg = wire.decode_message(msg, codecs, limit_of(cfg.protocol), threads=cfg.wire.threads)
        accepting.appliers[msg.kind](msg)
        applied.append((msg.kind, msg.payload_bytes))
    return AppliedFile(applied, accepting)
