"""Which FFN neurons the GPU executor holds (hot) and which the CPU executor holds (cold), per layer.

``placement="fraction"`` takes ``hot_fraction`` of each layer's neurons (the most frequently active
ones when the model is calibrated); ``"topk"`` / ``"ilp"`` run the solver that ``pinfer place`` runs
(``scheduler/placement.py``) over the calibrated activation frequencies, with the room the memory
budget leaves after the dense part and the KV cache, and/or a ``tau_hot`` floor. Solver results are
cached beside the model (``sparsity/placement-*``) and reused while the calibration they came from is.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.config import EngineConfig
from runtime.errors import PinferError
from runtime.model.config import ModelConfig
from runtime.model.qformat import QK
from runtime.sparsity import artifacts
from runtime.sparsity.online import activation_frequencies, prepare_hint
from scheduler.placement import LayerSplit, place_ilp, place_topk, split_by_fraction

logger = logging.getLogger(__name__)


class BudgetError(PinferError, ValueError):
    """What the GPU executor must hold does not fit its memory budget."""


@dataclass(frozen=True, slots=True)
class GpuMemory:
    """Bytes the GPU executor holds besides hot neurons, and per hot neuron (its gate/up/down rows)."""

    dense: int             # attention, norms, embeddings, lm_head
    kv_cache: int          # the KV-cache budget (kv_cache_tokens positions)
    per_neuron: int

    @classmethod
    def of(cls, c: ModelConfig, config: EngineConfig) -> "GpuMemory":
        b, hd, kv = config.bytes_per_value, c.head_dim, c.num_key_value_heads
        attn = c.hidden_size * (c.num_attention_heads + 2 * kv) * hd + c.num_attention_heads * hd * c.hidden_size
        dense = c.num_hidden_layers * (attn + 2 * c.hidden_size) + c.vocab_size * c.hidden_size * (
            1 if c.tie_word_embeddings else 2) + c.hidden_size
        kv_bytes = 2 * c.num_hidden_layers * kv * hd * config.kv_cache_tokens * b
        return cls(dense * b, kv_bytes, c.hidden_size * (3 if c.is_gated_ffn else 2) * b)

    def neurons_that_fit(self, budget: int) -> int:
        return max(0, budget - self.dense - self.kv_cache) // self.per_neuron

    def describe(self, num_hot: int) -> str:
        return (f"dense part {self.dense / 1e6:.1f} MB, hot neurons {num_hot * self.per_neuron / 1e6:.1f} MB, "
                f"KV cache {self.kv_cache / 1e6:.1f} MB")


def place(config: EngineConfig, model_dir: Path, model_cfg: ModelConfig) -> list[LayerSplit]:
    """Each layer's hot/cold split for ``config`` (resolved for the model); raises BudgetError when what the GPU
    executor must hold exceeds ``memory_budget_mb``."""
    L, n_ff = model_cfg.num_hidden_layers, model_cfg.intermediate_size
    memory, budget = GpuMemory.of(model_cfg, config), config.memory_budget_bytes
    calibrated = activation_frequencies(model_dir, config)
    if config.placement == "fraction":
        # Dense layers on quantized weights split in whole blocks: each side then computes with W_down's own
        # blocks, exactly as the whole layer's dense pass (which neurons go hot matters only to sparse modes).
        block = QK if config.sparsity == "dense" and config.weights != "fp32" and n_ff % QK == 0 else 1
        splits = split_by_fraction(L, n_ff, config.hot_fraction, calibrated[0] if calibrated else None, block)
        num_hot = sum(len(s.hot) for s in splits)
        if budget is not None and memory.dense + memory.kv_cache + num_hot * memory.per_neuron > budget:
            most = memory.neurons_that_fit(budget) // L // block * block
            raise BudgetError(
                f"GPU executor needs {(memory.dense + memory.kv_cache + num_hot * memory.per_neuron) / 1e6:.1f} MB "
                f"({memory.describe(num_hot)}) but the budget is {budget / 1e6:.1f} MB; at most {most} hot neurons "
                f"per layer fit (hot_fraction <= {most / n_ff:.3f}"
                + (f"; dense layers of quantized weights split in whole blocks of {block})" if block > 1 else ")")
                + _dense_too_big(memory, budget))
        return splits
    if calibrated is None:
        raise artifacts.MissingArtifactError(
            f"placement {config.placement!r} ranks neurons by their calibrated activation frequency; run "
            f"`{prepare_hint(model_dir, config.activation_sparsity or 0.5)}` first")
    capacity = L * n_ff
    if budget is not None:
        capacity = memory.neurons_that_fit(budget)
        if budget < memory.dense + memory.kv_cache:
            raise BudgetError(f"the GPU executor's memory budget of {budget / 1e6:.1f} MB holds no hot neuron "
                              f"({memory.describe(0)})" + _dense_too_big(memory, budget))
    return solve(model_dir, config, calibrated, capacity)


def _dense_too_big(memory: GpuMemory, budget: int) -> str:
    return ", and not even the dense part and the KV cache fit (lower kv_cache_tokens)" \
        if budget < memory.dense + memory.kv_cache else ""


def solve(model_dir: Path, config: EngineConfig, calibrated: tuple[list[np.ndarray], str],
          capacity: int) -> list[LayerSplit]:
    """The solver's hot sets for ``capacity`` neurons (cached: the same inputs load the earlier answer)."""
    frequencies, calibration = calibrated
    key = {"method": config.placement, "capacity": int(capacity), "tau_hot": config.tau_hot,
           "min_per_layer": config.min_per_layer if config.placement == "ilp" else 0, "calibration": calibration,
           "calibration_digest": artifacts.manifest_digest(model_dir, [calibration], "")}
    name = f"placement-{config.placement}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}"
    try:
        arrays, manifest = artifacts.load(model_dir, name, "")
        if manifest.get("key") == key:
            return _splits(arrays, frequencies)
    except artifacts.MissingArtifactError:
        pass
    if config.placement == "topk":
        splits = place_topk(frequencies, capacity, config.tau_hot)
    else:
        splits = place_ilp(frequencies, capacity, config.min_per_layer, config.tau_hot)
    hot, covered = sum(len(s.hot) for s in splits), coverage(splits, frequencies)
    artifacts.save(model_dir, name, {f"layer_{i}.hot": s.hot for i, s in enumerate(splits)},
                   {"key": key, "hot_neurons": hot, "hot_fraction": hot / sum(len(f) for f in frequencies),
                    "activation_coverage": covered, "per_layer": [len(s.hot) for s in splits]})
    logger.info("placement %s: %d hot neurons cover %.1f%% of activations; cached as %s", config.placement, hot,
                100 * covered, name)
    return splits


def _splits(arrays: dict[str, np.ndarray], frequencies: list[np.ndarray]) -> list[LayerSplit]:
    splits = []
    for i, f in enumerate(frequencies):
        hot = arrays[f"layer_{i}.hot"].astype(np.int64)
        splits.append(LayerSplit(hot, np.setdiff1d(np.arange(len(f)), hot).astype(np.int64)))
    return splits


def coverage(splits: list[LayerSplit], frequencies: list[np.ndarray]) -> float:
    """Share of all calibrated activations that hot neurons take."""
    return sum(float(f[s.hot].sum()) for f, s in zip(frequencies, splits)) / max(
        sum(float(f.sum()) for f in frequencies), 1e-12)
