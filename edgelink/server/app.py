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
from edgelink.errors import (
    ConfigError,
    EdgelinkError,
    ProtocolError,
    SessionError,
    StateError,
    TransportError,
)
from edgelink.server.engine import Busy, Engine, Outcome, TokenLogprob, TooLong
from edgelink.server.openai import (
    ApiError,
    Request,
    chunk,
    logprobs_body,
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

    api = _Api(engine, cfg, keys)
    middleware = _middleware(cfg)
    return Starlette(routes=_routes(api), middleware=middleware,
                     exception_handlers={404: _not_found, 405: _not_allowed, 500: _crashed, Exception: _crashed})


def _middleware(cfg: Config) -> list:
    """CORS for the configured origins only (none: no middleware, so browsers see no grant)."""
    from starlette.middleware import Middleware

    middleware = []
    origins = config_list(cfg.http.cors_origins)
    if origins:
        from starlette.middleware.cors import CORSMiddleware

        middleware.append(Middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                                     allow_headers=["authorization", "content-type"]))
    return middleware


def _routes(api: _Api) -> list:
    """The OpenAI routes, the health check and edgelink's handoff routes."""
    from starlette.routing import Route

    return [Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
            Route("/v1/completions", api.text_completions, methods=["POST"]),
            Route("/v1/models", api.models, methods=["GET"]),
            Route("/v1/models/{model:path}", api.model, methods=["GET"]),
            Route("/health", api.health, methods=["GET"]),
            Route("/edgelink/v1/state", api.edgelink_state, methods=["POST"]),
            Route("/edgelink/v1/continue", api.edgelink_continue, methods=["POST"]),
            Route("/edgelink/v1/handoff", api.edgelink_handoff, methods=["POST"])]


async def _not_found(request, exc):
    return _error(ApiError(404, f"no route {request.method} {request.url.path}", code="not_found"))


async def _not_allowed(request, exc):
    return _error(ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                           code="method_not_allowed"))


async def _crashed(request, exc):
    log.exception("request failed")
    return _error(ApiError(500, "the server failed on this request (logged)", type="server_error"))


