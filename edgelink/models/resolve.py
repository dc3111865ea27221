"""From what a user names (a registry name, a shape twin, a path) to a model file on disk,
pulling it into the cache when needed. Above both the registry (what models exist) and the
puller (how they arrive), so neither needs the other's caller."""

from __future__ import annotations

import os
from pathlib import Path

from edgelink.config import Config
from edgelink.errors import ModelError
from edgelink.models import pull as puller
from edgelink.models.registry import (
    Progress,
    _looks_like_path,
    _unknown_message,
    check_gguf_file,
    is_cached,
    model_cache_path,
    registry_for,
)
from edgelink.models.twins import twin_path


def resolve_model(spec: str, cfg: Config, pull: bool = True, progress: Progress | None = None) -> Path:
    """Turn a registry name, a shape twin (``twin:llama-3-8b``) or a path to a .gguf file into
    a local file path.

    A registry name not yet cached is pulled when ``pull`` is true; an existing path is returned
    (made absolute, "~" expanded) without being copied or hashed.
    """
    if not spec:
        raise ModelError("no model given")
    if spec.startswith("twin:"):  # a shape twin of a real model (edgelink/models/twins.py)
        return twin_path(spec, cfg)
    entries = registry_for(cfg)
    if spec in entries and not _looks_like_path(spec):
        entry = entries[spec]
        path = model_cache_path(entry, cfg)
        if is_cached(entry, cfg):
            return path
        if not pull:
            raise ModelError(
                f"model {spec!r} is not downloaded yet; run `edgelink models pull {spec}`"
            )
        return puller.pull_model(entry, cfg, progress=progress)
    candidate = Path(os.path.expanduser(spec))
    if candidate.exists():
        return check_gguf_file(candidate.absolute())
    if _looks_like_path(spec):
        raise ModelError(f"model file not found: {candidate}")
    raise ModelError(_unknown_message(spec, entries))
