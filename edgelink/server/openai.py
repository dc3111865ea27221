"""The OpenAI wire format: request bodies checked into typed requests, and the response and
stream-chunk bodies OpenAI's clients parse. Every way a body can be wrong is an ``ApiError``
with OpenAI's error shape and a 4xx status; unknown fields are ignored, as OpenAI does."""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import time
from typing import Any

from edgelink.server.engine import Outcome, Params, TokenLogprob

ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked completion request: the prompt (chat messages or text) and how to continue it."""

    chat: bool
    model: str | None
    messages: list[dict[str, Any]] | None
    prompt: str | None
    params: Params
    stream: bool
    include_usage: bool


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _get(body: dict, key: str, types: tuple[type, ...], default: Any = None, *, what: str = "") -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types:
        value = object()  # True is an int to Python, not to a JSON schema
    if not isinstance(value, types):
        names = what or " or ".join(t.__name__.replace("str", "string").replace("int", "integer")
                                    .replace("float", "number").replace("bool", "boolean") for t in types)
        raise ApiError(400, f"'{key}' must be {names}, got {type(value).__name__ if value is not None else 'null'}",
                       param=key, code="invalid_type")
    return value


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = float(_get(body, key, (int, float), default))
    if not (math.isfinite(v) and lo <= v <= hi):
        raise ApiError(400, f"'{key}' must be between {lo:g} and {hi:g}, got {v:g}", param=key,
                       code="invalid_value")
    return v


def _content(msg: dict, i: int) -> str:
    c = msg.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for part in c:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported "
                               "(this model reads text)", param=f"messages[{i}].content", code="invalid_value")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                   param=f"messages[{i}].content", code="invalid_type")


def parse_request(body: dict[str, Any], *, chat: bool, max_tokens_cap: int) -> Request:
    """Check an OpenAI completion body; ``ApiError`` (400) names the first field that is wrong."""
    model = _get(body, "model", (str,))
    if _get(body, "n", (int,), 1) != 1:
        raise ApiError(400, "'n' must be 1: one choice per request", param="n", code="invalid_value")
    if _get(body, "echo", (bool,), False):
        raise ApiError(400, "'echo' is not supported", param="echo", code="unsupported_parameter")
    messages = prompt = None
    if chat:
        raw = body.get("messages")
        if not isinstance(raw, list) or not raw:
            raise ApiError(400, "'messages' must be a non-empty list", param="messages",
                           code="invalid_type" if raw is not None else "missing_required_parameter")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                raise ApiError(400, f"messages[{i}] must be an object", param=f"messages[{i}]", code="invalid_type")
            role = m.get("role")
            if role not in ROLES:
                raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}",
                               param=f"messages[{i}].role", code="invalid_value")
            messages.append({"role": "system" if role == "developer" else role, "content": _content(m, i)})
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if not isinstance(p, str) or not p:
            raise ApiError(400, "'prompt' must be a non-empty string", param="prompt",
                           code="invalid_type" if p is not None else "missing_required_parameter")
        prompt = p
    cap_key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    # OpenAI's defaults: a chat reply runs until it stops (here: the cap, or the context), a
    # text completion is 16 tokens
    max_tokens = _get(body, cap_key, (int,), max_tokens_cap if chat else min(16, max_tokens_cap))
    if not 1 <= max_tokens <= max_tokens_cap:
        raise ApiError(400, f"'{cap_key}' must be between 1 and {max_tokens_cap} (http.max_tokens), got {max_tokens}",
                       param=cap_key, code="invalid_value")
    stop = _get(body, "stop", (str, list), None)
    stop = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stop) > 4 or not all(isinstance(s, str) and len(s) <= 256 for s in stop):
        raise ApiError(400, "'stop' must be a string or at most 4 strings", param="stop", code="invalid_value")
    seed = _get(body, "seed", (int,))
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise ApiError(400, "'seed' must fit 64 bits", param="seed", code="invalid_value")
    params = Params(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0 if seed is not None else 0.0, 0.0, 2.0),
                    top_p=_number(body, "top_p", 1.0, 1e-9, 1.0), seed=None if seed is None else seed % 2**64,
                    stop=stop, ignore_eos=bool(_get(body, "ignore_eos", (bool,), False)))
    logprobs, top = _logprobs(body, chat)
    params = dataclasses.replace(params, logprobs=logprobs, top_logprobs=top)
    stream = _get(body, "stream", (bool,), False)
    opts = _get(body, "stream_options", (dict,), None) or {}
    include_usage = bool(_get(opts, "include_usage", (bool,), False))
    return Request(chat, model, messages, prompt, params, stream, include_usage)


def _logprobs(body: dict[str, Any], chat: bool) -> tuple[bool, int]:
    """(report logprobs, alternatives per token): a chat's ``logprobs`` (bool) and
    ``top_logprobs`` (0-20, only with ``logprobs``); a text completion's ``logprobs`` (0-5)."""
    if not chat:
        n = _get(body, "logprobs", (int,), None)
        if n is not None and not 0 <= n <= MAX_TOP_LOGPROBS_TEXT:
            raise ApiError(400, f"'logprobs' must be between 0 and {MAX_TOP_LOGPROBS_TEXT}, got {n}",
                           param="logprobs", code="invalid_value")
        return n is not None, n or 0
    on = _get(body, "logprobs", (bool,), False)
    top = _get(body, "top_logprobs", (int,), None)
    if top is not None and not on:
        raise ApiError(400, "'top_logprobs' needs 'logprobs' set to true", param="top_logprobs",
                       code="invalid_value")
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}, got {top}",
                       param="top_logprobs", code="invalid_value")
    return on, top or 0


