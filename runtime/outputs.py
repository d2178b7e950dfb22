"""What requests hand back to the user: finished outputs, stream chunks, and the engine's counters."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str
    prompt_token_ids: list[int]
    text: str                          # generated text, stop string and EOS excluded
    token_ids: list[int]               # generated tokens (EOS included when it ended the request)
    finish_reason: str                 # "stop" (EOS or a stop string) | "length" (max_tokens) | "abort"
    stop_reason: str | int | None = None   # the stop string or EOS id that ended it
    metrics: dict[str, float] = field(default_factory=dict)   # queue_s, prefill_s, decode_s, total_s


@dataclass(slots=True)
class StreamChunk:
    """New text of one request since its previous chunk; the last one has ``finished`` and the whole output."""

    request_id: str
    text: str                          # text delta (a possible stop string's prefix is held back until decided)
    token_ids: list[int]               # tokens sampled since the previous chunk
    finished: bool = False
    output: RequestOutput | None = None


@dataclass(slots=True, frozen=True)
class EngineStats:
    """A snapshot of an engine's request loop."""

    num_waiting: int                   # submitted, not yet admitted to a KV-cache slot
    num_running: int                   # decoding
    num_finished: int                  # since start: ended by EOS, a stop string or max_tokens
    num_aborted: int                   # since start: cancelled while waiting or running
    kv_cache_len: int                  # positions each KV-cache row holds now (0: no cache; sized to what runs)
    kv_cache_tokens: int = 0           # positions the KV cache holds now, all rows (at most the kv_cache_tokens budget)
