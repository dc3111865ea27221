"""The bad-input contract (docs/security.md): every boundary that reads untrusted bytes returns a
valid value or raises an EdgelinkError; never another exception, a hang, or an allocation
beyond the bytes received. Property-based tests (hypothesis) and seeded mutation runs of the
project's fuzzer (edgelink/fuzz) over real frames, a real export, real bridge and key files,
and live `serve` and `node` processes that must survive hundreds of mutated frames and then
hand off exactly."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import random
import threading
import tracemalloc
import uuid
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgelink.errors import ConfigError, EdgelinkError, ModelError, ProtocolError, SessionError
from edgelink.fuzz import run, seed_frames, synthetic_signature
from edgelink.fuzz import targets as T
from edgelink.fuzz.mutate import HOSTILE_TEXT, HOSTILE_VALUES, forge, frame_parts
from edgelink.protocol import codec
from edgelink.protocol.kinds import FrameType
from edgelink.protocol.ops import PARAMS, check_params, check_result
from edgelink.protocol.untrusted import Int, Obj, Seq, Str, load_json

DEFAULT_BRIDGE = "models/sentiment-perceiver-k8-l15"


def _no_failures(report) -> None:
    assert not report.failures, "\n".join(
        f"{f.target} seed={f.seed} case={f.case} ({f.mutator}): {f.error}\n{f.trace}" for f in report.failures[:5])


# --------------------------------------------------------------------------- JSON, parse level


@pytest.mark.parametrize("text", HOSTILE_TEXT)
def test_hostile_json_text_is_a_typed_refusal(text):
    doc = '{"a": ' + text + "}"
    try:
        value = load_json(doc.encode(), "t")
    except ProtocolError:
        return
    # what is accepted is bounded: 64-bit integers, finite floats, no lone surrogates
    json.dumps(value, allow_nan=False).encode("utf-8")


def test_json_limits_are_the_documented_ones():
    assert load_json(b'{"a": 18446744073709551615}', "t") == {"a": 2**64 - 1}
    for bad in (b'{"a": 18446744073709551616}', b'{"a": 1e400}', b'{"a": NaN}', b'"\\ud800"',
                b'[' * 33 + b']' * 33, b"\xff", b"", b"[1,]"):
        with pytest.raises(ProtocolError):
            load_json(bad, "t")
    assert load_json(b"[" * 32 + b"]" * 32, "t") is not None
    with pytest.raises(SessionError):
        load_json(b"{", "t", error=SessionError)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(_json)
def test_any_json_value_loads_or_is_refused(value):
    text = json.dumps(value)  # may hold NaN, Infinity, huge ints, lone surrogates
    try:
        got = load_json(text.encode("utf-8", "surrogatepass"), "t")
    except ProtocolError:
        return
    assert json.dumps(got, allow_nan=False) == json.dumps(value, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_load_or_are_refused(data):
    try:
        load_json(data, "t")
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(PARAMS)), _json)
def test_request_params_and_results_are_checked_or_refused(op, value):
    for check in (check_params, check_result):
        try:
            check(op, value if isinstance(value, dict) else {"x": value})
        except SessionError:
            pass


def test_schema_errors_name_the_path():
    schema = Obj({"a": Seq(Obj({"n": Int(0, 9)}))})
    with pytest.raises(ProtocolError, match=r"x\.a\[1\]\.n: 10 outside 0\.\.9"):
        schema({"a": [{"n": 1}, {"n": 10}]}, "x")
    with pytest.raises(ProtocolError, match="unexpected field"):
        schema({"a": [], "b": 1}, "x")
    with pytest.raises(ProtocolError, match="expected an integer"):
        Int()(True, "x")
    with pytest.raises(ProtocolError, match="not one of"):
        Str(choices=("a",))("b", "x")


# --------------------------------------------------------------------------- frames


@pytest.fixture(scope="module")
def limits(cfg):
    return cfg.protocol


@pytest.fixture(scope="module")
def seeds(limits):
    return seed_frames(limits=limits)


def test_every_seed_frame_decodes(seeds, limits):
    kinds = set()
    for f in seeds:
        msg = codec.decode_frame(f, limits)
        T.follow_up(msg)
        kinds.add(type(msg).__name__)
    assert kinds == {"Hello", "TensorMessage", "Request", "Ack", "Reject", "Result", "Close"}


HELLO_FIELDS = ("role", "signature", "dtypes", "kinds", "max_message_bytes", "encryption", "auth", "bridge")


@pytest.mark.parametrize("field", HELLO_FIELDS)
def test_hello_type_confusion_is_refused_typed(seeds, limits, field):
    fields, header, _ = frame_parts(seeds[0])
    body = json.loads(header)
    original = body.get(field, {})  # optional fields (bridge) are objects
    for value in HOSTILE_VALUES:
        body[field] = value
        frame = forge(fields, json.dumps(body).encode())
        if type(value) is not type(original):  # a value of the wrong JSON type: always refused
            with pytest.raises(ProtocolError, match="HELLO"):
                codec.decode_frame(frame, limits)
            continue
        try:  # the right type: accepted, or refused typed (a range, a choice, a length)
            codec.decode_frame(frame, limits)
        except ProtocolError:
            pass


def test_decoder_fuzz_seeded(seeds, limits):
    report = run(T.decode(limits), "decode", seeds, 4000, seed=11)
    _no_failures(report)
    # the mutations reach every layer of checks, not just the header digest
    assert {"protocol", "checksum", "truncated", "too_large", "kind"} <= set(report.by_code), report.by_code
    assert report.accepted > 0 and report.typed > 0.5 * report.cases


def test_streaming_reader_agrees_with_whole_frame_decoding(seeds, limits):
    """protocol/reader.py, fed mutated frames in random slices, refuses exactly what
    decode_frame refuses (same error type) and otherwise gives the same message."""
    report = run(T.frame_reader(limits, seed=21), "frame_reader", seeds, 3000, seed=21)
    _no_failures(report)


def test_session_fuzz_seeded(seeds, limits):
    target = T.session(synthetic_signature(), limits)
    _no_failures(run(lambda f: target([seeds[0], f]), "session", seeds[1:], 2000, seed=12))
    _no_failures(run(lambda f: target([f]), "hello", seeds[:1], 600, seed=13))


@pytest.mark.slow
def test_message_file_fuzz_seeded(seeds):
    report = run(lambda f: T.message_file(len(f).to_bytes(8, "little") + f), "file", seeds, 300, seed=14)
    _no_failures(report)
    assert report.accepted > 0.05 * report.cases  # frames get past the reader into the decoder


@pytest.mark.parametrize("target, typed", [(T.seq_state_blob, EdgelinkError), (T.identity_file, ConfigError)],
                         ids=["seq_state_blob", "identity_file"])
@settings(max_examples=250, deadline=None)
@given(data=st.binary(max_size=300))
def test_any_bytes_give_a_value_or_a_typed_error(target, typed, data):
    """The llama.cpp sequence-state parser and the identity key reader, on arbitrary bytes."""
    try:
        target(data)
    except typed:
        pass


def _with_attrs(frame: bytes, attrs: dict) -> bytes:
    """A tensor frame with other attrs (and a valid header digest)."""
    fields, header, payload = frame_parts(frame)
    fixed = list(codec.TENSOR_FIXED.unpack_from(header, 0))
    rest = header[codec.TENSOR_FIXED.size + fixed[-1]:]
    raw = json.dumps(attrs).encode()
    fixed[-1] = len(raw)
    body = (codec.TENSOR_FIXED.pack(*fixed) + raw + rest).rstrip(b"\0")
    body += b"\0" * ((-(64 + len(body))) % 64)
    return forge(fields, body, payload)


def test_out_of_range_values_stop_at_the_schema(seeds, limits):
    """The cases that used to pass every check and fail deeper (struct.pack, math.isfinite)."""
    from edgelink.errors import StateError
    from edgelink.runtime.kvstate import tensors_to_state

    kv_frames = [f for f in seeds if f[6] == FrameType.TENSOR and b'"kv"' in f[:4096]]
    assert kv_frames
    for frame in kv_frames:
        msg = codec.decode_frame(frame, limits)
        for bad in (2**40, -(2**40), "0", 1.5, None):
            attrs = json.loads(json.dumps(msg.attrs))
            attrs["kv"]["seq_id"] = bad
            with pytest.raises(StateError, match="seq_id"):
                T.follow_up(codec.decode_frame(_with_attrs(frame, attrs), limits))
    for text in (b'{"gain": 1' + b"0" * 400 + b"}", b'{"gain": 1e400}', b'{"gain": -Infinity}'):
        with pytest.raises(ProtocolError):
            load_json(text, "attrs")
    for layout in ({"seq_id": 2**40, "caches": []}, {"seq_id": 0, "caches": 5}, {"seq_id": 0, "caches": [[7]]},
                   {"seq_id": 0, "caches": [[{"cells": 1, "v_trans": 0, "n_layer": 10**9}]]}, [], None):
        with pytest.raises(StateError):
            tensors_to_state({}, layout)


# --------------------------------------------------------------------------- a real export


@pytest.fixture(scope="module")
def real_seeds(smollm2_path, cfg, limits):
    from edgelink.fuzz import real_export

    sig, extra = real_export(str(smollm2_path), cfg.replace(runtime_n_ctx=256, runtime_n_threads=1))
    return sig, extra, seed_frames(sig, limits, extra)


def test_real_export_fuzz_seeded(real_seeds, limits):
    sig, _, seeds = real_seeds
    _no_failures(run(T.decode(limits), "decode-real", seeds[-12:], 600, seed=15))
    _no_failures(run(T.frame_reader(limits, seed=17), "frame_reader-real", seeds[-12:], 600, seed=17))
    target = T.session(sig, limits)
    _no_failures(run(lambda f: target([seeds[0], f]), "session-real", seeds[1:], 600, seed=16))


# --------------------------------------------------------------------------- files


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _fake_header_npz(name: str, shape: tuple[int, ...]) -> bytes:
    """An npz whose one member's npy header claims ``shape`` but holds 16 bytes of data."""
    hdr = io.BytesIO()
    np.lib.format.write_array_header_1_0(hdr, {"descr": "<f4", "fortran_order": False, "shape": shape})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{name}.npy", np.lib.format.magic(1, 0) + hdr.getvalue() + b"\0" * 16)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bridge_pair():
    with open(DEFAULT_BRIDGE + ".json", "rb") as fh:
        manifest = fh.read()
    with open(DEFAULT_BRIDGE + ".npz", "rb") as fh:
        npz = fh.read()
    return manifest, npz


