"""The OpenAI-compatible HTTP API: ``/v1/completions``, ``/v1/chat/completions`` (streamed as server-sent
events with ``"stream": true``) and ``/v1/models``, over an in-process ``LLM`` or a served engine's ``Client``.

Everything runs on one asyncio event loop that never blocks on the engine: requests go through the
backend's ``agenerate`` / ``astream``, and a client that disconnects cancels its request (the handler is
cancelled, which closes the stream, which aborts the request on the engine). A user's mistake is a 4xx
with an OpenAI-style ``{"error": {...}}`` body, never a 500.
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, suppress
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from runtime.errors import EngineDeadError, InvalidRequestError
from runtime.outputs import RequestOutput
from runtime.sampling import SamplingParams
from runtime.streams import StreamChunk

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 256}      # 16: OpenAI's own default for /v1/completions
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# OpenAI options this server does not implement: accepted only at their neutral value, else a 400.
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "best_of", "logit_bias", "presence_penalty",
               "frequency_penalty", "tools", "tool_choice", "functions", "function_call", "response_format")
NEUTRAL = {"best_of": 1, "response_format": {"type": "text"}}
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop")


class Backend(Protocol):
    """What the server needs from an engine: ``runtime.LLM`` and ``runtime.client.Client`` both fit."""

    model_name: str

    async def agenerate(self, prompt: str, params: SamplingParams | None = None) -> RequestOutput: ...

    def astream(self, prompt: str, params: SamplingParams | None = None) -> AsyncIterator[StreamChunk]: ...

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str: ...


class ApiError(Exception):
    """An error answered as OpenAI does: HTTP ``status`` and ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body, status=self.status)


def _root(e: BaseException) -> BaseException:
    """The engine's own exception inside the Ray task errors that carried it here."""
    while isinstance(getattr(e, "cause", None), BaseException):
        e = e.cause                                                      # type: ignore[attr-defined]
    return e


def _invalid(e: InvalidRequestError) -> ApiError:
    """A 400 for an engine-side refusal, naming the offending field when the message starts with it."""
    message = str(_root(e))
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


def _show(value: Any, limit: int = 80) -> str:
    """A bad value as JSON, cut short: error messages echo what was sent, not all of it."""
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
        raise ApiError(400, f"{name} must be {what}, got {_show(value)}", param=name)
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
        raise ApiError(400, f"stop must be a string or an array of strings, got {_show(stop)}", param="stop")
    top_k, seed = _get(body, "top_k", int, 0), _get(body, "seed", int)
    if seed is not None and seed >= 2**64:                 # torch's generator takes a 64-bit seed
        raise ApiError(400, f"seed must be below 2**64, got {seed}", param="seed")
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=float(_get(body, "temperature", (int, float), 1.0)),
                              top_p=float(_get(body, "top_p", (int, float), 1.0)), top_k=0 if top_k == -1 else top_k,
                              seed=seed, stop=stop or [],
                              ignore_eos=_get(body, "ignore_eos", bool, False))
    except InvalidRequestError as e:
        raise _invalid(e) from None


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
    return prompt


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or the text parts of a content array."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
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

class _Reply:
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


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


# ---- the application ---------------------------------------------------------------------------

