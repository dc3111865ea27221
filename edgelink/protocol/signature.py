"""What a model is, as the protocol carries it: the HELLO's signature, a message file's header,
the root of the prefix cache's keys. A dataclass here, below runtime (which builds one from a
loaded model: ``edgelink.runtime.signature.model_signature``), so every layer passes the object
itself; it becomes JSON only in the HELLO (``to_dict``). A peer's signature stays the untrusted
mapping it arrived as until ``edgelink.protocol.compat`` has compared it field by field."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from edgelink.errors import ProtocolError


@dataclasses.dataclass(frozen=True)
class ModelSignature:
    architecture: str
    family: str
    name: str
    weights_digest: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_type: str
    rope_freq_base: float | None
    rope_scaling: str | None
    norm: str
    vocab_size: int
    special_tokens: dict[str, int]
    n_ctx_train: int
    n_swa: int
    type_k: str
    type_v: str
    flash_attn: bool
    llama_cpp: str
    file_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSignature:
        """A signature back from ``to_dict()`` (a file, a child process's argument); every field
        must be there, and fields a newer version added are ignored."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise ProtocolError(f"a model signature lacks {missing}")
        return cls(**{n: d[n] for n in names})
