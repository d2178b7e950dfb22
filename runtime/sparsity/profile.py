"""Profile FFN activations over the calibration corpus, and calibrate per-layer thresholds from it.

For SwiGLU models no activation is exactly zero, so "active" means |a_j| = |act(gate_j) * up_j| above a
per-layer threshold tau_act chosen so that a target share of (token, neuron) pairs falls below it
(TEAL/CATS-style). The profile keeps, per layer: a per-neuron histogram of |a_j| over log-spaced
bins (activation counts at any threshold), the mean |a_j|, uniform samples of |a| and of |act(gate)|
(with the neuron each came from) from which any target sparsity's thresholds are exact quantiles, and
the norms ||W_down[:, j]|| that WINA weighs |a_j| by.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from runtime.model.transformer import KVCache, StepInput, Transformer
from runtime.sparsity import artifacts, corpus

logger = logging.getLogger(__name__)

BIN_EDGES = np.logspace(-6, 3, 73).astype(np.float32)          # 72 bins, 8 per decade
PROFILE = "profile"


def run_with_ffn_hook(model: Transformer, windows: list[list[int]], hook, desc: str) -> None:
    """Prefill each window through the dense model, calling ``hook(layer, x, a_gate, a)`` per FFN."""
    def ffn(layer: int, x: torch.Tensor) -> torch.Tensor:
        f = model.layers[layer].ffn
        d, n, n_mats = f.w_gate_up_t.shape
        gu = (x @ f.w_gate_up_t.view(d, n * n_mats)).view(x.shape[0], n, n_mats)
        gate_act = f.act(gu[..., 0])
        a = gate_act * gu[..., 1] if n_mats == 2 else gate_act
        hook(layer, x, gate_act, a)
        return a @ f.w_down_t

    for ids in tqdm(windows, desc=desc, unit="window"):
        cache = KVCache(model.cfg, 1, len(ids), model.dtype)
        model(torch.tensor([ids]), StepInput.build([0], len(ids), [0]), cache, ffn=ffn)


def profile(model: Transformer, model_dir: Path, encode, num_tokens: int = 8192, window: int = 256,
            samples_per_layer: int = 262_144, seed: int = 0) -> Path:
    cfg = model.cfg
    L, n, B = cfg.num_hidden_layers, cfg.intermediate_size, len(BIN_EDGES) - 1
    windows = corpus.token_windows(encode, "calibration", num_tokens, window)
    total = len(windows) * window
    keep = min(1.0, samples_per_layer / (total * n))
    gen = torch.Generator().manual_seed(seed)
    edges = torch.from_numpy(BIN_EDGES)
    hist = [torch.zeros(n * B, dtype=torch.int64) for _ in range(L)]
    abs_sum = [torch.zeros(n, dtype=torch.float64) for _ in range(L)]
    samples_act: list[list[torch.Tensor]] = [[] for _ in range(L)]
    samples_gate: list[list[torch.Tensor]] = [[] for _ in range(L)]
    samples_index: list[list[torch.Tensor]] = [[] for _ in range(L)]

    def hook(layer: int, x: torch.Tensor, gate_act: torch.Tensor, a: torch.Tensor) -> None:
        mag = a.abs().float()                                                     # [N, n]
        bins = torch.bucketize(mag, edges).clamp_(1, B) - 1
        hist[layer] += torch.bincount((torch.arange(n) * B + bins).flatten(), minlength=n * B)
        abs_sum[layer] += mag.sum(0, dtype=torch.float64)
        pick = torch.rand(mag.shape, generator=gen) < keep
        samples_act[layer].append(mag[pick])
        samples_gate[layer].append(gate_act.abs().float()[pick])
        samples_index[layer].append(pick.nonzero()[:, 1].to(torch.int32))                 # same (row-major) order

    t0 = time.perf_counter()
    run_with_ffn_hook(model, windows, hook, "profile")
    arrays = {"bin_edges": BIN_EDGES}
    for i in range(L):
        arrays[f"layer_{i}.hist"] = hist[i].view(n, B).to(torch.int32).numpy()
        arrays[f"layer_{i}.mean_abs"] = (abs_sum[i] / total).float().numpy()
        arrays[f"layer_{i}.sample_act"] = torch.cat(samples_act[i]).numpy()
        arrays[f"layer_{i}.sample_gate"] = torch.cat(samples_gate[i]).numpy()
        arrays[f"layer_{i}.sample_index"] = torch.cat(samples_index[i]).numpy()
        arrays[f"layer_{i}.down_norm"] = model.layers[i].ffn.w_down_t.float().norm(dim=1).numpy()   # [n]
    manifest = {"num_tokens": total, "window": window, "seed": seed, "seconds": time.perf_counter() - t0,
                **corpus.describe()}
    return artifacts.save(model_dir, PROFILE, arrays, manifest)


def calibration_name(activation_sparsity: float) -> str:
    return f"calibration-{artifacts.sparsity_tag(activation_sparsity)}"


def has_neuron_samples(prof: dict[str, np.ndarray]) -> bool:
    """Whether a profile keeps each sample's neuron (and W_down's norms): what WINA is calibrated from."""
    return "layer_0.sample_index" in prof and "layer_0.down_norm" in prof


def calibrate(model_dir: Path, activation_sparsity: float) -> Path:
    """Per-layer tau_act (on |a|), tau_gate (on |act(gate)|, for gate mode) and tau_wina (on |a_j| * ||W_down[:, j]||,
    for wina mode) for a target sparsity, and each neuron's activation frequency at tau_act (the placement input)."""
    if not 0.0 <= activation_sparsity < 1.0:
        raise ValueError(f"activation sparsity must be in [0, 1), got {activation_sparsity!r}")
    prof, pman = artifacts.load(model_dir, PROFILE, f"pinfer profile --model {model_dir}")
    L = sum(1 for k in prof if k.endswith(".hist"))
    edges = prof["bin_edges"]
    arrays: dict[str, np.ndarray] = {}
    tau_act, tau_gate, tau_wina = (np.zeros(L, np.float32) for _ in range(3))
    wina = has_neuron_samples(prof)
    for i in range(L):
        tau_act[i] = np.quantile(prof[f"layer_{i}.sample_act"], activation_sparsity) if activation_sparsity else 0
        tau_gate[i] = np.quantile(prof[f"layer_{i}.sample_gate"], activation_sparsity) if activation_sparsity else 0
        arrays[f"layer_{i}.frequency"] = _frequency_above(prof[f"layer_{i}.hist"], edges, tau_act[i])
        if wina:
            norm = prof[f"layer_{i}.down_norm"]
            score = prof[f"layer_{i}.sample_act"] * norm[prof[f"layer_{i}.sample_index"]]     # |a_j| ||W_down[:, j]||
            tau_wina[i] = np.quantile(score, activation_sparsity) if activation_sparsity else 0
            arrays[f"layer_{i}.down_norm"] = norm
    arrays["tau_act"], arrays["tau_gate"] = tau_act, tau_gate
    if wina:
        arrays["tau_wina"] = tau_wina
    manifest = {"activation_sparsity": activation_sparsity, "profile_tokens": pman["num_tokens"],
                "corpus": pman["corpus"]}
    return artifacts.save(model_dir, calibration_name(activation_sparsity), arrays, manifest)


def _frequency_above(hist: np.ndarray, edges: np.ndarray, tau: float) -> np.ndarray:
    """Share of tokens with |a_j| > tau per neuron, from the histogram (log-linear inside tau's bin)."""
    counts = hist.astype(np.float64)
    total = counts.sum(1)
    k = int(np.clip(np.searchsorted(edges, tau, side="right") - 1, 0, len(edges) - 2))
    lo, hi = np.log(max(edges[k], 1e-30)), np.log(edges[k + 1])
    inside = 1.0 - (np.log(max(tau, 1e-30)) - lo) / (hi - lo) if tau > edges[0] else 1.0
    above = counts[:, k + 1:].sum(1) + counts[:, k] * float(np.clip(inside, 0, 1))
    return (above / np.maximum(total, 1)).astype(np.float32)
