"""The generation loop: validate requests, batch them continuously, stop each on its own terms.

Requests are submitted from any thread (or asyncio task) and run on one engine thread: between decoding
steps waiting requests join free cache slots (prefilled one by one) and finished or cancelled ones
leave, so one forward pass decodes every running sequence together. The KV cache has a budget
(``kv_cache_tokens`` positions): a request reserves its prompt + ``max_tokens`` when admitted, waits while
the running ones leave no room, is refused at once if it could never fit, and the cache shrinks (to
nothing when idle) as requests leave, so memory returns after a load. The loop is the same for every
runner; a runner owns the weights and the forward pass (the in-process model, or the GPU executor's
hybrid model whose FFN is split with the CPU executor).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import aclosing
from typing import Any, TypeVar

import torch

from runtime.api import new_request_id
from runtime.config import EngineConfig
from runtime.core.handles import RequestHandle
from runtime.core.runners import Runner
from runtime.core.sequence import Sequence, eos_token_ids
from runtime.errors import EngineDeadError, InvalidRequestError
from runtime.model.tokenizer import IncrementalDetokenizer, TextTokenizer
from runtime.model.transformer import StepInput
from runtime.outputs import EngineStats, RequestOutput, StreamChunk
from runtime.sampling import Sampler, SamplingParams, brief
from scheduler.batching import BatchScheduler

logger = logging.getLogger(__name__)
T = TypeVar("T")
CACHE_GROWTH = 64           # KV cache length is rounded up to this many positions (within the budget)
MAX_EARLY_ABORTS = 4096     # remembered ids of aborts that found no request (oldest forgotten first)


class Engine:
    """Validates requests and serves them, continuously batched, on its own thread.

    ``config`` is resolved for the model (``EngineConfig.for_model``): its ``max_model_len`` and
    ``max_batch_size`` bound every request. ``ready`` says whether the runner can step now (the GPU
    executor's: "a CPU executor is connected"); ``on_error`` hears of every failed step.
    """

    def __init__(self, runner: Runner, tokenizer: TextTokenizer, config: EngineConfig,
                 ready: Callable[[], bool] = lambda: True,
                 on_error: Callable[[BaseException], None] = lambda e: None) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_model_len: int = config.max_model_len
        self.max_batch_size = config.max_batch_size
        self.kv_budget: int = config.kv_cache_tokens or config.max_batch_size * config.max_model_len
        self.eos_ids = eos_token_ids(runner.cfg, tokenizer)
        self.batch: BatchScheduler[Sequence] = BatchScheduler(config.max_batch_size)
        self.cache: Any = None
        self.num_finished = self.num_aborted = 0
        self._early_aborts: dict[str, bool] = {}           # ids aborted before their request arrived (ordered)
        self._ready, self._on_error = ready, on_error
        self._cv = threading.Condition()
        self._inbox: list[tuple[str, Any]] = []
        self._thread: threading.Thread | None = None
        self._threads = torch.get_num_threads()
        self._closed = False
        # Prompts submitted from an event loop are tokenized here (one thread: a long prompt never blocks the loop).
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pinfer-tokenize")

    # ---- requests (any thread) -----------------------------------------------------------------
    def submit(self, prompt: str, params: SamplingParams, stream: bool = False, request_id: str | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue one request (validated first: a bad one raises InvalidRequestError before any work); it joins
        the running batch at the next step. With an event ``loop``, the handle streams to ``async for``."""
        return self._add(self._sequence(prompt, params, request_id or new_request_id()), stream, loop)

    def generate(self, prompts: list[str], params: list[SamplingParams]) -> list[RequestOutput]:
        """Complete every prompt (all are validated before any starts); outputs in input order."""
        seqs = [self._sequence(p, sp, new_request_id()) for p, sp in zip(prompts, params, strict=True)]
        handles = [self._add(s) for s in seqs]
        try:
            return [h.result() for h in handles]
        finally:
            for h in handles:                 # on an error (or an interrupt), stop the rest as well
                h.cancel()

    async def _asubmit(self, prompt: str, params: SamplingParams, stream: bool = False,
                       request_id: str | None = None) -> RequestHandle:
        """``submit`` from an event loop: tokenizing a long prompt happens in a worker thread, never on the loop;
        a caller cancelled meanwhile cancels the request it submitted."""
        loop = asyncio.get_running_loop()
        submitted = loop.run_in_executor(self._tokenizing, self.submit, prompt, params, stream, request_id,
                                         loop if stream else None)
        try:
            return await asyncio.shield(submitted)
        except asyncio.CancelledError:
            submitted.add_done_callback(lambda f: None if f.cancelled() or f.exception() else f.result().cancel())
            raise

    async def agenerate(self, prompt: str, params: SamplingParams) -> RequestOutput:
        """One prompt, awaitable; cancelling the awaiting task cancels the request."""
        handle = await self._asubmit(prompt, params)
        return await asyncio.wrap_future(handle.future)

    def stream(self, prompt: str, params: SamplingParams, request_id: str | None = None) -> Iterator[StreamChunk]:
        """Chunks of new text as tokens arrive; closing the iterator early cancels the request."""
        return iter(self.submit(prompt, params, stream=True, request_id=request_id))

    async def astream(self, prompt: str, params: SamplingParams,
                      request_id: str | None = None) -> AsyncIterator[StreamChunk]:
        """``stream`` for an asyncio event loop, which never blocks on the engine; a bad request raises at the
        first chunk, closing early (or cancelling the iterating task) cancels it."""
        handle = await self._asubmit(prompt, params, stream=True, request_id=request_id)
        async with aclosing(aiter(handle)) as chunks:
            async for chunk in chunks:
                yield chunk

    def abort(self, request_id: str) -> None:
        self._post("abort", request_id)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine thread between two steps (the model is not shared across threads)."""
        future: Future[T] = Future()
        self._post("call", (fn, future))
        return future.result()

    def prompt_logits(self, prompt: str) -> torch.Tensor:
        """fp32 next-token logits [V] after ``prompt`` (one prefill in a fresh cache)."""
        ids = self._sequence(prompt, SamplingParams(max_tokens=1), "").prompt_ids
        return self.call(lambda: self._forward_alone(ids, all_logits=False))

    def token_logits(self, ids: list[int]) -> torch.Tensor:
        """fp32 logits [T, V] at every position of ``ids`` (teacher forcing; for perplexity and agreement)."""
        return self.call(lambda: self._forward_alone(ids, all_logits=True))

    def stats(self) -> EngineStats:
        def snapshot() -> EngineStats:
            rows, length = self._cache_shape()
            return EngineStats(len(self.batch.waiting), len(self.batch.running), self.num_finished, self.num_aborted,
                               length, rows * length)
        return self.call(snapshot)

    def wake(self) -> None:
        """Re-check ``ready`` (e.g. after a CPU executor was reconnected)."""
        with self._cv:
            self._cv.notify()

    def shutdown(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self._tokenizing.shutdown(wait=False)

    def _sequence(self, prompt: str, params: SamplingParams, request_id: str) -> Sequence:
        """Tokenize and check one request; raises InvalidRequestError before any work is done."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequestError(f"prompt must be a non-empty string, got {brief(prompt)}")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRequestError(f"prompt is not valid Unicode text: a lone surrogate at {e.start}") from None
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise InvalidRequestError("prompt encodes to zero tokens")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {len(ids) + params.max_tokens} "
                f"exceeds the model context of {self.max_model_len} tokens")
        if len(ids) + params.max_tokens > self.kv_budget:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {len(ids) + params.max_tokens} "
                f"exceeds the engine's KV-cache budget of {self.kv_budget} positions (kv_cache_tokens)")
        return Sequence(request_id, prompt, ids, params, Sampler(params), IncrementalDetokenizer(self.tokenizer))

    def _add(self, seq: Sequence, stream: bool = False, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        seq.handle = RequestHandle(seq.request_id, self.abort, stream, loop)
        self._post("add", seq)
        return seq.handle

    def _post(self, kind: str, item: Any) -> None:
        with self._cv:
            if self._closed:
                raise EngineDeadError("the engine was shut down")
            self._inbox.append((kind, item))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="pinfer-engine", daemon=True)
                self._thread.start()
            self._cv.notify()

    # ---- the engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_num_threads(self._threads)            # intra-op threads are per calling thread
        while True:
            with self._cv:
                while not self._closed and not self._inbox and not (self.batch and self._ready()):
                    self._cv.wait()
                if self._closed:
                    break
                inbox, self._inbox = self._inbox, []
            for kind, item in inbox:
                self._handle(kind, item)
            if self.batch and self._ready():
                try:
                    self.step()
                except Exception as e:                   # fail what was running; waiting requests stay
                    logger.warning("engine step failed: %s", e)
                    self._on_error(e)                    # first: a caller who sees the failure sees its effects
                    for s in list(self.batch.running):
                        self.batch.finish(s)
                        s.handle.fail(e)
            self._fit_cache()                            # give back what finished or aborted requests held
        dead = EngineDeadError("the engine was shut down")
        for s in self.batch.drain():
            s.handle.fail(dead)
        for kind, item in self._inbox:
            if kind == "add":
                item.handle.fail(dead)
            elif kind == "call":
                item[1].set_exception(dead)
        self.cache = None

    def _handle(self, kind: str, item: Any) -> None:
        if kind == "add":
            if self._early_aborts.pop(item.request_id, False):     # cancelled before it arrived
                self._abort(item)
            else:
                self.batch.add(item)
        elif kind == "abort":
            seq = self.batch.remove(item)
            if seq is not None:
                self._abort(seq)
            else:                 # finished, or not here yet (a remote caller's abort can overtake its request)
                self._early_aborts[item] = True
                while len(self._early_aborts) > MAX_EARLY_ABORTS:
                    self._early_aborts.pop(next(iter(self._early_aborts)))
        else:
            fn, future = item
            try:
                future.set_result(fn())
            except Exception as e:
                future.set_exception(e)

    def _abort(self, seq: Sequence) -> None:
        self.num_aborted += 1
        seq.finish("abort")
        self._emit(seq)

    def step(self) -> None:
        """Admit waiting requests (prefill each), then decode one token for every running sequence."""
        admitted = self.batch.admit(self._fits)
        if admitted:
            self._fit_cache()
        for s in admitted:
            t0 = time.perf_counter()
            s.metrics["queue_s"] = t0 - s.arrival
            tokens = torch.tensor([s.prompt_ids])                                            # [1, T]
            logits = self.runner.forward(tokens, StepInput.build([0], len(s.prompt_ids), [s.slot]), self.cache)
            s.first_token = time.perf_counter()
            s.metrics["prefill_s"] = s.first_token - t0
            self._advance(s, logits[0])
        running = [s for s in self.batch.running if not s.is_finished]
        if running:
            tokens = torch.tensor([[s.output_ids[-1]] for s in running])                    # [B, 1]
            step = StepInput.build([s.next_position for s in running], 1, [s.slot for s in running])
            logits = self.runner.forward(tokens, step, self.cache)                            # [B, V]
            for row, s in enumerate(running):
                self._advance(s, logits[row])
        for s in [s for s in self.batch.running if s.is_finished]:
            self.num_finished += 1
            self.batch.finish(s)

    def _advance(self, s: Sequence, logits: torch.Tensor) -> None:
        """Sample, record and hand out one token of ``s`` (logits [V]): a failure there (sampling, detokenizing,
        stop strings) fails this request alone, never the batch it runs in."""
        try:
            s.append(s.sampler(logits), self.eos_ids)
            self._emit(s)
        except Exception as e:
            logger.warning("request %s failed: %s", s.request_id, e)
            s.finish("abort")
            self.batch.finish(s)
            s.handle.fail(e)

    # ---- the KV cache: rows [0, highest running slot], positions for the longest reservation ---------------
    @staticmethod
    def _need(s: Sequence) -> int:
        return len(s.prompt_ids) + s.params.max_tokens

    def _fits(self, s: Sequence, slot: int) -> bool:
        """Whether the cache for the running sequences plus ``s`` in ``slot`` stays within the budget."""
        rows = max([slot] + [r.slot for r in self.batch.running]) + 1
        return rows * max([self._need(s)] + [self._need(r) for r in self.batch.running]) <= self.kv_budget

    def _cache_shape(self) -> tuple[int, int]:
        return (0, 0) if self.cache is None else (self.cache.k.shape[1], self.cache.max_len)

    def _fit_cache(self) -> None:
        """Size the cache for the running sequences: grow it to hold every reservation, give memory back when
        they use less than half of it (all of it when nothing runs). Live rows and positions are copied over."""
        running = self.batch.running
        have_rows, have_len = self._cache_shape()
        if not running:
            self.cache = None
            return
        rows = max(s.slot for s in running) + 1
        need = max(self._need(s) for s in running)
        length = min(self.max_model_len, -(-need // CACHE_GROWTH) * CACHE_GROWTH, max(need, self.kv_budget // rows))
        if rows <= have_rows and need <= have_len and 2 * rows * length >= have_rows * have_len:
            return
        new = self.runner.new_cache(rows, length)          # [L, rows, KV, length, hd] each for keys and values
        if self.cache is not None:
            r, n = min(rows, have_rows), min(length, have_len)
            new.k[:, :r, :, :n].copy_(self.cache.k[:, :r, :, :n])
            new.v[:, :r, :, :n].copy_(self.cache.v[:, :r, :, :n])
        self.cache = new

    def _forward_alone(self, ids: list[int], all_logits: bool) -> torch.Tensor:
        cache = self.runner.new_cache(1, len(ids))
        out = self.runner.forward(torch.tensor([ids]), StepInput.build([0], len(ids), [0]), cache, all_logits=all_logits)
        return out[0]

    @staticmethod
    def _emit(s: Sequence) -> None:
        """Hand new text to a streaming handle; complete the handle when the sequence is done."""
        if s.handle.streaming or s.is_finished:
            chunk = s.next_chunk()
            if chunk is not None:
                s.handle.push(chunk)
