"""The OpenAI-compatible HTTP API: ``/v1/completions``, ``/v1/chat/completions`` (streamed as server-sent
events with ``"stream": true``) and ``/v1/models``, over an in-process ``LLM`` or a served engine's ``Client``.

Everything runs on one asyncio event loop that never blocks on the engine: requests go through the
backend's ``agenerate`` / ``astream``, and a client that disconnects cancels its request (the handler is
cancelled, which closes the stream, which aborts the request on the engine). A user's mistake is a 4xx
with an OpenAI-style ``{"error": {...}}`` body, never a 500.

Exposure: with an API key every request needs ``Authorization: Bearer KEY``, and without one only a loopback
address may be bound (unless ``allow_unauthenticated``). Open connections are capped (the rest get a canned
503), a request head must arrive within ``header_timeout_s`` of connecting or of the previous response, and a
body within ``body_timeout_s`` (408): slow or idle clients cannot pin the server's sockets for long.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import re
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, suppress
from typing import Any

from aiohttp import web

from runtime.api import EngineClient
from runtime.errors import EngineDeadError, InvalidRequestError
from runtime.serving.openai_protocol import ApiError, GenerationRequest, Reply, invalid_request, parse_request, root_cause, \
    show, sse
from runtime.outputs import StreamChunk
from runtime.sampling import brief

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


MAX_IN_FLIGHT = 256          # generation requests at once (the engine's callers cap); more get 503 + Retry-After
MAX_CONNECTIONS = 512        # open connections; more get a canned 503 + Retry-After and are closed
KEEPALIVE_S = 15.0           # aiohttp's idle keep-alive timer (a backstop: the head deadline below is shorter)
HEADER_TIMEOUT_S = 10.0      # a connection without a whole request head this long after connecting or its last answer
BODY_TIMEOUT_S = 30.0        # a request body must arrive in this long, else 408
REFUSAL_LINGER_S = 1.0       # how long a refused connection may take to hang up after its 503
LOOPBACK_NAMES = ("localhost",)
API_KEY_PATTERN = re.compile(r"[\x21-\x7e]+")        # visible ASCII: sendable as-is in an HTTP header

_OVERLOADED = json.dumps(ApiError(503, "the server has too many open connections; retry shortly",
                                  code="overloaded").body).encode()
_REFUSAL = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" \
           b"Retry-After: 1\r\nConnection: close\r\n\r\n%s" % (len(_OVERLOADED), _OVERLOADED)


def is_loopback(host: str) -> bool:
    try:
        return host in LOOPBACK_NAMES or ipaddress.ip_address(host).is_loopback
    except ValueError:                             # a host name: it may resolve to anything
        return False


def check_access(host: str, api_key: str | None, allow_unauthenticated: bool = False) -> None:
    """Refuse (ValueError) an unusable key, or an address beyond this machine with no key and no opt-out."""
    if api_key is not None and not API_KEY_PATTERN.fullmatch(api_key):
        raise ValueError("the API key must be non-empty visible ASCII without spaces (it is sent as "
                         "'Authorization: Bearer KEY')")
    if api_key is None and not allow_unauthenticated and not is_loopback(host):
        raise ValueError(f"refusing to serve the HTTP API on {host!r} without authentication: anyone who can reach "
                         "it could use the engine. Set an API key (--api-key KEY, or the PINFER_API_KEY environment "
                         "variable; api_key= in Python) that clients send as 'Authorization: Bearer KEY', or pass "
                         "--no-auth (allow_unauthenticated=True) to serve it open anyway")


class OpenAIApi:
    """The route handlers over one backend."""

    def __init__(self, backend: EngineClient, max_in_flight: int = MAX_IN_FLIGHT, api_key: str | None = None,
                 body_timeout_s: float = BODY_TIMEOUT_S) -> None:
        self.backend = backend
        self.model_name = backend.model_name
        self.created = int(time.time())
        self.num_active = 0                  # generation requests in flight (for tests and shutdown logs)
        self.max_in_flight = max_in_flight
        self._api_key = None if api_key is None else api_key.encode()
        self.body_timeout_s = body_timeout_s

    def app(self, middlewares: tuple[Middleware, ...] = ()) -> web.Application:
        app = web.Application(middlewares=[*middlewares, _errors, self._authenticate])
        app.add_routes([web.get("/v1/models", self.models), web.get("/v1/models/{model:.+}", self.model),
                        web.post("/v1/completions", self.completions),
                        web.post("/v1/chat/completions", self.chat_completions)])
        return app

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """With an API key, every request (before its body is read) needs ``Authorization: Bearer KEY``."""
        if self._api_key is not None:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            # bytes: compare_digest refuses non-ASCII str; surrogatepass: whatever the header decoded to
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode("utf-8", "surrogatepass"), self._api_key):
                response = ApiError(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                                    code="invalid_api_key").response()
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
        return await handler(request)

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
            raise ApiError(400, f"model must be a string, got {show(model)}", param="model")
        if model is not None and model != self.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        try:
            raw = await asyncio.wait_for(request.read(), self.body_timeout_s)
        except asyncio.TimeoutError:                     # (3.10: not yet the builtin TimeoutError)
            raise ApiError(408, f"the request body did not arrive within {self.body_timeout_s:g} s") from None
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:        # bad UTF-8 or JSON, too deep, an integer of 4300+ digits
            raise ApiError(400, f"the request body is not valid JSON: {brief(str(e), 200)}") from None
        if isinstance(body, dict):
            self._check_model(body.get("model"))
        req = parse_request(kind, body)
        if self.num_active >= self.max_in_flight:
            raise ApiError(503, f"the server has {self.num_active} requests in flight, its limit; retry shortly",
                           code="overloaded", retry_after_s=1)
        if req.messages is not None:
            req.prompt = await self._chat_prompt(req.messages)
        self.num_active += 1
        try:
            if req.is_stream:
                return await self._stream(request, req)
            try:
                out = await self.backend.agenerate(req.prompt, req.params)
            except InvalidRequestError as e:
                raise invalid_request(e) from None
            return web.json_response(Reply(kind, self.model_name).whole(out))
        finally:
            self.num_active -= 1

    async def _chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The conversation through the chat template, off the event loop (a served engine's is a Ray call)."""
        from jinja2 import TemplateError

        try:
            return await asyncio.to_thread(self.backend.apply_chat_template, messages)
        except (ValueError, TemplateError) as e:
            raise ApiError(400, f"cannot apply the chat template: {root_cause(e)}", param="messages") from None

    async def _stream(self, request: web.Request, req: GenerationRequest) -> web.StreamResponse:
        reply = Reply(req.kind, self.model_name)
        async with aclosing(self.backend.astream(req.prompt, req.params)) as chunks:   # leaving it aborts
            try:
                first = await anext(chunks)               # a refused request is still a plain 400
            except InvalidRequestError as e:
                raise invalid_request(e) from None
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            try:
                await self._send_chunks(response, reply, req, first, chunks)
            except ConnectionResetError:
                logger.debug("client of %s went away; request cancelled", reply.id)
            except Exception as e:                        # headers are out: the error becomes the last event
                error = invalid_request(e) if isinstance(e, InvalidRequestError) else \
                    ApiError(503, str(e)) if isinstance(e, EngineDeadError) else ApiError(500, "internal server error")
                logger.log(logging.ERROR if error.status == 500 else logging.WARNING, "stream %s failed: %r",
                           reply.id, e, exc_info=error.status == 500)
                with suppress(ConnectionResetError):
                    await response.write(sse(error.body) + sse("[DONE]"))
        return response

    async def _send_chunks(self, response: web.StreamResponse, reply: Reply, req: GenerationRequest,
                           first: StreamChunk, rest: AsyncIterator[StreamChunk]) -> None:
        if req.kind == "chat":
            await response.write(sse(reply.chunk(None)))
        chunk: StreamChunk | None = first
        while chunk is not None:
            if chunk.text:
                await response.write(sse(reply.chunk(chunk.text)))
            if chunk.finished and chunk.output is not None:
                await response.write(sse(reply.chunk("", chunk.output.finish_reason)))
                if req.include_usage:
                    await response.write(sse(reply.usage_chunk(chunk.output)))
                break
            chunk = await anext(rest, None)
        await response.write(sse("[DONE]"))


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure as an OpenAI-style JSON error: 4xx for the caller's mistakes, 5xx for the server's."""
    try:
        return await handler(request)
    except ApiError as e:
        response = e.response()
        if e.status == 408:                        # half a body read: the connection cannot carry another request
            response.force_close()
        return response
    except web.HTTPException as e:                 # unknown route, wrong method, body too large
        if e.status < 400:
            raise
        return ApiError(e.status, f"{request.method} {request.path}: {e.reason}").response()
    except InvalidRequestError as e:
        return invalid_request(e).response()
    except EngineDeadError as e:
        return ApiError(503, str(e)).response()
    except Exception:
        logger.exception("%s %s failed", request.method, request.path)
        return ApiError(500, "internal server error (see the server log)").response()


# ---- running it --------------------------------------------------------------------------------

class _Refusal(asyncio.Protocol):
    """A connection over the cap: the canned 503 (no HTTP parsing, no aiohttp handler), then hang up."""

    def __init__(self, refused: set[asyncio.Transport]) -> None:
        self._refused = refused
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._refused.add(transport)
        transport.write(_REFUSAL)
        transport.write_eof()
        # Drain the client's request until it hangs up (eof_received then closes), a second at most: closing
        # with it unread would send a reset, which can destroy the 503 before the client reads it.
        self._timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER_S, transport.abort)

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None:
            self._refused.discard(self._transport)


class HttpServer:
    """The API on a listening socket of the current event loop: ``url = await start()``, ``await stop()``.

    ``api_key``: every request needs ``Authorization: Bearer <api_key>``; without one, a non-loopback ``host`` is a
    ValueError unless ``allow_unauthenticated``. ``max_connections``: open connections (more get a canned 503).
    ``header_timeout_s``: a connection with no whole request head this long after connecting or after its last
    answer is closed. ``body_timeout_s``: a request body slower than this gets 408."""

    def __init__(self, backend: EngineClient, host: str = "127.0.0.1", port: int = 8000,
                 max_in_flight: int = MAX_IN_FLIGHT, *, api_key: str | None = None,
                 allow_unauthenticated: bool = False, max_connections: int = MAX_CONNECTIONS,
                 header_timeout_s: float = HEADER_TIMEOUT_S, body_timeout_s: float = BODY_TIMEOUT_S) -> None:
        check_access(host, api_key, allow_unauthenticated)
        self.api = OpenAIApi(backend, max_in_flight, api_key, body_timeout_s)
        self.host, self.port = host, port
        self.is_authenticated = api_key is not None
        self.max_connections, self.header_timeout_s = max_connections, header_timeout_s
        self._head_timers: dict[web.RequestHandler, asyncio.TimerHandle] = {}   # connections owing a request head
        self._refused: set[asyncio.Transport] = set()
        self._listener: asyncio.Server | None = None
        self._is_full = False
        # Cancelling a handler when its client disconnects is what aborts that client's request.
        self._runner = web.AppRunner(self.api.app((self._head_arrived,)), handler_cancellation=True,
                                     shutdown_timeout=1.0, keepalive_timeout=KEEPALIVE_S)

    @property
    def num_connections(self) -> int:
        """Open HTTP connections (refused ones not counted)."""
        server = self._runner.server
        return 0 if server is None else len(server.connections)

    async def start(self) -> str:
        await self._runner.setup()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            sock = socket.create_server((self.host, self.port), family=family)
            # Our own asyncio server, not a web.SockSite: its protocol factory is where the cap and the
            # head deadline start, before aiohttp sees the connection.
            self._listener = await asyncio.get_running_loop().create_server(self._connection, sock=sock)
        except OSError:
            await self._runner.cleanup()
            raise
        self.port = sock.getsockname()[1]
        if not self.is_authenticated and not is_loopback(self.host):
            logger.warning("serving on %s without authentication: anyone who reaches it can use the engine",
                           self.host)
        host = f"[{self.host}]" if family == socket.AF_INET6 else self.host
        logger.info("OpenAI-compatible API for %s on http://%s:%d/v1%s", self.api.model_name, host, self.port,
                    " (API key required)" if self.is_authenticated else "")
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Close the socket and every connection (cancelling what they still run)."""
        if self._listener is not None:
            self._listener.close()       # no wait_closed(): on 3.12+ it also waits for every client to hang up
        for transport in list(self._refused):
            transport.abort()
        await self._runner.cleanup()
        for timer in self._head_timers.values():
            timer.cancel()
        self._head_timers.clear()

    def _connection(self) -> asyncio.BaseProtocol:
        """The protocol for a new connection: aiohttp's under a deadline for its first request head, or, over
        the cap, a refusal."""
        server = self._runner.server
        assert server is not None
        if len(server.connections) >= self.max_connections:
            if not self._is_full:
                logger.warning("%d connections open, the limit: answering new ones 503 until some close",
                               self.max_connections)
            self._is_full = True
            return _Refusal(self._refused)
        self._is_full = False
        handler = server()
        self._await_head(handler)
        return handler

    def _await_head(self, handler: web.RequestHandler) -> None:
        if (timer := self._head_timers.pop(handler, None)) is not None:
            timer.cancel()
        self._head_timers[handler] = asyncio.get_running_loop().call_later(self.header_timeout_s,
                                                                            self._head_overdue, handler)

    def _head_overdue(self, handler: web.RequestHandler) -> None:
        self._head_timers.pop(handler, None)
        if handler.transport is not None:                # still open (then idle, or sending a head too slowly)
            logger.debug("closing the connection from %s: no request head in %g s",
                         handler.transport.get_extra_info("peername"), self.header_timeout_s)
            handler.force_close()

    @web.middleware
    async def _head_arrived(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """A whole head came: no deadline while the request runs, a fresh one for the next head after it."""
        connection = request.protocol
        if (timer := self._head_timers.pop(connection, None)) is not None:
            timer.cancel()
        try:
            return await handler(request)
        finally:
            if request.transport is not None:
                self._await_head(connection)


class BackgroundHttpServer:
    """``HttpServer`` on its own thread and event loop, for callers without one (tests, notebooks)."""

    def __init__(self, backend: EngineClient, host: str = "127.0.0.1", port: int = 0,
                 max_in_flight: int = MAX_IN_FLIGHT, *, api_key: str | None = None,
                 allow_unauthenticated: bool = False, max_connections: int = MAX_CONNECTIONS,
                 header_timeout_s: float = HEADER_TIMEOUT_S, body_timeout_s: float = BODY_TIMEOUT_S) -> None:
        self.server = HttpServer(backend, host, port, max_in_flight, api_key=api_key,
                                 allow_unauthenticated=allow_unauthenticated, max_connections=max_connections,
                                 header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s)
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


def serve_http(backend: EngineClient, host: str = "127.0.0.1", port: int = 8000,
               ready: Callable[[str], None] | None = None, *, api_key: str | None = None,
               allow_unauthenticated: bool = False) -> None:
    """Serve the API from this (main) thread until SIGINT or SIGTERM; ``ready(url)`` once it listens."""

    async def main() -> None:
        server = HttpServer(backend, host, port, api_key=api_key, allow_unauthenticated=allow_unauthenticated)
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
