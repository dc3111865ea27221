"""The receiving side of a session: verify, apply, continue, answer. Transport-agnostic."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

from edgelink import wire
from edgelink.bridge import Bridge
from edgelink.cache.prefix import PrefixCache
from edgelink.config import Config
from edgelink.errors import (
    ConfigError,
    EdgelinkError,
    InternalError,
    PeerGone,
    ProtocolError,
    SessionError,
    TransportError,
)
from edgelink.kinds.delta import delta_tensors
from edgelink.kinds.encode import encode_message
from edgelink.kinds.specs import acceptance
from edgelink.protocol.codec import PREAMBLE_BYTES, TensorHeader, tensor_message_digest
from edgelink.protocol.kinds import ApplyMode, Kind
from edgelink.protocol.limits import limit_of
from edgelink.protocol.messages import Ack, Close, Reject, Request, TensorMessage
from edgelink.protocol.ops import check_params
from edgelink.protocol.reader import FrameReader
from edgelink.protocol.session import Role, Session, State
from edgelink.protocol.signature import ModelSignature
from edgelink.runtime.llama import BATCHED_MIN, LlamaRuntime
from edgelink.runtime.sizing import fit_limits
from edgelink.transport.base import Channel

log = logging.getLogger("edgelink.roles.receiver")


def frame_limit(cfg: Config) -> int:
    """The largest frame a transport should accept: a full message plus its headers."""
    return limit_of(cfg.protocol) + cfg.protocol.max_control_bytes + 64


def hello_frame_limit(cfg: Config) -> int:
    """The largest first frame (a HELLO: preamble, header digest, a handshake body of at most
    ``protocol.max_handshake_bytes``) a listener reads before a peer has authenticated."""
    return PREAMBLE_BYTES + cfg.protocol.max_handshake_bytes + 64


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
    codec: str = ""  # the wire codec of the last tensor message applied ("raw": none)


CALIBRATION_TOKENS = 128


def calibrate_prefill(rt: LlamaRuntime) -> float:
    """Measure the runtime's prefill speed on a short made-up prompt (the faster of two runs,
    then cleared), so a fresh receiver can announce one; real prefills refine it
    (``rt.prefill_tps``)."""
    n = min(CALIBRATION_TOKENS, rt.n_batch, rt.n_ctx - 1)
    best = 0.0
    for _ in range(2 if n >= 64 else 0):
        rt.prefill_tps = 0.0
        rt.prefill([(1000 + 7 * i) % rt.n_vocab for i in range(n)])
        rt.clear()
        best = max(best, rt.prefill_tps)
    rt.prefill_tps = best
    return best


class Receiver:
    """Serves sessions on channels, one at a time, against one runtime. With a ``bridge``
    (edgelink/bridge/__init__.py, trained for this model as its target) it also accepts sessions bridged
    from the bridge's source model and applies their BRIDGED_PREFIX messages."""

    def __init__(self, rt: LlamaRuntime, cfg: Config, signature: ModelSignature,
                 bridge: Bridge | None = None, calibrate: bool = True, prefix_cache: Any = None):
        """``calibrate``: measure the prefill speed to announce now (``calibrate_prefill``),
        unless wire.prefill_tps sets it; off for a receiver that serves no live session.
        ``prefix_cache``: the PrefixCache to share (a node's, one for all of its slots); by
        default one is made on the first cache request."""
        self.rt = rt
        self.cfg = fit_limits(cfg, rt)  # message limits derived from this model unless set
        self.codecs = wire.offered(cfg.wire)  # what this receiver's HELLO lists
        if cfg.protocol.session_state not in ("clear", "keep"):
            raise ConfigError(f"protocol.session_state is {cfg.protocol.session_state!r}: clear or keep")
        self.signature = signature
        # Every kind this receiver accepts (edgelink/kinds/specs.py): its applier (which checks
        # everything before touching the runtime and leaves its state unchanged when it raises),
        # placer (tensors straight into the buffer they are imported from: protocol/reader.py),
        # cleanups and REQUEST ops. The session negotiates exactly these kinds.
        self.accepting = acceptance(rt, self.cfg, signature, bridge)
        self.appliers = self.accepting.appliers
        self.ops = self.accepting.ops
        self.bridge_claim = self.accepting.bridge_claim
        # A prefill the sender asked for in the background (a split handoff: wire/plan.py);
        # every later message of the session waits for it.
        self._cache = prefix_cache  # the shared prefix cache (cache.share), made on first request
        self._background: threading.Thread | None = None
        self._background_error: BaseException | None = None
        if calibrate and cfg.wire.prefill_tps == 0 and rt.prefill_tps == 0 and not rt.tokens:
            calibrate_prefill(rt)

    @property
    def hidden_slices(self):
        """The HIDDEN_SLICE messages this session stored (cleared when a session ends)."""
        return self.accepting.held.get(Kind.HIDDEN_SLICE)

    def prefill_tps(self) -> float:
        """The prefill speed this receiver announces (configured, else measured)."""
        return self.cfg.wire.prefill_tps or self.rt.prefill_tps

    def _join(self) -> None:
        if self._background is not None:
            self._background.join()
            self._background = None

    def _settle(self) -> None:
        """Wait for a background prefill; its failure is the failure of the message that waits."""
        self._join()
        exc, self._background_error = self._background_error, None
        if exc is not None:
            raise SessionError(f"the background prefill failed: {exc}") from exc

    def _prefill(self, params: dict[str, Any]) -> dict[str, Any]:
        rt = self.rt
        toks = list(params["tokens"])
        if max(toks) >= rt.n_vocab:
            raise SessionError(f"prefill: token id {max(toks)} outside the vocabulary of {rt.n_vocab}")
        base = 0 if params.get("replace") else len(rt.tokens)
        if base + len(toks) > rt.n_ctx:
            raise SessionError(f"{len(toks)} tokens do not fit the context")
        if params.get("replace"):
            rt.clear()
        # a handoff's prefill (replace) decodes in ubatches of 64+ tokens, so its cells are the
        # sender's bit for bit (see LlamaRuntime.batched)
        tail = BATCHED_MIN if params.get("replace") else 0
        keep = bool(params.get("replace")) and self._keeps_prefills()
        if not params.get("background"):
            rt.prefill(toks, min_tail=tail)
            if keep:
                self._keep_prefix()
            return {"context_tokens": len(rt.tokens)}

        def run() -> None:
            t0 = time.perf_counter()
            try:
                rt.prefill(toks, min_tail=tail, measure=False)  # it shares the CPU with the receive
                log.info("background prefill of %d tokens: %.2f s", len(toks), time.perf_counter() - t0)
                if keep:
                    self._keep_prefix()
            except BaseException as exc:  # noqa: BLE001 - reported to the message that waits
                self._background_error = exc

        self._background = threading.Thread(target=run, name="edgelink-prefill", daemon=True)
        self._background.start()
        return {"context_tokens": base + len(toks), "background": True}

    def _keeps_prefills(self) -> bool:
        return self.cfg.cache.keep_prefills and self.cfg.cache.share

    def _keep_prefix(self) -> None:
        """Store the whole chunks a peer's prompt filled here (cache.keep_prefills): a cache
        that cannot store costs the cache, never the session."""
        try:
            n = self._prefix_cache().keep(self.rt, self.signature)
            log.info("kept %d chunk(s) of a prefilled prompt in the prefix cache", n)
        except (EdgelinkError, OSError) as exc:
            log.warning("could not keep a prefilled prompt in the prefix cache: %s", exc)

    def _place(self, th: TensorHeader) -> dict[str, memoryview]:
        placer = self.accepting.placers.get(th.kind)
        if placer is None:
            return {}
        self._join()  # a placer prepares buffers for the runtime: not while it prefills
        return placer(th)

    def _recv(self, ch: Channel, reader: FrameReader, limit: int, timeout: float | None = None):
        """The next frame: into ``reader`` where the transport can scatter, else whole."""
        recv_into = getattr(ch, "recv_into", None)
        if recv_into is None:
            frame = ch.recv(limit, timeout)
            return frame, frame.nbytes
        return reader, recv_into(reader, limit, timeout)

    def serve_channel(self, ch: Channel) -> SessionReport:
        """Run one session to its end. Whatever the peer sends, this returns a report (it
        never raises for a peer's bytes), and the sequence the session built is cleared at
        the end, so no later session, whoever its peer, can read or continue it."""
        reader = FrameReader(self.cfg.protocol, self._place)
        report = SessionReport()
        try:
            return self._serve(ch, reader, report)
        finally:
            self._join()
            self._background_error = None
            if self.cfg.protocol.session_state != "keep":
                self.rt.clear()
                for forget in self.accepting.forget:
                    forget()
            if report.rejected or report.ended_by != "close":
                # A message that was cut off or refused must not leave its gigabyte behind:
                # buffers it filled are given back (a later one faults them in again).
                reader.release()
                for release in self.accepting.release:
                    release()

    def _serve(self, ch: Channel, reader: FrameReader, report: SessionReport) -> SessionReport:
        session = Session(Role.SERVER, self.signature, self.cfg.protocol, kinds=tuple(self.appliers),
                          pipeline=self.cfg.cache.fetch_window,
                          codecs=self.codecs, prefill_tps=self.prefill_tps(),
                          encryption=getattr(ch, "encryption", None), bridge=self.bridge_claim)
        limit = frame_limit(self.cfg)
        try:
            if not self._handshake(ch, reader, session, limit, report):
                return report
            while session.state is not State.CLOSED:
                frame, n = self._recv(ch, reader, limit, self.cfg.protocol.idle_timeout_s)
                report.bytes_in += n
                if self._answer(ch, session, frame, limit, report):
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
            self._last_words(ch, session, exc)
        except Exception as exc:  # noqa: BLE001 - end this session, never the process
            log.exception("internal error: session ended")
            report.rejected.append(InternalError.code)
            report.ended_by = InternalError.code
            self._last_words(ch, session, InternalError(f"internal error: {type(exc).__name__}"))
        return report

    def _handshake(self, ch: Channel, reader: FrameReader, session: Session, limit: int,
                   report: SessionReport) -> bool:
        """The peer's HELLO, answered by ours or refused; whether the session goes on."""
        frame, n = self._recv(ch, reader, limit)
        report.bytes_in += n
        try:
            hello = session.receive(frame)
        except EdgelinkError as exc:
            log.warning("handshake rejected: %s", exc)
            report.rejected.append(exc.code)
            report.ended_by = "handshake"
            ch.send(session.reject(0, exc))
            return False
        report.peer_role = hello.role
        report.bridged = session.bridged
        ch.send(session.hello())
        return True

    def _answer(self, ch: Channel, session: Session, frame: bytes | memoryview, limit: int,
                report: SessionReport) -> bool:
        """One frame of an open session, answered; whether the session ended. A typed refusal
        is a REJECT (fatal ones end the session); a fault of ours is an internal REJECT."""
        try:
            t0 = time.perf_counter()
            msg = session.receive(frame)
            self._settle()
            if isinstance(msg, Close):
                report.ended_by = "close"
                return True
            if isinstance(msg, TensorMessage):
                self._apply(ch, session, msg, limit, report, t0)
            elif isinstance(msg, Request):
                self._request_frame(ch, session, msg, report)
            elif isinstance(msg, Ack):
                log.info("peer applied our message %d", msg.acked_id)
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
                return True
        except Exception as exc:  # noqa: BLE001 - a peer must never kill the receiver
            # A fault of ours, not a typed refusal. Every applier restores the sequence
            # on any exception, so the state is as before the message; the session
            # goes on, and the peer learns the message was not applied.
            log.exception("internal error while handling message %d", session.last_seen_id)
            report.rejected.append(InternalError.code)
            ch.send(session.reject(session.last_seen_id, InternalError(
                f"internal error while handling message {session.last_seen_id}: "
                f"{type(exc).__name__}; nothing was applied")))
        return False

    def _apply(self, ch: Channel, session: Session, msg: TensorMessage, limit: int, report: SessionReport,
               t0: float) -> None:
        """A tensor message decoded (wire codec), applied all or nothing, and acknowledged."""
        t1 = time.perf_counter()
        digest = tensor_message_digest(msg)  # of what was sent, encoded or not
        coded = msg.attrs.get("wire")
        msg = wire.decode_message(msg, self.codecs, limit_of(self.cfg.protocol), self._place,
                                  threads=self.cfg.wire.threads)
        codec_used = coded["codec"] if coded is not None else "raw"  # checked by the decode
        t2 = time.perf_counter()
        self.appliers[msg.kind](msg)
        report.applied += 1
        report.codec = codec_used
        ch.send(session.ack(msg, digest))
        log.info("applied %s message %d (%d bytes; waited %.1f ms for a background prefill, "
                 "decoded in %.1f ms, applied in %.1f ms)", msg.kind.name, msg.message_id,
                 msg.payload_bytes, 1e3 * (t1 - t0), 1e3 * (t2 - t1), 1e3 * (time.perf_counter() - t2))

    def _request_frame(self, ch: Channel, session: Session, msg: Request, report: SessionReport) -> None:
        """A REQUEST, its params checked: answered by a tensor message (delta, cache_get) or a RESULT."""
        msg = dataclasses.replace(msg, params=check_params(msg.op, msg.params))
        if msg.op == "delta":
            self._send_delta(ch, session, msg)
        elif msg.op == "cache_get":
            self._send_chunk(ch, session, msg)
        else:
            body = self._request(msg, ch)
            report.generated += len(body.get("tokens", []))
            ch.send(session.result(msg, body))

    @staticmethod
    def _last_words(ch: Channel, session: Session, exc: EdgelinkError) -> None:
        """A REJECT for a session that is ending anyway (the channel may already be gone)."""
        try:
            ch.send(session.reject(-1, exc))
        except Exception:  # noqa: BLE001 - best effort
            pass

    def _send_delta(self, ch: Channel, session: Session, req: Request) -> None:
        """Answer REQUEST(delta, since) with the cells this side added from ``since`` on."""
        since = req.params["since"]
        parts, _ = encode_message(session, Kind.KV_CACHE_DELTA, ApplyMode.APPEND, delta_tensors(self.rt, since),
                                  seq_slot=self.rt.seq, layer_range=(0, self.rt.n_layer))
        ch.send(*parts)

    def _prefix_cache(self):
        """The prefix cache this receiver shares (cache.share), made on first use."""
        if not self.cfg.cache.share:
            raise SessionError("this receiver does not share its prefix cache (cache.share = off)")
        if self._cache is None:
            self._cache = PrefixCache(self.cfg)
        return self._cache

    def _send_chunk(self, ch: Channel, session: Session, req: Request) -> None:
        """Answer REQUEST(cache_get, key) with that chunk, verified here first, encoded with
        the codec the peer takes over a network link."""
        msg = self._prefix_cache().chunk_message(self.rt, self.signature, req.params["key"].hex(),
                                                 window=req.params.get("window", True))
        codec = wire.choose(self.cfg.wire, session.peer.codecs if session.peer else (),
                            getattr(ch, "link", "local") == "network")
        parts, _ = encode_message(session, Kind.KV_CACHE_DELTA, ApplyMode.APPEND,
                                  (list(msg.tensors), dict(msg.attrs), msg.token_range), seq_slot=self.rt.seq,
                                  layer_range=msg.layer_range, codec=codec, effort=wire.effort(self.cfg.wire))
        ch.send(*parts)

    def _request(self, req: Request, ch: Channel | None = None) -> dict[str, Any]:
        rt = self.rt
        if req.op == "cache_has":
            return {"held": self._prefix_cache().held([k.hex() for k in req.params["keys"]], for_peer=True),
                    "context_tokens": len(rt.tokens)}
        if req.op == "generate":
            n = req.params["n_tokens"]
            room = rt.n_ctx - len(rt.tokens)
            if n > room:
                raise SessionError(f"{n} tokens do not fit: {room} positions left in the context")
            t0 = time.perf_counter()
            # A client that went away (Ctrl-C, killed) stops the generation within a token:
            # nobody would read the reply, and the next client is waiting.
            gone = getattr(ch, "peer_gone", None)
            tokens = rt.generate(n, stop_at_eog=req.params.get("stop_at_eog", True), cancelled=gone)
            if gone is not None and gone():
                raise PeerGone(f"the client went away after {len(tokens)} of {n} generated tokens")
            dt = time.perf_counter() - t0
            return {"tokens": tokens, "text": rt.detokenize(tokens), "generate_s": dt,
                    "context_tokens": len(rt.tokens)}
        if req.op == "digest":
            return {"digest": rt.state_digest(), "context_tokens": len(rt.tokens)}
        if req.op == "reset":
            rt.clear()
            return {"context_tokens": 0}
        if req.op == "prefill":
            return self._prefill(req.params)
        if req.op == "probe":
            return {"bytes": len(req.params["pad"]), "context_tokens": len(rt.tokens)}
        if req.op in self.ops:
            return self.ops[req.op](req.params)
        raise SessionError(f"unknown request {req.op!r}")