MAX_TOP_LOGPROBS = 20  # OpenAI's bounds
MAX_TOP_LOGPROBS_TEXT = 5


# ---------------------------------------------------------------------- responses


def logprobs_body(req: Request, entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any] | None:
    """``choices[i].logprobs`` for ``entries`` (None when not asked): a chat's ``content`` list,
    or a text completion's parallel lists; ``offset``: where the first entry's text starts in
    the completion (characters), for a text completion's ``text_offset``."""
    if not req.params.logprobs:
        return None

    def text(b: bytes) -> str:
        return b.decode("utf-8", "replace")

    if req.chat:
        return {"content": [{"token": text(e.piece), "logprob": e.logprob, "bytes": list(e.piece),
                             "top_logprobs": [{"token": text(b), "logprob": v, "bytes": list(b)} for b, v in e.top]}
                            for e in entries], "refusal": None}
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(text(e.piece))
    return {"tokens": [text(e.piece) for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{text(b): v for b, v in e.top} for e in entries], "text_offset": offsets}


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)


def usage(out: Outcome) -> dict[str, Any]:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": out.cached_tokens},
            # ours, beside OpenAI's fields (clients keep unknown fields): where the prompt was
            # prefilled (here, or http.prefill_peer's address), how long that took, and a remote
            # prefill's steps
            "edgelink": {"prefilled_by": out.prefilled_by, "prefill_s": round(out.prefill_s, 4),
                         **({"remote_prefill": dataclasses.asdict(out.remote_prefill)} if out.remote_prefill else {})}}


def finish(out: Outcome) -> str:
    return "length" if out.finish_reason == "length" else "stop"


def response(req: Request, rid: str, model: str, text: str, out: Outcome,
             entries: list[TokenLogprob] = ()) -> dict[str, Any]:
    now = int(time.time())
    lp = logprobs_body(req, list(entries))
    if req.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                  "finish_reason": finish(out)}
        return {"id": rid, "object": "chat.completion", "created": now, "model": model,
                "choices": [choice], "usage": usage(out), "system_fingerprint": None}
    choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish(out)}
    return {"id": rid, "object": "text_completion", "created": now, "model": model,
            "choices": [choice], "usage": usage(out)}


def chunk(req: Request, rid: str, model: str, *, text: str | None = None, role: bool = False,
          out: Outcome | None = None, usage_only: bool = False, logprobs: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    """One streamed chunk: a delta (with its tokens' ``logprobs_body``), the final one (``out``:
    its finish_reason), or usage."""
    now = int(time.time())
    kind = "chat.completion.chunk" if req.chat else "text_completion"
    body: dict[str, Any] = {"id": rid, "object": kind, "created": now, "model": model}
    if usage_only:
        body["choices"] = []
        body["usage"] = usage(out) if out else None
        return body
    reason = finish(out) if out is not None else None
    if req.chat:
        delta: dict[str, Any] = {}
        if role:
            delta = {"role": "assistant", "content": ""}
        elif text is not None:
            delta = {"content": text}
        body["choices"] = [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]
    else:
        body["choices"] = [{"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": reason}]
    if req.include_usage:
        body["usage"] = None
    return body
