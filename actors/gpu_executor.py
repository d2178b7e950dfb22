"""GPU executor: embeddings, attention + KV cache, norms, lm_head, the hot FFN neurons, and the engine loop.

It runs on CUDA when there is one and otherwise on the CPU device, with the same memory-budget
accounting either way. Per layer it hands the normed hidden state to the cold side through the
shared arena and the layer scheduler, computes its hot partial meanwhile, and adds the cold partial
read from the arena without a copy (the arena is registered as pinned host memory on CUDA).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from runtime.model.ffn_shard import FFNShard
from runtime.model.config import ModelConfig
from runtime.core.engine import Engine
from runtime.errors import EngineDeadError
from runtime.llm import parse_dtype
from runtime.model.transformer import KVCache, StepInput, Transformer
from runtime.outputs import RequestOutput
from runtime.sampling import SamplingParams
from runtime.core.handles import StreamChunk
from runtime.sparsity.modes import SparsityConfig
from runtime.model.tokenizer import TextTokenizer
from runtime.model.weights import load_transformer
from scheduler.doorbell import Doorbell
from scheduler.layer_scheduler import ColdExecutorError, LayerEvent, LayerScheduler
from scheduler.placement import LayerSplit
from scheduler.shm import BufferSpec, SharedArena

logger = logging.getLogger(__name__)


@contextmanager
def _cold_errors_as_dead() -> Iterator[None]:
    try:
        yield
    except ColdExecutorError as e:
        raise EngineDeadError(f"CPU executor failed mid-request: {e}") from e


class BudgetError(ValueError):
    """What the GPU executor must hold does not fit its memory budget."""


class _HybridRunner:
    """Runner for the engine loop: the dense model with the FFN replaced by the hot/cold split."""

    def __init__(self, executor: "GPUExecutor") -> None:
        self.x = executor
        self.cfg = executor.cfg

    def new_cache(self, num_slots: int, max_len: int) -> KVCache:
        return KVCache(self.cfg, num_slots, max_len, self.x.dtype, self.x.device)

    def forward(self, tokens: torch.Tensor, step: StepInput, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        d = self.x.device
        if d.type != "cpu":
            tokens = tokens.to(d)
            step = StepInput(step.positions.to(d), step.slots.to(d),
                             step.rows if isinstance(step.rows, slice) else step.rows.to(d), step.ctx_len,
                             None if step.mask is None else step.mask.to(d), step.is_causal)
        return self.x.model(tokens, step, cache, ffn=self.x.ffn, all_logits=all_logits).cpu()


class GPUExecutor:
    def __init__(self, model_dir: str, splits: list[LayerSplit], dtype: str = "float32",
                 device: str | None = None, memory_budget_bytes: int | None = None, num_threads: int = 1,
                 max_batch_size: int = 16, max_model_len: int | None = None, max_rows: int = 256,
                 sparsity: SparsityConfig = SparsityConfig()) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.set_num_threads(num_threads)
        self.dtype = parse_dtype(dtype)
        self.cfg = ModelConfig.load(model_dir)
        self.max_model_len = min(max_model_len or self.cfg.max_position_embeddings, self.cfg.max_position_embeddings)
        self.max_batch_size = max_batch_size
        self._check_budget(splits, memory_budget_bytes)
        self.model: Transformer = load_transformer(model_dir, self.dtype, self.cfg, with_ffn=False).to(self.device)
        self.hot = FFNShard.load(model_dir, [s.hot for s in splits], self.dtype, self.device, sparsity.mode,
                                 sparsity.tau_gate(Path(model_dir)), num_threads)
        self.mask_fn = sparsity.mask_fn(Path(model_dir), self.dtype, self.device)    # predictor mode only
        self.has_cold = [len(s.cold) > 0 for s in splits]
        self.has_hot = [len(s.hot) > 0 for s in splits]
        d = self.cfg.hidden_size
        self.max_rows = max_rows
        self.arena = SharedArena([BufferSpec("x", (max_rows, d), "float32"), BufferSpec("y_cold", (max_rows, d), "float32"),
                                  BufferSpec("mask", (max_rows, self.cfg.intermediate_size), "bool")])
        self._x = torch.from_numpy(self.arena["x"])              # [max_rows, d] shared with the CPU executor
        self._y_cold = torch.from_numpy(self.arena["y_cold"])
        self._mask = torch.from_numpy(self.arena["mask"])        # [max_rows, n_ff] the predictor's output, broadcast
        if self.device.type == "cuda":                          # pin the arena so H2D/D2H copies are DMA
            for t in (self._x, self._y_cold):
                torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
        self.scheduler: LayerScheduler | None = None
        self.engine = Engine(_HybridRunner(self), TextTokenizer(model_dir), self.max_model_len, max_batch_size,
                             ready=lambda: self.scheduler is not None, on_error=self._on_engine_error)
        logger.info("GPU executor on %s: %.1f MB resident (%d hot neurons of %d per layer on average)",
                    self.device, self.resident_bytes() / 1e6, int(np.mean([len(s.hot) for s in splits])),
                    self.cfg.intermediate_size)

    # ---- control plane -------------------------------------------------------------------------
    def arena_info(self) -> tuple[str, list[BufferSpec]]:
        return self.arena.name, self.arena.specs

    def connect(self, doorbell_path: str, timeout_s: float = 60.0) -> None:
        """Attach the CPU executor's doorbell (again, after a restart)."""
        if self.scheduler is not None:
            self.scheduler.cold.close()
        scheduler = LayerScheduler(Doorbell.connect(doorbell_path), timeout_s)
        scheduler.ping()
        self.scheduler = scheduler
        self.engine.wake()                 # requests that arrived while no CPU executor was attached

    def resident_bytes(self) -> int:
        params = sum(t.numel() * t.element_size() for t in self.model.parameters())
        return params + self.hot.nbytes()

    def _check_budget(self, splits: list[LayerSplit], budget: int | None) -> None:
        """Weights the executor will hold (dense part + hot neurons + one full-context KV slot) vs ``budget``."""
        if budget is None:
            return
        c, b = self.cfg, torch.finfo(self.dtype).bits // 8
        hd, kv = c.head_dim, c.num_key_value_heads
        attn = c.hidden_size * (c.num_attention_heads + 2 * kv) * hd + c.num_attention_heads * hd * c.hidden_size
        dense = c.num_hidden_layers * (attn + 2 * c.hidden_size) + c.vocab_size * c.hidden_size * (
            1 if c.tie_word_embeddings else 2) + c.hidden_size
        per_neuron = c.hidden_size * (3 if c.is_gated_ffn else 2)
        hot = sum(len(s.hot) for s in splits) * per_neuron
        kv_bytes = 2 * c.num_hidden_layers * kv * hd * self.max_model_len * self.max_batch_size * b
        need = (dense + hot) * b + kv_bytes
        if need > budget:
            spare = budget - dense * b - kv_bytes
            most = max(0, spare) // (per_neuron * b * c.num_hidden_layers)
            raise BudgetError(
                f"GPU executor needs {need / 1e6:.1f} MB (dense part {dense * b / 1e6:.1f} MB, hot neurons "
                f"{hot * b / 1e6:.1f} MB, KV cache {kv_bytes / 1e6:.1f} MB) but the budget is {budget / 1e6:.1f} MB; "
                f"at most {most} hot neurons per layer fit (hot_fraction <= {most / c.intermediate_size:.3f})"
                + (", and not even the dense part fits" if spare < 0 else ""))

    def set_tracing(self, on: bool) -> None:
        self._require_scheduler().is_tracing = on
        self.scheduler.events.clear()

    def trace_events(self) -> list[LayerEvent]:
        return list(self._require_scheduler().events)

    def _on_engine_error(self, error: BaseException) -> None:
        """A failed step fails its running requests; a dead cold side also detaches until ``connect``."""
        if isinstance(error, ColdExecutorError) and self.scheduler is not None:
            self.scheduler.close()
            self.scheduler = None

    def shutdown(self) -> None:
        self.engine.shutdown()
        if self.scheduler is not None:
            self.scheduler.close()
            self.scheduler = None
        self._x = self._y_cold = None
        self.arena.close()

    def _require_scheduler(self) -> LayerScheduler:
        if self.scheduler is None:
            raise EngineDeadError("GPU executor has no CPU executor connected")
        return self.scheduler

    # ---- requests (many at once: this is a threaded actor; the engine thread batches them) -------
    def generate(self, prompts: list[str], params: list[SamplingParams]) -> list[RequestOutput]:
        with _cold_errors_as_dead():
            return self.engine.generate(prompts, params)

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[StreamChunk]:
        """Ray streaming generator: one chunk of new text per object, as tokens arrive."""
        with _cold_errors_as_dead():
            yield from self.engine.stream(prompt, params)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def prompt_logits(self, prompt: str) -> torch.Tensor:
        self._require_scheduler()
        with _cold_errors_as_dead():
            return self.engine.prompt_logits(prompt)

    # ---- data plane: one FFN layer, hot here and cold there at once ----------------------------
    def ffn(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """h [N, d] (normed hidden) -> FFN output [N, d] = hot partial + cold partial."""
        if h.shape[0] > self.max_rows:                           # long prefills go through in chunks
            return torch.cat([self.ffn(layer, chunk) for chunk in h.split(self.max_rows)])
        n = h.shape[0]
        mask = None if self.mask_fn is None else self.mask_fn(layer, h)         # [N, n_ff] bool
        if self.has_cold[layer]:
            self._x[:n].copy_(h)                                 # into shared memory (D2H on CUDA)
            if mask is not None:
                self._mask[:n].copy_(mask)                       # written once, read by the CPU executor
        result: list[torch.Tensor] = []

        def hot() -> None:
            if self.has_hot[layer]:
                result.append(self.hot.partial(layer, h, mask=mask))
            if self.device.type == "cuda":
                torch.cuda.current_stream().synchronize()       # the trace should show the real GPU time

        self.scheduler.run_layer(layer, n, hot, self.has_cold[layer])
        if not self.has_cold[layer]:
            return result[0]
        cold = self._y_cold[:n]
        cold = cold.to(self.device, non_blocking=True) if self.device.type != "cpu" else cold
        return result[0] + cold.to(self.dtype) if result else cold.to(self.dtype).clone()
