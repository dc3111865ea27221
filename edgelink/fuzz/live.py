"""Mutated frames against a live receiver (`edgelink serve` over shm, or an `edgelink node` over
encrypted p2p): each session opens with a valid HELLO (or, now and then, a mutated one), then
sends mutated frames renumbered to the id the receiver expects, so they reach past the replay
check into the decoders and appliers. Every answer must be a typed frame; an ``internal``
REJECT (a fault that only the receiver's safety net caught) counts as a failure too."""

from __future__ import annotations

import random
import time

from edgelink.config import Config
from edgelink.errors import EdgelinkError, TransportError
from edgelink.fuzz import Failure, FuzzReport, seed_frames
from edgelink.fuzz.mutate import PREAMBLE, forge, frame_parts, mutations
from edgelink.net.endpoint import connect
from edgelink.protocol import codec
from edgelink.protocol.kinds import Kind
from edgelink.protocol.messages import Ack, Close, Hello, Reject
from edgelink.protocol.session import Role, Session
from edgelink.protocol.signature import ModelSignature
from edgelink.roles.receiver import frame_limit


def with_id(frame: bytes, message_id: int) -> bytes:
    """The same frame renumbered (digest recomputed)."""
    fields, header, payload = frame_parts(frame)
    f = list(fields)
    f[5] = message_id
    return forge(tuple(f), header, payload, fix_lengths=False)


def _expects_reply(frame: bytes, cfg: Config) -> bool:
    """Whether the receiver answers this frame (ACK/REJECT/CLOSE from a client get no answer)."""
    try:
        msg = codec.decode_frame(frame, cfg.protocol)
    except EdgelinkError:
        return True  # refused with a REJECT
    return not isinstance(msg, (Ack, Reject, Close))


def fuzz_live(endpoint: str, cfg: Config, signature: ModelSignature, cases: int, seed: int = 0,
              token: str | None = None, extra_tensor_messages=(), per_session: int = 3,
              reply_timeout_s: float = 60.0) -> FuzzReport:
    """Send ``cases`` mutated frames to the receiver at ``endpoint`` (sessions of up to
    ``per_session`` frames each) and return what came back."""

    seeds = seed_frames(signature, cfg.protocol, extra_tensor_messages)
    auth = {"token": token} if token else None

    def hello_for(ch) -> bytes:  # a network channel's HELLO names its end-to-end scheme
        return Session(Role.CLIENT, signature, cfg.protocol, kinds=tuple(Kind), session_id=b"\x11" * 16,
                       encryption=getattr(ch, "encryption", None), auth=auth).hello()

    hello, body = seeds[0], seeds[1:]
    rng = random.Random(seed)
    report = FuzzReport()
    endless = 1 << 62  # a session may end early, leaving frames unsent: never run dry
    stream = mutations(rng, body, endless)
    hello_stream = mutations(random.Random(seed + 1), [hello], endless)
    limit = frame_limit(cfg)
    t0 = time.perf_counter()
    case = 0
    while case < cases:
        ch = connect(endpoint, cfg)
        try:
            if rng.random() < 0.1:
                name, frame = next(hello_stream)
                frames = [(name, frame, True)]
            else:
                ch.send(hello_for(ch))
                answer = codec.decode_frame(ch.recv(limit, timeout=reply_timeout_s), cfg.protocol)
                if not isinstance(answer, Hello):
                    raise EdgelinkError(f"the receiver refused a valid HELLO: {answer}")
                frames = []
                for i in range(rng.randint(1, per_session)):
                    name, frame = next(stream)
                    if len(frame) >= PREAMBLE.size and rng.random() < 0.9:
                        frame = with_id(frame, i + 1)
                    frames.append((name, frame, _expects_reply(frame, cfg)))
            for name, frame, reply in frames:
                case += 1
                report.cases += 1
                try:
                    ch.send(frame)
                    if not reply:
                        report.accepted += 1
                        continue
                    msg = codec.decode_frame(ch.recv(limit, timeout=reply_timeout_s), cfg.protocol)
                except TransportError as exc:  # the receiver ended the session: allowed
                    report.typed += 1
                    report.by_code[exc.code] = report.by_code.get(exc.code, 0) + 1
                    break
                if isinstance(msg, Reject):
                    report.typed += 1
                    report.by_code[msg.code] = report.by_code.get(msg.code, 0) + 1
                    if msg.code == "internal":
                        report.failures.append(Failure("live", seed, case, name, msg.detail, ""))
                else:
                    report.accepted += 1
        finally:
            ch.close()
    report.seconds = time.perf_counter() - t0
    return report
