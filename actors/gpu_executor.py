"""GPU executor: embeddings, attention + KV cache, norms, lm_head, the predictor, the hot FFN neurons, and
the engine loop.

It runs on CUDA when there is one and otherwise on the CPU device. Its engine's runner is the dense model
whose FFN is the layer scheduler's hop: the hot partial here, the cold one in the CPU executor, joined
through the shared arena (registered as pinned host memory on CUDA).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from actors.endpoint import EngineEndpoint
from runtime.config import EngineConfig
from runtime.core.engine import Engine
from runtime.errors import EngineDeadError
from runtime.model.config import ModelConfig
from runtime.model.ffn_shard import FFNShard, ShardSpec
from runtime.model.tokenizer import TextTokenizer
from runtime.model.transformer import KVCache, StepInput, Transformer
from runtime.model.weights import load_transformer
from runtime.sparsity.online import predictor_mask_fn
from scheduler.channel import ArenaLayout, ArenaRef, ColdChannel, ColdExecutorError, LayerArena
from scheduler.doorbell import Doorbell
from scheduler.layer_scheduler import ArenaViews, LayerEvent, LayerScheduler

logger = logging.getLogger(__name__)
MAX_ROWS = 256               # token rows per layer message (the arena's size); longer prefills go in chunks


class _HybridRunner:
    """Runner for the engine loop: the dense model with the FFN replaced by the layer scheduler's hop."""

    def __init__(self, executor: GPUExecutor) -> None:
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
        return self.x.model(tokens, step, cache, ffn=self.x.scheduler.ffn, all_logits=all_logits).cpu()


class GPUExecutor(EngineEndpoint):
    def __init__(self, config: EngineConfig, model_dir: str, spec: ShardSpec, device: str | None = None,
                 max_rows: int = MAX_ROWS, dequantize: bool | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.set_num_threads(config.gpu_threads)
        on_cpu = self.device.type == "cpu"
        # Quantized weights: the block kernels on the CPU; dequantized to dtype elsewhere (or when asked: the
        # CUDA path's arithmetic reproduced on the CPU, for its check).
        dequantize = not on_cpu if dequantize is None else dequantize
        self.dtype = getattr(torch, config.cpu_dtype if on_cpu else config.dtype)
        self.cfg = ModelConfig.load(model_dir)
        self.model: Transformer = load_transformer(model_dir, self.dtype, self.cfg, with_ffn=False,
                                                   weights=config.weights, dequantize=dequantize).to(self.device)
        # Attention and the head run while the CPU executor waits for its next layer: they may use every core.
        self.model.set_num_threads(config.num_threads)
        self.hot = FFNShard.load(model_dir, spec.neurons, self.dtype, self.device, config.sparsity, spec.thresholds,
                                 config.gpu_threads, config.weights, dequantize)
        self.predictor = predictor_mask_fn(Path(model_dir), config, self.device)     # predictor mode only
        self.arena = LayerArena(ArenaLayout(max_rows, self.cfg.hidden_size, self.cfg.intermediate_size))
        x, y_cold, mask = (torch.from_numpy(a) for a in (self.arena.x, self.arena.y_cold, self.arena.mask))
        # Pin the arena so that H2D/D2H copies are DMA. Unpinned at shutdown, before the arena is unmapped: a
        # later mapping at the same address would otherwise stay tied to the old pages (copies would miss it).
        self._pinned: list[int] = []
        if self.device.type == "cuda":
            for t in (x, y_cold):
                nbytes = t.numel() * t.element_size()
                torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0))
                self._pinned.append(t.data_ptr())
        self._views = ArenaViews(x, y_cold, mask, self.device, self.dtype)
        self.scheduler: LayerScheduler | None = None
        self.engine = Engine(_HybridRunner(self), TextTokenizer(model_dir), config,
                             ready=lambda: self.scheduler is not None, on_error=self._on_engine_error)
        logger.info("GPU executor on %s: %.1f MB resident (%d hot neurons of %d per layer on average)",
                    self.device, self.resident_bytes() / 1e6, int(np.mean([len(n) for n in spec.neurons])),
                    self.cfg.intermediate_size)

    # ---- control plane (through execute_method) ----------------------------------------------------
    def arena_ref(self) -> ArenaRef:
        return self.arena.ref()

    def connect(self, doorbell_path: str, timeout_s: float = 60.0) -> None:
        """Attach the CPU executor's doorbell (again, after a restart)."""
        if self.scheduler is not None:
            self.scheduler.close()
        channel = ColdChannel(Doorbell.connect(doorbell_path), timeout_s)
        channel.ping()
        num_hot = [self.hot.num_neurons(layer) for layer in range(self.cfg.num_hidden_layers)]
        has_hot, has_cold = [n > 0 for n in num_hot], [n < self.cfg.intermediate_size for n in num_hot]
        self.scheduler = LayerScheduler(channel, self._views, self._hot_partial, self.predictor, has_hot, has_cold)
        self.engine.wake()                 # requests that arrived while no CPU executor was attached

    def _hot_partial(self, layer: int, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        y = self.hot.partial(layer, h, mask=mask)
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()       # the trace should show the real GPU time
        return y

    def resident_bytes(self) -> int:
        return self.model.weight_bytes() + self.hot.nbytes()

    def hot_neurons(self) -> list[np.ndarray]:
        return [n.numpy() for n in self.hot.neurons]

    def pid(self) -> int:
        return os.getpid()

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
        self._views = None
        if self._pinned:
            torch.cuda.synchronize(self.device)
            for ptr in self._pinned:
                torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(ptr))
            self._pinned = []
        self.arena.close()

    def _require_scheduler(self) -> LayerScheduler:
        if self.scheduler is None:
            raise EngineDeadError("GPU executor has no CPU executor connected")
        return self.scheduler

    # ---- requests (EngineEndpoint; many at once: this is a threaded actor) --------------------------
    @contextmanager
    def request_errors(self) -> Iterator[None]:
        try:
            yield
        except ColdExecutorError as e:
            raise EngineDeadError(f"CPU executor failed mid-request: {e}") from e

    def prompt_logits(self, prompt: str) -> torch.Tensor:
        self._require_scheduler()
        return super().prompt_logits(prompt)

    def token_logits(self, ids: list[int]) -> torch.Tensor:
        self._require_scheduler()
        return super().token_logits(ids)
