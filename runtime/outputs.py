"""What a finished request returns to the user."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str
    prompt_token_ids: list[int]
    text: str                          # generated text, stop string and EOS excluded
    token_ids: list[int]               # generated tokens (EOS included when it ended the request)
    finish_reason: str                 # "stop" (EOS or a stop string) | "length" (max_tokens)
    stop_reason: str | int | None = None   # the stop string or EOS id that ended it
    metrics: dict[str, float] = field(default_factory=dict)   # prefill_s, decode_s
