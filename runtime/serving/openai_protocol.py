"""The OpenAI wire protocol of the HTTP API: request parsing and validation, response and stream-chunk
shapes, and OpenAI-style errors. Pure data handling (no sockets, no engine)."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from runtime.errors import InvalidRequestError
from runtime.outputs import RequestOutput
from runtime.sampling import SamplingParams, brief

DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 256}      # 16: OpenAI's own default for /v1/completions
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# OpenAI options this server does not implement: accepted only at their neutral value, else a 400.
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "best_of", "logit_bias", "presence_penalty",
               "frequency_penalty", "tools", "tool_choice", "functions", "function_call", "response_format")
NEUTRAL = {"best_of": 1, "response_format": {"type": "text"}}
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop")


class ApiError(Exception):
    """An error answered as OpenAI does: HTTP ``status`` and ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after_s = retry_after_s

    @property
    def body(self) -> dict[str, Any]:
        kind = "authentication_error" if self.status == 401 else \
            "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        headers = None if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}
        return web.json_response(self.body, status=self.status, headers=headers)


def root_cause(e: BaseException) -> BaseException:
    """The engine's own exception inside the Ray task errors that carried it here."""
    while isinstance(getattr(e, "cause", None), BaseException):
        e = e.cause                                                      # type: ignore[attr-defined]
    return e


def invalid_request(e: InvalidRequestError) -> ApiError:
    """A 400 for an engine-side refusal, naming the offending field when the message starts with it."""
    message = str(root_cause(e))
    param = next((f for f in SAMPLING_FIELDS if message.startswith(f + " ")), None)
    code = "context_length_exceeded" if "exceeds the model context" in message else None
    return ApiError(400, message, param=None if code else param, code=code)


# ---- request parsing ---------------------------------------------------------------------------

@dataclass(slots=True)
class GenerationRequest:
    """A validated completion or chat request: the prompt text and how to sample it."""

    kind: str                        # "completion" | "chat"
    prompt: str                      # chat: filled in from ``messages`` through the chat template
    messages: list[dict[str, str]] | None
    params: SamplingParams
    is_stream: bool
    include_usage: bool              # stream_options.include_usage: a last chunk with token counts


def show(value: Any, limit: int = 80) -> str:
    """A bad value as JSON, cut short: error messages echo what was sent, not all of it."""
    if isinstance(value, int) and value.bit_length() > 128:
        return brief(value)
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


_KIND_NAMES = {bool: "a boolean", int: "an integer", str: "a string", dict: "an object", list: "an array"}


def _get(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """``body[name]`` checked against ``kind`` (a bool is not a number here); ``default`` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        what = "a number" if float in kinds else _KIND_NAMES.get(kinds[0], kinds[0].__name__)
        raise ApiError(400, f"{name} must be {what}, got {show(value)}", param=name)
    return value


def _sampling(body: dict[str, Any], default_max_tokens: int) -> SamplingParams:
    if _get(body, "n", int, 1) != 1:
        raise ApiError(400, f"only n=1 is supported, got n={body['n']}", param="n")
    for name in UNSUPPORTED:
        value = body.get(name)
        if value and value != NEUTRAL.get(name):
            raise ApiError(400, f"{name} is not supported by this server", param=name)
    max_tokens = _get(body, "max_tokens", int, None)
    if max_tokens is None:
        max_tokens = _get(body, "max_completion_tokens", int, default_max_tokens)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    elif stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, f"stop must be a string or an array of strings, got {show(stop)}", param="stop")
    top_k, seed = _get(body, "top_k", int, 0), _get(body, "seed", int)
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=float(_get(body, "temperature", (int, float), 1.0)),
                              top_p=float(_get(body, "top_p", (int, float), 1.0)), top_k=0 if top_k == -1 else top_k,
                              seed=seed, stop=stop or [],
                              ignore_eos=_get(body, "ignore_eos", bool, False))
    except InvalidRequestError as e:
        raise invalid_request(e) from None


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]                                   # a batch of one
    if prompt is None:
        raise ApiError(400, "prompt is required", param="prompt")
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string (batches and token-id prompts are not supported)",
                       param="prompt")
    if not prompt:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    return _text(prompt, "prompt", "prompt")


def _text(value: str, where: str, param: str) -> str:
    """``value``, if UTF-8 can carry it (JSON's "\\ud800" escapes make lone surrogates no tokenizer takes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{where} is not valid Unicode text: a lone surrogate at {e.start}", param=param) from None
    return value


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or the text parts of a content array."""
    if isinstance(content, str):
        return _text(content, f"{where}.content", "messages")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return _text("".join(p["text"] for p in content), f"{where}.content", "messages")
    raise ApiError(400, f"{where}.content must be a string or an array of text parts", param="messages")


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty array", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise ApiError(400, f"{where} must be an object with role one of {sorted(CHAT_ROLES)}", param="messages")
        text = "" if m["role"] == "assistant" and m.get("content") is None else _content(m.get("content"), where)
        out.append({"role": CHAT_ROLES[m["role"]], "content": text})
    return out


def parse_request(kind: str, body: Any) -> GenerationRequest:
    """Validate a decoded JSON body of /v1/completions (``kind="completion"``) or /v1/chat/completions."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    is_stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, {})
    prompt, messages = (_prompt(body), None) if kind == "completion" else ("", _messages(body))
    return GenerationRequest(kind, prompt, messages, _sampling(body, DEFAULT_MAX_TOKENS[kind]), is_stream,
                             is_stream and bool(options.get("include_usage")))


# ---- responses ---------------------------------------------------------------------------------

class Reply:
    """The id, timestamps and shapes of one response (whole, or as stream chunks)."""

    def __init__(self, kind: str, model: str) -> None:
        self.kind, self.model = kind, model
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, out: RequestOutput) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": out.finish_reason}
        if self.kind == "chat":
            choice["message"] = {"role": "assistant", "content": out.text}
        else:
            choice["text"] = out.text
        body = self._envelope("chat.completion" if self.kind == "chat" else "text_completion", [choice])
        return {**body, "usage": usage(out)}

    def chunk(self, text: str | None, finish_reason: str | None = None) -> dict[str, Any]:
        """One stream event; chat: ``text=None`` opens the message (the role, no content yet)."""
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if self.kind == "chat":
            choice["delta"] = {"role": "assistant", "content": ""} if text is None else \
                ({"content": text} if text else {})
            return self._envelope("chat.completion.chunk", [choice])
        return self._envelope("text_completion", [{**choice, "text": text or ""}])

    def usage_chunk(self, out: RequestOutput) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._envelope(obj, []), "usage": usage(out)}


def usage(out: RequestOutput) -> dict[str, int]:
    prompt, completion = len(out.prompt_token_ids), len(out.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


# ---- the application ---------------------------------------------------------------------------