def _bridge_case(manifest: bytes, npz: bytes, peak_bytes: int, *, fix_sha: bool = True) -> None:
    tracemalloc.start()
    try:
        T.bridge_files(manifest, npz, fix_sha=fix_sha)
    except ModelError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < peak_bytes, f"loading allocated {peak} bytes"


def test_the_shipped_bridge_still_loads(bridge_pair):
    br = T.bridge_files(*bridge_pair)
    assert br.k == 8


@pytest.mark.slow
def test_hostile_bridge_files_are_typed_and_bounded(bridge_pair):
    manifest, npz = bridge_pair
    bound = 8 * len(npz) + (64 << 20)
    # the weights as bridge_files writes them (b.npz), so each manifest case is its own hostile
    # value and nothing else (no fix-up of the manifest per case)
    meta = dict(json.loads(manifest), weights_file="b.npz", weights_sha256=hashlib.sha256(npz).hexdigest())
    rng = random.Random(3)
    # manifest fields: every top-level field and some nested ones, each hostile value
    for key in sorted(meta):
        for value in HOSTILE_VALUES:
            m = dict(meta, **{key: value})
            _bridge_case(json.dumps(m).encode(), npz, bound, fix_sha=False)
    for path in (("arch", "n_layers"), ("arch", "d_model"), ("normalizer", "mean"), ("pool", "kind"),
                 ("source", "n_embd"), ("prompt", "labels")):
        for value in (10**9, -1, 2**63, "x", None, [1.0] * 3, {"a": "b"}):
            m = copy.deepcopy(meta)
            m[path[0]][path[1]] = value
            _bridge_case(json.dumps(m).encode(), npz, bound, fix_sha=False)
    for text in HOSTILE_TEXT:
        _bridge_case(manifest.replace(b'"k": 8', b'"k": ' + text.encode()), npz, bound)
    # npz bytes: truncations and flips (the manifest's sha256 fixed up so the parser is reached)
    for _ in range(150):
        b = bytearray(npz)
        if rng.random() < 0.5:
            b = b[:rng.randrange(len(b))]
        else:
            for _ in range(rng.randint(1, 16)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        _bridge_case(manifest, bytes(b), bound)
    # npy headers that claim gigabytes the file does not hold
    for shape in ((1 << 20, 1 << 20), (576, 1 << 40), (2**62,), ()):
        _bridge_case(manifest, _fake_header_npz("in_ln.g", shape), 64 << 20)
    # names: NUL bytes, paths out of the bridge's folder
    from edgelink.bridge import load_bridge

    for bad in ("a\0b", "../../etc/passwd", "/etc/passwd", "."):
        m = dict(meta, weights_file=bad)
        with pytest.raises(ModelError):
            T.bridge_files(json.dumps(m).encode(), npz, fix_sha=False)
    with pytest.raises(ModelError):
        load_bridge("models/x\0y")


def test_identity_file_edge_cases(tmp_path):
    from edgelink.transport.identity import HEADER, load_identity

    good = f"{HEADER} {'ab' * 32}\n".encode()
    T.identity_file(good)  # a valid key file loads
    for bad in (b"x" * 100_000, good.replace(b"ab", b"\xff\xfe"), good[:-10], b"\0" * 64):
        with pytest.raises(ConfigError):
            T.identity_file(bad)
    with pytest.raises(ConfigError):
        load_identity(tmp_path / "a\0b", create=False)


# --------------------------------------------------------------------------- memory follows bytes


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_bare_length_claim_costs_no_memory(cfg):
    """A client writes only a frame length of 1 GiB: the receiver waits for bytes without
    committing the gigabyte, and gives up typed when the client goes away."""
    from edgelink.transport.framing import HEADER
    from edgelink.transport.shm import ShmListener
    from edgelink.transport.shm import connect as shm_connect

    name = f"t-claim-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    c = cfg.replace(shm_timeout_s=5.0)
    listener = ShmListener(name, c)
    got: dict = {}
    started = threading.Event()

    def serve():
        ch = listener.accept()
        started.set()
        try:
            ch.recv(2 << 30)
        except EdgelinkError as exc:
            got["error"] = exc
        finally:
            ch.close()

    t = threading.Thread(target=serve)
    t.start()
    client = shm_connect(name, c)
    started.wait(10)
    before = _rss()
    client._tx.write([memoryview(HEADER.pack(1 << 30))], 5.0)
    client._tx.write([memoryview(b"x" * 4096)], 5.0)  # a first page of payload, then nothing
    peak = before
    for _ in range(20):  # the receiver is now blocked mid-frame
        peak = max(peak, _rss())
        if got:
            break
        t.join(0.05)
    client.close()
    t.join(30)
    listener.close()
    assert isinstance(got.get("error"), EdgelinkError)
    assert peak - before < 64 << 20, f"RSS grew by {(peak - before) >> 20} MiB for a bare claim"


def test_recv_buffer_is_reused_and_lazy():
    from edgelink.transport.framing import RecvBuffer

    buf = RecvBuffer()
    before = _rss()
    v = buf.view(512 << 20)
    assert _rss() - before < 16 << 20  # reserved, not committed
    v[:4096] = b"\1" * 4096
    assert bytes(buf.view(10)) == b"\1" * 10 and buf.capacity >= 512 << 20


# --------------------------------------------------------------------------- hashes of the fixture


def test_fuzz_seeds_are_reproducible(limits):
    a = hashlib.sha256(b"".join(seed_frames(limits=limits)[1:])).hexdigest()
    b = hashlib.sha256(b"".join(seed_frames(limits=limits)[1:])).hexdigest()
    assert a == b
