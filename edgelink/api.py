"""The Python API: everything the CLI does, as functions returning dataclasses.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgelink.config import Config, load_config
from edgelink.endpoint import parse_endpoint
from edgelink.errors import EdgelinkError
from edgelink.launcher import start_receiver, stop_receiver
from edgelink.protocol.kinds import ApplyMode, Kind
from edgelink.protocol.messages import TensorMessage
from edgelink.protocol.session import Role, Session
from edgelink.receiver import Receiver, SessionReport, frame_limit
from edgelink.registry import resolve_model
from edgelink.runtime.llama import LlamaRuntime
from edgelink.sender import Sender
from edgelink.signature import ModelSignature, model_signature
from edgelink.snapshot import SnapshotApplier, snapshot_tensors
from edgelink.transport.file import FileChannelReader, FileChannelWriter
from edgelink.transport.shm import ShmListener, install_cleanup_handlers
from edgelink.transport.shm import connect as shm_connect

log = logging.getLogger("edgelink")

Progress = Callable[[str, int, int], None]


@dataclasses.dataclass
class Generation:
    """Tokens and text from a greedy continuation, with where the time and bytes went."""

    model: str
    prompt_tokens: int
    tokens: list[int]
    text: str
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _cfg(cfg: Config | None) -> Config:
    return cfg if cfg is not None else load_config()


def load_runtime(model: str, cfg: Config | None = None, progress: Progress | None = None) -> LlamaRuntime:
    """A runtime for a registry name or a path to a .gguf file (pulled into the cache if needed)."""
    cfg = _cfg(cfg)
    return LlamaRuntime(resolve_model(model, cfg, pull=True, progress=progress), cfg)


def info(model: str, cfg: Config | None = None, progress: Progress | None = None) -> ModelSignature:
    cfg = _cfg(cfg)
    with load_runtime(model, cfg, progress) as rt:
        return model_signature(rt, cfg)


def generate(model: str, prompt: str, n_tokens: int | None = None, cfg: Config | None = None,
             progress: Progress | None = None) -> Generation:
    """Greedy continuation in this process: the reference a handoff must reproduce."""
    cfg = _cfg(cfg)
    n = cfg.generate.n_tokens if n_tokens is None else n_tokens
    with load_runtime(model, cfg, progress) as rt:
        toks = rt.tokenize(prompt)
        t0 = time.perf_counter()
        rt.prefill(toks)
        t1 = time.perf_counter()
        out = rt.generate(n)
        t2 = time.perf_counter()
        return Generation(model, len(toks), out, rt.detokenize(out),
                          {"prefill_s": t1 - t0, "generate_s": t2 - t1})


def _file_session(rt: LlamaRuntime, cfg: Config, role: Role) -> Session:
    return Session(role, model_signature(rt, cfg).to_dict(), cfg.protocol, kinds=(Kind.KV_CACHE,))


def export(model: str, prompt: str, path: str | Path, cfg: Config | None = None,
           progress: Progress | None = None) -> Generation:
    """Prefill ``prompt`` and write the handshake and KV snapshot frames to ``path``."""

    cfg = _cfg(cfg)
    with load_runtime(model, cfg, progress) as rt:
        toks = rt.tokenize(prompt)
        t0 = time.perf_counter()
        rt.prefill(toks)
        t1 = time.perf_counter()
        session = _file_session(rt, cfg, Role.CLIENT)
        hello = session.hello()
        session.assume_peer_accepts()
        tensors, attrs, token_range = snapshot_tensors(rt)
        parts, msg = session.encode_tensor_message(Kind.KV_CACHE, ApplyMode.OVERWRITE, tensors,
                                                   seq_slot=rt.seq, layer_range=(0, rt.n_layer),
                                                   token_range=token_range, attrs=attrs)
        with FileChannelWriter(path) as w:
            w.send(hello)
            w.send(*parts)
        t2 = time.perf_counter()
        size = Path(path).stat().st_size
        return Generation(model, len(toks), [], "", {"prefill_s": t1 - t0, "export_s": t2 - t1},
                          {"file": size, "payload": msg.payload_bytes})


def resume(model: str, path: str | Path, n_tokens: int | None = None, cfg: Config | None = None,
           progress: Progress | None = None) -> Generation:
    """Load a snapshot file written by ``export`` (verified like a live message) and continue."""
    cfg = _cfg(cfg)
    n = cfg.generate.n_tokens if n_tokens is None else n_tokens
    with load_runtime(model, cfg, progress) as rt:
        session = _file_session(rt, cfg, Role.SERVER)
        t0 = time.perf_counter()
        with FileChannelReader(path) as r:
            session.receive(r.recv(frame_limit(cfg)))  # the writer's HELLO: signature checked
            msg = session.receive(r.recv(frame_limit(cfg)))
            if not isinstance(msg, TensorMessage):
                raise EdgelinkError(f"{path}: second frame is {msg.frame_type.name}, not a tensor message")
            SnapshotApplier(rt).apply(msg)
        t1 = time.perf_counter()
        out = rt.generate(n)
        t2 = time.perf_counter()
        return Generation(model, len(rt.tokens) - len(out), out, rt.detokenize(out),
                          {"import_s": t1 - t0, "generate_s": t2 - t1},
                          {"payload": msg.payload_bytes})


def serve(model: str, endpoint: str, cfg: Config | None = None, *, max_sessions: int | None = None,
          on_ready: Callable[[str], None] | None = None,
          on_session: Callable[[SessionReport], None] | None = None,
          progress: Progress | None = None) -> None:
    """Receive sessions on ``endpoint`` (``shm:NAME``) until stopped or ``max_sessions`` end."""
    cfg = _cfg(cfg)
    ep = parse_endpoint(endpoint)
    with load_runtime(model, cfg, progress) as rt:
        receiver = Receiver(rt, cfg, model_signature(rt, cfg).to_dict())
        listener = ShmListener(ep.address, cfg)
        install_cleanup_handlers()
        try:
            if on_ready:
                on_ready(str(ep))
            served = 0
            while max_sessions is None or served < max_sessions:
                ch = listener.accept()
                try:
                    report = receiver.serve_channel(ch)
                finally:
                    ch.close()
                served += 1
                if on_session:
                    on_session(report)
        finally:
            listener.close()


def connect(endpoint: str, cfg: Config | None = None):
    """A raw channel to a serving peer (for tools and tests that speak the protocol directly)."""
    cfg = _cfg(cfg)
    ep = parse_endpoint(endpoint)
    return shm_connect(ep.address, cfg)


def handoff(model: str, prompt: str, to: str, n_tokens: int | None = None,
            cfg: Config | None = None, *, verify: bool = False,
            progress: Progress | None = None) -> Generation:
    """Prefill ``prompt`` here, ship the KV snapshot to the peer at ``to``, and return the
    peer's greedy continuation. With ``verify``, also continue locally and compare."""
    cfg = _cfg(cfg)
    n = cfg.generate.n_tokens if n_tokens is None else n_tokens
    with load_runtime(model, cfg, progress) as rt:
        signature = model_signature(rt, cfg).to_dict()
        toks = rt.tokenize(prompt)
        t0 = time.perf_counter()
        rt.prefill(toks)
        t1 = time.perf_counter()
        sender = Sender(connect(to, cfg), cfg, signature)
        try:
            t2 = time.perf_counter()
            sender.handshake()
            t3 = time.perf_counter()
            sent = sender.send_snapshot(rt)
            body = sender.request("generate", n_tokens=n)
        finally:
            sender.close()
        result = Generation(
            model, len(toks), list(body["tokens"]), body["text"],
            {"prefill_s": t1 - t0, "handshake_s": t3 - t2, "export_s": sent.export_s,
             "snapshot_roundtrip_s": sent.roundtrip_s, "remote_generate_s": body["generate_s"]},
            {"payload": sent.payload_bytes, "wire": sent.wire_bytes},
            {"digest": sent.digest, "to": to},
        )
        if verify:
            local = rt.generate(n)
            result.extra["local_tokens"] = local
            result.extra["local_text"] = rt.detokenize(local)
            result.extra["matches_local"] = local == result.tokens
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
    g.extra.pop("local_tokens")
    return Demo(g, g.extra.pop("local_text"), os.getpid(), proc.pid)
