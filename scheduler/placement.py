"""Placement: which FFN neurons of each layer are hot (GPU executor) and which are cold (CPU executor)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class LayerSplit:
    hot: np.ndarray       # sorted neuron indices held by the GPU executor
    cold: np.ndarray      # the complement, held by the CPU executor


def split_by_fraction(num_layers: int, n_ff: int, hot_fraction: float,
                      frequencies: Sequence[np.ndarray] | None = None) -> list[LayerSplit]:
    """``hot_fraction`` of each layer's neurons go hot: the most frequently active ones when an
    activation-frequency profile is given (ties broken by index), else the lowest indices."""
    if not 0.0 <= hot_fraction <= 1.0:
        raise ValueError(f"hot_fraction must be in [0, 1], got {hot_fraction!r}")
    if frequencies is not None and len(frequencies) != num_layers:
        raise ValueError(f"profile has {len(frequencies)} layers, model has {num_layers}")
    n_hot = round(hot_fraction * n_ff)
    splits = []
    for layer in range(num_layers):
        if frequencies is None:
            order = np.arange(n_ff)
        else:
            order = np.argsort(-np.asarray(frequencies[layer], dtype=np.float64), kind="stable")
        hot = np.sort(order[:n_hot])
        cold = np.sort(order[n_hot:])
        splits.append(LayerSplit(hot.astype(np.int64), cold.astype(np.int64)))
    return splits
