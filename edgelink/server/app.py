"""The OpenAI-compatible HTTP server: Starlette routes over an ``Engine``, run by uvicorn.

Why Starlette and uvicorn: they are what llama-cpp-python's own server stands on (through
FastAPI), small, typed, with streaming responses and disconnect detection built in; edgelink
needs neither FastAPI's models (openai.py checks bodies, in OpenAI's error shape) nor
sse-starlette (an event stream is a few lines over a streaming response).

Decoding runs in worker threads, one per request holding a context; the event loop only moves
bytes. A streamed request whose client disconnects is cancelled at the next token, a plain one
as soon as the disconnect is seen, and its context is free for the next request at once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from edgelink.config import Config, config_list
from edgelink.errors import ConfigError, EdgelinkError
from edgelink.server.engine import Busy, Engine, Outcome, TooLong
from edgelink.server.openai import (
    ApiError,
    Request,
    chunk,
    new_id,
    parse_json,
    parse_request,
    response,
)

log = logging.getLogger(__name__)


def api_keys(cfg: Config) -> tuple[str, ...]:
    keys = config_list(cfg.http.api_keys)
    if cfg.http.api_key_file:
        from pathlib import Path

        try:
            text = Path(cfg.http.api_key_file).expanduser().read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read http.api_key_file: {exc}") from None
        keys += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return tuple(keys)


def split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"http.listen is {listen!r}: HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _error(exc: ApiError):
    from starlette.responses import JSONResponse

    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def build_app(engine: Engine, cfg: Config, keys: tuple[str, ...] = ()):
    """The Starlette application serving ``engine`` (no socket: ``serve_http`` runs it)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    limit = cfg.http.max_body_bytes
    wanted = [k.encode() for k in keys]

    def check_auth(request) -> None:
        if not wanted:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        ok = scheme.lower() == "bearer" and any(hmac.compare_digest(token.strip().encode(), k) for k in wanted)
        if not ok:
            raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)",
                           type="invalid_request_error", code="invalid_api_key")

    async def read_body(request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise ApiError(413, f"the request body is over {limit} bytes (http.max_body_bytes)",
                           code="request_too_large")
        out = bytearray()
        async for part in request.stream():
            out += part
            if len(out) > limit:
                raise ApiError(413, f"the request body is over {limit} bytes (http.max_body_bytes)",
                               code="request_too_large")
        return bytes(out)

    def prompt_tokens(req: Request) -> list[int]:
        try:
            return engine.chat_tokens(req.messages) if req.chat else engine.text_tokens(req.prompt)
        except ConfigError as exc:
            raise ApiError(400, str(exc), code="unsupported_model") from None
        except EdgelinkError as exc:
            raise ApiError(400, str(exc), param="messages", code="invalid_value") from None

    async def completions(request, chat: bool):
        try:
            check_auth(request)
            body = parse_json(await read_body(request))
            req = parse_request(body, chat=chat, max_tokens_cap=cfg.http.max_tokens)
            if req.model not in (None, "", engine.name):
                raise ApiError(404, f"The model '{req.model}' does not exist; this server serves "
                               f"'{engine.name}' (GET /v1/models)", param="model", code="model_not_found")
            tokens = await asyncio.to_thread(prompt_tokens, req)
            if len(tokens) >= engine.n_ctx:
                raise ApiError(400, f"this prompt is {len(tokens)} tokens and the model's context holds "
                               f"{engine.n_ctx} (runtime.n_ctx), with room for at least one more",
                               param="messages" if chat else "prompt", code="context_length_exceeded")
        except ApiError as exc:
            return _error(exc)
        rid = new_id(chat)
        run = _Run(engine, req, tokens)
        watcher = asyncio.create_task(_watch(request, run.cancel))
        try:
            first = await run.q.get()  # after the prefill: a delta, or why it could not start
            if isinstance(first, BaseException):
                _raise_for(first, engine)
            if req.stream:
                watcher.cancel()  # Starlette's streaming response listens for the disconnect now
                return StreamingResponse(_stream(engine, req, rid, run, first), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            text, out = await _rest(run, first, engine)
        except ApiError as exc:
            return _error(exc)
        finally:
            watcher.cancel()
        if run.cancel.is_set() or out is None:  # the client went away: nobody to answer
            return JSONResponse({}, status_code=499)
        return JSONResponse(response(req, rid, engine.name, text, out))

    async def chat_completions(request):
        return await completions(request, True)

    async def text_completions(request):
        return await completions(request, False)

    async def models(request):
        try:
            check_auth(request)
        except ApiError as exc:
            return _error(exc)
        return JSONResponse({"object": "list", "data": [{"id": engine.name, "object": "model",
                                                          "created": engine.created, "owned_by": "edgelink"}]})

    async def health(request):
        return JSONResponse({"status": "ok", "model": engine.name, "contexts": engine.parallel,
                             "decoding": engine.decoding, "waiting": engine.waiting})

    async def not_found(request, exc):
        return _error(ApiError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    async def not_allowed(request, exc):
        return _error(ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                               code="method_not_allowed"))

    async def crashed(request, exc):
        log.exception("request failed")
        return _error(ApiError(500, "the server failed on this request (logged)", type="server_error"))

    middleware = []
    origins = config_list(cfg.http.cors_origins)
    if origins:
        from starlette.middleware.cors import CORSMiddleware

        middleware.append(Middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                                     allow_headers=["authorization", "content-type"]))
    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", text_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={404: not_found, 405: not_allowed, 500: crashed, Exception: crashed})


def _busy(exc: Busy, cfg_retry: float) -> ApiError:
    return ApiError(429, f"the server is at capacity: {exc}; retry shortly", type="rate_limit_exceeded",
                    code="rate_limit_exceeded", headers={"Retry-After": f"{max(1, round(cfg_retry))}"})


class _Run:
    """One request decoding in a worker thread, which owns its context from acquiring it to
    giving it back; what it yields (deltas, the outcome, an exception, then None) arrives in
    ``q``. Setting ``cancel`` stops it at the next token."""

    def __init__(self, engine: Engine, req: Request, tokens: list[int]):
        self.loop = asyncio.get_running_loop()
        self.q: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        threading.Thread(target=self._work, args=(engine, req, tokens), daemon=True,
                         name="edgelink-http").start()

    def _put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.q.put_nowait, item)
        except RuntimeError:  # the event loop is gone (the server stopped): stop decoding
            self.cancel.set()

    def _work(self, engine: Engine, req: Request, tokens: list[int]) -> None:
        try:
            for item in engine.run(tokens, req.params, self.cancel.is_set):
                self._put(item)
        except Exception as exc:  # noqa: BLE001 - reported to the waiting request
            self._put(exc)
        finally:
            self._put(None)


