"""The public entry point: ``LLM(model).generate(prompts, SamplingParams(...))``."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from runtime.api import EngineClientBase
from runtime.config import EngineConfig
from runtime.core.engine import Engine
from runtime.core.runners import build_runner
from runtime.core.sequence import eos_token_ids
from runtime.model.registry import open_model
from runtime.model.tokenizer import TextTokenizer
from runtime.outputs import EngineStats, RequestOutput
from runtime.sampling import SamplingParams

if TYPE_CHECKING:
    from runtime.hybrid.driver import HybridEngine
    from scheduler.layer_scheduler import LayerEvent

logger = logging.getLogger(__name__)


class LLM(EngineClientBase):
    """A loaded model that generates text.

    ``model`` is a registry name (``pinfer models`` lists them), a model directory (pinfer or Hugging
    Face safetensors layout) or a ``.gguf`` file; ``None`` takes the registry default. Every other
    option is an ``EngineConfig`` field, given as ``config`` and/or as keywords (which win), on top of
    ``configs/engine.yaml``: e.g. ``LLM("qwen2.5-coder-0.5b", hot_fraction=0.3, dtype="bfloat16")``.

    With ``is_hybrid`` (implied by ``hot_fraction``, ``address``, ``placement``, ``memory_budget_mb``...)
    the model runs on the hybrid Ray runtime: a GPU executor holding the hot FFN neurons of every layer
    and a CPU executor holding the rest, on the cluster at ``address`` or an embedded one. Otherwise it
    runs in this process.
    """

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, **options: Any) -> None:
        # Resolved once (options, then the model's own limits) and passed down unchanged.
        self.config, self.model_dir, model_cfg = open_model(EngineConfig.resolve(config, model=model, **options))
        self.tokenizer = TextTokenizer(self.model_dir)
        self.eos_token_ids = eos_token_ids(model_cfg, self.tokenizer)
        if self.config.is_hybrid:
            from runtime.hybrid.driver import HybridEngine

            self._engine: Engine | HybridEngine | None = HybridEngine(self.config, self.model_dir)
        else:
            torch.set_num_threads(self.config.num_threads)
            self._engine = Engine(build_runner(self.config, self.model_dir), self.tokenizer, self.config)

    @property
    def model_name(self) -> str:
        return self.config.model

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    def _requests(self) -> Engine | HybridEngine:
        if self._engine is None:
            raise RuntimeError("this LLM was shut down")
        return self._engine

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """The prompt for a conversation under the model's chat template (generation prompt appended)."""
        return self.tokenizer.apply_chat_template(messages)

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None) -> RequestOutput:
        """Answer one conversation (``[{"role": "user", "content": ...}, ...]``) through the chat template."""
        return self.generate(self.apply_chat_template(messages), params)[0]

    def prompt_logits(self, prompt: str) -> torch.Tensor:
        """fp32 next-token logits [V] after ``prompt``."""
        return self._requests().prompt_logits(prompt)

    def token_logits(self, ids: list[int]) -> torch.Tensor:
        """fp32 logits [T, V] at every position of the token ids ``ids`` (teacher forcing, fresh cache)."""
        return self._requests().token_logits(ids)

    def stats(self) -> EngineStats:
        """Requests waiting and running now, finished and aborted so far, the KV cache's length."""
        return self._requests().stats()

    def achieved_sparsity(self, reset: bool = False) -> float | None:
        """Share of offered FFN neurons skipped so far (in-process sparse engines; None otherwise); ``reset``
        starts counting anew afterwards."""
        shard = getattr(getattr(self._requests(), "runner", None), "shard", None)
        if shard is None:
            return None
        share = 1 - shard.num_computed / shard.num_offered if shard.num_offered else None
        if reset:
            shard.num_computed = shard.num_offered = 0
        return share

    # ---- the hybrid runtime's own ---------------------------------------------------------------------
    def start_trace(self) -> None:
        """Record per-layer hot/cold timings from now on (``trace_events`` returns them)."""
        self._hybrid().set_tracing(True)

    def trace_events(self) -> list[LayerEvent]:
        return self._hybrid().trace_events()

    def hot_neurons(self) -> list[np.ndarray]:
        """Per layer, the neuron ids the GPU executor holds (as it reports them)."""
        return self._hybrid().hot_neurons()

    def executor_pids(self) -> dict[str, int]:
        """Process ids of the GPU and CPU executors."""
        return self._hybrid().executor_pids()

    def executor_nodes(self) -> dict[str, str]:
        """Ray node ids of the GPU and CPU executors (the same node: the one this engine runs on)."""
        return self._hybrid().executor_nodes()

    def _hybrid(self) -> HybridEngine:
        engine = self._requests()
        if isinstance(engine, Engine):
            raise RuntimeError("this needs the hybrid runtime (LLM(..., is_hybrid=True) or a hot_fraction)")
        return engine

    def shutdown(self) -> None:
        """Release the engine; on the hybrid runtime: shared memory, sockets, actors (and an embedded cluster)."""
        if self._engine is not None:
            self._engine.shutdown()
        self._engine = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
