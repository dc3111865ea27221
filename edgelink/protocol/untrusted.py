"""JSON from a peer or a file: a bounded parse, then an explicit schema.

Every JSON body edgelink reads from outside (HELLO and control headers, tensor attrs, request
params, message files, bridge manifests) goes through :func:`load_json` and then a schema
from this module, so the code behind it only ever sees values of the declared types and
ranges. ``load_json`` refuses what Python's ``json`` would accept but later code could trip
on: integers outside the 64-bit range (Python would build a 4,000-digit integer, or refuse
with a plain ``ValueError``), ``NaN``/``Infinity`` and floats that overflow to infinity,
nesting deeper than a limit, and strings holding lone surrogates (they cannot be encoded
back to UTF-8). Every refusal is the caller's ``EdgelinkError`` subclass, with the path of the
offending value.

The schemas are a dozen lines of combinators rather than a dependency: the checks that matter
here (64-bit ranges that ``struct`` will pack, closed string sets, bounded list lengths,
typed errors of the layer that asks) are exactly these, and they run in microseconds on the
hot path of every frame.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from edgelink.errors import EdgelinkError, ProtocolError

I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
U64_MAX = (1 << 64) - 1
I32_MIN, I32_MAX = -(1 << 31), (1 << 31) - 1
# Decimal digits of the widest integer any field may hold (u64 has 20); longer literals are
# refused before Python converts them.
MAX_INT_DIGITS = 20
DEFAULT_MAX_DEPTH = 32

ErrorType = type[EdgelinkError]


class _Refused(Exception):
    """Raised inside json's hooks; turned into the caller's error type."""


def _parse_int(text: str) -> int:
    digits = len(text) - (text[0] == "-")
    if digits > MAX_INT_DIGITS:
        raise _Refused(f"integer literal of {digits} digits (at most {MAX_INT_DIGITS})")
    value = int(text)
    if not I64_MIN <= value <= U64_MAX:
        raise _Refused(f"integer {value} outside the 64-bit range")
    return value


def _parse_float(text: str) -> float:
    if len(text) > 64:
        raise _Refused(f"number literal of {len(text)} characters")
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"number {text[:32]} is not finite")
    return value


def _parse_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _walk(value: Any, max_depth: int) -> None:
    """Depth and string checks without recursion (a hostile document cannot exhaust the stack)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise _Refused("string holds a lone surrogate") from None
        elif isinstance(item, (dict, list)):
            if depth > max_depth:
                raise _Refused(f"nested deeper than {max_depth} levels")
            if isinstance(item, dict):
                for k, v in item.items():
                    stack.append((k, depth))
                    stack.append((v, depth + 1))
            else:
                stack.extend((v, depth + 1) for v in item)


def load_json(data: bytes | bytearray | memoryview | str, what: str, *,
              max_depth: int = DEFAULT_MAX_DEPTH, error: ErrorType = ProtocolError) -> Any:
    """Parse untrusted JSON; raise ``error`` (never anything else) when it is not acceptable."""
    try:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float,
                           parse_constant=_parse_constant)
        _walk(value, max_depth)
    except _Refused as exc:
        raise error(f"{what}: {exc}") from None
    except RecursionError:
        raise error(f"{what}: nested deeper than {max_depth} levels") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{what}: not valid JSON: {exc}") from None
    except ValueError as exc:  # anything else json or int() refuses
        raise error(f"{what}: not valid JSON: {exc}") from None
    return value


# ------------------------------------------------------------------------------- schemas


class Schema:
    """Checks one value; returns it (possibly normalised: a Hex string as bytes, a Num as float) or raises."""

    def check(self, value: Any, path: str, error: ErrorType) -> Any:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, value: Any, what: str, error: ErrorType = ProtocolError) -> Any:
        return self.check(value, what, error)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Int(Schema):
    def __init__(self, lo: int = I64_MIN, hi: int = I64_MAX):
        self.lo, self.hi = lo, hi

    def check(self, value, path, error):
        if not _is_int(value):
            raise error(f"{path}: expected an integer, got {_kind(value)}")
        if not self.lo <= value <= self.hi:
            raise error(f"{path}: {value} outside {self.lo}..{self.hi}")
        return value


