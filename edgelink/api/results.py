"""What the API's calls return: plain dataclasses that print, compare and turn into JSON."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: results stay importable without llama.cpp
    from edgelink.cache.prefix import CachedPrefill
    from edgelink.roles.sender import WireFacts

# progress(what, done, total): how long work (a model pull) reports how far it is
Progress = Callable[[str, int, int], None]


@dataclasses.dataclass
class Verified:
    """The same continuation computed here (``handoff(verify=True)``): what the peer had to reproduce."""

    tokens: list[int]
    text: str
    matches: bool


@dataclasses.dataclass
class Written:
    """A state file that a call wrote (``export``, ``import_llama -o``)."""

    path: str | None = None
    format: str = "edgelink"  # or "llama": llama.cpp's own sequence-state file
    kind: str | None = None  # the message kind the file holds (KV_CACHE, KV_MEMORY, VIRTUAL_PREFIX)
    codec: str | None = None  # how its K/V tensors are encoded (edgelink/wire)
    payload_bytes: int = 0  # the tensor message's payload
    file_bytes: int = 0


@dataclasses.dataclass
class Applied:
    """A message file read and applied (``api.latent.apply_file``), then continued."""

    applied: list[str]  # the kinds applied, in order
    hidden_slices: int  # HIDDEN_SLICE messages held (they change no sequence)
    tokens: list[int]
    text: str
    digest: str  # the state after it all


@dataclasses.dataclass
class Bridged:
    """A handoff through a bridge to another model (``bridged_handoff``)."""

    bridge: str  # the bridge's digest
    k: int  # vectors it makes
    source_layer: int
    layout: dict[str, Any] | None = None  # how the receiver placed them (head, vectors, tail tokens)
    label_scores: dict[str, float] | None = None  # the receiver's scores, when the prompt has labels
    label_probs: dict[str, float] | None = None
    label: str | None = None


@dataclasses.dataclass
class Steering:
    """A steering patch the peer decoded with (``steer``)."""

    layer: int
    gain: float  # as applied: clipped to the peer's max_gain


@dataclasses.dataclass
class Generation:
    """Tokens and text from a greedy continuation, with where the time and bytes went. The
    optional parts say what else the call did; each is None when it did not happen."""

    model: str
    prompt_tokens: int
    tokens: list[int]
    text: str
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    to: str | None = None  # the peer that continued
    digest: str | None = None  # the digest of the state the peer acknowledged
    wire: WireFacts | None = None  # how the state travelled
    verified: Verified | None = None
    cache: CachedPrefill | None = None  # the prompt through the prefix cache
    fetch: CacheFetch | None = None  # chunks fetched from peers' caches first
    written: Written | None = None
    bridged: Bridged | None = None
    steering: Steering | None = None

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
