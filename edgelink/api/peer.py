"""A session with one receiver, opened by ``Model.connect`` and reused by every call until it
is closed: hand the model's state over, ask for continuations, take turns.

The peer keeps track of how much of the model's sequence the receiver already holds, so after
the first handoff only new cells travel (KV_CACHE_DELTA) while the two sides stay in step.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from edgelink.api.results import Generation
from edgelink.errors import EdgelinkError, StateError
from edgelink.kinds.snapshot import snapshot_tensors
from edgelink.net.endpoint import connect
from edgelink.protocol.kinds import Kind
from edgelink.protocol.ops import GenerateResult, OpResult
from edgelink.roles.sender import Sender, SentMessage
from edgelink.runtime.sizing import fit_limits, snapshot_tokens_within
from edgelink.transport.p2p import preload

if TYPE_CHECKING:
    from edgelink.api.model import Model


def preload_dialling(addresses: Sequence[str]) -> float:
    """Load the p2p transport now if any of ``addresses`` (peers a process will dial) is not a
    ``shm:`` segment, rather than inside the first call that dials; returns the seconds spent."""
    if all(a.startswith("shm:") for a in addresses):
        return 0.0
    t0 = time.perf_counter()
    preload()
    return time.perf_counter() - t0


@dataclasses.dataclass
class Round:
    """One turn of a delta conversation: A adds a turn, B answers, each ships only its cells."""

    turn: int
    context_tokens: int
    sent_tokens: int
    sent_bytes: int
    sent_kind: str
    reply_tokens: list[int]
    reply_text: str
    pulled_bytes: int
    full_snapshot_bytes: int
    timings: dict[str, float]


class Peer:
    """One session with a receiver. Use it as a context manager (or call ``close``)."""

    def __init__(self, model: Model, sender: Sender, to: str, timings: dict[str, float]):
        self.model = model
        self.sender = sender
        self.to = to
        self.timings = timings  # connect_s, handshake_s
        self.synced = 0  # tokens of the model's sequence the receiver holds exactly as we do
        self.turns = 0
        # After the receiver generated from a state we sent: the tokens it continued (ours then)
        # and its reply, so the next turn can take the reply's cells back instead of resending.
        self._ahead: tuple[list[int], list[int]] | None = None

    @classmethod
    def open(cls, model: Model, to: str, *, token: str | None = None, token_ids: bool = True,
             kinds: Sequence[Kind] = tuple(Kind), bridge: dict[str, str] | None = None) -> Peer:
        """``token_ids=False``: the receiver gets -1 for every token id of ours (the cells and
        logits still travel; docs/security.md): each turn ships the whole state, and the
        receiver's replies are read here again rather than pulled as cells."""
        t0 = time.perf_counter()
        ch = connect(to, model.cfg)
        t1 = time.perf_counter()
        sender = Sender(ch, fit_limits(model.cfg, model.runtime), model.signature,
                        auth={"token": token} if token else None, token_ids=token_ids, kinds=tuple(kinds),
                        bridge=bridge)
        try:
            sender.handshake()
        except BaseException:
            ch.close()
            raise
        return cls(model, sender, to, {"connect_s": t1 - t0, "handshake_s": time.perf_counter() - t1})

    def close(self) -> None:
        self.sender.close()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def room(self) -> int:
        """The most tokens of this model's state the receiver accepts (read from the message
        limit its HELLO announced: its n_ctx when that limit is derived, as by default)."""
        return snapshot_tokens_within(self.model.runtime, self.sender.session.peer_max_bytes)

    def check_room(self, n_tokens: int, what: str = "this prompt") -> None:
        """Refuse, before any prefill, a sequence that the receiver could never take."""
        room = self.room
        if n_tokens > room:
            raise StateError(
                f"{what} is {n_tokens:,} tokens, and the receiver at {self.to} takes at most {room:,}: "
                "start it with a larger runtime.n_ctx (--set runtime.n_ctx=N), or send a shorter "
                "prompt; nothing was sent")

    # ------------------------------------------------------------------ operations

    def send(self) -> SentMessage:
        """Bring the receiver's sequence to the model's: the whole state (planned over a
        network link: docs/protocol.md, "Choosing") or, while in step, only the new cells."""
        with self.model.step() as rt:
            if 0 < self.synced < len(rt.tokens) and self.sender.token_ids:
                sent = self.sender.send_delta(rt, self.synced)
            else:
                self.check_room(len(rt.tokens), "the model's sequence")
                sent = self.sender.send_snapshot(rt)
            self.synced = len(rt.tokens)
        return sent

    def generate(self, n_tokens: int | None = None, *, stop_at_eog: bool = True) -> GenerateResult:
        """The receiver's greedy continuation of what it holds (its sequence grows, ours not:
        the next ``send`` ships the whole state again)."""
        n = self.model.cfg.generate.n_tokens if n_tokens is None else n_tokens
        body = self.sender.request("generate", n_tokens=n, stop_at_eog=stop_at_eog)
        if body.tokens:
            if self.synced == len(self.model.runtime.tokens):
                self._ahead = (list(self.model.runtime.tokens), list(body.tokens))
            self.synced = 0
        return body

    def send_prefix(self, vectors: np.ndarray, *, reset: bool = False, energy_match: bool = False) -> SentMessage:
        """Append ``vectors`` (f32 [n, n_embd]) to the receiver's sequence as virtual tokens
        (VIRTUAL_PREFIX); with ``reset`` its sequence is cleared first. The receiver then holds
        what we do not, so the next ``send`` ships the whole state."""
        start = 0 if reset else self.sender.request("digest").context_tokens
        if reset:
            self.sender.request("reset")
        self.synced = 0
        return self.sender.send_prefix(vectors, start, seq_slot=self.model.runtime.seq, energy_match=energy_match)

    def send_memory(self) -> SentMessage:
        """Hand the model's sequence to the receiver as KV_MEMORY: cells it appends after its own
        context, re-positioned, rather than a sequence it takes over."""
        self.synced = 0
        with self.model.step() as rt:
            return self.sender.send_memory(rt)

    def read(self, tokens: Sequence[int]) -> int:
        """Have the receiver read ``tokens`` after what it holds (its own prefill); returns how
        many tokens it then holds."""
        self.synced = 0
        return self.sender.request("prefill", tokens=list(tokens)).context_tokens

    def _catch_up(self) -> int:
        """Take back the cells of the receiver's last reply (a ``handoff``/``generate``), when our
        sequence is still the one it continued: the conversation keeps the reply, and the next
        turn ships only its own new cells. Returns the payload bytes pulled."""
        ahead, self._ahead = self._ahead, None
        if ahead is None or self.synced:
            return 0
        base, reply = ahead
        with self.model.step() as rt:
            if rt.tokens != base:
                return 0  # our sequence moved on (a local generate, a reset): resend it whole
            if not self.sender.token_ids:
                rt.prefill(reply)  # its cells name tokens it holds as -1: read the reply here
                return 0
            pulled = self.sender.pull_delta(rt, len(base))
            self.synced = len(rt.tokens)
        return pulled

    def handoff(self, n_tokens: int | None = None, *, stop_at_eog: bool = True) -> Generation:
        """Ship the model's state and return the receiver's continuation."""
        sent = self.send()
        body = self.generate(n_tokens, stop_at_eog=stop_at_eog)
        return Generation(
            self.model.name, len(self.model.runtime.tokens), list(body.tokens), body.text,
            {**self.timings, "export_s": sent.export_s, "snapshot_roundtrip_s": sent.roundtrip_s,
             "remote_generate_s": body.generate_s},
            {"payload": sent.payload_bytes, "wire": sent.wire_bytes},
            to=self.to, digest=sent.digest, wire=sent.wire_facts())

    def converse(self, text: str, n_tokens: int | None = None, *, stop_at_eog: bool = True) -> Round:
        """One turn: read ``text`` here, ship only what the receiver lacks, let it answer (up to
        ``n_tokens``, ending at its end-of-turn token unless ``stop_at_eog`` is off), and take
        its answer's cells back, so both sides hold the same sequence again."""
        n = self.model.cfg.generate.n_tokens if n_tokens is None else n_tokens
        caught_up = self._catch_up()
        first = self.synced == 0
        t0 = time.perf_counter()
        sent_tokens = self.model.prefill(text)
        t1 = time.perf_counter()
        sent = self.send()
        t2 = time.perf_counter()
        body = self.sender.request("generate", n_tokens=n, stop_at_eog=stop_at_eog)
        t3 = time.perf_counter()
        with self.model.step() as rt:
            if not self.sender.token_ids:
                rt.prefill(list(body.tokens))  # see _catch_up; the next turn ships it whole
                pulled = caught_up
            else:
                pulled = caught_up + (self.sender.pull_delta(rt, len(rt.tokens)) if body.tokens else 0)
            self.synced = len(rt.tokens)
            full = sum(t.nbytes for t in _snapshot_tensors(rt))
        t4 = time.perf_counter()
        self.turns += 1
        return Round(self.turns - 1, self.synced, sent_tokens, sent.payload_bytes,
                     "KV_CACHE" if first or not self.sender.token_ids else "KV_CACHE_DELTA", list(body.tokens), body.text, pulled, full,
                     {"prefill_s": t1 - t0, "ship_s": t2 - t1, "remote_generate_s": t3 - t2, "pull_s": t4 - t3})

    def fetch_cache(self, prompt: str | Sequence[int]) -> int:
        """Fetch from the receiver the prefix-cache chunks of ``prompt`` (as the start of a
        sequence) that the model's own cache lacks, each verified before it is stored there;
        a later ``model.prefill(prompt, cache=True)`` then finds them. Returns how many came."""
        m = self.model
        toks = m.tokenize(prompt, add_special=True) if isinstance(prompt, str) else [int(t) for t in prompt]
        source = getattr(self.sender.ch, "remote_peer_id", None) or self.to
        return m.prefix_cache().fetch(self.sender, m.runtime, m.signature, toks, source=source)

    def digest(self) -> str:
        """The receiver's state digest (equal to ``model.runtime.state_digest()`` in step)."""
        return self.sender.request("digest").digest

    def same_state(self) -> bool:
        """Whether the receiver holds exactly the model's sequence (cells, tokens, logits)."""
        with self.model.step() as rt:
            return self.digest() == rt.state_digest()

    def request(self, op: str, **params: Any) -> OpResult:
        """Any other REQUEST the receiver answers (docs/protocol.md); its typed RESULT."""
        return self.begin(op, **params)()

    def begin(self, op: str, **params: Any) -> Callable[[], OpResult]:
        """Send REQUEST ``op`` now and return what waits for its RESULT (``Sender.begin``): the
        caller computes while the peer does."""
        if op in ("prefill", "reset", "generate"):
            self.synced = 0
            self._ahead = None
        return self.sender.begin(op, **params)


def _snapshot_tensors(rt) -> list:
    if not rt.tokens:
        raise EdgelinkError("the sequence is empty")
    return snapshot_tensors(rt)[0]
