"""Mutations of real frames, the way a hostile peer would make them.

Byte flips alone mostly die at the header digest, which any peer can recompute (it guards
against corruption, not against an attacker), so most mutators here rebuild a *valid* header
digest around what they break: hostile JSON values at every field, numbers past every range,
tensor tables that lie about dtypes, shapes, offsets and lengths, and preambles that claim
sizes the frame does not hold. All randomness comes from one ``random.Random``: a seed
reproduces a case exactly.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from typing import Any

import blake3

from edgelink.protocol.codec import (
    HEADER_DIGEST_BYTES,
    PREAMBLE,
    PREAMBLE_BYTES,
    TENSOR_ENTRY,
    TENSOR_FIXED,
    TENSOR_TAIL,
)
from edgelink.protocol.kinds import FrameType

# Values that have broken (or could break) code behind a JSON field.
HOSTILE_VALUES: tuple[Any, ...] = (
    None, True, False, 0, -1, 1, 2**31, -(2**31) - 1, 2**63, 2**64, -(2**63) - 1, 10**25,
    1.5, -0.0, 1e308, "", "x" * 5000, "\u0000", "../../etc/passwd", [], [1, 2], [[[]]],
    {}, {"a": {"b": {}}}, ["kv"], {"seq_id": 0}, [None], [""], {"": None},
)
# Raw JSON text that Python's json module accepts but no field should: spliced in as text.
HOSTILE_TEXT: tuple[str, ...] = (
    "1" * 5000, "-" + "9" * 4400, "1e400", "-1e400", "NaN", "Infinity", "-Infinity",
    '"\\ud800"', '"\\udfff\\ud800"', "[" * 5000 + "]" * 5000, '{"a":' * 2000 + "1" + "}" * 2000,
    "[" * 40 + "]" * 40, "123456789012345678901234567890", "0.1e-400", '"' + "\\u0000" * 10 + '"',
)

Frame = bytes


def frame_parts(frame: bytes) -> tuple[tuple, bytes, bytes]:
    """(preamble fields, header, payload) of a whole frame (as encoded by the codec)."""
    fields = PREAMBLE.unpack_from(frame, 0)
    header_len = fields[6]
    header = frame[PREAMBLE_BYTES:PREAMBLE_BYTES + header_len]
    return fields, header, frame[PREAMBLE_BYTES + header_len:]


def forge(fields: tuple, header: bytes, payload: bytes = b"", *, fix_lengths: bool = True) -> bytes:
    """A frame with a valid header digest around anything: what an attacker can always send."""
    f = list(fields)
    if fix_lengths:
        f[6], f[8] = len(header), len(payload)
    pre = PREAMBLE.pack(*f)
    return pre + blake3.blake3(pre + header).digest(length=HEADER_DIGEST_BYTES) + header + payload


def _flip(rng: random.Random, data: bytes, n: int) -> bytes:
    b = bytearray(data)
    for _ in range(n):
        if b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:16]):
            out += _paths(v, prefix + (i,))
    return out


def _set(obj: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    obj[path[0]] = _set(obj[path[0]], path[1:], value)
    return obj


def _json_span(frame: bytes) -> tuple[tuple, bytes, bytes, int, int] | None:
    """Where a frame's JSON lies: the whole header, or a tensor frame's attrs."""
    fields, header, payload = frame_parts(frame)
    if fields[2] != FrameType.TENSOR:
        return fields, header, payload, 0, len(header)
    if len(header) < TENSOR_FIXED.size:
        return None
    attrs_len = TENSOR_FIXED.unpack_from(header, 0)[-1]
    if not attrs_len:
        return None
    return fields, header, payload, TENSOR_FIXED.size, TENSOR_FIXED.size + attrs_len


def _replace_json(frame: bytes, build: Callable[[Any], bytes]) -> bytes | None:
    span = _json_span(frame)
    if span is None:
        return None
    fields, header, payload, a, b = span
    try:
        obj = json.loads(header[a:b])
    except ValueError:
        return None
    new = build(obj)
    if fields[2] == FrameType.TENSOR:
        fixed = list(TENSOR_FIXED.unpack_from(header, 0))
        fixed[-1] = len(new)
        rest = header[b:]
        body = TENSOR_FIXED.pack(*fixed) + new + rest
        body += b"\0" * ((-(PREAMBLE_BYTES + len(body))) % 64)
        return forge(fields, body, payload)
    return forge(fields, new, payload)


def mutate_json_value(rng: random.Random, frame: bytes) -> bytes | None:
    """One field (at any depth) replaced by a hostile value, or a key dropped or added."""
    def build(obj: Any) -> bytes:
        path = rng.choice(_paths(obj))
        choice = rng.random()
        if choice < 0.15 and path and isinstance(obj, dict):
            parent = obj
            for p in path[:-1]:
                parent = parent[p]
            if isinstance(parent, dict):
                parent.pop(path[-1], None)
        elif choice < 0.25 and isinstance(obj, dict):
            obj[rng.choice(["x", "op", "kv", "auth", "bridge", "layers", "gain"])] = rng.choice(HOSTILE_VALUES)
        else:
            obj = _set(obj, path, rng.choice(HOSTILE_VALUES))
        return json.dumps(obj).encode()
    return _replace_json(frame, build)


def mutate_json_text(rng: random.Random, frame: bytes) -> bytes | None:
    """A field's value replaced by raw JSON text Python parses into something unexpected."""
    def build(obj: Any) -> bytes:
        marker = "\u2603MARK\u2603"
        paths = [p for p in _paths(obj) if p]
        if paths:
            obj = _set(obj, rng.choice(paths), marker)
        else:
            obj = marker
        text = json.dumps(obj, ensure_ascii=False)
        return text.replace(json.dumps(marker, ensure_ascii=False), rng.choice(HOSTILE_TEXT), 1).encode()
    return _replace_json(frame, build)


