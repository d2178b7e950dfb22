"""Activation predictors: per layer one low-rank scorer of the FFN neurons, shared by every target sparsity,
plus one threshold per layer and target; fitted on the calibration split, judged on the held-out one.

Scorer. The FFN pre-activations [g, u] = x W (W = [W_gate | W_up], [d, m n]) are estimated as (x P) Q,
P [d, r], Q [r, m n]: the rank-r factorization minimizing E||x W - x P Q||^2 over calibration inputs, in
closed form (top eigenvectors of C^1/2 W W^T C^1/2, C = E[x^T x]; seconds per layer, no gradient steps).
The error of that estimate is modelled as r_tj ~ N(0, sigma_j^2 spread_t^2): sigma_j per column, and
spread_t per token from a 64-direction random sketch of the token's whitened input outside the kept
subspace (tokens unlike the calibration inputs get wide error bars). A neuron's score is E[a_j^2] under
that model (Gauss-Hermite nodes for E[act(g)^2]), so a neuron whose estimate is small but uncertain
still ranks high. The score estimates |a_j|^2 itself: one scorer serves every sparsity, and a level only
adds a per-layer threshold tau_pred.

Why not PowerInfer's trained MLP classifier (qwen2.5-coder-0.5b, held-out, 50% target): at the same
predicted sparsity (41%) a Linear-ReLU-Linear h=256 trained with BCE recalls 0.69 of the active neurons
of layer 9, the bare rank-128 estimate 0.73 at a smaller cost, the exact gate alone (CATS) 0.80. What
perplexity punishes is the few large activations a predictor drops: without the per-token spread, rank 96
dropped activations up to 30x tau_act and cost +32% perplexity at 44% sparsity; with it, +9% at 34%
(exact oracle: +0.3% at 50%). The closed form takes seconds per layer and serves every level; the MLP
took 20 s per layer and level.

Criterion. What the predictor aims at is one of the threshold modes' masks: ``wina`` (the default) a neuron
whose |a_j| ||W_down[:, j]|| passes tau_wina, so the score is E[a_j^2] ||W_down[:, j]||^2 (the neuron's
expected contribution to the output: at 90% sparsity WINA's exact mask costs a third less perplexity than
|a_j|'s on qwen2.5-coder-0.5b); ``act`` a neuron whose |a_j| passes tau_act, the score E[a_j^2].

On CPU engines with quantized weights the scorer runs on 8-bit P and Q, one kernel call per layer
(``QuantizedLayerPredictor``; 4x faster than the float scorer's ~10 operations per layer): on
qwen2.5-coder-0.5b's held-out tokens its masks agree with the float scorer's on 99.1% (50% target) and
99.2% (70%) of the neurons, at the same predicted sparsity and recall.

Threshold per level and layer: on validation tokens from calibration files the fit never read, the
highest tau_pred that keeps ``target_recall`` of the truly active neurons (the criterion's exact mask), but
never one whose predicted sparsity falls more than ``max_sparsity_gap`` under the calibrated sparsity.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from runtime.model.config import ModelConfig
from runtime.model.activations import ACTIVATIONS
from runtime.model.kernels.quantized import QMatrix, predictor_scores
from runtime.model.qformat import QK, quantize
from runtime.model.transformer import Transformer, ffn_activations
from runtime.sparsity import artifacts, corpus
from runtime.sparsity.profile import calibration_name, run_with_ffn_hook

logger = logging.getLogger(__name__)

PREDICTORS = "predictors"
CRITERIA = ("wina", "act")      # what the predictor learns to predict (see the module docstring)
NUM_NODES = 8                   # Gauss-Hermite nodes for E[act(g)^2] (4 ranked as well without the spread)
SKETCH_DIM = 64                 # random directions that measure each token's residual scale (JL sketch)
ROWS_PER_CHUNK = 64             # bounds the [rows, n, K] quadrature temporaries of a long prefill
WINDOW = 256


@dataclass(slots=True)
class LayerPredictor:
    proj_t: torch.Tensor            # [d, r + k]   P, then the k sketch directions S
    expand_t: torch.Tensor          # [r, m * n]   Q: gate columns, then up columns (m = 2 gated, 1 not)
    gate_nodes: torch.Tensor        # [n, K]       sigma_g_j * z_k, the quadrature points around g^_j
    node_weights: torch.Tensor      # [K]          quadrature weights, sum 1
    up_var: torch.Tensor | None     # [n]          sigma_u_j^2 (gated FFNs)
    act: Callable[[torch.Tensor], torch.Tensor]
    tau: float                      # threshold on the score of this sparsity level
    weight: torch.Tensor | None = None   # [n] ||W_down[:, j]||^2 (criterion wina), None: E[a_j^2] alone

    @property
    def nbytes(self) -> int:
        """Bytes of the weights that scoring a token reads (P, S and Q)."""
        return sum(t.numel() * t.element_size() for t in (self.proj_t, self.expand_t))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """E[a_j^2] (times ||W_down[:, j]||^2 for wina) [N, n] for x [N, d]: each neuron's estimated squared
        activation (contribution)."""
        rank = self.expand_t.shape[0]
        h = x @ self.proj_t                                                       # [N, r + k]
        est = h[:, :rank] @ self.expand_t                                         # [N, m * n]
        spread2 = h[:, rank:].pow(2).sum(1, keepdim=True) if h.shape[1] > rank else torch.ones_like(h[:, :1])
        if len(est) > ROWS_PER_CHUNK:
            score = torch.cat([self._mean_square(e, s) for e, s in zip(est.split(ROWS_PER_CHUNK),
                                                                       spread2.split(ROWS_PER_CHUNK))])
        else:
            score = self._mean_square(est, spread2)
        return score if self.weight is None else score * self.weight

    def _mean_square(self, est: torch.Tensor, spread2: torch.Tensor) -> torch.Tensor:
        n = self.gate_nodes.shape[0]
        gate = est[:, :n, None] + self.gate_nodes * spread2.sqrt()[:, :, None]    # [N, n, K] quadrature points
        mean_sq = (self.act(gate) ** 2) @ self.node_weights                       # [N, n]
        if self.up_var is not None:
            up = est[:, n:]
            mean_sq = mean_sq * (up * up + self.up_var * spread2)
        return mean_sq

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted active neurons [N, n_ff] (bool) for x [N, d]."""
        return self.scores(x) > self.tau


