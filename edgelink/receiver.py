"""The receiving side of a session: verify, apply, continue, answer. Transport-agnostic."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from edgelink.bridge import Bridge
from edgelink.config import Config
from edgelink.errors import EdgelinkError, ProtocolError, SessionError, TransportError
from edgelink.latent.bridged import register_bridged
from edgelink.latent.delta import DeltaApplier, delta_tensors
from edgelink.latent.memory import MemoryApplier
from edgelink.latent.prefix import PrefixApplier
from edgelink.protocol.codec import tensor_message_digest
from edgelink.protocol.kinds import ApplyMode, Kind
from edgelink.protocol.messages import Ack, Close, Reject, Request, TensorMessage
from edgelink.protocol.session import Role, Session, State
from edgelink.runtime.llama import LlamaRuntime
from edgelink.snapshot import SnapshotApplier
from edgelink.transport.base import Channel

log = logging.getLogger("edgelink.receiver")


def frame_limit(cfg: Config) -> int:
    """The largest frame a transport should accept: a full message plus its headers."""
    return cfg.protocol.max_message_bytes + cfg.protocol.max_control_bytes + 64


@dataclasses.dataclass
class SessionReport:
    """What happened in one served session (for logs, tests and `serve --json`)."""

    peer_role: str = ""
    applied: int = 0
    rejected: list[str] = dataclasses.field(default_factory=list)
    generated: int = 0
    bytes_in: int = 0
    ended_by: str = ""
    bridged: bool = False  # the session ran through this receiver's bridge (another model)


class Receiver:
    """Serves sessions on channels, one at a time, against one runtime. With a ``bridge``
    (edgelink/bridge.py, trained for this model as its target) it also accepts sessions bridged
    from the bridge's source model and applies their BRIDGED_PREFIX messages."""

    def __init__(self, rt: LlamaRuntime, cfg: Config, signature: dict[str, Any],
                 bridge: Bridge | None = None):
        self.rt = rt
        self.cfg = cfg
        self.signature = signature
        snapshot = SnapshotApplier(rt)
        # One applier per message kind this receiver accepts; the session negotiates exactly
        # these kinds. Each applier checks everything before touching the runtime and leaves
        # its state unchanged when it raises.
        self.appliers: dict[Kind, Callable[[TensorMessage], None]] = {
            Kind.KV_CACHE: snapshot.apply,
            Kind.KV_CACHE_DELTA: DeltaApplier(rt).apply,
            Kind.VIRTUAL_PREFIX: PrefixApplier(rt, rt.token_embeddings()).apply,
            Kind.KV_MEMORY: MemoryApplier(rt).apply,
        }
        # Extra REQUEST ops (name -> handler(params) -> result body), e.g. "latent_caps".
        self.ops: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}
        # HIDDEN_SLICE (always) and RESIDUAL_PATCH (only with the eval hook): edgelink/latent.
        from edgelink.latent.receive import register_latent

        register_latent(self)
        # BRIDGED_PREFIX (only with a bridge) and the label_scores request: edgelink/latent.
        self.bridge_claim: dict[str, str] | None = None
        register_bridged(self, bridge)

    def serve_channel(self, ch: Channel) -> SessionReport:
        report = SessionReport()
        session = Session(Role.SERVER, self.signature, self.cfg.protocol, kinds=tuple(self.appliers),
                          encryption=getattr(ch, "encryption", None), bridge=self.bridge_claim)
        limit = frame_limit(self.cfg)
        try:
            frame = ch.recv(limit)
            report.bytes_in += frame.nbytes
            try:
                hello = session.receive(frame)
            except EdgelinkError as exc:
                log.warning("handshake rejected: %s", exc)
                report.rejected.append(exc.code)
                report.ended_by = "handshake"
                ch.send(session.reject(0, exc))
                return report
            report.peer_role = hello.role
            report.bridged = session.bridged
            ch.send(session.hello())
            while session.state is not State.CLOSED:
                frame = ch.recv(limit, timeout=self.cfg.protocol.idle_timeout_s)
                report.bytes_in += frame.nbytes
                try:
                    msg = session.receive(frame)
                    if isinstance(msg, Close):
                        report.ended_by = "close"
                        break
                    if isinstance(msg, TensorMessage):
                        t0 = time.perf_counter()
                        self.appliers[msg.kind](msg)
                        report.applied += 1
                        ch.send(session.ack(msg, tensor_message_digest(msg)))
                        log.info("applied %s message %d (%d bytes, %.1f ms)", msg.kind.name,
                                 msg.message_id, msg.payload_bytes, 1e3 * (time.perf_counter() - t0))
                    elif isinstance(msg, Request) and msg.op == "delta":
                        self._send_delta(ch, session, msg)  # answered by a tensor message
                    elif isinstance(msg, Ack):
                        log.info("peer applied our message %d", msg.acked_id)
                    elif isinstance(msg, Request):
                        body = self._request(msg)
                        report.generated += len(body.get("tokens", []))
                        ch.send(session.result(msg, body))
                    elif isinstance(msg, Reject):
                        log.info("peer rejected message %d: %s", msg.about_id, msg.code)
                    else:
                        raise SessionError(f"unexpected {msg.frame_type.name} from the sender")
                except EdgelinkError as exc:
                    if isinstance(exc, TransportError):
                        raise
                    log.warning("rejected a message: %s", exc)
                    report.rejected.append(exc.code)
                    ch.send(session.reject(session.last_seen_id, exc))
                    if session.state is State.CLOSED:
                        report.ended_by = "fatal"
                        break
        except TransportError as exc:
            log.warning("session ended by the transport: %s", exc)
            report.ended_by = exc.code
        except ProtocolError as exc:
            # The transport refused a frame (for example a declared length over the limit)
            # before reading it: the stream is out of step, so refuse and end the session.
            log.warning("refused a frame: %s", exc)
            report.rejected.append(exc.code)
            report.ended_by = exc.code
            try:
                ch.send(session.reject(-1, exc))
            except EdgelinkError:
                pass
        return report

    def _send_delta(self, ch: Channel, session: Session, req: Request) -> None:
        """Answer REQUEST(delta, since) with the cells this side added from ``since`` on."""
        since = req.params.get("since")
        if not isinstance(since, int) or isinstance(since, bool):
            raise SessionError("delta needs an integer 'since'")
        tensors, attrs, token_range = delta_tensors(self.rt, since)
        parts, _ = session.encode_tensor_message(
            Kind.KV_CACHE_DELTA, ApplyMode.APPEND, tensors, seq_slot=self.rt.seq,
            layer_range=(0, self.rt.n_layer), token_range=token_range, attrs=attrs)
        ch.send(*parts)

    def _request(self, req: Request) -> dict[str, Any]:
        rt = self.rt
        if req.op == "generate":
            n = req.params.get("n_tokens")
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise SessionError("generate needs a non-negative integer n_tokens")
            room = rt.n_ctx - len(rt.tokens)
            if n > room:
                raise SessionError(f"{n} tokens do not fit: {room} positions left in the context")
            t0 = time.perf_counter()
            tokens = rt.generate(n, stop_at_eog=bool(req.params.get("stop_at_eog", True)))
            dt = time.perf_counter() - t0
            return {"tokens": tokens, "text": rt.detokenize(tokens), "generate_s": dt,
                    "context_tokens": len(rt.tokens)}
        if req.op == "digest":
            return {"digest": rt.state_digest(), "context_tokens": len(rt.tokens)}
        if req.op == "reset":
            rt.clear()
            return {"context_tokens": 0}
        if req.op == "prefill":
            toks = req.params.get("tokens")
            if not isinstance(toks, list) or not toks or not all(
                    isinstance(t, int) and not isinstance(t, bool) and 0 <= t < rt.n_vocab for t in toks):
                raise SessionError("prefill needs a non-empty list of token ids in the vocabulary")
            if len(rt.tokens) + len(toks) > rt.n_ctx:
                raise SessionError(f"{len(toks)} tokens do not fit the context")
            rt.prefill(toks)
            return {"context_tokens": len(rt.tokens)}
        if req.op in self.ops:
            return self.ops[req.op](req.params)
        raise SessionError(f"unknown request {req.op!r}")

