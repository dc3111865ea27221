"""The llama.cpp adapter: the only module that calls into llama.cpp.

It owns one model and one context with a single sequence slot, keeps the token ids and the
last logits of that sequence (llama.cpp's sequence state holds neither), and exposes the
operations the rest of edgelink needs: tokenize, prefill, greedy decode, export and import of
the sequence state, and the facts that make up the model signature.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from collections.abc import Callable
from pathlib import Path

import blake3
import llama_cpp
import numpy as np

from edgelink.config import Config
from edgelink.errors import ModelError, StateError
from edgelink.runtime.embeddings import TokenEmbeddings
from edgelink.runtime.evalhook import EvalHook
from edgelink.runtime.kvstate import CACHE_TYPE_NAMES, canonical_digest, parse_seq_state
from edgelink.runtime.system import ExtraBuffers, extra_buffers
from edgelink.runtime.threads import ThreadPlan, thread_plan

_FLASH = {"auto": -1, "off": 0, "on": 1}
# Prefills at least this long update ``prefill_tps`` (shorter ones say little about bulk speed).
PREFILL_RATE_MIN_TOKENS = 64
BATCHED_MIN = 64  # see LlamaRuntime.batched
_backend_lock = threading.Lock()
_backend_ready = False


@llama_cpp.llama_log_callback
def _silent_log(level, text, user_data):  # noqa: ARG001 - llama.cpp's callback signature
    return None


def _init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_log_set(_silent_log, ctypes.c_void_p())
            llama_cpp.llama_backend_init()
            _backend_ready = True


class LlamaRuntime:
    """One GGUF model and one context. Not thread-safe: one caller at a time."""

    def __init__(self, model_path: str | Path, cfg: Config, *, eval_hook: bool | None = None):
        """``eval_hook``: install edgelink's native eval callback (runtime/evalhook.py) in the
        context; None follows ``runtime.eval_hook`` in the config."""
        self.path = Path(model_path)
        self.cfg = cfg
        rc = cfg.runtime
        if rc.flash_attn not in _FLASH:
            raise ModelError(f"runtime.flash_attn must be one of {sorted(_FLASH)}, not {rc.flash_attn!r}")
        for name in (rc.type_k, rc.type_v):
            if name not in CACHE_TYPE_NAMES:
                raise ModelError(f"unknown KV cache type {name!r} (use one of {sorted(CACHE_TYPE_NAMES)})")
        if not self.path.is_file():
            raise ModelError(f"model file not found: {self.path}")
        _init_backend()
        self._owned = True  # this runtime made the model and context, and frees them
        # Which weight buffers llama.cpp may use on this machine (runtime/system.py: the AMX ones
        # fault); resolved per load, and reported by `edgelink doctor`.
        self.extra_buffers = extra_buffers(rc.extra_buffers)
        mparams = llama_cpp.llama_model_default_params()
        mparams.use_extra_bufts = self.extra_buffers.use
        mparams.n_gpu_layers = rc.n_gpu_layers
        self.model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self.model:
            raise ModelError(f"llama.cpp could not load {self.path}")
        self._model_facts()
        cp = llama_cpp.llama_context_default_params()
        self.eval_hook = None
        # Called with (positions, output flags) before each llama_decode while set; prefill then
        # decodes one micro-batch per call (the eval hook maps l_out rows to positions by it).
        self.batch_observer = None
        if eval_hook if eval_hook is not None else rc.eval_hook:
            self.eval_hook = EvalHook(self.n_layer, self.n_embd)
            cp.cb_eval = self.eval_hook.cb_eval
            cp.cb_eval_user_data = self.eval_hook.user_data
        cp.n_ctx = rc.n_ctx
        cp.n_batch = rc.n_batch
        cp.n_ubatch = min(rc.n_ubatch, rc.n_batch)
        cp.n_seq_max = 1
        self.threads = thread_plan(rc)
        cp.n_threads = self.threads.threads
        cp.n_threads_batch = self.threads.threads_batch
        self._threads_now = (cp.n_threads, cp.n_threads_batch)
        self._pinned = False  # inside generate: one thread count for the whole reply
        cp.flash_attn_type = _FLASH[rc.flash_attn]
        cp.type_k = CACHE_TYPE_NAMES[rc.type_k]
        cp.type_v = CACHE_TYPE_NAMES[rc.type_v]
        cp.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise ModelError(f"llama.cpp could not create a context for {self.path} (n_ctx={rc.n_ctx})")
        self._context_facts()
        # Resolve flash attention now, while the sequence is empty: probing later would reuse
        # the export buffer that callers may still be reading views from.
        self.flash_attn_resolved()

    @classmethod
    def adopt(cls, model, ctx, path: Path, cfg: Config) -> LlamaRuntime:
        """A runtime over a model and context someone else made and frees (a llama-cpp-python
        ``Llama``'s: edgelink/api/interop.py). ``cfg`` must describe that context."""
        self = cls.__new__(cls)
        self.path, self.cfg, self._owned = Path(path), cfg, False
        self.model, self.ctx = model, ctx
        self.extra_buffers = ExtraBuffers(True, "theirs", "the caller loaded the model")
        rc = cfg.runtime
        self.threads = ThreadPlan(rc.n_threads, rc.n_threads_batch or rc.n_threads, "the caller's context")
        self._threads_now = (self.threads.threads, self.threads.threads_batch)
        self._pinned = False
        self.eval_hook = None
        self.batch_observer = None
        self._model_facts()
        self._context_facts()
        return self

    def _model_facts(self) -> None:
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self._piece_buf = ctypes.create_string_buffer(256)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_layer = llama_cpp.llama_model_n_layer(self.model)
        self.n_swa = llama_cpp.llama_model_n_swa(self.model)
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        # Head sizes (the GGUF's key/value length, else n_embd / n_head) and the width of one
        # token's K and V rows per layer: the signature and message sizing read these.
        arch = self.meta("general.architecture") or ""
        n_head = max(llama_cpp.llama_model_n_head(self.model), 1)
        self.n_head_kv = llama_cpp.llama_model_n_head_kv(self.model)
        k_len, v_len = self.meta(f"{arch}.attention.key_length"), self.meta(f"{arch}.attention.value_length")
        self.head_dim = int(k_len) if k_len else self.n_embd // n_head
        head_dim_v = int(v_len) if v_len else self.n_embd // n_head
        self.kv_widths = (self.n_head_kv * self.head_dim, self.n_head_kv * head_dim_v)

    def _context_facts(self) -> None:
        rc = self.cfg.runtime
        # llama.cpp may pad the context and clamp the batch to it: use what it resolved.
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.n_batch = min(llama_cpp.llama_n_batch(self.ctx), rc.n_batch)
        self.n_ubatch = min(llama_cpp.llama_n_ubatch(self.ctx), self.n_batch)
        self.seq = rc.seq_id
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._b_token = np.ctypeslib.as_array(self._batch.token, shape=(self.n_batch,))
        self._b_pos = np.ctypeslib.as_array(self._batch.pos, shape=(self.n_batch,))
        self._b_nseq = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(self.n_batch,))
        self._b_logits = np.ctypeslib.as_array(self._batch.logits, shape=(self.n_batch,))
        for i in range(self.n_batch):
            self._batch.seq_id[i][0] = self.seq
        self._b_nseq[:] = 1
        self.tokens: list[int] = []
        # Measured bulk prefill speed, tokens/s (0 until a prefill of 64+ tokens): what a
        # receiver announces to senders that plan a split handoff (edgelink/wire/plan.py).
        self.prefill_tps = 0.0
        # How many leading tokens of the sequence this runtime computed itself in batches whose
        # every ubatch held 64+ tokens: the cells another process's batch prefill of the same
        # tokens reproduces bit for bit (measured; single-token decodes and small batches take
        # other kernels). A split handoff splits only inside this prefix.
        self.batched = 0
        self.logits: np.ndarray | None = None
        self._state_buf = np.empty(0, dtype=np.uint8)
        self._flash_resolved: bool | None = None
        self._embeddings: TokenEmbeddings | None = None

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        if getattr(self, "ctx", None):
            llama_cpp.llama_batch_free(self._batch)
            if self._owned:
                llama_cpp.llama_free(self.ctx)
                llama_cpp.llama_model_free(self.model)
            self.ctx = None
            self.model = None

    def __enter__(self) -> LlamaRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ text

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """``parse_special``: read control tokens written in the text (a chat template's
        ``<|im_start|>``) as those tokens rather than as plain characters."""
        data = text.encode()
        cap = len(data) + 16
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special,
                                         parse_special)
        return list(buf[:n])

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def piece(self, token: int) -> bytes:
        """The bytes of one token (a multi-byte character may span tokens: decode them
        together, or incrementally)."""
        buf = self._piece_buf
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    # ------------------------------------------------------------------ forward passes

    def clear(self) -> None:
        """Forget the sequence (cells, tokens and logits)."""
        llama_cpp.llama_memory_seq_rm(self.memory, self.seq, -1, -1)
        self.tokens = []
        self.logits = None
        self.batched = 0

    def truncate(self, n_keep: int) -> None:
        """Drop every position from ``n_keep`` on, so a shared context (a primer) is computed
        once and reused; the logits are gone until the next prefill."""
        if not 0 <= n_keep <= len(self.tokens):
            raise StateError(f"cannot keep {n_keep} of {len(self.tokens)} positions")
        if not llama_cpp.llama_memory_seq_rm(self.memory, self.seq, n_keep, -1):
            raise StateError(f"llama.cpp refused to drop positions {n_keep}.. of the sequence")
        del self.tokens[n_keep:]
        self.batched = min(self.batched, n_keep)
        self.logits = None

    def prefill(self, tokens: list[int], min_tail: int = 0, measure: bool = True) -> np.ndarray:
        """Append ``tokens`` to the sequence; returns the logits after the last one. If llama.cpp
        fails part-way, the sequence is left as it was. ``min_tail``: decode in ubatches of which
        none is shorter than this (the last borrows from the one before), as a split handoff's
        receiver does so that its cells match a sender's large batches bit for bit. ``measure``:
        let this prefill update ``prefill_tps`` (not one that shares the CPU with other work)."""
        if not tokens:
            raise StateError("nothing to prefill")
        if len(self.tokens) + len(tokens) > self.n_ctx:
            raise StateError(f"{len(self.tokens) + len(tokens)} tokens exceed the context of {self.n_ctx}")
        if not self._pinned:
            self.fit_threads()
        observer = self.batch_observer
        step = self.n_batch if observer is None and not min_tail else self.n_ubatch
        bounds = [*range(0, len(tokens), step), len(tokens)]
        if 2 * min_tail <= step and len(bounds) > 2 and bounds[-1] - bounds[-2] < min_tail:
            bounds[-2] = bounds[-1] - min_tail
        base0, logits0 = len(self.tokens), self.logits
        t0 = time.perf_counter()
        for start, stop in zip(bounds, bounds[1:], strict=False):
            chunk = tokens[start:stop]
            n = len(chunk)
            base = len(self.tokens)
            self._b_token[:n] = chunk
            self._b_pos[:n] = np.arange(base, base + n)
            self._b_logits[:n] = 0
            self._b_logits[n - 1] = 1
            self._batch.n_tokens = n
            if observer is not None:
                observer(self._b_pos[:n], self._b_logits[:n])
            rc = llama_cpp.llama_decode(self.ctx, self._batch)
            if rc != 0:
                # Earlier chunks are already in the cache: take them out again, so a failed
                # prefill leaves the sequence as it was.
                llama_cpp.llama_memory_seq_rm(self.memory, self.seq, base0, -1)
                del self.tokens[base0:]
                self.logits = logits0
                raise StateError(f"llama_decode failed with code {rc}")
            self._note_batch(base, n)
            self.tokens.extend(chunk)
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        self.logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
        if measure and len(tokens) >= PREFILL_RATE_MIN_TOKENS:
            tps = len(tokens) / max(time.perf_counter() - t0, 1e-9)
            self.prefill_tps = tps if self.prefill_tps <= 0 else 0.5 * (self.prefill_tps + tps)
        return self.logits

    def _note_batch(self, base: int, n: int) -> None:
        """Extend ``batched`` over a decoded batch of ``n`` tokens at ``base`` when it qualifies."""
        whole, rest = divmod(n, self.n_ubatch)
        if base == self.batched and (self.n_ubatch >= BATCHED_MIN or not whole) and (not rest or rest >= BATCHED_MIN):
            self.batched += n

    def prefill_all_logits(self, tokens: list[int]) -> np.ndarray:
        """Append ``tokens`` (at most ``n_batch``) in one batch and return the logits after each
        of them, f32 [n, vocab]: teacher forcing, for measuring what a state predicts along a
        known continuation in one llama.cpp call."""
        n = len(tokens)
        if not 0 < n <= self.n_batch:
            raise StateError(f"{n} tokens: one batch takes 1..{self.n_batch}")
        if len(self.tokens) + n > self.n_ctx:
            raise StateError(f"{len(self.tokens) + n} tokens exceed the context of {self.n_ctx}")
        base = len(self.tokens)
        self._b_token[:n] = tokens
        self._b_pos[:n] = np.arange(base, base + n)
        self._b_logits[:n] = 1
        self._batch.n_tokens = n
        rc = llama_cpp.llama_decode(self.ctx, self._batch)
        if rc != 0:
            raise StateError(f"llama_decode failed with code {rc}")
        self._note_batch(base, n)
        self.tokens.extend(tokens)
        out = np.empty((n, self.n_vocab), dtype=np.float32)
        for i in range(n):
            out[i] = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
        self.logits = out[-1].copy()
        return out

    def prefill_embeddings(self, vectors: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """Append positions fed by ``vectors`` (f32 [n, n_embd], times ``scale``) instead of
        tokens; they are recorded as token id -1. Returns the logits after the last one. If
        llama.cpp fails part-way, the new positions are removed again."""
        n, width = vectors.shape
        n_embd = llama_cpp.llama_model_n_embd(self.model)
        if width != n_embd:
            raise StateError(f"vectors of width {width}, the model's is {n_embd}")
        if len(self.tokens) + n > self.n_ctx:
            raise StateError(f"{len(self.tokens) + n} positions exceed the context of {self.n_ctx}")
        base0 = len(self.tokens)
        batch = llama_cpp.llama_batch_init(self.n_batch, n_embd, 1)
        try:
            embd = np.ctypeslib.as_array(batch.embd, shape=(self.n_batch, n_embd))
            pos = np.ctypeslib.as_array(batch.pos, shape=(self.n_batch,))
            nseq = np.ctypeslib.as_array(batch.n_seq_id, shape=(self.n_batch,))
            want = np.ctypeslib.as_array(batch.logits, shape=(self.n_batch,))
            for i in range(self.n_batch):
                batch.seq_id[i][0] = self.seq
            nseq[:] = 1
            observer = self.batch_observer  # the eval hook maps rows to positions per ubatch
            step = self.n_batch if observer is None else self.n_ubatch
            for start in range(0, n, step):
                chunk = vectors[start:start + step]
                m = len(chunk)
                np.multiply(chunk, scale, out=embd[:m], casting="unsafe")
                pos[:m] = np.arange(len(self.tokens), len(self.tokens) + m)
                want[:m] = 0
                want[m - 1] = 1
                batch.n_tokens = m
                if observer is not None:
                    observer(pos[:m], want[:m])
                rc = llama_cpp.llama_decode(self.ctx, batch)
                if rc != 0:
                    llama_cpp.llama_memory_seq_rm(self.memory, self.seq, base0, -1)
                    del self.tokens[base0:]
                    raise StateError(f"llama_decode failed with code {rc}")
                self.tokens.extend([-1] * m)
        finally:
            llama_cpp.llama_batch_free(batch)
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        self.logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
        return self.logits

    def context_logits(self) -> np.ndarray:
        """The logits llama.cpp holds for the last token of its last decode (a copy)."""
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def generate(self, n_tokens: int, stop_at_eog: bool = True,
                 cancelled: Callable[[], bool] | None = None) -> list[int]:
        """Greedy continuation from the current logits: the reference every handoff must match.
        ``cancelled`` is asked before each token; once it says so, what was made is returned."""
        if self.logits is None:
            raise StateError("no logits: prefill or import a state first")
        out: list[int] = []
        with self.one_reply():
            for _ in range(n_tokens):
                if cancelled is not None and cancelled():
                    break
                tok = int(np.argmax(self.logits))
                if stop_at_eog and self.is_eog(tok):
                    break
                out.append(tok)
                self.prefill([tok])
        return out

    @contextlib.contextmanager
    def one_reply(self):
        """One thread count for a whole reply: fitted once here, not before each one-token
        prefill (that would read /proc per token and flap between counts)."""
        self.fit_threads()
        was, self._pinned = self._pinned, True
        try:
            yield self
        finally:
            self._pinned = was

    def fit_threads(self) -> tuple[int, int]:
        """Take the thread counts the plan gives for this moment (runtime/threads.py: fewer while
        other processes keep cores busy, where OpenMP barriers would otherwise wait a time slice
        each); returns (decode, batch) threads now in use."""
        want = (self.threads.now(), self.threads.now(batch=True))
        if want != self._threads_now:
            llama_cpp.llama_set_n_threads(self.ctx, *want)
            self._threads_now = want
        return want

    # ------------------------------------------------------------------ state

    def export_state(self) -> memoryview:
        """The sequence's llama.cpp state blob (a view into a reused buffer)."""
        size = llama_cpp.llama_state_seq_get_size(self.ctx, self.seq)
        if self._state_buf.nbytes < size:
            self._state_buf = np.empty(size, dtype=np.uint8)
        ptr = self._state_buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        n = llama_cpp.llama_state_seq_get_data(self.ctx, ptr, size, self.seq)
        if n == 0:
            raise StateError("llama_state_seq_get_data failed")
        return memoryview(self._state_buf[:n])

    def import_state(self, blob: np.ndarray, tokens: list[int], logits: np.ndarray | None) -> None:
        """Replace the sequence with ``blob``. On any failure the sequence is left empty and a
        StateError is raised; callers verify everything they can before calling this.
        ``logits`` None means "none yet": the next token must be prefilled before generating."""
        if len(tokens) > self.n_ctx:
            raise StateError(f"state of {len(tokens)} tokens exceeds the context of {self.n_ctx}")
        if logits is not None and logits.shape != (self.n_vocab,):
            raise StateError(f"logits of shape {logits.shape}, vocabulary is {self.n_vocab}")
        blob = np.ascontiguousarray(blob, dtype=np.uint8)
        self.clear()
        ptr = blob.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        n = llama_cpp.llama_state_seq_set_data(self.ctx, ptr, blob.nbytes, self.seq)
        pos_max = llama_cpp.llama_memory_seq_pos_max(self.memory, self.seq)
        if n == 0 or pos_max != len(tokens) - 1:
            self.clear()
            raise StateError(f"llama.cpp refused the state (read {n} bytes, last position {pos_max})")
        self.tokens = list(tokens)
        self.logits = None if logits is None else np.array(logits, dtype=np.float32, copy=True)

    def state_digest(self) -> str:
        """A digest of everything that defines this sequence: cells, tokens and logits."""
        h = blake3.blake3()
        if self.tokens:
            h.update(canonical_digest(parse_seq_state(self.export_state())))
        h.update(np.asarray(self.tokens, dtype=np.int32).tobytes())
        if self.logits is not None:
            h.update(self.logits.tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------ facts

    def shift_positions(self, p0: int, p1: int, delta: int) -> None:
        """Move the cells at positions [p0, p1) by ``delta``; llama.cpp re-rotates their keys.

        The rotation is applied lazily at the next decode, so one throwaway token is decoded
        after the last position and removed again: afterwards the cells hold final values and
        export as such. Tokens and logits are the caller's to update."""
        llama_cpp.llama_memory_seq_add(self.memory, self.seq, p0, p1, delta)
        self.batched = min(self.batched, p0)
        end = llama_cpp.llama_memory_seq_pos_max(self.memory, self.seq) + 1
        if end >= self.n_ctx:
            raise StateError("no room to apply a position shift")
        self._b_token[0] = max(llama_cpp.llama_vocab_bos(self.vocab), 0)
        self._b_pos[0] = end
        self._b_logits[0] = 0
        self._batch.n_tokens = 1
        rc = llama_cpp.llama_decode(self.ctx, self._batch)
        llama_cpp.llama_memory_seq_rm(self.memory, self.seq, end, -1)
        if rc != 0:
            raise StateError(f"llama_decode failed with code {rc} while shifting positions")

    def token_embeddings(self) -> TokenEmbeddings:
        """This model's token-embedding rows (read lazily from the GGUF file)."""
        if self._embeddings is None:
            self._embeddings = TokenEmbeddings(self.path, self.meta("general.architecture") or "",
                                               llama_cpp.llama_model_n_embd(self.model))
        return self._embeddings

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text (a chat template may run to kilobytes)."""
        buf = ctypes.create_string_buffer(512)
        n = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            n = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    def special_text(self, which: str) -> tuple[int, str]:
        """(id, text) of the model's ``bos`` or ``eos`` token; (-1, "") when it has none."""
        tok = (llama_cpp.llama_vocab_bos if which == "bos" else llama_cpp.llama_vocab_eos)(self.vocab)
        if tok < 0:
            return -1, ""
        return int(tok), llama_cpp.llama_vocab_get_text(self.vocab, tok).decode("utf-8", errors="replace")

    def flash_attn_resolved(self) -> bool:
        """Whether llama.cpp enabled flash attention: it decides the V layout, and "auto" is
        resolved inside llama.cpp, so read it back from a one-token state."""
        if self._flash_resolved is None:
            saved = (self.export_state().tobytes(), list(self.tokens), self.logits) if self.tokens else None
            self.clear()
            self.prefill([llama_cpp.llama_vocab_bos(self.vocab) if llama_cpp.llama_vocab_bos(self.vocab) >= 0 else 0])
            state = parse_seq_state(self.export_state())
            self._flash_resolved = not next(st for c in state.caches for st in c.streams if st).v_trans
            self.clear()
            if saved:
                self.import_state(np.frombuffer(saved[0], dtype=np.uint8), saved[1], saved[2])
        return self._flash_resolved
