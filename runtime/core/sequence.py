"""One request inside the engine: its tokens, how it stops, and the stream chunks it hands out."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from runtime.core.handles import RequestHandle
from runtime.model.config import ModelConfig
from runtime.model.tokenizer import IncrementalDetokenizer, TextTokenizer
from runtime.outputs import RequestOutput, StreamChunk
from runtime.sampling import Sampler, SamplingParams


def eos_token_ids(cfg: ModelConfig, tokenizer: TextTokenizer) -> frozenset[int]:
    """Tokens that end a request (unless it ignores EOS): the model's and the tokenizer's EOS ids."""
    return frozenset(i for i in [*cfg.eos_token_ids, tokenizer.eos_id] if i is not None)


@dataclass(slots=True)
class Sequence:
    request_id: str
    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    sampler: Sampler
    detok: IncrementalDetokenizer
    handle: RequestHandle | None = None
    slot: int = -1                          # KV-cache slot while running
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

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int, eos_ids: frozenset[int]) -> None:
        """Record one sampled token and decide whether the sequence is done (EOS, stop string, length)."""
        delta = self.detok.add(token)
        p = self.params
        if token in eos_ids and not p.ignore_eos:
            self.stop_reason = token
            self.finish("stop")
            return
        self.text += delta
        if p.stop and delta:                 # a stop string can only end inside the new text's window
            window = len(delta) + max(map(len, p.stop)) - 1
            tail_start = max(0, len(self.text) - window)
            hits = [(i, stop) for stop in p.stop if (i := self.text.find(stop, tail_start)) >= 0]
            if hits:
                i, stop = min(hits)
                self.text, self.stop_reason = self.text[:i], stop
                self.finish("stop")
                return
        if len(self.output_ids) >= p.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        """End the sequence ("stop", "length" or "abort") and time it."""
        self.finish_reason = reason
        now = time.perf_counter()
        self.metrics["decode_s"] = now - self.first_token if self.first_token else 0.0
        self.metrics["total_s"] = now - self.arrival

    def next_chunk(self) -> StreamChunk | None:
        """What a stream has not seen yet (None if nothing). Text that could still become a stop string is
        held back until decided, so the chunks always add up to the final text."""
        done = self.is_finished
        hold = 0 if done or not self.params.stop else max(map(len, self.params.stop)) - 1
        visible = len(self.text) - hold
        text = self.text[self.sent_chars:visible] if visible > self.sent_chars else ""
        tokens = self.output_ids[self.sent_tokens:]
        if not (text or tokens or done):
            return None
        self.sent_chars += len(text)
        self.sent_tokens += len(tokens)
        return StreamChunk(self.request_id, text, list(tokens), done, self.to_output() if done else None)

    def to_output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, self.text, list(self.output_ids),
                             self.finish_reason or "length", self.stop_reason, dict(self.metrics))