class _Api:
    """The route handlers and what they share: the engine, the settings, the accepted API keys."""

    def __init__(self, engine: Engine, cfg: Config, keys: tuple[str, ...]):
        self.engine = engine
        self.cfg = cfg
        self.limit = cfg.http.max_body_bytes
        self.wanted = [k.encode() for k in keys]

    # ---------------------------------------------------------------- shared checks

    def check_auth(self, request) -> None:
        """A bearer key from ``keys`` (compared in constant time); no keys: no check."""
        if not self.wanted:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        ok = scheme.lower() == "bearer" and any(hmac.compare_digest(token.strip().encode(), k) for k in self.wanted)
        if not ok:
            raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)",
                           type="invalid_request_error", code="invalid_api_key")

    async def read_body(self, request) -> bytes:
        """The body, refused (413) as soon as it is over http.max_body_bytes, declared or sent."""
        limit = self.limit
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

    def prompt_tokens(self, req: Request) -> list[int]:
        """The request's prompt (chat template applied) as tokens; engine refusals are 400s."""
        engine = self.engine
        try:
            return engine.chat_tokens(req.messages) if req.chat else engine.text_tokens(req.prompt)
        except ConfigError as exc:
            raise ApiError(400, str(exc), code="unsupported_model") from None
        except EdgelinkError as exc:
            raise ApiError(400, str(exc), param="messages", code="invalid_value") from None

    # ---------------------------------------------------------------- /v1: OpenAI

    async def completions(self, request, chat: bool):
        """A checked chat or text completion: key, body, model name, context room; then answered."""
        engine = self.engine
        try:
            self.check_auth(request)
            body = parse_json(await self.read_body(request))
            req = parse_request(body, chat=chat, max_tokens_cap=self.cfg.http.max_tokens)
            if req.model not in (None, "", engine.name):
                raise ApiError(404, f"The model '{req.model}' does not exist; this server serves "
                               f"'{engine.name}' (GET /v1/models)", param="model", code="model_not_found")
            tokens = await asyncio.to_thread(self.prompt_tokens, req)
            if len(tokens) >= engine.n_ctx:
                raise ApiError(400, f"this prompt is {len(tokens)} tokens and the model's context holds "
                               f"{engine.n_ctx} (runtime.n_ctx), with room for at least one more",
                               param="messages" if chat else "prompt", code="context_length_exceeded")
        except ApiError as exc:
            return _error(exc)
        return await self.answer(request, req, tokens, None)

    async def answer(self, request, req: Request, tokens: list[int] | None, state: bytes | None):
        """Run a checked request (a prompt, or a handed-over state) and answer it, streamed or whole."""
        from starlette.responses import JSONResponse, StreamingResponse

        engine = self.engine
        rid = new_id(req.chat)
        run = _Run(engine, req, tokens, state)
        watcher = asyncio.create_task(_watch(request, run.cancel))
        try:
            first = await run.q.get()  # after the prefill: a delta, or why it could not start
            if isinstance(first, BaseException):
                _raise_for(first, engine)
            if req.stream:
                watcher.cancel()  # Starlette's streaming response listens for the disconnect now
                return StreamingResponse(_stream(engine, req, rid, run, first), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            text, out, entries = await _rest(run, first, engine)
        except ApiError as exc:
            return _error(exc)
        finally:
            watcher.cancel()
        if run.cancel.is_set() or out is None:  # the client went away: nobody to answer
            return JSONResponse({}, status_code=499)
        return JSONResponse(response(req, rid, engine.name, text, out, entries))

    async def chat_completions(self, request):
        return await self.completions(request, True)

    async def text_completions(self, request):
        return await self.completions(request, False)

    async def models(self, request):
        from starlette.responses import JSONResponse

        engine = self.engine
        try:
            self.check_auth(request)
        except ApiError as exc:
            return _error(exc)
        return JSONResponse({"object": "list", "data": [_model_object(engine)]})

    async def model(self, request):
        """``GET /v1/models/{id}``: the served model, or OpenAI's 404 for any other id."""
        from starlette.responses import JSONResponse

        engine = self.engine
        try:
            self.check_auth(request)
            wanted = request.path_params["model"]
            if wanted != engine.name:
                raise ApiError(404, f"The model '{wanted[:200]}' does not exist; this server serves "
                               f"'{engine.name}'", param="model", code="model_not_found")
        except ApiError as exc:
            return _error(exc)
        return JSONResponse(_model_object(engine))

    async def health(self, request):
        from starlette.responses import JSONResponse

        engine = self.engine
        return JSONResponse({"status": "ok", "model": engine.name, "contexts": engine.parallel,
                             "decoding": engine.decoding, "waiting": engine.waiting})

    # ---------------------------------------------------------------- /edgelink: handoffs

    async def edgelink_prompt(self, request) -> tuple[Request, list[int], dict]:
        """A completion body (``messages`` or ``prompt``) as checked tokens, and the raw body."""
        engine = self.engine
        body = parse_json(await self.read_body(request))
        req = parse_request(body, chat="messages" in body, max_tokens_cap=self.cfg.http.max_tokens)
        tokens = await asyncio.to_thread(self.prompt_tokens, req)
        if len(tokens) >= engine.n_ctx:
            raise ApiError(400, f"this prompt is {len(tokens)} tokens and the model's context holds "
                           f"{engine.n_ctx} (runtime.n_ctx)", code="context_length_exceeded")
        return req, tokens, body

    async def edgelink_state(self, request):
        """POST a completion body: the prompt's KV state (through the prefix cache) as an
        edgelink message file, the bytes `edgelink resume` and /edgelink/v1/continue read."""
        from starlette.responses import Response

        engine = self.engine
        try:
            self.check_auth(request)
            _, tokens, _ = await self.edgelink_prompt(request)
            frames, out = await asyncio.to_thread(_engine_call, engine, engine.state, tokens)
        except ApiError as exc:
            return _error(exc)
        return Response(frames, media_type=ELK_MEDIA_TYPE,
                        headers={"X-Edgelink-Tokens": str(out.prompt_tokens),
                                 "X-Edgelink-Cached-Tokens": str(out.cached_tokens)})

    async def edgelink_continue(self, request):
        """POST an edgelink message file (a state another process handed over): verified, then
        continued here; the answer is a text completion (streamed with ?stream=true). Sampling
        settings come as query parameters (max_tokens, temperature, top_p, seed, stop)."""
        try:
            self.check_auth(request)
            state = await self.read_body(request)
            if not state:
                raise ApiError(400, "the body must be an edgelink message file (edgelink export, "
                               "POST /edgelink/v1/state)", code="missing_required_parameter")
            req = parse_request({"prompt": "-", **_query_body(request.query_params)}, chat=False,
                                max_tokens_cap=self.cfg.http.max_tokens)
        except ApiError as exc:
            return _error(exc)
        return await self.answer(request, req, None, state)

    async def edgelink_handoff(self, request):
        """POST a completion body with ``to`` (``shm:NAME`` or a multiaddr, and ``token`` for a
        node that wants one): the prompt is prefilled here and its state handed to that
        receiver, whose greedy continuation is the answer."""
        from starlette.responses import JSONResponse

        engine = self.engine
        try:
            self.check_auth(request)
            req, tokens, body = await self.edgelink_prompt(request)
            to, token = _handoff_target(body)
            g, out = await asyncio.to_thread(_engine_call, engine, engine.handoff, tokens, to,
                                             req.params.max_tokens, token)
        except ApiError as exc:
            return _error(exc)
        return JSONResponse({"object": "edgelink.handoff", "model": engine.name, "to": to, "text": g.text,
                             "tokens": g.tokens, "usage": {"prompt_tokens": out.prompt_tokens,
                                                           "completion_tokens": len(g.tokens),
                                                           "prompt_tokens_details": {"cached_tokens": out.cached_tokens}},
                             "bytes": g.bytes, "timings": {"prefill_s": out.prefill_s, **g.timings}})


def _model_object(engine: Engine) -> dict[str, Any]:
    return {"id": engine.name, "object": "model", "created": engine.created, "owned_by": "edgelink"}


def _handoff_target(body: dict) -> tuple[str, str | None]:
    """A handoff body's receiver (``to``) and its optional node ``token``, type-checked."""
    to = body.get("to")
    if not isinstance(to, str) or not to:
        raise ApiError(400, "'to' must name a receiver: shm:NAME or /ip4/.../p2p/PEER", param="to",
                       code="missing_required_parameter" if to is None else "invalid_type")
    token = body.get("token")
    if token is not None and not isinstance(token, str):
        raise ApiError(400, "'token' must be a string", param="token", code="invalid_type")
    return to, token


ELK_MEDIA_TYPE = "application/vnd.edgelink.message"


def _api_error(exc: EdgelinkError, engine: Engine, generic: int = 500) -> ApiError:
    """An engine failure as an OpenAI-shaped error: capacity (429), a prompt too long (400), a
    handed-over state or a peer that refused (422 / 409, with edgelink's reason), a peer that
    cannot be reached (502); anything else ``generic``."""
    if isinstance(exc, Busy):
        return _busy(exc, engine.cfg.http.retry_after_s)
    if isinstance(exc, TooLong):
        return ApiError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, (ProtocolError, StateError)):
        return ApiError(422, f"{exc.code}: {exc}", code=exc.code)
    if isinstance(exc, SessionError):
        return ApiError(409, f"{exc.code}: {exc}", code=exc.code)
    if isinstance(exc, TransportError):
        return ApiError(502, f"{exc.code}: {exc}", type="server_error", code=exc.code)
    return ApiError(generic, f"{exc.code}: {exc}", type="server_error" if generic >= 500 else "invalid_request_error",
                    code=exc.code)


