"""An OpenAI-compatible HTTP server over edgelink (``edgelink serve MODEL --http``): apps that
speak the OpenAI API get the prefix cache (RAM, disk, peers) without code changes.

Needs the optional extra ``edgelink[server]`` (Starlette, uvicorn)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgelink.config import Config, load_config
from edgelink.errors import ConfigError


def serve_http(model: str | None = None, cfg: Config | None = None, *, listen: str | None = None,
               api_keys: tuple[str, ...] | None = None,
               on_ready: Callable[[dict[str, Any]], None] | None = None, progress=None) -> None:
    """Serve ``model`` (default ``runtime.default_model``) on ``listen`` (``http.listen``,
    HOST:PORT; port 0 picks one, named in the ready event) until SIGINT/SIGTERM."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError("the HTTP server needs its extra: pip install 'edgelink[server]'") from None
    from edgelink.server.app import serve_http as _serve  # app needs the server extra

    cfg = cfg or load_config()
    _serve(model or cfg.runtime.default_model, cfg, listen=listen, api_keys_=api_keys, on_ready=on_ready,
           progress=progress)
