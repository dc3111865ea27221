"""edgelink: hand a language model's internal state to another process instead of text.

    import edgelink

    with edgelink.load("smollm2-135m") as m:          # one model + context, reused
        m.prefill("The capital of France is")
        with m.connect("shm:demo") as peer:           # one session, reused
            print(peer.handoff(n_tokens=16).text)     # ship the state, get the continuation

The public names below are imported on first use, so ``import edgelink`` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Before anything loads llama.cpp (and with it libgomp, which reads this once): OpenMP threads
# that spin only briefly when they wait, so that edgelink processes sharing a machine do not
# burn each other's cores at every barrier (edgelink/runtime/threads.py).
from edgelink.runtime.threads import default_wait_policy as _default_wait_policy  # noqa: E402

_default_wait_policy()

_PUBLIC = {
    "load": "edgelink.api.model",
    "Model": "edgelink.api.model",
    "Snapshot": "edgelink.api.model",
    "Generation": "edgelink.api.results",
    "ModelSignature": "edgelink.protocol.signature",
    "Peer": "edgelink.api.peer",
    "Round": "edgelink.api.peer",
    "from_llama": "edgelink.api.interop",
    "serve_http": "edgelink.server",
    "Config": "edgelink.config",
    "load_config": "edgelink.config",
    "EdgelinkError": "edgelink.errors",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'edgelink' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
