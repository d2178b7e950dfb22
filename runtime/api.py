"""The one client interface that ``LLM``, a served engine's ``Client``, the HTTP server and the batch runner
share, and the one helper that cancels a stream its consumer leaves early."""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

from runtime.errors import EngineDeadError
from runtime.outputs import RequestOutput, StreamChunk
from runtime.sampling import SamplingParams

logger = logging.getLogger(__name__)


class EngineClient(Protocol):
    """What every way in offers: ``runtime.LLM`` (in process or hybrid) and ``runtime.serving.client.Client``."""

    model_name: str

    def generate(self, prompts: str | list[str],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]: ...

    async def agenerate(self, prompt: str, params: SamplingParams | None = None) -> RequestOutput: ...

    def stream(self, prompt: str, params: SamplingParams | None = None,
               request_id: str | None = None) -> Iterator[StreamChunk]: ...

    def astream(self, prompt: str, params: SamplingParams | None = None,
                request_id: str | None = None) -> AsyncIterator[StreamChunk]: ...

    def abort(self, request_id: str) -> None: ...

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str: ...


class EngineClientBase:
    """The request half of ``EngineClient`` over ``self._requests()``: an engine-shaped object (the in-process
    ``Engine``, or a ``RemoteEngine`` on an actor) that takes lists and explicit params."""

    def _requests(self) -> Any:
        raise NotImplementedError

    def generate(self, prompts: str | list[str],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Complete each prompt; one output per prompt, in order. Safe to call from many threads at once:
        concurrent requests are batched together."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self._requests().generate(prompts, expand_params(params, len(prompts)))

    async def agenerate(self, prompt: str, params: SamplingParams | None = None) -> RequestOutput:
        """``generate`` for one prompt, awaitable from an asyncio event loop."""
        return await self._requests().agenerate(prompt, params or SamplingParams())

    def stream(self, prompt: str, params: SamplingParams | None = None,
               request_id: str | None = None) -> Iterator[StreamChunk]:
        """``StreamChunk``s (new text, new token ids) as tokens arrive; the last one has ``finished`` and the
        whole ``output``. Leaving the loop early cancels the request."""
        return self._requests().stream(prompt, params or SamplingParams(), request_id=request_id)

    def astream(self, prompt: str, params: SamplingParams | None = None,
                request_id: str | None = None) -> AsyncIterator[StreamChunk]:
        """``stream`` for an asyncio event loop (which never blocks on the engine); closing it early (or
        cancelling the iterating task) cancels the request. A refused request raises at the first chunk (the
        engines' ``astream`` are async generators: nothing runs before it is iterated)."""
        return self._requests().astream(prompt, params or SamplingParams(), request_id)

    def abort(self, request_id: str) -> None:
        """Cancel a running or waiting request by id (its result ends with finish_reason "abort")."""
        self._requests().abort(request_id)


def generate_retrying(client: EngineClient, prompt: str, params: SamplingParams, retries: int = 3,
                      backoff_s: float = 1.0) -> RequestOutput:
    """One prompt's output, sent again (up to ``retries`` times, waiting 1, 2, 4... x ``backoff_s``) when the engine
    died under it (``EngineDeadError``: a replica lost with its node, a replaced executor); other errors at once."""
    for attempt in range(retries):
        try:
            return client.generate([prompt], [params])[0]
        except EngineDeadError as e:
            logger.warning("%s; sending the request again (%d/%d)", e, attempt + 1, retries)
            time.sleep(backoff_s * 2 ** attempt)
    return client.generate([prompt], [params])[0]


def expand_params(params: SamplingParams | list[SamplingParams] | None, n: int) -> list[SamplingParams]:
    """One SamplingParams per prompt: a list as given (same length), else the one (or default) repeated."""
    params = params or SamplingParams()
    plist = list(params) if isinstance(params, list) else [params] * n
    if len(plist) != n:
        raise ValueError(f"{n} prompts but {len(plist)} sampling params")
    return plist


def new_request_id() -> str:
    """Chosen by whoever submits, so a stream can be cancelled before its first chunk names it."""
    return f"req-{uuid.uuid4().hex[:16]}"


def cancel_on_exit(chunks: Iterator[StreamChunk], cancel: Callable[[], None]) -> Iterator[StreamChunk]:
    """The chunks as they come; if the consumer leaves before the last one (or an error ends them), ``cancel``."""
    finished = False
    try:
        for chunk in chunks:
            finished = chunk.finished
            yield chunk
    finally:
        if not finished:
            cancel()


async def acancel_on_exit(chunks: AsyncIterator[StreamChunk], cancel: Callable[[], None]) -> AsyncIterator[StreamChunk]:
    """``cancel_on_exit`` for an asyncio consumer (leaving includes cancelling the iterating task)."""
    finished = False
    try:
        async for chunk in chunks:
            finished = chunk.finished
            yield chunk
    finally:
        if not finished:
            cancel()