@dataclass(slots=True)
class QuantizedLayerPredictor:
    """The same scorer with P and Q as 8-bit rows and the quadrature in C, one kernel call per layer (CPU engines
    with quantized weights): a quarter of the float scorer's bytes, no per-operation dispatch. Its scores
    differ from the float scorer's by the rounding of P, Q and their inputs to 8 bits."""
    proj: QMatrix                   # [r + k, d]   P^T, then the k sketch directions, as rows
    expand: QMatrix                 # [m * n, r]   Q^T: gate rows, then up rows
    sigma: torch.Tensor             # [n]          sigma_g_j
    nodes: torch.Tensor             # [K]          z_k
    node_weights: torch.Tensor      # [K]
    up_var: torch.Tensor | None     # [n]
    weight: torch.Tensor | None     # [n]
    act: str
    tau: float
    num_threads: int

    @property
    def nbytes(self) -> int:
        """Bytes of the weights that scoring a token reads (P, S and Q)."""
        return self.proj.nbytes + self.expand.nbytes

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return predictor_scores(x.float(), self.proj, self.expand.k, self.expand, self.sigma, self.nodes,
                                self.node_weights, self.up_var, self.weight, self.act, self.num_threads)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores(x) > self.tau


def _make_layer(arrays: dict[str, np.ndarray], layer: int, n: int, tau: float, act: str, dtype: torch.dtype,
                device: torch.device | str, quantized: str | None, num_threads: int
                ) -> LayerPredictor | QuantizedLayerPredictor:
    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device=device, dtype=dtype)

    z, w = np.polynomial.hermite_e.hermegauss(NUM_NODES)                          # probabilists' nodes, N(0, 1)
    proj_t, expand_t, sigma = (arrays[f"layer_{layer}.{k}"] for k in ("proj_t", "expand_t", "sigma"))
    weight = arrays.get(f"layer_{layer}.weight")
    up_var = sigma[n:] ** 2 if len(sigma) > n else None                           # gated: sigma = [gate n | up n]
    if quantized and proj_t.shape[0] % QK == 0 and expand_t.shape[0] % QK == 0:
        def rows(a_t: np.ndarray) -> QMatrix:                                     # [k, m] -> m rows of k inputs
            return QMatrix(quantize(np.ascontiguousarray(a_t.T), quantized), quantized, a_t.shape[0])

        f32 = [None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
               for a in (sigma[:n], z, w / w.sum(), up_var, weight)]
        return QuantizedLayerPredictor(rows(proj_t), rows(expand_t), *f32, act, tau, num_threads)
    nodes = tensor(z)
    return LayerPredictor(tensor(proj_t), tensor(expand_t), tensor(sigma[:n])[:, None] * nodes, tensor(w / w.sum()),
                          None if up_var is None else tensor(up_var), ACTIVATIONS[act], tau,
                          None if weight is None else tensor(weight))


