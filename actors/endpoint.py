"""An engine's request surface over Ray, both ends: the methods an actor holding an engine exposes
(``EngineEndpoint``: the GPU executor, the served engine) and the caller's side (``RemoteEngine``: the
hybrid driver, a served engine's client). Control calls all take one shape: ``execute_method``."""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, aclosing, nullcontext
from typing import Any

import torch

from runtime.api import acancel_on_exit, cancel_on_exit, new_request_id
from runtime.outputs import EngineStats, RequestOutput, StreamChunk
from runtime.sampling import SamplingParams

logger = logging.getLogger(__name__)


class ControlEndpoint:
    """Mixin for every actor: the one shape of control calls (setup, tracing, teardown)."""

    def execute_method(self, method: str, *args: Any) -> Any:
        """Run ``method``; a failure is logged with the method's name (and raised to the caller)."""
        try:
            return getattr(self, method)(*args)
        except Exception:
            logger.exception("%s.%s failed", type(self).__name__, method)
            raise

    def node_id(self) -> str:
        """The Ray node this actor runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()


class EngineEndpoint(ControlEndpoint):
    """Mixin for an actor whose ``engine`` (a ``runtime.core.engine.Engine`` or an ``LLM``) serves requests.
    Threaded actors: many callers at once, batched continuously by the engine."""

    engine: Any

    def request_errors(self) -> AbstractContextManager[None]:
        """Where the actor turns its own failures into what callers should see (default: as they are)."""
        return nullcontext()

    def generate(self, prompts: list[str], params: list[SamplingParams]) -> list[RequestOutput]:
        with self.request_errors():
            return self.engine.generate(prompts, params)

    def stream(self, prompt: str, params: SamplingParams, request_id: str) -> Iterator[StreamChunk]:
        """Ray streaming generator: one chunk of new text per object, as tokens arrive."""
        with self.request_errors():
            yield from self.engine.stream(prompt, params, request_id=request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def prompt_logits(self, prompt: str) -> torch.Tensor:
        with self.request_errors():
            return self.engine.prompt_logits(prompt)

    def token_logits(self, ids: list[int]) -> torch.Tensor:
        with self.request_errors():
            return self.engine.token_logits(ids)

    def stats(self) -> EngineStats:
        return self.engine.stats()


class RemoteEngine:
    """Calls an ``EngineEndpoint`` actor as if its engine were local. ``actor()`` returns the live handle (or
    raises); ``faults()`` turns the actor's deaths and failures into the errors callers should see."""

    def __init__(self, actor: Callable[[], Any],
                 faults: Callable[[], AbstractContextManager[None]] = nullcontext) -> None:
        self._actor = actor
        self._faults = faults

    def generate(self, prompts: list[str], params: list[SamplingParams]) -> list[RequestOutput]:
        return self.call("generate", prompts, params)

    async def agenerate(self, prompt: str, params: SamplingParams) -> RequestOutput:
        with self._faults():
            return (await self._actor().generate.remote([prompt], [params]))[0]

    def stream(self, prompt: str, params: SamplingParams, request_id: str | None = None) -> Iterator[StreamChunk]:
        """Chunks as the actor's engine produces them; leaving early aborts the request there."""
        import ray

        actor, request_id = self._actor(), request_id or new_request_id()
        refs = actor.stream.remote(prompt, params, request_id)
        with self._faults():
            yield from cancel_on_exit((ray.get(ref) for ref in refs), lambda: actor.abort.remote(request_id))

    async def astream(self, prompt: str, params: SamplingParams,
                      request_id: str | None = None) -> AsyncIterator[StreamChunk]:
        """``stream`` for an asyncio event loop: awaits each chunk instead of blocking on it."""
        actor, request_id = self._actor(), request_id or new_request_id()

        async def chunks() -> AsyncIterator[StreamChunk]:
            async for ref in actor.stream.remote(prompt, params, request_id):
                yield await ref

        with self._faults():
            async with aclosing(acancel_on_exit(chunks(), lambda: actor.abort.remote(request_id))) as it:
                async for chunk in it:
                    yield chunk

    def abort(self, request_id: str) -> None:
        self._actor().abort.remote(request_id)

    def prompt_logits(self, prompt: str) -> torch.Tensor:
        return self.call("prompt_logits", prompt)

    def token_logits(self, ids: list[int]) -> torch.Tensor:
        return self.call("token_logits", ids)

    def stats(self) -> EngineStats:
        return self.call("stats")

    def call(self, method: str, *args: Any) -> Any:
        """A request-plane method of the actor, waited for."""
        import ray

        with self._faults():
            return ray.get(getattr(self._actor(), method).remote(*args))
