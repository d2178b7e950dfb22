"""Runners: who owns the weights and the forward pass under the request loop, in this process."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from runtime.config import EngineConfig
from runtime.model.config import ModelConfig
from runtime.model.ffn_shard import FFNShard
from runtime.model.transformer import KVCache, StepInput, Transformer
from runtime.model.weights import load_transformer
from runtime.sparsity.online import MaskFn, mode_thresholds, predictor_mask_fn


class Runner(Protocol):
    cfg: ModelConfig

    def new_cache(self, num_slots: int, max_len: int) -> Any: ...

    def forward(self, tokens: torch.Tensor, step: StepInput, cache: Any, all_logits: bool = False) -> torch.Tensor:
        """tokens [B, T] -> fp32 logits [B, V] of each row's last position ([B, T, V] with ``all_logits``)."""
        ...


class DenseRunner:
    """The dense reference model."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.cfg = model.cfg

    def new_cache(self, num_slots: int, max_len: int) -> KVCache:
        return KVCache(self.cfg, num_slots, max_len, self.model.dtype)

    def forward(self, tokens: torch.Tensor, step: StepInput, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        return self.model(tokens, step, cache, all_logits=all_logits)


class SparseRunner:
    """The model's attention path plus one FFN shard holding every neuron (computed sparsely, or densely by
    the quantized kernels)."""

    def __init__(self, model: Transformer, shard: FFNShard, mask_fn: MaskFn | None) -> None:
        self.model, self.shard, self.mask_fn = model, shard, mask_fn
        self.cfg = model.cfg

    def new_cache(self, num_slots: int, max_len: int) -> KVCache:
        return KVCache(self.cfg, num_slots, max_len, self.model.dtype)

    def ffn(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        mask = None if self.mask_fn is None else self.mask_fn(layer, h)
        return self.shard.partial(layer, h, mask=mask)

    def forward(self, tokens: torch.Tensor, step: StepInput, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        return self.model(tokens, step, cache, ffn=self.ffn, all_logits=all_logits)


def build_runner(config: EngineConfig, model_dir: Path) -> DenseRunner | SparseRunner:
    """The in-process runner ``config`` asks for: the dense float model, or the model's attention path and
    one shard of every FFN neuron (sparse modes, and every quantized format)."""
    dtype = getattr(torch, config.cpu_dtype)
    if config.sparsity == "dense" and not config.quantized:
        return DenseRunner(load_transformer(model_dir, dtype))
    model = load_transformer(model_dir, dtype, with_ffn=False, weights=config.weights)
    model.set_num_threads(config.num_threads)
    every = [np.arange(model.cfg.intermediate_size)] * model.cfg.num_hidden_layers
    shard = FFNShard.load(model_dir, every, dtype, mode=config.sparsity, thresholds=mode_thresholds(model_dir, config),
                          num_threads=config.num_threads, weights=config.weights)
    return SparseRunner(model, shard, predictor_mask_fn(model_dir, config))
