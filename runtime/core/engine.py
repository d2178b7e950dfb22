"""The generation loop: validate requests, batch them continuously, stop each on its own terms.

Requests are submitted from any thread and run on one engine thread: between decoding steps waiting
requests join free cache slots (prefilled one by one) and finished or cancelled ones leave, so one
forward pass decodes every running sequence together. The loop is the same for every runner; a
runner owns the weights and the forward pass (the dense in-process model here, the hybrid GPU/CPU
executors in the Ray runtime).
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from runtime.model.config import ModelConfig
from runtime.errors import EngineDeadError, InvalidRequestError
from runtime.model.transformer import KVCache, StepInput, Transformer
from runtime.outputs import RequestOutput
from runtime.sampling import Sampler, SamplingParams
from runtime.core.handles import RequestHandle, StreamChunk
from runtime.model.tokenizer import IncrementalDetokenizer, TextTokenizer
from scheduler.batching import BatchScheduler

logger = logging.getLogger(__name__)
_request_ids = itertools.count()
T = TypeVar("T")
CACHE_GROWTH = 64           # KV cache length grows in steps of this many positions


class Runner(Protocol):
    cfg: ModelConfig

    def new_cache(self, num_slots: int, max_len: int) -> Any: ...

    def forward(self, tokens: torch.Tensor, step: StepInput, cache: Any, all_logits: bool = False) -> torch.Tensor:
        """tokens [B, T] -> fp32 logits [B, V] of each row's last position ([B, T, V] with ``all_logits``)."""
        ...