def _engine_call(engine: Engine, fn: Callable, *args: Any) -> Any:
    """An engine call from a worker thread, its failures as OpenAI-shaped errors."""
    try:
        return fn(*args)
    except EdgelinkError as exc:
        raise _api_error(exc, engine) from None


_QUERY_INT = ("max_tokens", "seed")
_QUERY_NUM = ("temperature", "top_p")


def _query_body(q) -> dict[str, Any]:
    """Sampling settings from a query string, typed as a JSON body would carry them."""
    out: dict[str, Any] = {}
    for key, raw in q.multi_items():
        if key in _QUERY_INT or key in _QUERY_NUM:
            try:
                out[key] = int(raw) if key in _QUERY_INT else float(raw)
            except ValueError:
                raise ApiError(400, f"'{key}' must be a number, got {raw[:40]!r}", param=key,
                               code="invalid_type") from None
        elif key == "stream":
            out["stream"] = raw.lower() in ("1", "true", "yes")
        elif key == "stop":
            out.setdefault("stop", []).append(raw)
        else:
            raise ApiError(400, f"unknown parameter {key!r} (max_tokens, temperature, top_p, seed, stop, "
                           "stream)", param=key, code="unknown_parameter")
    return out


def _busy(exc: Busy, cfg_retry: float) -> ApiError:
    return ApiError(429, f"the server is at capacity: {exc}; retry shortly", type="rate_limit_exceeded",
                    code="rate_limit_exceeded", headers={"Retry-After": f"{max(1, round(cfg_retry))}"})


