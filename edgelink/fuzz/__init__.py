"""A fuzzer for every boundary that reads untrusted bytes (docs/security.md, "Bad input").

Seeds are real frames from edgelink's own encoders (and, when a runtime is given, a real KV
export); :mod:`edgelink.fuzz.mutate` breaks them the way a hostile peer would, and each
target in :mod:`edgelink.fuzz.targets` must return or raise an ``EdgelinkError``. The test
suite runs a short seeded budget on every CI run; before a release run the long one::

    python -m edgelink.fuzz --cases 200000 --seed 1
    python -m edgelink.fuzz --cases 2000 --live shm:NAME     # against a running `edgelink serve`

A failure prints its seed and case number, which reproduce it exactly.
"""

from __future__ import annotations

import dataclasses
import random
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from edgelink.config import load_config
from edgelink.errors import EdgelinkError
from edgelink.fuzz.mutate import mutations
from edgelink.kinds.snapshot import snapshot_tensors
from edgelink.kinds.specs import SPECS, Example
from edgelink.models.resolve import resolve_model
from edgelink.protocol import codec
from edgelink.protocol.kinds import ApplyMode, Checksum, DType, Kind
from edgelink.protocol.messages import SESSION_ID_BYTES, Ack, Reject, Result, Tensor
from edgelink.protocol.session import Role, Session
from edgelink.protocol.signature import ModelSignature
from edgelink.runtime.kvstate import (
    CacheState,
    LayerRows,
    SeqState,
    StreamState,
    state_to_tensors,
)
from edgelink.runtime.llama import LlamaRuntime
from edgelink.runtime.signature import model_signature
from edgelink.wire import CODECS, encode_tensors


@dataclasses.dataclass
class Failure:
    """An untyped exception (or any other contract breach) and how to reproduce it."""

    target: str
    seed: int
    case: int
    mutator: str
    error: str
    trace: str


@dataclasses.dataclass
class FuzzReport:
    cases: int = 0
    typed: int = 0  # refused with an EdgelinkError: what hostile input should get
    accepted: int = 0  # decoded to a valid value
    seconds: float = 0.0
    failures: list[Failure] = dataclasses.field(default_factory=list)
    by_code: dict[str, int] = dataclasses.field(default_factory=dict)


def synthetic_signature() -> ModelSignature:
    """A signature shaped like a real one (tests that need a real one pass it in)."""
    return ModelSignature(
        architecture="llama", family="llama", name="synthetic", weights_digest="ab" * 32, n_layer=2, n_embd=8,
        n_head=2, n_head_kv=1, head_dim=4, rope_type="norm", rope_freq_base=10000.0, rope_scaling=None,
        norm="rms:1e-05", vocab_size=16, special_tokens={"bos": 1}, n_ctx_train=64, n_swa=0, type_k="f16",
        type_v="f16", flash_attn=False, llama_cpp="x", file_bytes=0)


def _kv_tensors(cells: int = 3, n_layer: int = 2, width: int = 4) -> tuple[list[Tensor], dict]:
    rows = tuple(LayerRows(1, (cells, width), memoryview(np.full((cells, width), i, np.float16)).cast("B"))
                 for i in range(n_layer))
    st = StreamState(np.arange(cells, dtype=np.int32), np.zeros(cells, np.int32), False, rows, rows)
    return state_to_tensors(SeqState(0, (CacheState((st,)),)))


def _i32(name: str, values) -> Tensor:
    a = np.asarray(values, dtype="<i4")
    return Tensor(name, DType.I32, a.shape, memoryview(a).cast("B"))


def _f32(name: str, a: np.ndarray) -> Tensor:
    a = np.ascontiguousarray(a, dtype="<f4")
    return Tensor(name, DType.F32, a.shape, memoryview(a).cast("B"))


def _wire_messages(nv: int) -> list[tuple]:
    """KV snapshots encoded with each wire codec (edgelink/wire), so mutations reach the
    decoders and the decoded-checksum check."""

    kv, layout = _kv_tensors(cells=5, n_layer=1, width=64)
    kv = [Tensor(t.name, t.dtype, t.shape, memoryview(np.frombuffer(t.data, np.float16) * np.float16(0.37 + i))
                 .cast("B")) if t.dtype is DType.F16 else t for i, t in enumerate(kv)]
    out = []
    for name in CODECS:
        tensors, attrs = encode_tensors(kv, {"kv": layout}, name, Checksum.XXH3_128)
        out.append((Kind.KV_CACHE, ApplyMode.OVERWRITE, tensors + [_i32("tokens", [1, 2, 3, 4, 5]),
                                                                   _f32("logits", np.zeros(nv))],
                    attrs, (0, 1), (0, 5)))
    return out


