"""Activation predictors: per layer ``Linear(d, h) -> ReLU -> Linear(h, n_ff)`` from the FFN input to
the active-neuron mask (|a_j| > tau_act), trained on the calibration split, judged on the held-out one.

The default predictor threshold tau_pred of each layer is the logit that keeps ``target_recall`` of
the truly active neurons on a validation slice of the calibration data. The hidden size h is chosen
per layer: the smaller candidate first, the larger one when the smaller one, at that recall, would
leave predicted sparsity more than ``max_sparsity_gap`` below the calibrated sparsity.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from runtime.model import Transformer, ffn_activations
from runtime.sparsity import artifacts, corpus
from runtime.sparsity.profile import calibration_name, run_with_ffn_hook

logger = logging.getLogger(__name__)


def predictors_name(activation_sparsity: float) -> str:
    return f"predictors-{artifacts.sparsity_tag(activation_sparsity)}"


@dataclass(slots=True)
class LayerPredictor:
    w1_t: torch.Tensor     # [d, h]
    b1: torch.Tensor       # [h]
    w2_t: torch.Tensor     # [h, n_ff]
    b2: torch.Tensor       # [n_ff]
    tau: float             # logit threshold

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.w1_t + self.b1) @ self.w2_t + self.b2            # [N, n_ff]

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted active neurons [N, n_ff] (bool) for x [N, d]."""
        return self.logits(x) > self.tau


def load_predictors(model_dir: Path, activation_sparsity: float, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> list[LayerPredictor]:
    arrays, _ = artifacts.load(model_dir, predictors_name(activation_sparsity),
                               f"pinfer train-predictors --model {model_dir} --sparsity {activation_sparsity}")
    L = len(arrays["tau"])
    t = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
    return [LayerPredictor(t[f"layer_{i}.w1_t"].to(dtype), t[f"layer_{i}.b1"].to(dtype), t[f"layer_{i}.w2_t"].to(dtype),
                           t[f"layer_{i}.b2"].to(dtype), float(arrays["tau"][i])) for i in range(L)]


def _collect_inputs(model: Transformer, windows: list[list[int]], desc: str) -> list[torch.Tensor]:
    L = model.cfg.num_hidden_layers
    xs: list[list[torch.Tensor]] = [[] for _ in range(L)]
    run_with_ffn_hook(model, windows, lambda layer, x, g, a: xs[layer].append(x.to(torch.bfloat16)), desc)
    return [torch.cat(x) for x in xs]


def _labels(model: Transformer, layer: int, x: torch.Tensor, tau: float) -> torch.Tensor:
    f = model.layers[layer].ffn
    return ffn_activations(x, f.w_gate_up_t, f.act).abs() > tau


def _train_one(x: torch.Tensor, y_fn, d: int, n: int, h: int, epochs: int, density: float, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, n))
    steps = epochs * math.ceil(len(x) / 256)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    pos_weight = torch.tensor((1 - density) / max(density, 1e-3))
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(len(x)).split(256):
                xb = x[idx].float()
                loss = F.binary_cross_entropy_with_logits(net(xb), y_fn(xb).float(), pos_weight=pos_weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    return net


def _threshold_for_recall(logits: torch.Tensor, labels: torch.Tensor, recall: float) -> float:
    pos = logits[labels]
    return float(torch.quantile(pos[torch.randperm(len(pos))[:1_000_000]].float(), 1 - recall)) if len(pos) else 0.0


def _score(logits: torch.Tensor, labels: torch.Tensor, tau: float) -> dict[str, float]:
    pred = logits > tau
    tp = (pred & labels).sum().item()
    return {"recall": tp / max(labels.sum().item(), 1), "precision": tp / max(pred.sum().item(), 1),
            "predicted_sparsity": 1 - pred.float().mean().item(), "true_sparsity": 1 - labels.float().mean().item()}


def train_predictors(model: Transformer, model_dir: Path, encode, activation_sparsity: float,
                     num_tokens: int = 8192, heldout_tokens: int = 2048, epochs: int = 8,
                     target_recall: float = 0.96, max_sparsity_gap: float = 0.08, seed: int = 0) -> dict:
    cal, _ = artifacts.load(model_dir, calibration_name(activation_sparsity),
                            f"pinfer calibrate --model {model_dir} --sparsity {activation_sparsity}")
    cfg = model.cfg
    d, n, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    t0 = time.perf_counter()
    x_cal = _collect_inputs(model, corpus.token_windows(encode, "calibration", num_tokens), "collect calibration")
    x_held = _collect_inputs(model, corpus.token_windows(encode, "heldout", heldout_tokens), "collect held-out")
    h0 = max(64, 64 * math.ceil(0.05 * 3 * d * n / (d + n) / 64))      # ~5% of the layer's FFN weights
    arrays: dict[str, np.ndarray] = {}
    taus, report = np.zeros(L, np.float32), []
    for layer in tqdm(range(L), desc="train predictors", unit="layer"):
        tau_act = float(cal["tau_act"][layer])
        x = x_cal[layer]
        n_val = max(256, len(x) // 10)
        x_tr, x_val = x[:-n_val], x[-n_val:]

        def y_fn(xb: torch.Tensor) -> torch.Tensor:
            return _labels(model, layer, xb, tau_act)

        y_val = y_fn(x_val.float())
        for h in (h0, 2 * h0):
            net = _train_one(x_tr, y_fn, d, n, h, epochs, 1 - activation_sparsity, seed + layer)
            with torch.inference_mode():
                val_logits = net(x_val.float())
            tau = _threshold_for_recall(val_logits, y_val, target_recall)
            val = _score(val_logits, y_val, tau)
            if val["predicted_sparsity"] >= activation_sparsity - max_sparsity_gap:
                break
        with torch.inference_mode():
            xh = x_held[layer].float()
            held = _score(net(xh), y_fn(xh), tau)
        lin1, lin2 = net[0], net[2]
        arrays[f"layer_{layer}.w1_t"] = lin1.weight.detach().t().contiguous().numpy()
        arrays[f"layer_{layer}.b1"] = lin1.bias.detach().numpy()
        arrays[f"layer_{layer}.w2_t"] = lin2.weight.detach().t().contiguous().numpy()
        arrays[f"layer_{layer}.b2"] = lin2.bias.detach().numpy()
        taus[layer] = tau
        report.append({"layer": layer, "hidden": h, "tau_pred": tau, **{f"heldout_{k}": v for k, v in held.items()}})
    arrays["tau"] = taus
    summary = {k: float(np.mean([r[f"heldout_{k}"] for r in report]))
               for k in ("recall", "precision", "predicted_sparsity", "true_sparsity")}
    manifest = {"activation_sparsity": activation_sparsity, "target_recall": target_recall, "epochs": epochs,
                "train_tokens": sum(len(x) for x in x_cal[:1]), "heldout_tokens": len(x_held[0]),
                "seconds": time.perf_counter() - t0, "mean": summary, "layers": report, **corpus.describe()}
    artifacts.save(model_dir, predictors_name(activation_sparsity), arrays, manifest)
    return manifest