class _Run:
    """One request decoding in a worker thread, which owns its context from acquiring it to
    giving it back; what it yields (deltas, the outcome, an exception, then None) arrives in
    ``q``. Setting ``cancel`` stops it at the next token."""

    def __init__(self, engine: Engine, req: Request, tokens: list[int] | None, state: bytes | None = None):
        self.loop = asyncio.get_running_loop()
        self.q: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        threading.Thread(target=self._work, args=(engine, req, tokens, state), daemon=True,
                         name="edgelink-http").start()

    def _put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.q.put_nowait, item)
        except RuntimeError:  # the event loop is gone (the server stopped): stop decoding
            self.cancel.set()

    def _work(self, engine: Engine, req: Request, tokens: list[int] | None, state: bytes | None) -> None:
        try:
            for item in engine.run(tokens, req.params, self.cancel.is_set, state=state):
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
    if isinstance(item, EdgelinkError):
        raise _api_error(item, engine)
    raise item


async def _rest(run: _Run, item: Any, engine: Engine) -> tuple[str, Outcome | None, list[TokenLogprob]]:
    """Collect a request that is not streamed, from its first item on."""
    parts: list[str] = []
    entries: list[TokenLogprob] = []
    out: Outcome | None = None
    while item is not None:
        if isinstance(item, BaseException):
            _raise_for(item, engine)
        elif isinstance(item, Outcome):
            out = item
        elif isinstance(item, TokenLogprob):
            entries.append(item)
        else:
            parts.append(item)
        item = await run.q.get()
    return "".join(parts), out, entries


async def _stream(engine: Engine, req: Request, rid: str, run: _Run, item: Any):
    """Server-sent events: a role chunk, text deltas, the finishing chunk, usage if asked, DONE.
    Starlette cancels this generator when the client disconnects; the worker then stops."""

    def event(body: dict) -> bytes:
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    pending: list[TokenLogprob] = []  # tokens whose logprobs go out with the next chunk
    offset = 0  # where they start in the completion's text

    def logprobs() -> dict | None:
        nonlocal offset
        body = logprobs_body(req, pending, offset)
        offset += sum(len(e.piece.decode("utf-8", "replace")) for e in pending)
        pending.clear()
        return body

    try:
        if req.chat:
            yield event(chunk(req, rid, engine.name, role=True))
        while item is not None:
            if isinstance(item, TokenLogprob):
                pending.append(item)
            elif isinstance(item, Outcome):
                yield event(chunk(req, rid, engine.name, out=item, logprobs=logprobs() if pending else None))
                if req.include_usage:
                    yield event(chunk(req, rid, engine.name, out=item, usage_only=True))
            elif isinstance(item, BaseException):
                try:
                    _raise_for(item, engine)
                except ApiError as exc:
                    yield event(exc.body())
            else:
                yield event(chunk(req, rid, engine.name, text=item, logprobs=logprobs()))
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
                      "n_ctx": engine.n_ctx, "api_key": bool(keys), "reuse": engine.reuse,
                      "cache_dir": str(engine.cache.store.dir) if engine.cache.store.dir else None})
        server.run(sockets=[sock])
    finally:
        sock.close()
        engine.close()
