"""What an engine computes with from the offline results: gate thresholds, the predictors' mask, the
activation frequencies that placement ranks neurons by, and a digest that names all of them."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from runtime.config import EngineConfig
from runtime.sparsity import artifacts
from runtime.sparsity.profile import calibration_name

MaskFn = Callable[[int, torch.Tensor], torch.Tensor]       # (layer, x [N, d]) -> active neurons [N, n_ff] bool
PLACEMENT_SPARSITY = 0.5      # whose calibration ranks neurons for placement when the engine runs dense


def prepare_hint(model_dir: Path, activation_sparsity: float) -> str:
    return f"pinfer prepare --model {model_dir} --sparsity {activation_sparsity}"


def artifacts_digest(model_dir: Path, config: EngineConfig) -> str | None:
    """A short hash of the offline results ``config`` computes with (None when dense): results recorded under
    one digest must not mix with those of re-calibrated thresholds or retrained predictors."""
    if config.sparsity == "dense":
        return None
    names = [calibration_name(config.activation_sparsity)] + (["predictors"] if config.sparsity == "predictor" else [])
    return artifacts.manifest_digest(model_dir, names, prepare_hint(model_dir, config.activation_sparsity),
                                     artifacts.sparsity_tag(config.activation_sparsity))


def mode_thresholds(model_dir: Path, config: EngineConfig) -> list[float | np.ndarray] | None:
    """Per-layer thresholds of the threshold modes: gate mode's tau_gate (on |act(gate)|), down mode's tau_act
    (on |a|), wina mode's per-neuron tau_wina / ||W_down[:, j]|| (on |a_j|, [n_ff] per layer); None otherwise."""
    key = {"gate": "tau_gate", "down": "tau_act", "wina": "tau_wina"}.get(config.sparsity)
    if key is None:
        return None
    hint = prepare_hint(model_dir, config.activation_sparsity)
    cal, _ = artifacts.load(model_dir, calibration_name(config.activation_sparsity), hint)
    if key not in cal:
        raise artifacts.MissingArtifactError(f"the calibration predates {config.sparsity} mode; rerun `{hint}`")
    if key == "tau_wina":          # |a_j| ||W_down[:, j]|| > tau  <=>  |a_j| > tau / ||W_down[:, j]||
        return [tau / np.maximum(cal[f"layer_{i}.down_norm"], 1e-30) for i, tau in enumerate(cal[key])]
    return cal[key].tolist()


def predictor_mask_fn(model_dir: Path, config: EngineConfig, device: torch.device | str = "cpu") -> MaskFn | None:
    """The trained predictors' per-row mask of predictor mode (None in the other modes)."""
    if config.sparsity != "predictor":
        return None
    from runtime.sparsity.predictor import load_predictors

    on_cpu = torch.device(device).type == "cpu"
    dtype = config.cpu_dtype if on_cpu else config.dtype
    quantized = "q8_0" if on_cpu and config.quantized else None       # scored by the kernel library, as the FFN is
    predictors = load_predictors(model_dir, config.activation_sparsity, getattr(torch, dtype), device, quantized,
                                 config.num_threads or 1)
    return lambda layer, x: predictors[layer].mask(x)


def activation_frequencies(model_dir: Path, config: EngineConfig) -> tuple[list[np.ndarray], str] | None:
    """Per layer, each neuron's share of calibration tokens it is active for (at the engine's activation
    threshold, or at ``PLACEMENT_SPARSITY``'s when dense), and the calibration's name; None if not calibrated."""
    name = calibration_name(config.activation_sparsity or PLACEMENT_SPARSITY)
    try:
        cal, _ = artifacts.load(model_dir, name, "")
    except artifacts.MissingArtifactError:
        return None
    layers = sorted((k for k in cal if k.endswith(".frequency")), key=lambda k: int(k.split("_")[1].split(".")[0]))
    return [cal[k] for k in layers], name