def seed_frames(signature: ModelSignature | None = None, limits=None,
                extra_tensor_messages: Iterable[tuple] = ()) -> list[bytes]:
    """One valid exchange, client side: HELLO, then every frame type and tensor kind, with the
    session id and consecutive message ids a server would accept. ``extra_tensor_messages``
    are ``(kind, apply, tensors, attrs, layer_range, token_range)`` tuples (a real export)."""

    sig = signature or synthetic_signature()
    limits = limits or load_config().protocol
    client = Session(Role.CLIENT, sig, limits, kinds=tuple(Kind), session_id=b"\x11" * SESSION_ID_BYTES,
                     auth={"token": "s3cret"})
    frames = [client.hello()]
    client.assume_peer_accepts()
    kv, layout = _kv_tensors()
    # widths of the signature's model, so kind seeds reach each applier's deeper checks
    d = sig.n_embd if 0 < sig.n_embd <= 8192 else 8
    nv = sig.vocab_size if 0 < sig.vocab_size <= 1 << 18 else 16
    # one valid message of every kind (edgelink/kinds/specs.py), so a new kind is fuzzed too
    example = Example(d, nv, kv, layout)
    messages = [
        *((spec.kind, *spec.example(example)) for spec in SPECS),
        *_wire_messages(nv),
        *extra_tensor_messages,
    ]
    for kind, apply, tensors, attrs, lr, tr in messages:
        parts, _ = client.encode_tensor_message(kind, apply, tensors, layer_range=lr, token_range=tr,
                                                attrs=attrs)
        frames.append(b"".join(bytes(memoryview(p).cast("B")) for p in parts))
        client.state = client.state.READY  # as if acknowledged
    for op, params in (("generate", {"n_tokens": 4, "stop_at_eog": False}), ("prefill", {"tokens": [1, 2]}),
                       ("prefill", {"tokens": [1, 2, 3], "background": True, "replace": True}),
                       ("probe", {"pad": "x" * 64}), ("delta", {"since": 1}),
                       ("cache_has", {"keys": ["ab" * 32, "cd" * 32]}), ("cache_get", {"key": "ef" * 32}), ("digest", {}), ("reset", {}),
                       ("label_scores", {"labels": {"pos": " good", "neg": " bad"}}), ("latent_caps", {})):
        frames.append(client.request(op, params))

    sid = client.session_id
    frames.append(codec.encode_control(Ack(sid, 99, 3, b"\x01" * 32)))
    frames.append(codec.encode_control(Reject(sid, 100, 3, "state", "no")))
    frames.append(codec.encode_control(Result(sid, 101, 2, {"tokens": [1, 2], "text": "ab", "generate_s": 0.1,
                                                           "context_tokens": 5})))
    frames.append(client.close())
    return frames


def run(target: Callable[[bytes], Any], name: str, seeds: list[bytes], cases: int, seed: int = 0,
        report: FuzzReport | None = None, budget_s: float | None = None) -> FuzzReport:
    """Feed ``cases`` mutations of ``seeds`` to ``target``; record every breach."""

    report = report or FuzzReport()
    rng = random.Random(seed)
    t0 = time.perf_counter()
    for i, (mutator, frame) in enumerate(mutations(rng, seeds, cases)):
        report.cases += 1
        try:
            target(frame)
            report.accepted += 1
        except EdgelinkError as exc:
            report.typed += 1
            report.by_code[exc.code] = report.by_code.get(exc.code, 0) + 1
        except Exception as exc:  # noqa: BLE001 - that is the finding
            report.failures.append(Failure(name, seed, i, mutator, f"{type(exc).__name__}: {exc}"[:300],
                                           traceback.format_exc(limit=6)))
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            break
    report.seconds += time.perf_counter() - t0
    return report


def real_export(model: str, cfg, prompt: str = "The capital of France is") -> tuple[ModelSignature, list[tuple]]:
    """(signature, [a KV_CACHE message tuple]) from a real prefill of ``model``, for seeds."""

    with LlamaRuntime(resolve_model(model, cfg), cfg) as rt:
        rt.prefill(rt.tokenize(prompt))
        sig = model_signature(rt, cfg)
        tensors, attrs, token_range = snapshot_tensors(rt)
        # copies: the runtime's export buffer is reused by its next export
        tensors = [Tensor(t.name, t.dtype, t.shape, memoryview(bytes(t.data)), t.checksum) for t in tensors]
        return sig, [(Kind.KV_CACHE, ApplyMode.OVERWRITE, tensors, attrs, (0, rt.n_layer), token_range)]
