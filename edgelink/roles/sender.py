"""The sending side of a session: handshake, ship a snapshot, ask for a continuation."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from edgelink import wire
from edgelink.config import Config
from edgelink.errors import (
    ChecksumMismatch,
    EdgelinkError,
    PeerGone,
    PeerRejected,
    SessionError,
    StateError,
)
from edgelink.kinds.bridged import NO_RANGE, bridged_tensors
from edgelink.kinds.delta import DeltaApplier, delta_tensors
from edgelink.kinds.encode import encode_message
from edgelink.kinds.hidden import HiddenSlice
from edgelink.kinds.memory import memory_tensors
from edgelink.kinds.patch import ResidualPatch
from edgelink.kinds.prefix import prefix_tensors
from edgelink.kinds.snapshot import VIRTUAL_TOKEN, state_message_tensors
from edgelink.protocol.codec import tensor_message_digest
from edgelink.protocol.kinds import ApplyMode, Kind
from edgelink.protocol.messages import Ack, Reject, Result, TensorMessage
from edgelink.protocol.ops import OpResult, check_result
from edgelink.protocol.session import Role, Session, State
from edgelink.protocol.signature import ModelSignature
from edgelink.roles.receiver import frame_limit
from edgelink.runtime.kvstate import bytes_from_position, parse_seq_state
from edgelink.runtime.llama import LlamaRuntime
from edgelink.transport.base import Channel
from edgelink.wire.plan import SPLIT_MIN, Link, Plan, choose_plan

log = logging.getLogger(__name__)



@dataclasses.dataclass
class SentMessage:
    message_id: int
    payload_bytes: int
    wire_bytes: int
    digest: str
    export_s: float
    roundtrip_s: float
    codec: str = "raw"  # how the K/V tensors travelled (edgelink/wire)
    # A split handoff (wire/plan.py): the leading tokens the receiver prefilled itself; and
    # whether it was refused (its cells differed) so that the whole state followed.
    split: int = 0
    fallback: bool = False
    predicted_s: float | None = None  # what the plan expected, when a plan was made
    link: Link | None = None  # the link as measured for the plan
    path: str | None = None  # over libp2p: "direct" or "relayed" (through a circuit relay)

    def wire_facts(self) -> WireFacts:
        """How the state travelled, for reports."""
        link = self.link
        return WireFacts(self.codec, self.path, self.split, self.fallback,
                         None if link is None else round(8e-6 * link.bytes_per_s, 1),
                         None if link is None else round(1e3 * link.rtt_s, 2),
                         None if self.predicted_s is None else round(self.predicted_s, 3))


@dataclasses.dataclass(frozen=True)
class WireFacts:
    """How a handoff's state travelled: the codec, the libp2p path ("direct" or "relayed"), a
    split (leading tokens the receiver prefilled itself; ``fallback``: refused, so the whole
    state followed), the link as measured for the plan, and what the plan predicted."""

    codec: str
    path: str | None = None
    split: int = 0
    fallback: bool = False
    link_mbit: float | None = None
    rtt_ms: float | None = None
    predicted_s: float | None = None


class Sender:
    """A client session over one channel."""

    def __init__(self, ch: Channel, cfg: Config, signature: ModelSignature,
                 kinds: tuple[Kind, ...] = tuple(Kind), auth: dict[str, Any] | None = None,
                 bridge: dict[str, str] | None = None, token_ids: bool = True):
        """``bridge``: a bridge claim (``bridge_claim`` in kinds/bridged.py) to open a bridged
        session with a receiver that runs the bridge's target model. ``token_ids=False``: state
        messages carry -1 for every token id (docs/security.md, "Without token ids"): the
        receiver continues from the cells and logits, but cannot prefill our text itself, so
        no handoff splits, and deltas, which name the tokens they extend, are not sent."""
        self.ch = ch
        self.cfg = cfg
        self.token_ids = token_ids
        # A network channel knows the end-to-end scheme it negotiated; both HELLOs carry it.
        # codecs: what we take as a receiver of the peer's tensor messages (pulled deltas,
        # prefix-cache chunks)
        self.session = Session(Role.CLIENT, signature, cfg.protocol, kinds=kinds,
                               encryption=getattr(ch, "encryption", None), auth=auth, bridge=bridge,
                               codecs=wire.offered(cfg.wire))
        self._limit = frame_limit(cfg)
        self.codec: str | None = None  # the wire codec (edgelink/wire), settled at the handshake
        self.link: Link | None = None  # measured by the first handoff that plans (wire/plan.py)

    def handshake(self) -> None:
        self.ch.send(self.session.hello())
        hello = self.session.receive(self.ch.recv(self._limit))  # raises PeerRejected / SignatureMismatch
        try:
            self.codec = wire.choose(self.cfg.wire, hello.codecs, getattr(self.ch, "link", "local") == "network")
        except EdgelinkError:
            self.close()  # nothing can be sent: end the session now rather than leave it idle
            raise

    def _reply(self):
        msg = self.session.receive(self.ch.recv(self._limit, timeout=self.cfg.protocol.reply_timeout_s))
        if isinstance(msg, Reject):
            raise PeerRejected(msg.code, msg.detail)
        return msg

    def send_snapshot(self, rt: LlamaRuntime) -> SentMessage:
        """Export the runtime's sequence, ship it and wait for the receiver's verified ACK.
        Over a network link this follows a plan (wire/plan.py): the codec, and perhaps a split
        in which the receiver prefills the first tokens itself, that the link's measured rate
        and the receiver's announced prefill speed say reach the receiver's ACK soonest."""
        t0 = time.perf_counter()
        if not rt.tokens or rt.logits is None:
            raise StateError("the sequence is empty: prefill a prompt first")
        planning = self._planning(rt)
        if planning is not None and self.link is None:
            # measure the link while llama.cpp exports (the probe only waits on the network)
            with ThreadPoolExecutor(1, thread_name_prefix="edgelink-probe") as pool:
                probing = pool.submit(self.measure_link)
                full = parse_seq_state(rt.export_state())
                probing.result()
        else:
            full = parse_seq_state(rt.export_state())
        plan = self._plan(rt, planning, bytes_from_position(full)) if planning is not None else None
        whole = (*state_message_tensors(rt, full, self.shown(rt.tokens)), (0, len(rt.tokens)))
        if plan is None:
            return self._ship(rt.seq, (0, rt.n_layer), Kind.KV_CACHE, ApplyMode.OVERWRITE, whole, t0)
        if plan.split == len(rt.tokens):
            sent = self._send_text(rt, plan, t0)
            if sent is not None:
                return sent
            log.warning("the receiver's prefill of the text differs from ours; sending the whole state")
            sent = self._ship(rt.seq, (0, rt.n_layer), Kind.KV_CACHE, ApplyMode.OVERWRITE, whole, t0,
                              codec=self.codec)
            return dataclasses.replace(sent, split=plan.split, fallback=True, predicted_s=plan.seconds,
                                       link=self.link)
        if plan.split:
            try:
                sent = self._ship(rt.seq, (0, rt.n_layer), Kind.KV_CACHE_DELTA, ApplyMode.APPEND,
                                  delta_tensors(rt, plan.split, verify_base=True, state=full), t0,
                                  codec=plan.codec, before=self._start_prefill(rt.tokens[:plan.split]))
                return dataclasses.replace(sent, split=plan.split, predicted_s=plan.seconds, link=self.link)
            except PeerRejected as exc:
                # Its own cells differed from ours (or its prefill failed): the whole state
                # follows, which replaces whatever it holds.
                log.warning("split handoff refused (%s); sending the whole state", exc)
                sent = self._ship(rt.seq, (0, rt.n_layer), Kind.KV_CACHE, ApplyMode.OVERWRITE, whole, t0,
                                  codec=plan.codec)
                return dataclasses.replace(sent, split=plan.split, fallback=True, predicted_s=plan.seconds,
                                           link=self.link)
        sent = self._ship(rt.seq, (0, rt.n_layer), Kind.KV_CACHE, ApplyMode.OVERWRITE, whole, t0,
                          codec=plan.codec)
        return dataclasses.replace(sent, predicted_s=plan.seconds, link=self.link)

    def _send_text(self, rt: LlamaRuntime, plan: Plan, t0: float) -> SentMessage | None:
        """The text plan: the receiver replaces its sequence by prefilling our tokens; then its
        state digest must be ours (cells, tokens, logits), else None (nothing is lost: the
        caller sends the whole state, which replaces it)."""
        frame = self.session.request("prefill", {"tokens": rt.tokens, "replace": True})
        t1 = time.perf_counter()
        self.ch.send(frame)
        check_result("prefill", self._result())
        mine = rt.state_digest()
        if self.request("digest").digest != mine:
            return None
        return SentMessage(-1, 0, len(frame), mine, t1 - t0, time.perf_counter() - t0, "tokens",
                            split=plan.split, predicted_s=plan.seconds, link=self.link)

    def _result(self) -> dict[str, Any]:
        res = self._reply()
        if not isinstance(res, Result):
            raise SessionError(f"expected a RESULT, got {res.frame_type.name}")
        return res.body

    def _start_prefill(self, tokens: list[int]) -> int:
        """Ask the receiver to replace its sequence by ``tokens``, prefilled in the background
        while our KV for the rest travels. Returns the replies this leaves outstanding (1)."""
        self.ch.send(self.session.request("prefill", {"tokens": tokens, "background": True, "replace": True}))
        return 1

    def _planning(self, rt: LlamaRuntime) -> tuple[list[str | None], int] | None:
        """What a handoff's plan may choose from (codecs, the longest split), or None where
        there is nothing to plan: not a network link, or a fixed codec without splitting."""
        w = self.cfg.wire
        peer = self.session.peer
        if getattr(self.ch, "link", "local") != "network" or peer is None:
            return None
        can_split = (self.token_ids and w.split == "auto" and peer.prefill_tps > 0 and Kind.KV_CACHE_DELTA in self.session.negotiated_kinds
                     and rt.batched >= SPLIT_MIN)
        options = wire.candidates(w, peer.codecs, self.codec)
        if len(options) < 2 and not can_split:
            return None
        return options, rt.batched if can_split else 0

    def _plan(self, rt: LlamaRuntime, planning: tuple[list[str | None], int],
              shipped_from: Callable[[int], int]) -> Plan | None:
        """The handoff's plan (None without a way to know the link's rate)."""
        link = self.measure_link()
        if link is None:
            return None
        options, max_split = planning
        prefill_tps = self.session.peer.prefill_tps
        plan = choose_plan(len(rt.tokens), shipped_from, options, link, prefill_tps, max_split)
        log.info("handoff plan: %s (%.2f s predicted; link %.1f Mbit/s, rtt %.1f ms; receiver %.0f tokens/s)",
                 plan.describe(len(rt.tokens)), plan.seconds, 8e-6 * link.bytes_per_s, 1e3 * link.rtt_s,
                 prefill_tps)
        return plan

    def measure_link(self) -> Link | None:
        """The link's rate and round trip, measured once per session (or ``wire.link_mbit``
        when set): an empty probe gives the round trip; a probe of a quarter of
        ``wire.probe_bytes`` then drains whatever burst a shaper allows and opens TCP's window,
        and the time of one of ``wire.probe_bytes`` gives the rate. (On tc-shaped links this
        read within 5% of the bulk rate, where a single probe read 20% high: the burst.)"""
        w = self.cfg.wire
        if self.link is None and (w.link_mbit > 0 or w.probe_bytes > 0):
            t0 = time.perf_counter()
            self.request("probe", pad="")
            rtt = time.perf_counter() - t0
            if w.link_mbit > 0:
                self.link = Link(w.link_mbit * 1e6 / 8, rtt)
            else:
                n = min(w.probe_bytes, self.cfg.protocol.max_control_bytes - 1024)
                for size in (n // 4, n):
                    t1 = time.perf_counter()
                    if self.request("probe", pad="x" * size).bytes != size:
                        raise SessionError(f"the receiver did not answer a {size}-byte probe")
                took = time.perf_counter() - t1
                # a round trip that measured long must not make the rate absurd
                self.link = Link(n / max(took - rtt, took / 2, 1e-6), rtt)
        return self.link

    def shown(self, tokens: list[int]) -> list[int]:
        """The token ids a state message carries: ours, or -1 for each without ``token_ids``."""
        return list(tokens) if self.token_ids else [VIRTUAL_TOKEN] * len(tokens)

    def send_delta(self, rt: LlamaRuntime, since: int) -> SentMessage:
        """Ship only the cells from position ``since`` on (the receiver holds the rest)."""
        if not self.token_ids:
            raise StateError("a delta names the tokens it extends: without token ids, send the whole state")
        t0 = time.perf_counter()
        return self._ship(rt.seq, (0, rt.n_layer), Kind.KV_CACHE_DELTA, ApplyMode.APPEND,
                          delta_tensors(rt, since), t0)

    def send_memory(self, rt: LlamaRuntime) -> SentMessage:
        """Ship this runtime's sequence as KV_MEMORY: the peer appends it after its context."""
        t0 = time.perf_counter()
        return self._ship(rt.seq, (0, rt.n_layer), Kind.KV_MEMORY, ApplyMode.MEMORY,
                          memory_tensors(rt), t0)

    def send_prefix(self, vectors: np.ndarray, start: int, *, seq_slot: int = 0,
                    energy_match: bool = False) -> SentMessage:
        """Ship vectors the peer feeds as input embeddings at positions ``start``.. of its
        sequence (``start`` must be its current length)."""
        t0 = time.perf_counter()
        return self._ship(seq_slot, (-1, -1), Kind.VIRTUAL_PREFIX, ApplyMode.APPEND,
                          prefix_tensors(vectors, start, energy_match), t0)

    def send_bridged(self, vectors: np.ndarray, digest: str, source_tokens: int, *,
                     seq_slot: int = 0) -> SentMessage:
        """Ship a bridge's output (f32 [K, n_embd of the peer]) as BRIDGED_PREFIX; the peer
        rebuilds its sequence around it (bridged sessions only)."""
        t0 = time.perf_counter()
        return self._ship(seq_slot, NO_RANGE, Kind.BRIDGED_PREFIX, ApplyMode.OVERWRITE,
                          bridged_tensors(vectors, digest, source_tokens), t0)

    def send_hidden(self, sl: HiddenSlice) -> SentMessage:
        """Ship a hidden slice (HIDDEN_SLICE): the peer checks it against its model and keeps it."""
        tensors, attrs, layer_range, token_range = sl.message_parts()
        return self._ship(sl.seq_slot, layer_range, Kind.HIDDEN_SLICE, ApplyMode.OVERWRITE,
                          (tensors, attrs, token_range), time.perf_counter(), codec=None)

    def send_patch(self, patch: ResidualPatch) -> SentMessage:
        """Ship a residual patch (RESIDUAL_PATCH), gated by the peer's norms (``request("latent_caps")``)."""
        tensors, attrs, layer_range, token_range = patch.message_parts()
        return self._ship(patch.seq_slot, layer_range, Kind.RESIDUAL_PATCH, patch.mode,
                          (tensors, attrs, token_range), time.perf_counter(), codec=None)

    def pull_delta(self, rt: LlamaRuntime, since: int) -> int:
        """Ask the peer for the cells it added from ``since`` on, and append them here.
        Returns the payload bytes received."""
        self.ch.send(self.session.request("delta", {"since": since}))
        msg = self._reply()
        if not isinstance(msg, TensorMessage) or msg.kind is not Kind.KV_CACHE_DELTA:
            raise SessionError(f"expected a KV_CACHE_DELTA, got {msg.frame_type.name}")
        try:
            DeltaApplier(rt).apply(msg)
        except StateError as exc:
            self.ch.send(self.session.reject(msg.message_id, exc))
            raise
        self.ch.send(self.session.ack(msg, tensor_message_digest(msg)))
        return msg.payload_bytes

    def pull_chunks(self, chunks: Sequence[tuple[str, bool, Callable[[TensorMessage], None]]]) -> int:
        """Ask the peer for prefix-cache chunks (edgelink/cache), each ``(key, window, keep)``:
        without ``window``, only its full-attention cells. Each arrives decoded and verified by
        the session and goes to its ``keep``; the peer hears ACK, or REJECT when ``keep``
        refuses it. Up to ``cache.fetch_window`` requests (or the peer's HELLO ``pipeline``,
        the smaller) are in flight, so the peer prepares the next chunks while this side keeps
        one. On an error the replies still in flight are read and refused, so the session
        stays usable. Returns the payload bytes received."""
        peer = self.session.peer
        ahead = max(1, min(self.cfg.cache.fetch_window, peer.pipeline if peer else 1))
        sent = got = total = 0
        try:
            while got < len(chunks):
                while sent < len(chunks) and sent < got + ahead:
                    key, window, _ = chunks[sent]
                    params: dict[str, Any] = {"key": key} if window else {"key": key, "window": False}
                    self.ch.send(self.session.request("cache_get", params))
                    sent += 1
                total += self._keep_chunk(chunks[got][2])
                got += 1
        except EdgelinkError:
            self._drain(sent - got - 1)
            raise
        return total

    def _keep_chunk(self, keep: Callable[[TensorMessage], None]) -> int:
        msg = self._reply()  # PeerRejected when the peer does not hold it
        if not isinstance(msg, TensorMessage) or msg.kind is not Kind.KV_CACHE_DELTA:
            raise SessionError(f"expected a KV_CACHE_DELTA, got {msg.frame_type.name}")
        digest = tensor_message_digest(msg)
        try:
            keep(wire.decode_message(msg, self.session.codecs, self._limit, threads=self.cfg.wire.threads))
        except EdgelinkError as exc:
            self.ch.send(self.session.reject(msg.message_id, exc))
            raise
        self.ch.send(self.session.ack(msg, digest))
        return msg.payload_bytes

    def _drain(self, n: int) -> None:
        """Read and refuse ``n`` replies to requests sent ahead (after one failed)."""
        for _ in range(max(0, n)):
            try:
                msg = self._reply()
                if isinstance(msg, TensorMessage):
                    self.ch.send(self.session.reject(msg.message_id, SessionError("not wanted any more")))
            except PeerRejected:
                continue
            except EdgelinkError:
                return  # the session is gone anyway

    def _ship(self, seq_slot: int, layer_range: tuple[int, int], kind: Kind, apply: ApplyMode,
              built: tuple[list, dict, tuple[int, int]], t0: float, codec: str | None | bool = False,
              before: int = 0) -> SentMessage:
        """Encode (with ``codec``; by default the session's), send, and wait for the ACK,
        reading first the ``before`` replies to requests sent ahead of this message."""
        codec = self.codec if codec is False else codec
        parts, msg = encode_message(self.session, kind, apply, built, seq_slot=seq_slot, layer_range=layer_range,
                                    codec=codec, effort=wire.effort(self.cfg.wire))
        t1 = time.perf_counter()
        try:
            self.ch.send(*parts)
        except PeerGone:
            # The receiver stopped reading mid-frame (it refused it); read why, if it said so.
            self._reply()
            raise
        refused: PeerRejected | None = None
        for _ in range(before):
            try:
                self._reply()
            except PeerRejected as exc:
                refused = refused or exc
        ack = self._reply()
        if refused is not None:
            raise refused
        t2 = time.perf_counter()
        if not isinstance(ack, Ack) or ack.acked_id != msg.message_id:
            raise SessionError(f"expected an ACK for message {msg.message_id}, got {ack}")
        digest = tensor_message_digest(msg)
        if ack.digest != digest:
            raise ChecksumMismatch("the receiver acknowledged a different digest than was sent")
        return SentMessage(msg.message_id, msg.payload_bytes, sum(memoryview(p).nbytes for p in parts),
                            digest.hex(), t1 - t0, t2 - t0, codec or "raw", path=getattr(self.ch, "path", None))

    def request(self, op: str, **params: Any) -> OpResult:
        """Ask the receiver to run ``op``; its RESULT, checked and typed (``protocol.ops``)."""
        return self.begin(op, **params)()

    def begin(self, op: str, **params: Any) -> Callable[[], OpResult]:
        """Send REQUEST ``op`` now; returns what waits for its RESULT, so that this side can work
        while the receiver runs it (nothing else may be sent on the session in between)."""
        self.ch.send(self.session.request(op, params))
        return lambda: check_result(op, self._result())

    def close(self) -> None:
        """Say CLOSE (unless the session already ended, e.g. refused at the handshake: the peer
        has stopped reading, and a CLOSE would only hide the refusal) and close the channel."""
        try:
            if self.session.state is not State.CLOSED:
                self.ch.send(self.session.close())
        finally:
            self.ch.close()