def load_predictors(model_dir: Path, activation_sparsity: float, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", quantized: str | None = None,
                    num_threads: int = 1) -> list[LayerPredictor | QuantizedLayerPredictor]:
    """Every layer's predictor at one level; ``quantized`` (a block format, CPU only): P and Q in it, scored by
    the kernel on ``num_threads`` (where the rank and width are whole blocks; else the float scorer)."""
    hint = f"pinfer train-predictors --model {model_dir} --sparsity {activation_sparsity}"
    arrays, manifest = artifacts.load(model_dir, PREDICTORS, hint)
    key = f"tau.{artifacts.sparsity_tag(activation_sparsity)}"
    if key not in arrays:
        raise artifacts.MissingArtifactError(
            f"predictors in {artifacts.artifact_dir(model_dir)} have thresholds for "
            f"{sorted(manifest['levels'])}, not {activation_sparsity}; run `{hint}`")
    cfg = ModelConfig.load(model_dir)
    return [_make_layer(arrays, i, cfg.intermediate_size, float(tau), cfg.hidden_act, dtype, device, quantized,
                        num_threads) for i, tau in enumerate(arrays[key])]


def predictor_report(model_dir: Path, activation_sparsity: float) -> dict | None:
    """The held-out report of one trained level (``mean`` and per-``layers``), or None if not trained."""
    try:
        _, manifest = artifacts.load(model_dir, PREDICTORS, "")
    except artifacts.MissingArtifactError:
        return None
    return manifest["levels"].get(artifacts.sparsity_tag(activation_sparsity))


def default_rank(cfg: ModelConfig, cost: float) -> int:
    """The multiple of 32 whose scorer costs closest to ``cost`` of the FFN's multiply-adds per token."""
    d, n, m = cfg.hidden_size, cfg.intermediate_size, 2 if cfg.is_gated_ffn else 1
    return int(min(d, max(32, 32 * round(cost * (m + 1) * d * n / (d + m * n) / 32))))


