"""One-shot functions: everything the CLI does, each call loading its model and connecting
anew. Scripts that do more than one thing want the objects instead (``edgelink.load``,
``Model``, ``Peer``: edgelink/api/model.py), which these functions are thin wrappers over.

    >>> from edgelink import api
    >>> out = api.generate("smollm2-135m", "The capital of France is", n_tokens=8)
    >>> out.text
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgelink import wire
from edgelink.api.model import load
from edgelink.api.peer import Round
from edgelink.api.results import Generation, Progress, Verified, Written
from edgelink.bridge import Bridge, load_bridge
from edgelink.cache.prefix import PrefixCache
from edgelink.config import Config, load_config
from edgelink.errors import EdgelinkError
from edgelink.kinds.encode import OneWay
from edgelink.kinds.prefix import prefix_tensors
from edgelink.kinds.snapshot import snapshot_tensors
from edgelink.models.resolve import resolve_model
from edgelink.models.twins import TWINS, twin_path, twin_spec
from edgelink.net.discovery import discover as _discover
from edgelink.net.endpoint import connect, parse_endpoint  # noqa: F401 - connect: part of this API
from edgelink.net.node import Node
from edgelink.net.relay import Relay
from edgelink.protocol.kinds import ApplyMode, Kind
from edgelink.protocol.ops import GenerateResult
from edgelink.protocol.signature import ModelSignature
from edgelink.roles.launcher import start_receiver, stop_receiver
from edgelink.roles.receiver import Receiver, SessionReport
from edgelink.runtime.sizing import fit_limits
from edgelink.transport.identity import load_identity
from edgelink.transport.shm import ShmListener, install_cleanup_handlers

log = logging.getLogger("edgelink")



def _cfg(cfg: Config | None) -> Config:
    return cfg if cfg is not None else load_config()


def info(model: str, cfg: Config | None = None, progress: Progress | None = None) -> ModelSignature:
    with load(model, _cfg(cfg), progress=progress) as m:
        return m.signature


def generate(model: str, prompt: str, n_tokens: int | None = None, cfg: Config | None = None,
             progress: Progress | None = None, *, cache: bool = False, cache_from: str | None = None,
             token: str | None = None) -> Generation:
    """Greedy continuation in this process: the reference a handoff must reproduce. With
    ``cache``, the prompt goes through the prefix cache (cached chunks imported, new ones stored),
    after fetching the chunks it lacks from ``cache.peers``; ``cache_from`` names the peers
    instead (shm:NAME or multiaddrs, comma-separated, or ``dht``: whoever the DHT says holds
    them; see ``Model.fetch_cache``); ``token`` for nodes that require one."""
    with load(model, _cfg(cfg), progress=progress) as m:
        t0 = time.perf_counter()
        fetched = None
        if cache_from or (cache and m.cfg.cache.peers):
            cache = True
            fetched = m.fetch_cache(prompt, cache_from, token=token)
        used = m.prefill(prompt, cache=True) if cache else None
        if used is None:
            m.prefill(prompt)
        n = len(m.tokens)
        t1 = time.perf_counter()
        g = m.generate(n_tokens)
        g.prompt_tokens, g.timings = n, {"prefill_s": t1 - t0, **g.timings}
        g.cache, g.fetch = used, fetched
        return g


def cache_stats(cfg: Config | None = None) -> dict[str, Any]:
    """The prefix cache's tiers (entries, bytes, bounds) and where its disk tier lives."""

    return PrefixCache(_cfg(cfg)).stats()


def cache_list(cfg: Config | None = None) -> list[dict[str, Any]]:
    """Every chunk of the disk tier, most recently used first; ``from`` is "self" for the
    chunks computed on this machine, else the peer they were fetched from."""

    return [{"key": k, "bytes": size, "last_used": used, "from": src}
            for k, size, used, src in PrefixCache(_cfg(cfg)).disk_chunks()]


def cache_clear(cfg: Config | None = None) -> int:
    """Remove every chunk of the disk tier, own and fetched; returns how many went."""

    return PrefixCache(_cfg(cfg)).clear()


EXPORT_KINDS = ("snapshot", "memory", "prefix")


