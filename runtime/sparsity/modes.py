"""Which neurons an engine computes: the sparsity config and what each mode loads from the offline results."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from runtime.model.transformer import KVCache, StepInput, Transformer
from runtime.sparsity import artifacts
from runtime.sparsity.profile import calibration_name

MaskFn = Callable[[int, torch.Tensor], torch.Tensor]       # (layer, x [N, d]) -> active neurons [N, n_ff] bool


@dataclass(frozen=True, slots=True)
class SparsityConfig:
    mode: str = "dense"                   # dense | gate | predictor
    activation_sparsity: float = 0.0      # target share of (token, neuron) pairs treated as inactive

    def __post_init__(self) -> None:
        if self.mode not in ("dense", "gate", "predictor"):
            raise ValueError(f"sparsity must be 'dense', 'gate' or 'predictor', got {self.mode!r}")
        if not 0.0 <= self.activation_sparsity < 1.0:
            raise ValueError(f"activation_sparsity must be in [0, 1), got {self.activation_sparsity!r}")

    def prepare_hint(self, model_dir: Path) -> str:
        return f"pinfer prepare --model {model_dir} --sparsity {self.activation_sparsity}"

    def artifacts_digest(self, model_dir: Path) -> str | None:
        """A short hash of the offline results this config computes with (None for dense): results recorded
        under one digest must not mix with those of re-calibrated thresholds or retrained predictors."""
        if self.mode == "dense":
            return None
        names = [calibration_name(self.activation_sparsity)] + (["predictors"] if self.mode == "predictor" else [])
        return artifacts.manifest_digest(model_dir, names, self.prepare_hint(model_dir))

    def tau_gate(self, model_dir: Path) -> list[float] | None:
        if self.mode != "gate":
            return None
        cal, _ = artifacts.load(model_dir, calibration_name(self.activation_sparsity), self.prepare_hint(model_dir))
        return cal["tau_gate"].tolist()

    def mask_fn(self, model_dir: Path, dtype: torch.dtype, device: torch.device | str = "cpu") -> MaskFn | None:
        if self.mode != "predictor":
            return None
        from runtime.sparsity.predictor import load_predictors

        predictors = load_predictors(model_dir, self.activation_sparsity, dtype, device)
        return lambda layer, x: predictors[layer].mask(x)

    def frequencies(self, model_dir: Path) -> list[np.ndarray] | None:
        """Activation frequency per neuron at this config's threshold (placement input), if calibrated."""
        name = calibration_name(self.activation_sparsity if self.activation_sparsity else 0.5)
        try:
            cal, _ = artifacts.load(model_dir, name, self.prepare_hint(model_dir))
        except artifacts.MissingArtifactError:
            return None
        layers = sorted((k for k in cal if k.endswith(".frequency")), key=lambda k: int(k.split("_")[1].split(".")[0]))
        return [cal[k] for k in layers]


class SparseRunner:
    """In-process runner: the model's attention path plus one FFN shard holding every neuron."""

    def __init__(self, model: Transformer, shard, mask_fn: MaskFn | None) -> None:
        self.model, self.shard, self.mask_fn = model, shard, mask_fn
        self.cfg = model.cfg

    def new_cache(self, num_slots: int, max_len: int) -> KVCache:
        return KVCache(self.cfg, num_slots, max_len, self.model.lm_head_t.dtype)

    def ffn(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        mask = None if self.mask_fn is None else self.mask_fn(layer, h)
        return self.shard.partial(layer, h, mask=mask)

    def forward(self, tokens: torch.Tensor, step: StepInput, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        return self.model(tokens, step, cache, ffn=self.ffn, all_logits=all_logits)