def fit_scorer(x: torch.Tensor, x_val: torch.Tensor, w_gate_up_t: torch.Tensor, rank: int,
               sketch_dim: int = SKETCH_DIM, seed: int = 0) -> dict[str, torch.Tensor]:
    """P [d, r], Q [r, m * n] minimizing E||x W - x P Q||^2 over the rows of x [N, d]; the sketch S [d, k]
    whose ||x S||^2 estimates a token's residual scale (1 on average); and each column's residual sigma
    relative to that scale, both measured on x_val [N', d] (tokens the factorization has not seen)."""
    d, n, m = w_gate_up_t.shape
    w = w_gate_up_t.permute(0, 2, 1).reshape(d, m * n).float()                   # [d, gate n | up n]
    x64 = x.double()
    evals, evecs = torch.linalg.eigh(x64.T @ x64 / len(x))                       # C = E[x^T x]
    evals = evals.clamp_min(evals.max() * 1e-10)
    root = (evecs * evals.sqrt()) @ evecs.T                                       # C^1/2
    inv_root = (evecs / evals.sqrt()) @ evecs.T                                   # C^-1/2
    gram = root @ (w @ w.T).double() @ root                                       # C^1/2 W W^T C^1/2 [d, d]
    top = torch.linalg.eigh(gram)[1][:, -rank:]                                   # its top-r eigenvectors [d, r]
    proj_t = (inv_root @ top).float()                                             # P = C^-1/2 U_r
    expand_t = (top.T @ root).float() @ w                                         # Q = U_r^T C^1/2 W
    x_val = x_val.float()
    residual = x_val @ w - (x_val @ proj_t) @ expand_t                            # [N', m * n]
    if sketch_dim and rank < d:
        # A token far outside the inputs the factorization saw (large whitened part y_perp off U_r) has
        # large residuals in every column; y_perp G / sqrt(k) for Gaussian G [d, k] measures it for d k
        # multiply-adds (Johnson-Lindenstrauss) where the exact ||y_perp|| would cost d^2.
        gauss = torch.randn(d, sketch_dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        sketch = (inv_root @ (gauss - top @ (top.T @ gauss))).float()            # C^-1/2 (I - U_r U_r^T) G
        spread2 = (x_val @ sketch).pow(2).sum(1)
        sketch, spread2 = sketch / spread2.mean().sqrt(), spread2 / spread2.mean()
        proj_t = torch.cat([proj_t, sketch], 1)
    else:
        spread2 = torch.ones(len(x_val))
    sigma = (residual.pow(2) / spread2.clamp_min(1e-3)[:, None]).mean(0).sqrt()   # r_tj ~ N(0, sigma_j^2 spread_t^2)
    return {"proj_t": proj_t, "expand_t": expand_t, "sigma": sigma}


def _threshold(scores: torch.Tensor, labels: torch.Tensor, target_recall: float, max_gap: float) -> float:
    """Highest score threshold keeping ``target_recall`` of the labelled neurons, but predicting at most
    ``max_gap`` fewer inactive ones than the labels have."""
    pos = scores[labels]
    tau_recall = _kth(pos, 1 - target_recall) if len(pos) else math.inf
    floor_sparsity = max(0.0, 1 - labels.float().mean().item() - max_gap)
    tau_gap = _kth(scores.flatten(), floor_sparsity) if floor_sparsity > 0 else -math.inf
    return max(tau_recall, tau_gap)


def _kth(v: torch.Tensor, q: float) -> float:
    k = min(len(v.flatten()), max(1, round(q * v.numel())))
    return float(torch.kthvalue(v.flatten().float(), k).values)


def _score(scores: torch.Tensor, a_abs: torch.Tensor, labels: torch.Tensor, tau: float) -> dict[str, float]:
    """Recall, precision, sparsity, and the share of the total mass of the criterion (|a_j|, or |a_j| ||W_down[:, j]||
    for wina) the prediction keeps (the oracle, which keeps exactly the labelled neurons, keeps
    ``oracle_weighted_recall``)."""
    pred = scores > tau
    tp = (pred & labels).sum().item()
    mass = max(a_abs.sum().item(), 1e-30)
    return {"recall": tp / max(labels.sum().item(), 1), "precision": tp / max(pred.sum().item(), 1),
            "predicted_sparsity": 1 - pred.float().mean().item(), "true_sparsity": 1 - labels.float().mean().item(),
            "weighted_recall": (a_abs * pred).sum().item() / mass,
            "oracle_weighted_recall": (a_abs * labels).sum().item() / mass}


def _collect_inputs(model: Transformer, windows: list[list[int]], desc: str) -> list[torch.Tensor]:
    xs: list[list[torch.Tensor]] = [[] for _ in range(model.cfg.num_hidden_layers)]
    run_with_ffn_hook(model, windows, lambda layer, x, g, a: xs[layer].append(x.to(torch.bfloat16)), desc)
    return [torch.cat(x) for x in xs]                                             # [num_windows * WINDOW, d]


def train_predictors(model: Transformer, model_dir: Path, encode, activation_sparsities: list[float],
                     num_tokens: int = 16384, heldout_tokens: int = 4096, rank: int | None = None,
                     cost: float = 0.1, target_recall: float = 0.95, max_sparsity_gap: float = 0.09,
                     validation_tokens: int | None = None, criterion: str = "wina") -> dict:
    """Fit every layer's scorer once, then derive the thresholds of each level in ``activation_sparsities``
    and of every other level calibrated for this model; write one artifact and return its manifest.
    ``criterion``: which exact mask the predictor aims at (``CRITERIA``)."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    cfg = model.cfg
    L = cfg.num_hidden_layers
    levels = sorted({s for s in activation_sparsities if s > 0} | set(_calibrated_levels(model_dir)))
    key = "tau_wina" if criterion == "wina" else "tau_act"
    cals = {s: artifacts.load(model_dir, calibration_name(s), f"pinfer calibrate --model {model_dir} "
                              f"--sparsity {s}")[0] for s in levels}
    if any(key not in c for c in cals.values()):
        raise artifacts.MissingArtifactError(f"the calibration predates the {criterion} criterion; rerun "
                                             f"`pinfer prepare --model {model_dir}`")
    tau_true = {s: c[key] for s, c in cals.items()}
    rank = min(rank or default_rank(cfg, cost), cfg.hidden_size)
    t0 = time.perf_counter()
    validation_tokens = validation_tokens or max(WINDOW, num_tokens // 4)
    x_cal = _collect_inputs(model, corpus.sample_windows(encode, "calibration", num_tokens, WINDOW, "fit"), "collect calibration")
    x_vals = _collect_inputs(model, corpus.sample_windows(encode, "calibration", validation_tokens, WINDOW, "validation"),
                             "collect validation")
    x_held = _collect_inputs(model, corpus.sample_windows(encode, "heldout", heldout_tokens, WINDOW), "collect held-out")
    arrays: dict[str, np.ndarray] = {}
    reports: dict[str, list[dict]] = {artifacts.sparsity_tag(s): [] for s in levels}
    taus = {s: np.zeros(L, np.float32) for s in levels}
    act = ACTIVATIONS[cfg.hidden_act]
    for layer in tqdm(range(L), desc="fit predictors", unit="layer"):
        ffn = model.layers[layer].ffn
        w = ffn.w_gate_up_t
        x_fit, x_val, x_out = x_cal[layer].float(), x_vals[layer].float(), x_held[layer].float()
        fitted = fit_scorer(x_fit, x_val, w, rank)
        # ||W_down[:, j]|| [n]: the calibration's own (tau_wina was measured with it), else the weights'
        norm = None if criterion != "wina" else torch.from_numpy(cals[levels[0]][f"layer_{layer}.down_norm"]) \
            if levels else ffn.w_down_t.float().norm(dim=1)
        if norm is not None:
            fitted["weight"] = norm ** 2
        for name, value in fitted.items():
            arrays[f"layer_{layer}.{name}"] = value.contiguous().numpy()
        scorer = _make_layer(arrays, layer, cfg.intermediate_size, 0.0, cfg.hidden_act, torch.float32, "cpu", None, 1)
        with torch.inference_mode():                         # |a_j| (times ||W_down[:, j]|| for wina): the truth
            val_scores, val_abs = scorer.scores(x_val), ffn_activations(x_val, w, act).abs()
            out_scores, out_abs = scorer.scores(x_out), ffn_activations(x_out, w, act).abs()
            if norm is not None:
                val_abs, out_abs = val_abs * norm, out_abs * norm
        for s in levels:
            tau = _threshold(val_scores, val_abs > float(tau_true[s][layer]), target_recall, max_sparsity_gap)
            taus[s][layer] = tau
            held = _score(out_scores, out_abs, out_abs > float(tau_true[s][layer]), tau)
            reports[artifacts.sparsity_tag(s)].append({"layer": layer, "tau_pred": tau, **held})
    for s in levels:
        arrays[f"tau.{artifacts.sparsity_tag(s)}"] = taus[s]
    d, n, m = cfg.hidden_size, cfg.intermediate_size, 2 if cfg.is_gated_ffn else 1
    manifest = {"criterion": criterion, "rank": rank, "sketch_dim": SKETCH_DIM,
                "cost": (rank * (d + m * n) + SKETCH_DIM * d) / ((m + 1) * d * n),
                "num_nodes": NUM_NODES, "target_recall": target_recall, "max_sparsity_gap": max_sparsity_gap,
                "train_tokens": len(x_cal[0]), "validation_tokens": len(x_vals[0]),
                "heldout_tokens": len(x_held[0]),
                "seconds": time.perf_counter() - t0,
                "levels": {tag: {"activation_sparsity": s, "mean": _mean(rows), "layers": rows}
                           for s, (tag, rows) in zip(levels, reports.items())},
                **corpus.describe()}
    artifacts.save(model_dir, PREDICTORS, arrays, manifest)
    return manifest


def _mean(rows: list[dict]) -> dict[str, float]:
    keys = ("recall", "precision", "predicted_sparsity", "true_sparsity", "weighted_recall", "oracle_weighted_recall")
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


def _calibrated_levels(model_dir: Path) -> list[float]:
    """Target sparsities (> 0) with a calibration artifact beside the model."""
    found = artifacts.artifact_dir(model_dir).glob("calibration-s*.json")
    return [int(p.stem.rsplit("-s", 1)[1]) / 100 for p in found if int(p.stem.rsplit("-s", 1)[1]) > 0]