class Num(Schema):
    """A finite number (an integer is accepted and returned as float)."""

    def __init__(self, lo: float = -math.inf, hi: float = math.inf):
        self.lo, self.hi = lo, hi

    def check(self, value, path, error):
        if not (_is_int(value) or isinstance(value, float)):
            raise error(f"{path}: expected a number, got {_kind(value)}")
        try:
            x = float(value)
        except OverflowError:
            raise error(f"{path}: number out of range") from None
        if not math.isfinite(x) or not self.lo <= x <= self.hi:
            raise error(f"{path}: {value} outside {self.lo}..{self.hi}")
        return x


class Bool(Schema):
    def check(self, value, path, error):
        if not isinstance(value, bool):
            raise error(f"{path}: expected true or false, got {_kind(value)}")
        return value


class Str(Schema):
    def __init__(self, max_len: int = 4096, choices: tuple[str, ...] | None = None,
                 min_len: int = 0):
        self.max_len, self.choices, self.min_len = max_len, choices, min_len

    def check(self, value, path, error):
        if not isinstance(value, str):
            raise error(f"{path}: expected a string, got {_kind(value)}")
        if not self.min_len <= len(value) <= self.max_len:
            raise error(f"{path}: string of {len(value)} characters (allowed {self.min_len}..{self.max_len})")
        if self.choices is not None and value not in self.choices:
            raise error(f"{path}: {value[:40]!r} is not one of {list(self.choices)}")
        return value


class Hex(Str):
    """A hex string (of ``n_bytes`` bytes when given); returned as bytes."""

    def __init__(self, n_bytes: int | None = None, max_bytes: int = 64):
        super().__init__(max_len=2 * (n_bytes or max_bytes), min_len=2 * (n_bytes or 0))
        self.n_bytes = n_bytes

    def check(self, value, path, error):
        super().check(value, path, error)
        try:
            return bytes.fromhex(value)
        except ValueError:
            raise error(f"{path}: not a hex string") from None


class Seq(Schema):
    """A list of ``item``, at most ``max_items`` long."""

    def __init__(self, item: Schema, max_items: int = 4096, min_items: int = 0):
        self.item, self.max_items, self.min_items = item, max_items, min_items

    def check(self, value, path, error):
        if not isinstance(value, list):
            raise error(f"{path}: expected a list, got {_kind(value)}")
        if not self.min_items <= len(value) <= self.max_items:
            raise error(f"{path}: list of {len(value)} items (allowed {self.min_items}..{self.max_items})")
        return [self.item.check(v, f"{path}[{i}]", error) for i, v in enumerate(value)]


class Nullable(Schema):
    def __init__(self, inner: Schema):
        self.inner = inner

    def check(self, value, path, error):
        return None if value is None else self.inner.check(value, path, error)


class Json(Schema):
    """Any JSON value (already bounded by :func:`load_json`), optionally limited to scalars."""

    def __init__(self, scalar: bool = False):
        self.scalar = scalar

    def check(self, value, path, error):
        if self.scalar and isinstance(value, (dict, list)):
            raise error(f"{path}: expected a scalar, got {_kind(value)}")
        return value


class Obj(Schema):
    """A JSON object with ``required`` and ``optional`` fields. Unknown keys are refused unless
    ``extra`` gives a schema for them (at most ``max_keys`` keys in all)."""

    def __init__(self, required: Mapping[str, Schema] | None = None,
                 optional: Mapping[str, Schema] | None = None, *,
                 extra: Schema | None = None, max_keys: int = 256):
        self.required = dict(required or {})
        self.optional = dict(optional or {})
        self.extra = extra
        self.max_keys = max_keys

    def check(self, value, path, error):
        if not isinstance(value, dict):
            raise error(f"{path}: expected an object, got {_kind(value)}")
        if len(value) > self.max_keys:
            raise error(f"{path}: object of {len(value)} keys (at most {self.max_keys})")
        out = {}
        for key, schema in self.required.items():
            if key not in value:
                raise error(f"{path}: missing field {key!r}")
            out[key] = schema.check(value[key], f"{path}.{key}", error)
        for key, item in value.items():
            if key in self.required:
                continue
            schema = self.optional.get(key, self.extra)
            if schema is None:
                raise error(f"{path}: unexpected field {key[:40]!r}")
            out[key] = schema.check(item, f"{path}.{key}", error)
        return out


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null", float: "a number"}.get(type(value), "an integer" if _is_int(value)
                                                       else type(value).__name__)
