"""Sampling parameters (validated on construction) and the sampler that turns logits into tokens."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from runtime.errors import InvalidRequestError

GREEDY_BELOW = 1e-5        # temperatures under this are greedy (as vLLM): dividing by them overflows the logits
MAX_SEED = 2**63 - 1      # what torch's generator takes
MAX_STOP, MAX_STOP_CHARS = 16, 1000     # every new token is checked against every stop string


def brief(value: object, limit: int = 60) -> str:
    """A bad value for an error message, cut short (a huge integer's digits are not even spelled out)."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens. ``temperature`` < 1e-5 is greedy; ``seed`` makes sampling reproducible."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0                    # 0: no top-k cut
    top_p: float = 1.0                # 1.0: no nucleus cut
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        problems = []
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            problems.append(f"max_tokens must be an integer >= 1, got {brief(self.max_tokens)}")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 100.0 \
                or self.temperature != self.temperature:
            problems.append(f"temperature must be in [0, 100], got {brief(self.temperature)}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (0 disables it), got {brief(self.top_k)}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {brief(self.top_p)}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED):
            problems.append(f"seed must be an integer in [0, 2**63 - 1] or None, got {brief(self.seed)}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            problems.append(f"stop must be a list of non-empty strings, got {brief(self.stop)}")
        elif len(self.stop) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in self.stop):
            problems.append(f"stop takes at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters, got "
                            f"{len(self.stop)} of up to {max(map(len, self.stop))}")
        if problems:
            raise InvalidRequestError("; ".join(problems))

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1


class Sampler:
    """Per-request token choice: greedy argmax, or temperature / top-k / top-p with its own RNG."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.is_greedy:
            self.generator = torch.Generator()
            self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor) -> int:
        """One token id from logits [V] (fp32)."""
        p = self.params
        if p.is_greedy:
            return int(logits.argmax())
        logits = logits / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= p.top_p      # keep the smallest prefix reaching top_p
            logits = logits.masked_fill(torch.empty_like(drop).scatter_(0, order, drop), float("-inf"))
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