async def _watch(request, cancel: threading.Event) -> None:
    """Set ``cancel`` when the client disconnects (the body was read: the next message is that)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            cancel.set()
            return


def _raise_for(item: BaseException, engine: Engine) -> None:
    if isinstance(item, Busy):
        raise _busy(item, engine.cfg.http.retry_after_s)
    if isinstance(item, TooLong):
        raise ApiError(400, str(item), code="context_length_exceeded")
    if isinstance(item, EdgelinkError):
        raise ApiError(500, f"generation failed: {item}", type="server_error")
    raise item


async def _rest(run: _Run, item: Any, engine: Engine) -> tuple[str, Outcome | None]:
    """Collect a request that is not streamed, from its first item on."""
    parts: list[str] = []
    out: Outcome | None = None
    while item is not None:
        if isinstance(item, BaseException):
            _raise_for(item, engine)
        elif isinstance(item, Outcome):
            out = item
        else:
            parts.append(item)
        item = await run.q.get()
    return "".join(parts), out


async def _stream(engine: Engine, req: Request, rid: str, run: _Run, item: Any):
    """Server-sent events: a role chunk, text deltas, the finishing chunk, usage if asked, DONE.
    Starlette cancels this generator when the client disconnects; the worker then stops."""

    def event(body: dict) -> bytes:
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    try:
        if req.chat:
            yield event(chunk(req, rid, engine.name, role=True))
        while item is not None:
            if isinstance(item, Outcome):
                yield event(chunk(req, rid, engine.name, out=item))
                if req.include_usage:
                    yield event(chunk(req, rid, engine.name, out=item, usage_only=True))
            elif isinstance(item, BaseException):
                try:
                    _raise_for(item, engine)
                except ApiError as exc:
                    yield event(exc.body())
            else:
                yield event(chunk(req, rid, engine.name, text=item))
            item = await run.q.get()
        yield b"data: [DONE]\n\n"
    finally:
        run.cancel.set()  # a disconnect lands here: the worker stops at its next token


def serve_http(model: str, cfg: Config, *, listen: str | None = None, api_keys_: tuple[str, ...] | None = None,
               on_ready: Callable[[dict[str, Any]], None] | None = None, progress=None) -> None:
    """Serve ``model`` over the OpenAI API until SIGINT/SIGTERM. Beyond loopback an API key is
    required (``http.api_keys``, ``http.api_key_file``)."""
    import uvicorn

    host, port = split_listen(listen or cfg.http.listen)
    keys = api_keys(cfg) if api_keys_ is None else tuple(api_keys_)
    if not is_loopback(host) and not keys:
        raise ConfigError(f"the server would listen on {host}:{port} with no API key, so anyone who reaches it "
                          "could use the model: give --api-key-file FILE (http.api_key_file, or "
                          "EDGELINK_HTTP_API_KEYS), or listen on 127.0.0.1")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)  # connections queue from now on: the ready event may be acted on at once
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror} (http.listen, --http)") from None
    engine = Engine(model, cfg, progress=progress)
    try:
        bound = sock.getsockname()[1]
        app = build_app(engine, cfg, keys)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        if on_ready is not None:
            shown = f"[{host}]" if family == socket.AF_INET6 else host
            on_ready({"event": "ready", "url": f"http://{shown}:{bound}/v1", "model": engine.name,
                      "contexts": engine.parallel, "threads_per_context": engine.threads,
                      "n_ctx": engine.n_ctx, "api_key": bool(keys),
                      "cache_dir": str(engine.cache.store.dir) if engine.cache.store.dir else None})
        server.run(sockets=[sock])
    finally:
        sock.close()
        engine.close()
