"""What an OpenAI-style request runs on: a pool of llama.cpp contexts of one model, every
prompt through the shared prefix cache, tokens picked by a seeded sampler and handed out as
text deltas. No HTTP here (edgelink/server/app.py is the web layer); this module is what
``edgelink.serve_http`` and the tests drive.

A request waits for a free context (at most ``http.queue`` wait; past that ``Busy``), gets the
whole context while it decodes, and gives it back cleared, so no request sees another's cells.
A cancelled request (its client went away) stops at the next token and frees its context.
"""

from __future__ import annotations

import codecs
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from edgelink.api.model import Snapshot, load
from edgelink.api.peer import preload_dialling
from edgelink.cache.prefix import PrefixCache
from edgelink.config import Config, config_list
from edgelink.errors import ConfigError, EdgelinkError, StateError
from edgelink.roles.receiver import calibrate_prefill
from edgelink.runtime.chat import ChatTemplate
from edgelink.runtime.llama import BATCHED_MIN
from edgelink.runtime.sampling import Sampler, log_probs
from edgelink.runtime.sizing import snapshot_bytes

log = logging.getLogger(__name__)


class Busy(EdgelinkError):
    """Every context is decoding and ``http.queue`` requests already wait."""

    code = "busy"


class TooLong(EdgelinkError):
    """A prompt that leaves no room in the context to generate."""

    code = "context_length_exceeded"


@dataclasses.dataclass(frozen=True)
class Params:
    """How to continue a prompt (the OpenAI request fields that matter here)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False  # report each generated token's log probability (TokenLogprob)
    top_logprobs: int = 0  # and this many most likely alternatives


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One generated token as ``logprobs`` report it: its bytes, its log probability under the
    model's raw distribution, and the most likely tokens there (bytes, log probability)."""

    piece: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class RemotePrefillSteps:
    """Where a remote prefill's seconds went, in order, as this engine saw them."""

    link_s: float  # measuring the link (round trip and rate) on the kept session
    head_s: float  # the first BATCHED_MIN tokens prefilled here (the delta extends them), while
    #                the peer prefills the prompt
    peer_wait_s: float  # after that, waiting for the peer's RESULT (the rest of its prefill)
    pull_s: float  # the delta's request, transfer, verification and import
    delta_bytes: int  # its payload


@dataclasses.dataclass
class Outcome:
    """What a finished request reports (OpenAI's usage and finish_reason)."""

    prompt_tokens: int
    cached_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    prefill_s: float = 0.0
    decode_s: float = 0.0
    cached_from: dict[str, int] = dataclasses.field(default_factory=dict)  # chunks per tier
    fetched_chunks: int = 0  # chunks fetched from cache.peers for this request
    prefilled_by: str = "here"  # or http.prefill_peer's address (remote prefill)
    remote_prefill: RemotePrefillSteps | None = None  # its steps, when the peer prefilled