def export(model: str, prompt: str, path: str | Path, cfg: Config | None = None,
           progress: Progress | None = None, *, kind: str = "snapshot", file_format: str = "edgelink") -> Generation:
    """Write the handshake and one tensor message about ``prompt`` to ``path``:
    ``snapshot`` (KV_CACHE of the prefilled prompt), ``memory`` (the same cells as KV_MEMORY)
    or ``prefix`` (the prompt's token-embedding rows as a VIRTUAL_PREFIX at position 0).
    The K/V tensors are encoded with ``wire.codec`` when it names a codec (``auto``: raw, as
    for any local copy); reading a lossy file back needs ``wire.allow_lossy = on``."""
    if kind not in EXPORT_KINDS:
        raise EdgelinkError(f"unknown export kind {kind!r} (choose from {', '.join(EXPORT_KINDS)})")
    if file_format == "llama":
        return _export_llama(model, prompt, path, _cfg(cfg), progress, kind)
    if file_format != "edgelink":
        raise EdgelinkError(f"unknown file format {file_format!r} (edgelink or llama)")
    cfg = _cfg(cfg)
    codec = wire.choose(cfg.wire, tuple(wire.CODECS), network=False)
    with load(model, cfg, progress=progress) as m:
        rt = m.runtime
        toks = m.tokenize(prompt, add_special=kind != "memory")
        t0 = time.perf_counter()
        if kind == "prefix":
            built, what = prefix_tensors(rt.token_embeddings().rows(toks), 0), (Kind.VIRTUAL_PREFIX, ApplyMode.APPEND)
        else:
            m.prefill(toks)
            built = snapshot_tensors(rt)
            what = (Kind.KV_MEMORY, ApplyMode.MEMORY) if kind == "memory" else (Kind.KV_CACHE, ApplyMode.OVERWRITE)
        t1 = time.perf_counter()
        msg = OneWay.encode(m.signature, fit_limits(cfg, rt), *what, built,
                            seq_slot=rt.seq, layer_range=(-1, -1) if kind == "prefix" else (0, rt.n_layer),
                            codec=codec)
        size = msg.write(path)
        t2 = time.perf_counter()
        return Generation(model, len(toks), [], "", {"prefill_s": t1 - t0, "export_s": t2 - t1},
                          {"file": size, "payload": msg.message.payload_bytes},
                          written=Written(str(path), "edgelink", msg.message.kind.name, codec or "raw"))


def _export_llama(model: str, prompt: str, path: str | Path, cfg: Config, progress: Progress | None,
                  kind: str) -> Generation:
    """``export --format llama``: a llama.cpp sequence-state file (``llama_state_seq_load_file``)."""
    if kind != "snapshot":
        raise EdgelinkError(f"a llama.cpp state file holds a sequence's cells: export --as snapshot, not {kind}")
    if cfg.wire.codec not in ("auto", "raw"):
        raise EdgelinkError("a llama.cpp state file holds raw cells: drop --wire (or use raw)")
    with load(model, cfg, progress=progress) as m:
        t0 = time.perf_counter()
        n = m.prefill(prompt)
        t1 = time.perf_counter()
        size = m.save_llama_file(path)
        return Generation(model, n, [], "", {"prefill_s": t1 - t0, "export_s": time.perf_counter() - t1},
                          {"file": size}, written=Written(str(path), "llama", "KV_CACHE", "raw"))


def import_llama(model: str, path: str | Path, *, output: str | Path | None = None, to: str | None = None,
                 n_tokens: int | None = None, token: str | None = None, cfg: Config | None = None,
                 progress: Progress | None = None) -> Generation:
    """Read a llama.cpp sequence-state file (llama-server's saved slot, ``llama_state_seq_save_file``),
    verified against ``model``, then write it as an edgelink message file (``output``) and/or
    hand it off to ``to`` (returning the peer's continuation)."""
    if output is None and to is None:
        raise EdgelinkError("import-llama needs somewhere to put the state: -o FILE and/or --to PEER")
    with load(model, _cfg(cfg), progress=progress) as m:
        t0 = time.perf_counter()
        n = m.load_llama_file(path)
        result = Generation(model, n, [], "", {"import_s": time.perf_counter() - t0}, {})
        if output is not None:
            snap = m.snapshot()
            snap.save(output)
            result.bytes["file"] = len(snap.frames)
            result.written = Written(str(output), "edgelink", "KV_CACHE", "raw")
        if to is not None:
            with m.connect(to, token=token) as peer:
                g = peer.handoff(n_tokens)
            result.tokens, result.text = g.tokens, g.text
            result.timings.update(g.timings)
            result.bytes.update(g.bytes)
            result.to, result.digest, result.wire = g.to, g.digest, g.wire
        return result


