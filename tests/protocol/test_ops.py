"""The REQUEST/RESULT contract (edgelink/protocol/ops.py), as docs/architecture.md's recipe
"A request op" says to extend it: every op with a RESULT has a schema and a dataclass that
agree, and the sender reads nothing but that dataclass. No models."""

from __future__ import annotations

import dataclasses

import pytest

from edgelink.errors import SessionError
from edgelink.protocol.ops import PARAMS, RESULTS, GenerateResult, OpResult, check_result

# answered by a tensor message (a delta, a cache chunk), not by a RESULT
TENSOR_ANSWERS = {"delta", "cache_get"}


def test_every_op_has_params_and_a_result_contract():
    assert set(PARAMS) - TENSOR_ANSWERS == set(RESULTS)


@pytest.mark.parametrize("op", sorted(RESULTS))
def test_each_result_dataclass_is_its_schema(op):
    schema, cls = RESULTS[op]
    assert issubclass(cls, OpResult)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    needed = {n for n, f in fields.items()
              if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    assert needed == set(schema.required), "a field without a default is one the schema requires"
    assert set(fields) == set(schema.required) | set(schema.optional), "every schema field has a place"


def test_a_checked_body_is_typed_and_later_fields_stay_out():
    got = check_result("generate", {"tokens": [1, 2], "text": "hi", "generate_s": 0.5,
                                    "context_tokens": 9, "from_a_later_version": True})
    assert got == GenerateResult(context_tokens=9, tokens=[1, 2], text="hi", generate_s=0.5)


@pytest.mark.parametrize("body", [{"tokens": [1], "text": "x", "context_tokens": 1},  # no generate_s
                                  {"tokens": [-1], "text": "x", "generate_s": 0, "context_tokens": 1},
                                  {"tokens": "12", "text": "x", "generate_s": 0, "context_tokens": 1},
                                  []])
def test_a_bad_body_is_a_session_error(body):
    with pytest.raises(SessionError):
        check_result("generate", body)


def test_an_op_without_a_contract_is_refused():
    with pytest.raises(SessionError, match="no RESULT contract"):
        check_result("format_disk", {"context_tokens": 0})