def derived_parallel(cfg: Config) -> int:
    """``http.parallel``, 0 resolved: one context per two cores, at least one."""
    n = cfg.http.parallel
    if n < 0:
        raise ConfigError(f"http.parallel is {n}: at least 1, or 0 for one per two cores")
    return n or max(1, (os.cpu_count() or 2) // 2)


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many leading tokens ``a`` and ``b`` share, at most ``limit``."""
    n, limit = 0, min(limit, len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


REUSE = ("exact", "prefix")


class Engine:
    """``http.parallel`` contexts of one model, sharing its weights (mmap) and one prefix cache."""

    def __init__(self, model: str | Path, cfg: Config, *, progress=None):
        if cfg.http.reuse not in REUSE:
            raise ConfigError(f"http.reuse is {cfg.http.reuse!r}: one of {', '.join(REUSE)}")
        self.reuse = cfg.http.reuse
        self.parallel = derived_parallel(cfg)
        # contexts share the cores: each gets its part unless runtime.n_threads says otherwise;
        # one context keeps the adaptive default (runtime/threads.py: it also yields to other
        # processes), which counts only other processes' threads, so not several contexts
        self.threads = cfg.runtime.n_threads or max(1, (os.cpu_count() or 1) // self.parallel)
        if cfg.runtime.n_threads or self.parallel > 1:
            cfg = cfg.replace(runtime_n_threads=self.threads)
        self.cfg = cfg
        self._models = []
        try:
            for i in range(self.parallel):
                self._models.append(load(model, cfg, progress=progress if i == 0 else None))
        except BaseException:
            self.close()
            raise
        first = self._models[0]
        # the id /v1/models lists: the registry name, or a file's stem (never a path)
        self.name = cfg.http.model_name or (Path(first.name).stem if first.name.endswith(".gguf") else first.name)
        self.n_ctx = first.runtime.n_ctx
        self.cache = PrefixCache(cfg)
        for m in self._models:
            m._cache = self.cache  # one cache (one RAM tier) for every context
        try:
            self.template: ChatTemplate | None = ChatTemplate(first.runtime)
        except ConfigError:
            self.template = None  # /v1/chat/completions then says why
        if cfg.http.prefill_peer and first.runtime.prefill_tps <= 0:
            calibrate_prefill(first.runtime)  # remote prefill is chosen against this speed
            for m in self._models[1:]:
                m.runtime.prefill_tps = first.runtime.prefill_tps
        loaded_s = preload_dialling(config_list(cfg.cache.peers) + config_list(cfg.http.prefill_peer))
        if loaded_s:
            log.info("p2p transport loaded in %.1f s (cache.peers / http.prefill_peer dial through it)", loaded_s)
        self._free: queue.Queue = queue.Queue()
        for m in self._models:
            self._free.put(m)
        self._lock = threading.Lock()
        self._waiting = 0
        self.created = int(time.time())

    def close(self) -> None:
        for m in self._models:
            self._forget_peer(m)
            m.close()
        self._models = []

    # ------------------------------------------------------------------ prompts

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        if self.template is None:
            raise ConfigError(f"{self.name} has no chat template: use /v1/completions")
        return self.template.tokens(messages)

    def text_tokens(self, prompt: str) -> list[int]:
        return self._models[0].runtime.tokenize(prompt, add_special=True)

    # ------------------------------------------------------------------ running

    def acquire(self):
        """A free context, waiting in line if every one is busy (``Busy`` past ``http.queue``)."""
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._waiting >= self.cfg.http.queue:
                raise Busy(f"{self.parallel} requests are decoding and {self._waiting} wait (http.queue)")
            self._waiting += 1
        try:
            return self._free.get()
        finally:
            with self._lock:
                self._waiting -= 1

    @property
    def decoding(self) -> int:
        """Contexts held by a request now."""
        return self.parallel - self._free.qsize()

    @property
    def waiting(self) -> int:
        return self._waiting

    def _reusable(self, m, tokens: list[int]) -> int:
        """Whole chunks of ``tokens`` the context still holds from its last prompt, exactly as a
        prefill through the cache computes them (the generated tokens after it are not: each
        was decoded alone). The next request with the same system prompt starts from them, as
        llama-server reuses a slot's prefix, and the result stays that of a cold run through
        the cache. Not on a sliding-window model, whose cache may have dropped cells they need."""
        last = getattr(m, "prompt", None)
        rt = m.runtime
        if not last or rt.n_swa:
            return 0
        chunk = self.cache.chunk
        keep = common_prefix(last, tokens, min(len(tokens) - 1, len(rt.tokens))) // chunk * chunk
        return keep if rt.tokens[:keep] == tokens[:keep] else 0

    def _reusable_tokens(self, m, tokens: list[int], keep: int) -> int:
        """``http.reuse = prefix``: how much of ``tokens`` the context's cells cover token by
        token, its last reply included (llama-server's slot reuse), when that is more than the
        exact ``keep`` and what is left is short (a long new part goes through the cache, which
        stores it); else 0. Not on a sliding-window model (its window cells may be gone)."""
        rt = m.runtime
        if self.reuse != "prefix" or rt.n_swa or getattr(m, "prompt", None) is None:
            return 0
        n = common_prefix(rt.tokens, tokens, len(tokens) - 1)
        return n if keep < n and len(tokens) - n < 2 * self.cache.chunk else 0

    def _fetch(self, m, tokens: list[int], keep: int) -> int:
        """Chunks of ``tokens`` that this cache lacks, fetched from ``cache.peers`` (another
        machine's node that holds them) before the prefill; a peer that fails costs only time."""
        if not self.cfg.cache.peers:
            return 0
        keys = self.cache.keys(m.signature, tokens)[:(len(tokens) - 1) // self.cache.chunk]
        if not keys or self.cache.held(keys) == len(keys) or keep >= len(keys) * self.cache.chunk:
            return 0
        got = m.fetch_cache(tokens)
        return got.chunks

    @staticmethod
    def _drop(m) -> None:
        m.prompt = None
        with m.step() as rt:
            rt.clear()

    def release(self, m) -> None:
        # The cells stay for the next request to reuse its common whole chunks (_reusable):
        # they are a function of the tokens alone, so a request sees only cells of tokens it
        # sent itself; anything past them is dropped before it decodes.
        self._free.put(m)

    def _prefilled(self, m, tokens: list[int]) -> Outcome:
        """``m`` holding ``tokens``: its own whole chunks kept, lacking chunks fetched from
        ``cache.peers``, the rest through the prefix cache, or, sooner by the plan, prefilled
        on ``http.prefill_peer`` (``_remote_prefill``)."""
        t0 = time.perf_counter()
        keep = self._reusable(m, tokens)
        reused = self._reusable_tokens(m, tokens, keep)
        if reused:
            with m.step() as rt:
                rt.truncate(reused)
                rt.prefill(tokens[reused:])
            m.prompt = m.prompt[:reused]  # what is left of the cells computed through the cache
            return Outcome(prompt_tokens=len(tokens), cached_tokens=reused, prefill_s=time.perf_counter() - t0,
                           cached_from={"context": reused // self.cache.chunk} if reused >= self.cache.chunk else {})
        if not keep:
            self._drop(m)
        fetched = self._fetch(m, tokens, keep)
        steps = self._remote_prefill(m, tokens, keep)
        if steps is not None:
            m.prompt = None  # not cells of a prefill here: the next request does not reuse them
            return Outcome(prompt_tokens=len(tokens), prefill_s=time.perf_counter() - t0, fetched_chunks=fetched,
                           prefilled_by=self.cfg.http.prefill_peer, remote_prefill=steps)
        with m.step() as rt:
            hit = self.cache.prefill(rt, m.signature, tokens, keep=keep)
        m.prompt = list(tokens)
        return Outcome(prompt_tokens=len(tokens), cached_tokens=hit.hit_tokens,
                       prefill_s=time.perf_counter() - t0, cached_from=dict(hit.hit_tiers), fetched_chunks=fetched)

    def _remote_prefill(self, m, tokens: list[int], keep: int) -> RemotePrefillSteps | None:
        """Prefill ``tokens`` on ``http.prefill_peer`` and import its cells into ``m``, when the
        plan says that reaches the first token sooner than prefilling what this cache lacks
        here: the peer's announced prefill speed, this context's measured one, and the link
        as the session measures it (round trip and rate). The cells arrive as a verified
        KV_CACHE_DELTA from position 0, so the continuation is the one a prefill here gives.
        Any failure of the peer falls back to the local prefill (and a new session next time).
        Returns the steps' seconds when the peer prefilled, None when this context must."""
        where = self.cfg.http.prefill_peer
        if not where:
            return None
        chunk = self.cache.chunk
        keys = self.cache.keys(m.signature, tokens)[:(len(tokens) - 1) // chunk]
        uncached = len(tokens) - max(keep, self.cache.held(keys) * chunk)
        if uncached < max(self.cfg.http.prefill_min_tokens, 2 * BATCHED_MIN):
            return None

        try:
            peer = self._peer(m)
            t0 = time.perf_counter()
            link = peer.sender.measure_link()
            t_link = time.perf_counter()
            theirs = peer.sender.session.peer.prefill_tps if peer.sender.session.peer else 0.0
            ours = m.runtime.prefill_tps
            if link is None or theirs <= 0:
                return None
            remote_s = link.rtt_s + len(tokens) / theirs + snapshot_bytes(m.runtime, len(tokens)) / link.bytes_per_s
            local_s = uncached / ours if ours > 0 else float("inf")
            log.info("prefill of %d tokens (%d uncached): here %.2f s, on %s %.2f s predicted", len(tokens),
                     uncached, local_s, where, remote_s)
            if remote_s >= local_s:
                return None
            # The peer prefills the whole prompt; the first BATCHED_MIN tokens are prefilled here
            # too, meanwhile (a delta extends a sequence; both sides decode them in one batch of
            # 64+, so their cells agree bit for bit, as a split handoff's do), and the rest comes
            # back as a delta from there, verified before it is imported.
            prefilled = peer.begin("prefill", tokens=list(tokens), replace=True)
            with m.step() as rt:
                rt.clear()
                t_asked = time.perf_counter()
                rt.prefill(tokens[:BATCHED_MIN])
                t_head = time.perf_counter()
                prefilled()
                t_prefilled = time.perf_counter()
                delta_bytes = peer.sender.pull_delta(rt, BATCHED_MIN)
            steps = RemotePrefillSteps(link_s=t_link - t0, head_s=t_head - t_asked, peer_wait_s=t_prefilled - t_head,
                                       pull_s=time.perf_counter() - t_prefilled, delta_bytes=delta_bytes)
            log.info("remote prefill on %s: %s", where, steps)
            return steps
        except EdgelinkError as exc:
            log.warning("remote prefill on %s failed (%s); prefilling here", where, exc)
            self._forget_peer(m)
            with m.step() as rt:
                rt.clear()
            m.prompt = None
            return None

    def _peer(self, m):
        """This context's session with ``http.prefill_peer`` (opened once, kept)."""
        peer = getattr(m, "prefill_session", None)
        if peer is None:
            peer = m.prefill_session = m.connect(self.cfg.http.prefill_peer, token=self.cfg.http.prefill_token or None)
        return peer

    @staticmethod
    def _forget_peer(m) -> None:
        peer = getattr(m, "prefill_session", None)
        m.prefill_session = None
        if peer is not None:
            try:
                peer.close()
            except EdgelinkError:
                pass

    def _restored(self, m, state: bytes) -> Outcome:
        """``m`` holding a state another process handed over (an edgelink message file's bytes),
        every message verified against this model before anything changes."""

        t0 = time.perf_counter()
        self._drop(m)  # its cells are not a prefill of ours: nothing of them is reused later
        m.restore(Snapshot(state, 0, 0))
        return Outcome(prompt_tokens=len(m.runtime.tokens), cached_tokens=0, prefill_s=time.perf_counter() - t0)

    def state(self, tokens: list[int]) -> tuple[bytes, Outcome]:
        """The KV state of ``tokens`` (through the prefix cache) as an edgelink message file's
        bytes: what `edgelink resume` and ``/edgelink/v1/continue`` read."""
        self._check_prompt(tokens)
        m = self.acquire()
        try:
            out = self._prefilled(m, tokens)
            return m.snapshot().frames, out
        finally:
            self.release(m)

    def handoff(self, tokens: list[int], to: str, n_tokens: int, token: str | None = None):
        """Prefill ``tokens`` here (through the prefix cache) and hand the state to the receiver
        at ``to``; returns (its greedy continuation as a ``Generation``, the prefill Outcome)."""
        self._check_prompt(tokens)
        m = self.acquire()
        try:
            out = self._prefilled(m, tokens)
            with m.connect(to, token=token) as peer:
                peer.check_room(len(tokens))
                return peer.handoff(n_tokens), out
        finally:
            self.release(m)

    @staticmethod
    def _logprob(rt, tok: int, piece: bytes, top: int) -> TokenLogprob:
        lp, best = log_probs(rt.logits, tok, top)
        return TokenLogprob(piece, lp, tuple((rt.piece(t), v) for t, v in best))

    def _check_prompt(self, tokens: list[int]) -> None:
        if len(tokens) >= self.n_ctx:
            raise TooLong(f"the prompt is {len(tokens)} tokens; the context holds {self.n_ctx} "
                          "(runtime.n_ctx), with room to generate")
        if not tokens:
            raise StateError("an empty prompt")

    def run(self, tokens: list[int] | None, params: Params, cancelled: Callable[[], bool] = lambda: False,
            *, state: bytes | None = None) -> Iterator[str | TokenLogprob | Outcome]:
        """Continue ``tokens`` (or, with ``state``, a handed-over state): yields text deltas,
        then the ``Outcome``; with ``params.logprobs``, each token's ``TokenLogprob`` too, before
        the text it brings. Holds a context from the first ``next()`` until the generator ends
        (or is closed)."""

        if state is None:
            self._check_prompt(tokens or [])
        m = self.acquire()
        try:
            out = self._prefilled(m, tokens or []) if state is None else self._restored(m, state)
            if out.prompt_tokens >= self.n_ctx:
                raise TooLong(f"the state holds {out.prompt_tokens} tokens; the context holds {self.n_ctx}")
            rt = m.runtime
            sampler = Sampler(params.temperature, params.top_p, params.seed)
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            stop = [s for s in params.stop if s]
            hold = max((len(s) for s in stop), default=1) - 1
            text, sent = "", 0  # what was decoded, and how much of it went out
            by_string = False
            room = min(params.max_tokens, self.n_ctx - out.prompt_tokens)
            out.finish_reason = "length"
            t1 = time.perf_counter()
            with rt.one_reply():  # one thread count for the reply, fitted once
                while out.completion_tokens < room:
                    if cancelled():
                        out.finish_reason = "cancelled"
                        break
                    tok = sampler.pick(rt.logits)
                    if rt.is_eog(tok) and not params.ignore_eos:
                        out.finish_reason = "stop"
                        break
                    out.completion_tokens += 1
                    piece = rt.piece(tok)
                    if params.logprobs:
                        yield self._logprob(rt, tok, piece, params.top_logprobs)
                    text += decoder.decode(piece)
                    # A stop string cannot start in what went out: the last ``hold`` characters are
                    # held back until they can no longer begin one.
                    found = [i for i in (text.find(s, max(0, sent - len(s))) for s in stop) if i >= 0]
                    if found:
                        cut = min(found)
                        if cut > sent:
                            yield text[sent:cut]
                        out.finish_reason, by_string = "stop", True
                        break
                    if len(text) - hold > sent:
                        yield text[sent:len(text) - hold]
                        sent = len(text) - hold
                    if out.completion_tokens < room:
                        rt.prefill([tok], measure=False)
            if not by_string and out.finish_reason != "cancelled":
                text += decoder.decode(b"", final=True)
                if len(text) > sent:
                    yield text[sent:]
            out.decode_s = time.perf_counter() - t1
            yield out
        finally:
            self.release(m)