def resume(model: str, path: str | Path, n_tokens: int | None = None, cfg: Config | None = None,
           progress: Progress | None = None, *, prompt: str | None = None) -> Generation:
    """Apply every tensor message in a file written by ``export`` (verified like live
    messages, in order, through the same appliers as a receiver), optionally read ``prompt``
    after them, and continue greedily."""
    with load(model, _cfg(cfg), progress=progress) as m:
        t0 = time.perf_counter()
        payload = m.restore(path)
        if prompt:
            m.prefill(prompt)
        t1 = time.perf_counter()
        g = m.generate(n_tokens)
        g.timings = {"import_s": t1 - t0, **g.timings}
        g.bytes = {"payload": payload}
        return g


def _load_bridge(bridge: str | os.PathLike[str] | Bridge | None) -> Bridge | None:
    return load_bridge(bridge) if bridge is not None and not isinstance(bridge, Bridge) else bridge


def serve(model: str, endpoint: str, cfg: Config | None = None, *, max_sessions: int | None = None,
          on_ready: Callable[[str], None] | None = None,
          on_session: Callable[[SessionReport], None] | None = None,
          progress: Progress | None = None,
          bridge: str | os.PathLike[str] | Bridge | None = None, handle_signals: bool = False) -> None:
    """Receive sessions on ``endpoint`` (``shm:NAME``) until stopped or ``max_sessions`` end.
    With ``bridge`` (a file, trained for this model as its target; refused at startup
    otherwise) it also accepts sessions bridged from the bridge's source model.
    ``handle_signals``: remove the segment on SIGTERM/SIGHUP too (signal handlers belong to
    the program, so only a command asks for them; normal exit is always covered)."""
    cfg = _cfg(cfg)
    ep = parse_endpoint(endpoint)
    br = _load_bridge(bridge)
    with load(model, cfg, progress=progress) as m:
        receiver = Receiver(m.runtime, cfg, m.signature, bridge=br)
        listener = ShmListener(ep.address, cfg)
        if handle_signals:
            install_cleanup_handlers()
        try:
            if on_ready:
                on_ready(str(ep))
            served = 0
            while max_sessions is None or served < max_sessions:
                ch = listener.accept()
                try:
                    report = receiver.serve_channel(ch)  # never raises for a peer's bytes
                finally:
                    try:
                        ch.close()
                    except Exception:  # noqa: BLE001 - a broken channel must not end serving
                        log.exception("closing a session's channel failed")
                served += 1
                if on_session:
                    on_session(report)
        finally:
            listener.close()


def twins(cfg: Config | None = None, name: str | None = None) -> list[dict[str, Any]]:
    """The shape twins (edgelink/models/twins.py): name, the real model, its KV bytes per token and
    geometry. With ``name``, that twin's GGUF is written into the cache (if it is not there)
    and its row carries the path."""

    cfg = _cfg(cfg)
    specs = [twin_spec(name)] if name else list(TWINS.values())
    rows = []
    for spec in specs:
        row = {**dataclasses.asdict(spec), "kv_bytes_per_token": spec.kv_bytes_per_token}
        if name:
            row["path"] = str(twin_path(spec.name, cfg))
        rows.append(row)
    return rows


def discover(cfg: Config | None = None, timeout_s: float | None = None, *,
             peer_id: str | None = None) -> list:
    """libp2p peers announcing themselves with mDNS on the LAN (see edgelink.net.discovery)."""

    return _discover(_cfg(cfg), timeout_s, peer_id=peer_id)


