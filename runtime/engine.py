"""The generation loop: validate requests, prefill each, decode them together, stop each on its own terms.

The loop is the same for every runner; a runner owns the weights and the forward pass (the dense
in-process model here, the hybrid GPU/CPU executors in the Ray runtime).
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from runtime.config import ModelConfig
from runtime.errors import InvalidRequestError
from runtime.model import KVCache, StepInput, Transformer
from runtime.outputs import RequestOutput
from runtime.sampling import Sampler, SamplingParams
from runtime.tokenizer import IncrementalDetokenizer, TextTokenizer

logger = logging.getLogger(__name__)
_request_ids = itertools.count()


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
    slot: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text: str = ""
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
    """Validates and runs batches of requests through a runner."""

    def __init__(self, runner: Runner, tokenizer: TextTokenizer, max_model_len: int | None = None,
                 max_batch_size: int = 16) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_model_len = min(max_model_len or runner.cfg.max_position_embeddings, runner.cfg.max_position_embeddings)
        self.max_batch_size = max_batch_size
        self.eos_ids = frozenset(i for i in [*runner.cfg.eos_token_ids, tokenizer.eos_id] if i is not None)

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

    def prompt_logits(self, prompt: str) -> torch.Tensor:
        """fp32 next-token logits [V] after ``prompt`` (one prefill in a fresh cache)."""
        ids = self.make_sequence(prompt, SamplingParams(max_tokens=1)).prompt_ids
        cache = self.runner.new_cache(1, len(ids))
        return self.runner.forward(torch.tensor([ids]), StepInput.build([0], len(ids), [0]), cache)[0]

    def token_logits(self, ids: list[int]) -> torch.Tensor:
        """fp32 logits [T, V] at every position of ``ids`` (teacher forcing; for perplexity and agreement)."""
        cache = self.runner.new_cache(1, len(ids))
        return self.runner.forward(torch.tensor([ids]), StepInput.build([0], len(ids), [0]), cache, all_logits=True)[0]

    def generate(self, prompts: list[str], params: list[SamplingParams]) -> list[RequestOutput]:
        seqs = [self.make_sequence(p, sp) for p, sp in zip(prompts, params, strict=True)]
        for i in range(0, len(seqs), self.max_batch_size):
            self._run_batch(seqs[i:i + self.max_batch_size])
        return [s.to_output() for s in seqs]

    def _run_batch(self, seqs: list[Sequence]) -> None:
        max_len = max(len(s.prompt_ids) + s.params.max_tokens for s in seqs)
        cache = self.runner.new_cache(len(seqs), max_len)
        for slot, s in enumerate(seqs):
            s.slot = slot
            t0 = time.perf_counter()
            tokens = torch.tensor([s.prompt_ids])
            logits = self.runner.forward(tokens, StepInput.build([0], len(s.prompt_ids), [slot]), cache)
            self._append(s, s.sampler(logits[0]))
            s.metrics["prefill_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        active = [s for s in seqs if s.finish_reason is None]
        while active:
            tokens = torch.tensor([[s.output_ids[-1]] for s in active])                      # [B, 1]
            step = StepInput.build([s.next_position for s in active], 1, [s.slot for s in active])
            logits = self.runner.forward(tokens, step, cache)                                  # [B, V]
            for row, s in enumerate(active):
                self._append(s, s.sampler(logits[row]))
            active = [s for s in active if s.finish_reason is None]
        for s in seqs:
            s.metrics["decode_s"] = time.perf_counter() - t0

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