class OpenAIApi:
    """The route handlers over one backend."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.model_name = backend.model_name
        self.created = int(time.time())
        self.num_active = 0                  # generation requests in flight (for tests and shutdown logs)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_errors])
        app.add_routes([web.get("/v1/models", self.models), web.get("/v1/models/{model:.+}", self.model),
                        web.post("/v1/completions", self.completions),
                        web.post("/v1/chat/completions", self.chat_completions)])
        return app

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "pinfer"}

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        self._check_model(request.match_info["model"])
        return web.json_response(self._model_card())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    def _check_model(self, model: Any) -> None:
        if model is not None and not isinstance(model, str):
            raise ApiError(400, f"model must be a string, got {_show(model)}", param="model")
        if model is not None and model != self.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if isinstance(body, dict):
            self._check_model(body.get("model"))
        req = parse_request(kind, body)
        if req.messages is not None:
            req.prompt = await self._chat_prompt(req.messages)
        self.num_active += 1
        try:
            if req.is_stream:
                return await self._stream(request, req)
            try:
                out = await self.backend.agenerate(req.prompt, req.params)
            except InvalidRequestError as e:
                raise _invalid(e) from None
            return web.json_response(_Reply(kind, self.model_name).whole(out))
        finally:
            self.num_active -= 1

    async def _chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The conversation through the chat template, off the event loop (a served engine's is a Ray call)."""
        from jinja2 import TemplateError

        try:
            return await asyncio.to_thread(self.backend.apply_chat_template, messages)
        except (ValueError, TemplateError) as e:
            raise ApiError(400, f"cannot apply the chat template: {_root(e)}", param="messages") from None

    async def _stream(self, request: web.Request, req: GenerationRequest) -> web.StreamResponse:
        reply = _Reply(req.kind, self.model_name)
        async with aclosing(self.backend.astream(req.prompt, req.params)) as chunks:   # leaving it aborts
            try:
                first = await anext(chunks)               # a refused request is still a plain 400
            except InvalidRequestError as e:
                raise _invalid(e) from None
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            try:
                await self._send_chunks(response, reply, req, first, chunks)
            except ConnectionResetError:
                logger.debug("client of %s went away; request cancelled", reply.id)
            except Exception as e:                        # headers are out: the error becomes the last event
                error = _invalid(e) if isinstance(e, InvalidRequestError) else \
                    ApiError(503, str(e)) if isinstance(e, EngineDeadError) else ApiError(500, "internal server error")
                logger.log(logging.ERROR if error.status == 500 else logging.WARNING, "stream %s failed: %r",
                           reply.id, e, exc_info=error.status == 500)
                with suppress(ConnectionResetError):
                    await response.write(_sse(error.body) + _sse("[DONE]"))
        return response

    async def _send_chunks(self, response: web.StreamResponse, reply: _Reply, req: GenerationRequest,
                           first: StreamChunk, rest: AsyncIterator[StreamChunk]) -> None:
        if req.kind == "chat":
            await response.write(_sse(reply.chunk(None)))
        chunk: StreamChunk | None = first
        while chunk is not None:
            if chunk.text:
                await response.write(_sse(reply.chunk(chunk.text)))
            if chunk.finished and chunk.output is not None:
                await response.write(_sse(reply.chunk("", chunk.output.finish_reason)))
                if req.include_usage:
                    await response.write(_sse(reply.usage_chunk(chunk.output)))
                break
            chunk = await anext(rest, None)
        await response.write(_sse("[DONE]"))


@web.middleware
async def _errors(request: web.Request,
                  handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every failure as an OpenAI-style JSON error: 4xx for the caller's mistakes, 5xx for the server's."""
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except web.HTTPException as e:                 # unknown route, wrong method, body too large
        if e.status < 400:
            raise
        return ApiError(e.status, f"{request.method} {request.path}: {e.reason}").response()
    except InvalidRequestError as e:
        return _invalid(e).response()
    except EngineDeadError as e:
        return ApiError(503, str(e)).response()
    except Exception:
        logger.exception("%s %s failed", request.method, request.path)
        return ApiError(500, "internal server error (see the server log)").response()


# ---- running it --------------------------------------------------------------------------------

class HttpServer:
    """The API on a listening socket of the current event loop: ``url = await start()``, ``await stop()``."""

    def __init__(self, backend: Backend, host: str = "127.0.0.1", port: int = 8000) -> None:
        self.api = OpenAIApi(backend)
        self.host, self.port = host, port
        # Cancelling a handler when its client disconnects is what aborts that client's request.
        self._runner = web.AppRunner(self.api.app(), handler_cancellation=True, shutdown_timeout=1.0)

    async def start(self) -> str:
        await self._runner.setup()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            sock = socket.create_server((self.host, self.port), family=family)
        except OSError:
            await self._runner.cleanup()
            raise
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        if self.host not in ("127.0.0.1", "localhost", "::1"):
            logger.warning("serving on %s without authentication: anyone who reaches it can use the engine",
                           self.host)
        host = f"[{self.host}]" if family == socket.AF_INET6 else self.host
        logger.info("OpenAI-compatible API for %s on http://%s:%d/v1", self.api.model_name, host, self.port)
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Close the socket and every connection (cancelling what they still run)."""
        await self._runner.cleanup()


class BackgroundHttpServer:
    """``HttpServer`` on its own thread and event loop, for callers without one (tests, notebooks)."""

    def __init__(self, backend: Backend, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = HttpServer(backend, host, port)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="pinfer-http", daemon=True)
        self.url = ""

    def start(self) -> str:
        self._thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(timeout=30)
        return self.url

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()

    def __enter__(self) -> "BackgroundHttpServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_http(backend: Backend, host: str = "127.0.0.1", port: int = 8000,
               ready: Callable[[str], None] | None = None) -> None:
    """Serve the API from this (main) thread until SIGINT or SIGTERM; ``ready(url)`` once it listens."""

    async def main() -> None:
        server = HttpServer(backend, host, port)
        url = await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            if ready is not None:
                ready(url)
            await stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await server.stop()

    asyncio.run(main())