def identity(cfg: Config | None = None, *, create: bool = True) -> dict[str, Any]:
    """This machine's persistent libp2p identity (created, mode 0600, if missing)."""

    cfg = _cfg(cfg)
    ident = load_identity(cfg.p2p.identity_key, create=create)
    return {"peer_id": ident.peer_id_str, "key_file": str(ident.path), "created": ident.created}


def node(model: str, cfg: Config | None = None, *, listen: str | None = None,
         on_ready: Callable[[dict[str, Any]], None] | None = None,
         on_session: Callable[[dict[str, Any]], None] | None = None,
         progress: Progress | None = None,
         bridge: str | os.PathLike[str] | Bridge | None = None, handle_signals: bool = False) -> None:
    """Run a libp2p node that accepts handoffs until it is shut down (see edgelink.net.node);
    ``bridge`` as for :func:`serve`. ``handle_signals``: SIGINT/SIGTERM stop it gracefully
    (for a command; a library leaves the program's handlers alone)."""

    cfg = _cfg(cfg)
    br = _load_bridge(bridge)
    path = resolve_model(model, cfg, pull=True, progress=progress)
    n = Node(path, cfg, listen=listen, on_event=on_session, bridge=br)
    try:
        if on_ready:
            relayed = {"circuit_addrs": n.circuit_addrs, "reserve_s": round(n.reserve_s, 4)} if n.circuit_addrs else {}
            if n.reachability is not None:  # what the relay's dial-back check found
                r = n.reachability
                relayed["reachability"] = {"public": r.public, "observed_ip": r.observed_ip,
                                           "checked_by": r.checked_by, "said": r.describe()}
            on_ready({"event": "ready", "peer_id": n.identity.peer_id_str, "addrs": n.addrs,
                      **relayed, **n.memory_facts()})
        n.run(install_signals=handle_signals)
    except BaseException:
        n.shutdown()
        raise


def relay(cfg: Config | None = None, *, listen: Sequence[str] = (),
          on_event: Callable[[dict[str, Any]], None] | None = None) -> Relay:
    """Start a circuit relay for peers behind NAT (docs/nat.md) on ``listen`` (default
    ``relay.listen``); ``on_event`` hears each reservation and each circuit that ends (peers,
    bytes, seconds). Returns the running ``Relay``: ``run()`` serves until SIGINT/SIGTERM."""

    cfg = _cfg(cfg)
    return Relay(cfg, load_identity(cfg.p2p.identity_key), list(listen) or [cfg.relay.listen], on_event)


def handoff(model: str, prompt: str, to: str, n_tokens: int | None = None,
            cfg: Config | None = None, *, verify: bool = False, token: str | None = None,
            progress: Progress | None = None, token_ids: bool = True) -> Generation:
    """Prefill ``prompt`` here, ship the KV snapshot to the peer at ``to``, and return the
    peer's greedy continuation. With ``verify``, also continue locally and compare.
    ``token``: a bearer token for a node that requires one (sent inside the encryption).
    ``token_ids=False``: the peer gets -1 for each token id (docs/security.md)."""
    with load(model, _cfg(cfg), progress=progress) as m, \
            m.connect(to, token=token, token_ids=token_ids) as peer:
        toks = m.tokenize(prompt)
        peer.check_room(len(toks))  # known before a long prefill, not after it
        t0 = time.perf_counter()
        m.prefill(toks)
        prefill_s = time.perf_counter() - t0
        result = peer.handoff(n_tokens)
        result.timings = {"prefill_s": prefill_s, **result.timings}
        if verify:
            local = m.generate(n_tokens).tokens
            result.verified = Verified(local, m.runtime.detokenize(local), local == result.tokens)
        return result


@dataclasses.dataclass
class Demo:
    handoff: Generation
    local_text: str
    sender_pid: int
    receiver_pid: int


def demo(model: str, prompt: str, n_tokens: int | None = None, cfg: Config | None = None, *,
         progress: Progress | None = None, log: Callable[[str], None] | None = None) -> Demo:
    """Start `edgelink serve` in a second process, hand it our KV state, and compare its
    continuation with our own: the whole idea of edgelink in one call."""
    cfg = _cfg(cfg)
    path = resolve_model(model, cfg, pull=True, progress=progress)
    name = f"demo-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    if log:
        log(f"starting receiver process on shm:{name} ...")
    proc = start_receiver(str(path), cfg, name)
    try:
        if log:
            log("handing off ...")
        g = handoff(str(path), prompt, f"shm:{name}", n_tokens, cfg, verify=True)
        g.model = model
    finally:
        stop_receiver(proc)
    return Demo(g, g.verified.text, os.getpid(), proc.pid)


