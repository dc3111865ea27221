"""The session state machine (sans-IO, in the style of h11).

It turns intentions into frame bytes and frame bytes into verified messages, and enforces the
v1 invariants: exact signature match at the handshake, one session id, strictly consecutive
message ids, negotiated kinds and sizes, and verified checksums on every tensor. It never
touches a socket, a ring or a model; callers move the bytes and apply the tensors.

A *bridged* session (``bridge=`` a claim, see ``compat.bridge_rule``) replaces the exact match
with "both sides name the same bridge, the client runs its source model and the server its
target"; when the two models differ, BRIDGED_PREFIX is the only kind it negotiates, and an
ordinary session never negotiates BRIDGED_PREFIX.

States::

    AWAIT_HELLO --hello ok--> READY --tensor sent--> STREAMING --ack/reject--> READY
         |                      |                                              |
         +-----mismatch/close---+-----------------close-----------------------+--> CLOSED
"""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence
from typing import Any

from edgelink.config import ProtocolConfig
from edgelink.errors import (
    ConfigError,
    EdgelinkError,
    MessageTooLarge,
    PeerRejected,
    ProtocolError,
    ReplayError,
    SessionError,
    SignatureMismatch,
    UnknownKind,
)
from edgelink.protocol import codec
from edgelink.protocol.codec import MAX_PIPELINE, Buffer
from edgelink.protocol.compat import bridge_rule, describe_mismatch, signature_diff
from edgelink.protocol.kinds import CHECKSUM_BY_NAME, CHECKSUM_NAMES, ApplyMode, Checksum, Kind
from edgelink.protocol.limits import describe_bytes, limit_of
from edgelink.protocol.messages import (
    SESSION_ID_BYTES,
    Ack,
    Close,
    Hello,
    Message,
    Reject,
    Request,
    Result,
    Tensor,
    TensorMessage,
)
from edgelink.protocol.reader import FrameReader
from edgelink.protocol.signature import ModelSignature


def accepted_checksums(limits: ProtocolConfig) -> tuple[Checksum, ...]:
    """``protocol.checksums`` as algorithms, most preferred first."""
    names = [n.strip() for n in limits.checksums.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKSUM_BY_NAME]
    if unknown or not names:
        raise ConfigError(f"protocol.checksums: {limits.checksums!r}; choose from "
                          f"{', '.join(CHECKSUM_BY_NAME)} (most preferred first)")
    return tuple(dict.fromkeys(CHECKSUM_BY_NAME[n] for n in names))


