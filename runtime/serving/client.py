"""Client of an engine started by ``pinfer serve``: ``connect().generate(...)`` like ``LLM.generate``, plus
``agenerate`` (asyncio) and ``stream`` / ``astream`` (text as tokens arrive)."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from functools import cached_property

from runtime.errors import EngineDeadError
from runtime.llm import expand_params
from runtime.outputs import RequestOutput
from runtime.sampling import SamplingParams
from runtime.core.handles import StreamChunk

logger = logging.getLogger(__name__)
_pending_aborts: set[asyncio.Task[None]] = set()     # strong references to running _abort_first tasks


@contextmanager
def _engine_gone(name: str) -> Iterator[None]:
    from ray.exceptions import RayActorError

    try:
        yield
    except RayActorError as e:
        raise EngineDeadError(f"engine {name!r} is gone: {e}") from None


class Client:
    def __init__(self, actor, name: str) -> None:
        self._actor = actor
        self.name = name

    def generate(self, prompts: str | list[str],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Same signature and result as ``LLM.generate``; requests from all clients are batched together."""
        import ray

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        plist = expand_params(params, len(prompts))
        with _engine_gone(self.name):
            return ray.get(self._actor.generate.remote(prompts, plist))

    async def agenerate(self, prompt: str, params: SamplingParams | None = None) -> RequestOutput:
        """One prompt, awaitable from an asyncio event loop."""
        with _engine_gone(self.name):
            return (await self._actor.generate.remote([prompt], [params or SamplingParams()]))[0]

    def stream(self, prompt: str, params: SamplingParams | None = None) -> Iterator[StreamChunk]:
        """``StreamChunk``s as tokens arrive; the last has ``finished`` and the whole output. Leaving the
        loop early cancels the request on the engine."""
        import ray

        request_id, finished = None, False
        with _engine_gone(self.name):
            try:
                for ref in self._actor.stream.remote(prompt, params or SamplingParams()):
                    chunk: StreamChunk = ray.get(ref)
                    request_id, finished = chunk.request_id, chunk.finished
                    yield chunk
            finally:
                if request_id is not None and not finished:
                    self._actor.abort.remote(request_id)

    async def astream(self, prompt: str, params: SamplingParams | None = None) -> AsyncIterator[StreamChunk]:
        """``stream`` for an asyncio event loop: awaits each chunk instead of blocking on it. Closing it early
        (or cancelling the iterating task) cancels the request on the engine."""
        request_id, finished = None, False
        gen = self._actor.stream.remote(prompt, params or SamplingParams())
        with _engine_gone(self.name):
            try:
                async for ref in gen:
                    chunk: StreamChunk = await ref
                    request_id, finished = chunk.request_id, chunk.finished
                    yield chunk
            except (GeneratorExit, asyncio.CancelledError):       # the consumer left: cancel the request
                if request_id is None:                             # before a chunk named it: abort it later
                    task = asyncio.ensure_future(self._abort_first(gen))
                    _pending_aborts.add(task)
                    task.add_done_callback(_pending_aborts.discard)
                elif not finished:
                    self._actor.abort.remote(request_id)
                raise

    async def _abort_first(self, gen: AsyncIterator) -> None:
        """Abort a stream that was left before its first chunk arrived, once a chunk names its request."""
        try:
            async for ref in gen:
                chunk: StreamChunk = await ref
                if not chunk.finished:
                    self._actor.abort.remote(chunk.request_id)
                return
        except Exception as e:                     # a request that failed needs no abort
            logger.debug("stream ended before it could be aborted: %s", e)

    @cached_property
    def model_name(self) -> str:
        """Name of the model the engine serves."""
        return str(self.info()["model"])

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        import ray

        return ray.get(self._actor.apply_chat_template.remote(messages))

    def info(self) -> dict[str, str | int]:
        import ray

        return ray.get(self._actor.info.remote())


def connect(address: str = "auto", name: str | None = None) -> Client:
    """Attach to the cluster at ``address`` and to the engine actor ``name`` (configs/engine.yaml default)."""
    import ray

    from runtime.hybrid.cluster import NAMESPACE, ensure_ray
    from runtime.config import EngineConfig

    name = name or EngineConfig.load().engine_name
    ensure_ray(address)
    try:
        actor = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        raise EngineDeadError(f"no engine named {name!r} on the cluster at {address!r}; start one with "
                              f"`pinfer serve`") from None
    return Client(actor, name)
