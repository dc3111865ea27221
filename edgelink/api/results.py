"""What the API's calls return: plain dataclasses that print, compare and turn into JSON."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

# progress(what, done, total): how long work (a model pull) reports how far it is
Progress = Callable[[str, int, int], None]


@dataclasses.dataclass
class Generation:
    """Tokens and text from a greedy continuation, with where the time and bytes went."""

    model: str
    prompt_tokens: int
    tokens: list[int]
    text: str
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CacheFetch:
    """What fetching a prompt's prefix-cache chunks from peers did (``Model.fetch_cache``)."""

    chunks: int = 0  # chunks that arrived and verified
    lacking: int = 0  # chunks the local cache lacked before
    sources: list[str] = dataclasses.field(default_factory=list)  # peers asked, in order
    providers: list[str] = dataclasses.field(default_factory=list)  # DHT: trusted holders found
    untrusted: list[str] = dataclasses.field(default_factory=list)  # DHT: holders not in cache.trust
    errors: list[str] = dataclasses.field(default_factory=list)  # peers that failed (skipped)
    seconds: float = 0.0
