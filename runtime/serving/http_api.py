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


MAX_IN_FLIGHT = 256          # generation requests at once (the engine's callers cap); more get 503 + Retry-After
KEEPALIVE_S = 15.0           # an idle keep-alive connection is closed after this


class OpenAIApi:
    """The route handlers over one backend."""

    def __init__(self, backend: EngineClient, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.backend = backend
        self.model_name = backend.model_name
        self.created = int(time.time())
        self.num_active = 0                  # generation requests in flight (for tests and shutdown logs)
        self.max_in_flight = max_in_flight

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
            raise ApiError(400, f"model must be a string, got {show(model)}", param="model")
        if model is not None and model != self.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
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
        return invalid_request(e).response()
    except EngineDeadError as e:
        return ApiError(503, str(e)).response()
    except Exception:
        logger.exception("%s %s failed", request.method, request.path)
        return ApiError(500, "internal server error (see the server log)").response()


# ---- running it --------------------------------------------------------------------------------

class HttpServer:
    """The API on a listening socket of the current event loop: ``url = await start()``, ``await stop()``."""

    def __init__(self, backend: EngineClient, host: str = "127.0.0.1", port: int = 8000,
                 max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.api = OpenAIApi(backend, max_in_flight)
        self.host, self.port = host, port
        # Cancelling a handler when its client disconnects is what aborts that client's request.
        self._runner = web.AppRunner(self.api.app(), handler_cancellation=True, shutdown_timeout=1.0,
                                     keepalive_timeout=KEEPALIVE_S)

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

    def __init__(self, backend: EngineClient, host: str = "127.0.0.1", port: int = 0,
                 max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.server = HttpServer(backend, host, port, max_in_flight)
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