class DenseRunner:
    """The dense reference model in this process."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.cfg = model.cfg

    def new_cache(self, num_slots: int, max_len: int) -> KVCache:
        return KVCache(self.cfg, num_slots, max_len, self.model.embed.dtype)

    def forward(self, tokens: torch.Tensor, step: StepInput, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        return self.model(tokens, step, cache, all_logits=all_logits)


@dataclass(slots=True)
class Sequence:
    request_id: str
    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    sampler: Sampler
    detok: IncrementalDetokenizer
    handle: RequestHandle | None = None
    slot: int = -1
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text: str = ""
    sent_chars: int = 0                     # text and tokens already streamed
    sent_tokens: int = 0
    arrival: float = field(default_factory=time.perf_counter)
    first_token: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def output_ids(self) -> list[int]:
        return self.detok.token_ids

    @property
    def next_position(self) -> int:
        """Position of the last sampled token, the one the next decode step feeds."""
        return len(self.prompt_ids) + len(self.output_ids) - 1

    def to_output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, self.text, list(self.output_ids),
                             self.finish_reason or "length", self.stop_reason, dict(self.metrics))


class Engine:
    """Validates requests and serves them, continuously batched, on its own thread."""

    def __init__(self, runner: Runner, tokenizer: TextTokenizer, max_model_len: int | None = None,
                 max_batch_size: int = 16, ready: Callable[[], bool] = lambda: True,
                 on_error: Callable[[BaseException], None] = lambda e: None) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_model_len = min(max_model_len or runner.cfg.max_position_embeddings, runner.cfg.max_position_embeddings)
        self.max_batch_size = max_batch_size
        self.eos_ids = frozenset(i for i in [*runner.cfg.eos_token_ids, tokenizer.eos_id] if i is not None)
        self.batch: BatchScheduler[Sequence] = BatchScheduler(max_batch_size)
        self.cache: Any = None
        self._ready, self._on_error = ready, on_error        # e.g. "a CPU executor is connected"
        self._cv = threading.Condition()
        self._inbox: list[tuple[str, Any]] = []
        self._thread: threading.Thread | None = None
        self._threads = torch.get_num_threads()
        self._closed = False

    # ---- requests (any thread) -----------------------------------------------------------------
    def make_sequence(self, prompt: str, params: SamplingParams) -> Sequence:
        """Tokenize and check one request; raises InvalidRequestError before any work is done."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequestError(f"prompt must be a non-empty string, got {prompt!r}")
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise InvalidRequestError("prompt encodes to zero tokens")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {len(ids) + params.max_tokens} "
                f"exceeds the model context of {self.max_model_len} tokens")
        return Sequence(f"req-{next(_request_ids)}", prompt, ids, params, Sampler(params),
                        IncrementalDetokenizer(self.tokenizer))

    def submit(self, prompt: str, params: SamplingParams, stream: bool = False) -> RequestHandle:
        """Queue one request; it joins the running batch at the next step."""
        return self._submit(self.make_sequence(prompt, params), stream)

    def generate(self, prompts: list[str], params: list[SamplingParams]) -> list[RequestOutput]:
        """Complete every prompt (all are validated before any starts); outputs in input order."""
        seqs = [self.make_sequence(p, sp) for p, sp in zip(prompts, params, strict=True)]
        handles = [self._submit(s, stream=False) for s in seqs]
        try:
            return [h.result() for h in handles]
        finally:
            for h in handles:                 # on an error (or an interrupt), stop the rest as well
                h.cancel()

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[StreamChunk]:
        """Chunks of new text as tokens arrive; closing the iterator early cancels the request."""
        return iter(self.submit(prompt, params, stream=True))

    def abort(self, request_id: str) -> None:
        self._post("abort", request_id)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine thread between two steps (the model is not shared across threads)."""
        future: Future[T] = Future()
        self._post("call", (fn, future))
        return future.result()

    def prompt_logits(self, prompt: str) -> torch.Tensor:
        """fp32 next-token logits [V] after ``prompt`` (one prefill in a fresh cache)."""
        ids = self.make_sequence(prompt, SamplingParams(max_tokens=1)).prompt_ids
        return self.call(lambda: self._forward_alone(ids, all_logits=False))

    def token_logits(self, ids: list[int]) -> torch.Tensor:
        """fp32 logits [T, V] at every position of ``ids`` (teacher forcing; for perplexity and agreement)."""
        return self.call(lambda: self._forward_alone(ids, all_logits=True))

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

    def _submit(self, seq: Sequence, stream: bool) -> RequestHandle:
        seq.handle = RequestHandle(seq.request_id, self.abort, stream)
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
                    for s in list(self.batch.running):
                        self.batch.finish(s)
                        s.handle.fail(e)
                    self._on_error(e)
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
            self.batch.add(item)
        elif kind == "abort":
            seq = self.batch.remove(item)
            if seq is not None:
                seq.finish_reason = "abort"
                self._emit(seq)
        else:
            fn, future = item
            try:
                future.set_result(fn())
            except Exception as e:
                future.set_exception(e)

    def step(self) -> None:
        """Admit waiting requests (prefill each), then decode one token for every running sequence."""
        for s in self.batch.admit():
            t0 = time.perf_counter()
            s.metrics["queue_s"] = t0 - s.arrival
            self._reserve(len(s.prompt_ids) + s.params.max_tokens)
            tokens = torch.tensor([s.prompt_ids])                                            # [1, T]
            logits = self.runner.forward(tokens, StepInput.build([0], len(s.prompt_ids), [s.slot]), self.cache)
            s.first_token = time.perf_counter()
            s.metrics["prefill_s"] = s.first_token - t0
            self._append(s, s.sampler(logits[0]))
            self._emit(s)
        running = [s for s in self.batch.running if s.finish_reason is None]
        if running:
            tokens = torch.tensor([[s.output_ids[-1]] for s in running])                    # [B, 1]
            step = StepInput.build([s.next_position for s in running], 1, [s.slot for s in running])
            logits = self.runner.forward(tokens, step, self.cache)                            # [B, V]
            for row, s in enumerate(running):
                self._append(s, s.sampler(logits[row]))
                self._emit(s)
        for s in [s for s in self.batch.running if s.finish_reason is not None]:
            self.batch.finish(s)

    def _reserve(self, length: int) -> None:
        """Make the KV cache hold ``length`` positions in every slot (grown, never shrunk, while busy)."""
        if self.cache is not None and self.cache.max_len >= length:
            return
        new_len = min(self.max_model_len, -(-length // CACHE_GROWTH) * CACHE_GROWTH)
        new = self.runner.new_cache(self.max_batch_size, new_len)
        if self.cache is not None:
            old = self.cache.max_len
            new.k[:, :, :, :old].copy_(self.cache.k)
            new.v[:, :, :, :old].copy_(self.cache.v)
        self.cache = new

    def _forward_alone(self, ids: list[int], all_logits: bool) -> torch.Tensor:
        cache = self.runner.new_cache(1, len(ids))
        out = self.runner.forward(torch.tensor([ids]), StepInput.build([0], len(ids), [0]), cache, all_logits=all_logits)
        return out[0]

    def _append(self, s: Sequence, token: int) -> None:
        """Record one sampled token and decide whether the sequence is done."""
        delta = s.detok.add(token)
        p = s.params
        if token in self.eos_ids and not p.ignore_eos:
            s.finish_reason, s.stop_reason = "stop", token
            return
        s.text += delta
        if p.stop and delta:
            window = len(delta) + max(map(len, p.stop)) - 1
            tail_start = max(0, len(s.text) - window)
            hits = [(s.text.find(stop, tail_start), stop) for stop in p.stop]
            hits = [(i, stop) for i, stop in hits if i >= 0]
            if hits:
                i, stop = min(hits)
                s.text = s.text[:i]
                s.finish_reason, s.stop_reason = "stop", stop
                return
        if len(s.output_ids) >= p.max_tokens:
            s.finish_reason = "length"

    def _emit(self, s: Sequence) -> None:
        """Hand new text to a streaming handle; complete the handle when the sequence is done."""
        done = s.finish_reason is not None
        if done:
            now = time.perf_counter()
            s.metrics["decode_s"] = now - s.first_token if s.first_token else 0.0
            s.metrics["total_s"] = now - s.arrival
        if not (s.handle.streaming or done):
            return
        hold = 0 if done or not s.params.stop else max(map(len, s.params.stop)) - 1
        visible = len(s.text) - hold
        text = s.text[s.sent_chars:visible] if visible > s.sent_chars else ""
        tokens = s.output_ids[s.sent_tokens:]
        if text or tokens or done:
            s.sent_chars += len(text)
            s.sent_tokens += len(tokens)
            s.handle.push(StreamChunk(s.request_id, text, list(tokens), done, s.to_output() if done else None))
