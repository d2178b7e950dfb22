"""The public entry point: ``LLM(model).generate(prompts, SamplingParams(...))``."""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from typing import TYPE_CHECKING

import numpy as np
import torch

from runtime.model.config import ModelConfig
from runtime.core.engine import DenseRunner, Engine
from runtime.config import EngineConfig
from runtime.outputs import RequestOutput
from runtime.model.registry import default_model, resolve_model
from runtime.sampling import SamplingParams
from runtime.sparsity.modes import SparseRunner, SparsityConfig
from runtime.core.handles import StreamChunk
from runtime.model.tokenizer import TextTokenizer
from runtime.model.weights import load_transformer

if TYPE_CHECKING:
    from runtime.hybrid.driver import HybridEngine

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def expand_params(params: SamplingParams | list[SamplingParams] | None, n: int) -> list[SamplingParams]:
    """One SamplingParams per prompt: a list as given (same length), else the one (or default) repeated."""
    params = params or SamplingParams()
    plist = list(params) if isinstance(params, list) else [params] * n
    if len(plist) != n:
        raise ValueError(f"{n} prompts but {len(plist)} sampling params")
    return plist


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


class LLM:
    """A loaded model that generates text.

    ``model`` is a registry name (``pinfer models`` lists them), a model directory (pinfer or Hugging
    Face safetensors layout) or a ``.gguf`` file; ``None`` takes the registry default.

    With ``hot_fraction`` or ``address`` set, the model runs on the hybrid Ray runtime: a GPU executor
    holding ``hot_fraction`` of every layer's FFN neurons and a CPU executor holding the rest, on the
    cluster at ``address`` (``"auto"``: the local ``ray start`` cluster) or an embedded one. Otherwise
    it runs in this process on the dense reference engine.
    """

    def __init__(self, model: str | None = None, *, hot_fraction: float | None = None, address: str | None = None,
                 dtype: str | torch.dtype | None = None, num_threads: int | None = None,
                 max_model_len: int | None = None, max_batch_size: int | None = None,
                 memory_budget_bytes: int | None = None, sparsity: str = "dense",
                 activation_sparsity: float = 0.0) -> None:
        defaults = EngineConfig.load()                    # configs/engine.yaml fills what is not given
        self.model_name = model or default_model()
        self.model_dir = resolve_model(self.model_name)
        self.dtype = parse_dtype(dtype or defaults.dtype)
        self.tokenizer = TextTokenizer(self.model_dir)
        limit = ModelConfig.load(self.model_dir).max_position_embeddings
        self.max_model_len: int = min(max_model_len or defaults.max_model_len or limit, limit)
        max_model_len = self.max_model_len
        max_batch_size = max_batch_size or defaults.max_batch_size
        self.sparsity = SparsityConfig(sparsity, activation_sparsity)
        self.is_hybrid = hot_fraction is not None or address is not None
        if self.is_hybrid:
            from runtime.hybrid.driver import HybridEngine

            self._engine: Engine | HybridEngine | None = HybridEngine(
                self.model_dir, hot_fraction=defaults.hot_fraction if hot_fraction is None else hot_fraction,
                dtype=str(self.dtype).removeprefix("torch."), address=address,
                memory_budget_bytes=memory_budget_bytes or defaults.memory_budget_bytes,
                max_batch_size=max_batch_size, max_model_len=max_model_len, sparsity=self.sparsity)
        else:
            threads = num_threads or os.cpu_count() or 1
            torch.set_num_threads(threads)
            self._engine = Engine(self._local_runner(threads), self.tokenizer, max_model_len, max_batch_size)

    def _local_runner(self, threads: int) -> DenseRunner | SparseRunner:
        if self.sparsity.mode == "dense":
            return DenseRunner(load_transformer(self.model_dir, self.dtype))
        from runtime.model.ffn_shard import FFNShard

        model = load_transformer(self.model_dir, self.dtype, with_ffn=False)
        every = [np.arange(model.cfg.intermediate_size)] * model.cfg.num_hidden_layers
        shard = FFNShard.load(self.model_dir, every, self.dtype, mode=self.sparsity.mode,
                              tau_gate=self.sparsity.tau_gate(self.model_dir), num_threads=threads)
        return SparseRunner(model, shard, self.sparsity.mask_fn(self.model_dir, self.dtype))

    def achieved_sparsity(self) -> float | None:
        """Share of offered FFN neurons skipped so far (in-process sparse engines only)."""
        runner = getattr(self._engine, "runner", None)
        shard = getattr(runner, "shard", None)
        return None if shard is None or not shard.num_offered else 1 - shard.num_computed / shard.num_offered

    def generate(self, prompts: str | list[str],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Complete each prompt; one output per prompt, in order. Safe to call from many threads at once:
        concurrent requests are batched together."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self._live().generate(prompts, expand_params(params, len(prompts)))

    async def agenerate(self, prompt: str, params: SamplingParams | None = None) -> RequestOutput:
        """``generate`` for one prompt, awaitable; cancelling the awaiting task cancels the request."""
        engine = self._live()
        if self.is_hybrid:
            return await engine.agenerate(prompt, params or SamplingParams())
        return await asyncio.wrap_future(engine.submit(prompt, params or SamplingParams()).future)

    def stream(self, prompt: str, params: SamplingParams | None = None) -> Iterator[StreamChunk]:
        """Yield ``StreamChunk``s (new text, new token ids) as tokens arrive; the last one has ``finished``
        and the whole ``output``. Leaving the loop early cancels the request."""
        return self._live().stream(prompt, params or SamplingParams())

    async def astream(self, prompt: str, params: SamplingParams | None = None) -> AsyncIterator[StreamChunk]:
        """``stream`` for an asyncio event loop (which never blocks on the engine); closing it early (or
        cancelling the iterating task) cancels the request."""
        engine, params = self._live(), params or SamplingParams()
        if isinstance(engine, Engine):
            handle = engine.submit(prompt, params, stream=True)      # validates here: errors raise at once
            async with aclosing(_iterate_in_thread(iter(handle), handle.cancel)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        request_ids: list[str] = []                                  # the id, once a chunk names it

        def cancel() -> None:
            if request_ids:
                self.abort(request_ids[0])

        async with aclosing(_iterate_in_thread(engine.stream(prompt, params), cancel)) as chunks:
            async for chunk in chunks:
                request_ids[:] = [chunk.request_id]
                yield chunk

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """The prompt for a conversation under the model's chat template (generation prompt appended)."""
        return self.tokenizer.apply_chat_template(messages)

    def abort(self, request_id: str) -> None:
        """Cancel a running or waiting request by id (its result ends with finish_reason "abort")."""
        self._live().abort(request_id)

    def prompt_logits(self, prompt: str) -> torch.Tensor:
        """fp32 next-token logits [V] after ``prompt``."""
        return self._live().prompt_logits(prompt)

    def _live(self) -> Engine | HybridEngine:
        if self._engine is None:
            raise RuntimeError("this LLM was shut down")
        return self._engine

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None) -> RequestOutput:
        """Answer one conversation (``[{"role": "user", "content": ...}, ...]``) through the chat template."""
        return self.generate(self.tokenizer.apply_chat_template(messages), params)[0]

    def shutdown(self) -> None:
        """Release the engine; on the hybrid runtime: shared memory, sockets, actors (and an embedded cluster)."""
        if self._engine is not None:
            self._engine.shutdown()
        self._engine = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


async def _iterate_in_thread(chunks: Iterator[StreamChunk], cancel: Callable[[], None]) -> AsyncIterator[StreamChunk]:
    """Iterate a blocking chunk iterator on a helper thread, handing chunks to the event loop. When the
    consumer stops early, ``cancel`` makes the engine finish the request, which ends the thread."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[StreamChunk | BaseException | None] = asyncio.Queue()     # None: no more chunks
    stopped = threading.Event()

    def put(item: StreamChunk | BaseException | None) -> None:
        try:
            loop.call_soon_threadsafe(inbox.put_nowait, item)
        except RuntimeError:                    # the event loop is closed: nobody is listening any more
            stopped.set()

    def pump() -> None:
        try:
            for chunk in chunks:
                put(chunk)
                if stopped.is_set():            # the consumer left: closing the iterator cancels the request
                    break
        except BaseException as e:              # raised on the consumer's side
            put(e)
        finally:
            getattr(chunks, "close", lambda: None)()
            put(None)

    threading.Thread(target=pump, name="pinfer-astream", daemon=True).start()
    finished = False
    try:
        while (item := await inbox.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            finished = item.finished
            yield item
    finally:
        if not finished:
            stopped.set()
            try:
                cancel()
            except Exception as e:              # the engine is already gone: nothing left to cancel
                logger.debug("cancelling a stream failed: %s", e)