def mutate_tensor_table(rng: random.Random, frame: bytes) -> bytes | None:
    """One number in a tensor frame's fixed part or table rewritten (kind, apply, slot, ranges,
    count, dtype, rank, shape, offset, length)."""
    fields, header, payload = frame_parts(frame)
    if fields[2] != FrameType.TENSOR or len(header) < TENSOR_FIXED.size:
        return None
    h = bytearray(header)
    fixed = list(TENSOR_FIXED.unpack_from(h, 0))
    if rng.random() < 0.3:
        i = rng.choice([0, 1, 3, 4, 5, 6, 7, 8])
        fmt = TENSOR_FIXED.format[1:][i]
        fixed[i] = _wild(rng, fmt)
        TENSOR_FIXED.pack_into(h, 0, *fixed)
        return forge(fields, bytes(h), payload)
    # walk the table to a random entry
    pos = TENSOR_FIXED.size + fixed[-1]
    entries = []
    for _ in range(fixed[-2]):
        if pos + TENSOR_ENTRY.size > len(h):
            break
        name_len, _dt, ndim = TENSOR_ENTRY.unpack_from(h, pos)
        entries.append((pos, ndim))
        pos += TENSOR_ENTRY.size + 8 * ndim + TENSOR_TAIL.size + name_len
    if not entries:
        return None
    at, ndim = rng.choice(entries)
    target = rng.randrange(3 + ndim + 2)
    if target < 3:
        vals = list(TENSOR_ENTRY.unpack_from(h, at))
        vals[target] = _wild(rng, TENSOR_ENTRY.format[1:][target])
        TENSOR_ENTRY.pack_into(h, at, *vals)
    elif target < 3 + ndim:
        struct.pack_into("<Q", h, at + TENSOR_ENTRY.size + 8 * (target - 3), _wild(rng, "Q"))
    else:
        off = at + TENSOR_ENTRY.size + 8 * ndim + 8 * (target - 3 - ndim)
        struct.pack_into("<Q", h, off, _wild(rng, "Q"))
    return forge(fields, bytes(h), payload)


def mutate_preamble(rng: random.Random, frame: bytes) -> bytes:
    """A preamble field (version, type, flags, message id, lengths) rewritten, digest valid."""
    fields, header, payload = frame_parts(frame)
    f = list(fields)
    i = rng.choice([1, 2, 3, 5, 6, 7, 8])
    f[i] = _wild(rng, PREAMBLE.format[1:].replace("4s", "s").replace("16s", "s")[i])
    return forge(tuple(f), header, payload, fix_lengths=False)


def mutate_bytes(rng: random.Random, frame: bytes) -> bytes:
    """Bit flips anywhere, with the header digest recomputed half the time."""
    out = _flip(rng, frame, rng.randint(1, 8))
    if rng.random() < 0.5 and len(out) >= PREAMBLE_BYTES:
        try:
            fields, header, payload = frame_parts(out)
            return forge(fields, header, payload, fix_lengths=False)
        except struct.error:
            return out
    return out


def mutate_length(rng: random.Random, frame: bytes) -> bytes:
    """Cut short, or grown with junk."""
    if rng.random() < 0.6:
        return frame[:rng.randrange(len(frame))]
    return frame + rng.randbytes(rng.randint(1, 256))


def mutate_splice(rng: random.Random, frame: bytes, other: bytes) -> bytes:
    """The preamble of one frame over the body of another (types and bodies crossed)."""
    f1, _, _ = frame_parts(frame)
    _, h2, p2 = frame_parts(other)
    return forge(f1, h2, p2 if f1[2] == FrameType.TENSOR else b"")


def _wild(rng: random.Random, fmt: str) -> int:
    bits = {"B": 8, "H": 16, "I": 32, "i": 32, "Q": 64, "q": 64}[fmt]
    signed = fmt in "iq"
    pick = rng.random()
    if pick < 0.3:
        v = rng.choice([0, 1, 2, 3, 255, 65535, (1 << bits) - 1, 1 << (bits - 1), 64, 4096, 1 << 30])
    elif pick < 0.6:
        v = rng.getrandbits(bits)
    else:
        v = rng.randint(0, 64)
    v &= (1 << bits) - 1
    if signed and v >= 1 << (bits - 1):
        v -= 1 << bits
    return v


MUTATORS: tuple[Callable[[random.Random, bytes], bytes | None], ...] = (
    mutate_json_value, mutate_json_value, mutate_json_text, mutate_tensor_table,
    mutate_tensor_table, mutate_preamble, mutate_bytes, mutate_length,
)


def _try(mut, rng: random.Random, frame: bytes) -> bytes | None:
    """A mutator that cannot make sense of an already-broken frame just makes nothing."""
    try:
        return mut(rng, frame)
    except (ValueError, RecursionError, struct.error, IndexError, KeyError, TypeError):
        return None


def mutations(rng: random.Random, seeds: list[bytes], n: int):
    """``n`` mutated frames from ``seeds``: (mutator name, frame)."""
    made = 0
    while made < n:
        frame = rng.choice(seeds)
        if rng.random() < 0.05 and len(seeds) > 1:
            out = _try(lambda r, f: mutate_splice(r, f, rng.choice(seeds)), rng, frame)
            if out is not None:
                made += 1
                yield "splice", out
            continue
        mut = rng.choice(MUTATORS)
        out = _try(mut, rng, frame)
        if out is None:
            continue
        if rng.random() < 0.15 and len(out) >= PREAMBLE_BYTES:  # stack a second one now and then
            out = _try(rng.choice(MUTATORS), rng, out) or out
        made += 1
        yield mut.__name__, out