class State(enum.Enum):
    AWAIT_HELLO = "await_hello"
    READY = "ready"
    STREAMING = "streaming"
    CLOSED = "closed"


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class Session:
    """One side of one session. Create it, call ``hello()`` (client) or feed the peer's hello
    to ``receive()`` (server), then alternate ``encode_*`` and ``receive`` as the exchange goes."""

    def __init__(self, role: Role, signature: ModelSignature, limits: ProtocolConfig, *,
                 kinds: Sequence[Kind] = (Kind.KV_CACHE,),
                 dtypes: Sequence[str] = ("f32", "f16", "bf16", "i32", "u8", "q8_0", "q4_0"),
                 encryption: dict[str, Any] | None = None,
                 session_id: bytes | None = None,
                 auth: dict[str, Any] | None = None,
                 bridge: dict[str, str] | None = None,
                 codecs: Sequence[str] = (), prefill_tps: float = 0.0, pipeline: int = 1):
        """``bridge``: the claim of the bridge this side holds (``kinds.bridged.bridge_claim``);
        a client names it in its HELLO, a server accepts bridged sessions through it."""
        self.role = role
        self.signature = signature
        self._wire_signature = signature.to_dict()  # what the HELLO carries and compat compares
        self.limits = limits
        self.kinds = tuple(kinds)
        self.dtypes = tuple(dtypes)
        self.encryption = encryption or {"scheme": "none"}
        self.auth = dict(auth or {})  # e.g. {"token": ...}; only a client's HELLO carries it
        self.bridge = dict(bridge or {})
        self.codecs = tuple(codecs)  # wire codecs we take as a receiver (edgelink/wire)
        self.prefill_tps = prefill_tps  # what a receiver announces for senders planning a handoff
        if not 1 <= pipeline <= MAX_PIPELINE:
            raise ConfigError(f"a pipeline of {pipeline}: 1 to {MAX_PIPELINE} messages in flight")
        # tensor messages this side may have sent and not yet seen ACKed (a server announces it)
        self.pipeline = pipeline
        self.bridged = False  # set at the handshake: both sides named the same bridge
        self.state = State.AWAIT_HELLO
        self.session_id = session_id or (os.urandom(SESSION_ID_BYTES) if role is Role.CLIENT else b"")
        self.peer: Hello | None = None
        self.negotiated_kinds: frozenset[Kind] = frozenset()
        self.peer_max_bytes = 0
        self.accepts = accepted_checksums(limits)  # what we take, most preferred first
        self.send_checksum = Checksum.BLAKE3  # what we send with: settled at the handshake
        self._next_out = 0
        self._next_in = 0
        self._hello_sent = False
        self._outstanding: list[int] = []  # our tensor messages not yet ACKed or REJECTed
        self.last_seen_id = -1  # id of the frame being received; what a REJECT refers to

    # ------------------------------------------------------------------ outgoing

    def _take_id(self) -> int:
        mid = self._next_out
        self._next_out += 1
        return mid

    def _require(self, *states: State) -> None:
        if self.state not in states:
            raise SessionError(f"not allowed in state {self.state.value}")

    @property
    def hello_sent(self) -> bool:
        """Whether our HELLO went out (a server sends it once it accepted the client's)."""
        return self._hello_sent

    def hello(self) -> bytes:
        """Our HELLO. A server may only send it after accepting the client's."""
        if self._hello_sent:
            raise SessionError("hello already sent")
        if self.role is Role.SERVER and self.state is not State.READY:
            raise SessionError("a server answers a client's hello; it never opens")
        self._hello_sent = True
        return codec.encode_hello(Hello(
            session_id=self.session_id,
            message_id=self._take_id(),
            role=self.role.value,
            signature=self._wire_signature,
            dtypes=self.dtypes,
            kinds=tuple(k.name for k in self.kinds),
            max_message_bytes=limit_of(self.limits),
            encryption=self.encryption,
            checksums=tuple(CHECKSUM_NAMES[c] for c in self.accepts),
            codecs=self.codecs,
            prefill_tps=self.prefill_tps if self.role is Role.SERVER else 0.0,
            pipeline=self.pipeline if self.role is Role.SERVER else 1,
            auth=self.auth if self.role is Role.CLIENT else {},
            # A server echoes its bridge only into a session the client asked to bridge, so
            # ordinary clients of a bridge-holding server see an ordinary HELLO.
            bridge=self.bridge if self.role is Role.CLIENT or self.bridged else {},
        ))

    def assume_peer_accepts(self) -> None:
        """For one-way transports (a file): act as if the peer answered with our own hello.
        The reader still checks our hello against its own signature when it loads the file."""
        self._require(State.AWAIT_HELLO)
        if not self._hello_sent:
            raise SessionError("send the hello first")
        self.negotiated_kinds = frozenset(self.kinds)
        self.peer_max_bytes = limit_of(self.limits)
        self.send_checksum = self.accepts[0]
        self.state = State.READY

    def encode_tensor_message(self, kind: Kind, apply: ApplyMode, tensors: Sequence[Tensor], *,
                              seq_slot: int = 0, layer_range: tuple[int, int] = (-1, -1),
                              token_range: tuple[int, int] = (-1, -1),
                              attrs: dict[str, Any] | None = None) -> tuple[list[Buffer], TensorMessage]:
        """Frame parts for one tensor message, and the message (its checksums filled in). While
        others wait for their ACK (STREAMING), only within ``pipeline``."""
        if not (self.state is State.STREAMING and len(self._outstanding) < self.pipeline):
            self._require(State.READY)
        if kind not in self.negotiated_kinds:
            raise UnknownKind(f"{kind.name} was not negotiated with the peer")
        alg = self.send_checksum
        sums = codec.checksums([t.data for t in tensors], alg)
        with_sums = tuple(Tensor(t.name, t.dtype, t.shape, t.data, c) for t, c in zip(tensors, sums, strict=True))
        msg = TensorMessage(self.session_id, self._next_out, kind, apply, seq_slot, layer_range,
                            token_range, with_sums, attrs or {}, alg)
        parts = codec.encode_tensor_message(msg)
        # what the receiver checks against its limit: the payload, padding included (the
        # header has its own bound, protocol.max_control_bytes)
        size = sum(memoryview(p).nbytes for p in parts[1:])
        if size > self.peer_max_bytes:
            raise MessageTooLarge(
                f"this {kind.name} message is {describe_bytes(size)}, more than the receiver accepts "
                f"({describe_bytes(self.peer_max_bytes)}, its protocol.max_message_bytes, or "
                "node.max_message_bytes on a node; 0 derives it from its model and n_ctx): raise "
                "that setting on the receiver, or send a shorter context; nothing was sent")
        self._take_id()
        self._outstanding.append(msg.message_id)
        self.state = State.STREAMING
        return parts, msg

    def ack(self, about: TensorMessage, digest: bytes) -> bytes:
        self._require(State.READY)
        return codec.encode_control(Ack(self.session_id, self._take_id(), about.message_id, digest))

    def reject(self, about_id: int, error: EdgelinkError | str, detail: str = "") -> bytes:
        """A typed REJECT. Allowed in any state but after our own CLOSE."""
        code = error.code if isinstance(error, EdgelinkError) else error
        text = detail or (str(error) if isinstance(error, EdgelinkError) else "")
        return codec.encode_control(Reject(self.session_id or bytes(SESSION_ID_BYTES), self._take_id(),
                                           about_id, code, text[:2000]))

    def request(self, op: str, params: dict[str, Any]) -> bytes:
        self._require(State.READY)
        return codec.encode_control(Request(self.session_id, self._take_id(), op, params))

    def result(self, about: Request, body: dict[str, Any]) -> bytes:
        self._require(State.READY)
        return codec.encode_control(Result(self.session_id, self._take_id(), about.message_id, body))

    def close(self) -> bytes:
        frame = codec.encode_control(Close(self.session_id, self._take_id()))
        self.state = State.CLOSED
        return frame

    # ------------------------------------------------------------------ incoming

    def receive(self, frame: Buffer | FrameReader) -> Message:
        """Decode and check one frame from the peer: its bytes, or a ``FrameReader`` that a
        transport has filled (its tensors already hashed as they arrived).

        Returns the typed message. Raises a typed error when the frame is not acceptable;
        ``self.state`` is CLOSED afterwards when the error ends the session (handshake failures,
        corrupt headers, wrong session), and unchanged when only that message is refused.
        """
        if self.state is State.CLOSED:
            raise SessionError("session is closed")
        self.last_seen_id = -1
        try:
            msg = frame.message() if isinstance(frame, FrameReader) else codec.decode_frame(frame, self.limits)
        except ProtocolError as exc:
            if isinstance(exc, MessageTooLarge) and self.state is not State.AWAIT_HELLO:
                raise
            self.state = State.CLOSED
            raise
        self.last_seen_id = msg.message_id
        if self.state is State.AWAIT_HELLO:
            return self._receive_hello(msg)
        if msg.session_id != self.session_id:
            self.state = State.CLOSED
            raise SessionError("frame belongs to another session")
        if msg.message_id != self._next_in:
            kind = "replayed" if msg.message_id < self._next_in else "out-of-order"
            raise ReplayError(f"{kind} message id {msg.message_id} (expected {self._next_in})")
        self._next_in += 1
        if isinstance(msg, Hello):
            self.state = State.CLOSED
            raise SessionError("second hello in one session")
        if isinstance(msg, Close):
            self.state = State.CLOSED
            return msg
        about = msg.acked_id if isinstance(msg, Ack) else getattr(msg, "about_id", None)
        if isinstance(msg, (Ack, Reject)) and about in self._outstanding:
            self._outstanding.remove(about)
            if not self._outstanding:
                self.state = State.READY
        if isinstance(msg, Reject):
            return msg
        if isinstance(msg, TensorMessage):
            if msg.kind not in self.negotiated_kinds:
                raise UnknownKind(f"{msg.kind.name} was not negotiated for this session")
            if msg.checksum_alg not in self.accepts:
                raise UnknownKind(f"{CHECKSUM_NAMES[msg.checksum_alg]} checksums were not offered "
                                  "by this side (protocol.checksums)")
            if isinstance(frame, FrameReader):
                frame.verify(msg)
            else:
                codec.verify_checksums(msg)
        return msg

    def _receive_hello(self, msg: Message) -> Hello:
        if isinstance(msg, Reject):
            self.state = State.CLOSED
            raise PeerRejected(msg.code, msg.detail)
        if not isinstance(msg, Hello):
            self.state = State.CLOSED
            raise SessionError(f"expected HELLO, got {msg.frame_type.name}")
        if msg.message_id != 0:
            self.state = State.CLOSED
            raise ReplayError(f"hello must carry message id 0, got {msg.message_id}")
        if self.role is Role.CLIENT and msg.session_id != self.session_id:
            self.state = State.CLOSED
            raise SessionError("server answered with another session id")
        if self.role is Role.SERVER:
            self.session_id = msg.session_id
        self._next_in = 1
        diff = signature_diff(self._wire_signature, msg.signature)
        try:
            self.bridged = bridge_rule(self.role.value, self._wire_signature, self.bridge or None,
                                       msg.signature, msg.bridge or None, diff)
        except SignatureMismatch:
            self.state = State.CLOSED
            raise
        if diff and not self.bridged:
            self.state = State.CLOSED
            raise SignatureMismatch(describe_mismatch(self.role.value, self._wire_signature, msg.signature, diff), diff)
        if msg.encryption != self.encryption:
            self.state = State.CLOSED
            raise SessionError(f"encryption parameters differ: {msg.encryption} != {self.encryption}")
        theirs = set()
        for name in msg.kinds:
            if name in Kind.__members__:
                theirs.add(Kind[name])
        common = theirs & set(self.kinds)
        if not self.bridged:
            common.discard(Kind.BRIDGED_PREFIX)
        elif diff:  # two different models: nothing but what the bridge made can cross
            common &= {Kind.BRIDGED_PREFIX}
        self.negotiated_kinds = frozenset(common)
        if not self.negotiated_kinds:
            self.state = State.CLOSED
            raise SessionError("no message kind in common")
        theirs_sums = [CHECKSUM_BY_NAME[n] for n in msg.checksums if n in CHECKSUM_BY_NAME]
        common_sums = [c for c in self.accepts if c in theirs_sums]
        if not common_sums:
            self.state = State.CLOSED
            raise SessionError(f"no tensor checksum in common: the peer takes {list(msg.checksums)}, "
                               f"this side {[CHECKSUM_NAMES[c] for c in self.accepts]} (protocol.checksums)")
        self.send_checksum = common_sums[0]
        # What we may send is what the peer says it accepts (its own limit, from its model);
        # what we accept is checked against ours on every frame we decode.
        self.peer_max_bytes = msg.max_message_bytes
        self.peer = msg
        self.state = State.READY
        return msg