@dataclasses.dataclass
class Conversation:
    model: str
    rounds: list[Round]
    same_state: bool | None  # None: sent without token ids, so the digests cannot agree
    transcript: str


def converse(model: str, turns: list[str], to: str, n_tokens: int | None = None,
             cfg: Config | None = None, *, progress: Progress | None = None,
             stop_at_eog: bool = True, token_ids: bool = True) -> Conversation:
    """A and B take turns extending one sequence: this process prefills each turn and ships
    only the new cells (a full snapshot the first time); the peer generates a reply (ending at
    its end-of-turn token unless ``stop_at_eog`` is off) and ships only its new cells back.
    Ends by comparing both sides' state digests (``same`` is None without ``token_ids``:
    the peer then holds -1 for our token ids, so the digests differ by design)."""
    if not turns:
        raise EdgelinkError("a conversation needs at least one turn")
    with load(model, _cfg(cfg), progress=progress) as m, m.connect(to, token_ids=token_ids) as peer:
        rounds = [peer.converse(text, n_tokens, stop_at_eog=stop_at_eog) for text in turns]
        same = peer.same_state() if token_ids else None
        transcript = m.runtime.detokenize([t for t in m.tokens if t >= 0])
    return Conversation(model, rounds, same, transcript)


def send_prefix(model: str, to: str, *, text: str | None = None, vectors: np.ndarray | None = None,
                n_tokens: int | None = None, reset: bool = True, energy_match: bool = False,
                cfg: Config | None = None, progress: Progress | None = None) -> Generation:
    """Feed the peer a VIRTUAL_PREFIX and return its greedy continuation.

    ``vectors`` (f32 [n, n_embd]) are sent as they are; ``text`` is turned into this model's
    token-embedding rows (the peer then continues exactly as if it had read the text).
    With ``reset`` the peer's sequence is cleared first."""
    cfg = _cfg(cfg)
    n = cfg.generate.n_tokens if n_tokens is None else n_tokens
    if (text is None) == (vectors is None):
        raise EdgelinkError("give exactly one of text or vectors")
    with load(model, cfg, progress=progress) as m:
        if vectors is None:
            vectors = m.runtime.token_embeddings().rows(m.runtime.tokenize(text))
        with m.connect(to) as peer:
            sent = peer.send_prefix(vectors, reset=reset, energy_match=energy_match)
            body = peer.generate(n)
    return Generation(model, int(vectors.shape[0]), list(body.tokens), body.text,
                      {"ship_s": sent.roundtrip_s, "remote_generate_s": body.generate_s},
                      {"payload": sent.payload_bytes, "wire": sent.wire_bytes}, to=to, digest=sent.digest)


def send_memory(model: str, to: str, text: str, *, question: str | None = None,
                n_tokens: int | None = None, cfg: Config | None = None,
                progress: Progress | None = None) -> Generation:
    """Read ``text`` here and hand its KV cells to the peer as KV_MEMORY (appended after the
    peer's own context). With ``question``, the peer then reads it and answers greedily."""
    cfg = _cfg(cfg)
    n = cfg.generate.n_tokens if n_tokens is None else n_tokens
    with load(model, cfg, progress=progress) as m:
        m.prefill(m.tokenize(text, add_special=False))
        q_tokens = m.tokenize(question, add_special=False) if question else []
        with m.connect(to) as peer:
            sent = peer.send_memory()
            body = GenerateResult(0, [], "", 0.0)
            if q_tokens:
                peer.read(q_tokens)
                body = peer.generate(n)
    return Generation(model, len(q_tokens), list(body.tokens), body.text,
                      {"ship_s": sent.roundtrip_s, "remote_generate_s": body.generate_s},
                      {"payload": sent.payload_bytes, "wire": sent.wire_bytes}, to=to, digest=sent.digest)
