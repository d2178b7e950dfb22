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
                      frequencies: Sequence[np.ndarray] | None = None, block: int = 1) -> list[LayerSplit]:
    """``hot_fraction`` of each layer's neurons go hot: the most frequently active ones when an
    activation-frequency profile is given (ties broken by index), else the lowest indices. ``block`` > 1
    (dividing n_ff): whole aligned blocks of that many neurons go one way, ranked by their summed frequency,
    the hot count rounded to whole blocks."""
    if not 0.0 <= hot_fraction <= 1.0:
        raise ValueError(f"hot_fraction must be in [0, 1], got {hot_fraction!r}")
    if frequencies is not None and len(frequencies) != num_layers:
        raise ValueError(f"profile has {len(frequencies)} layers, model has {num_layers}")
    if n_ff % block:
        raise ValueError(f"blocks of {block} do not divide {n_ff} neurons")
    n_blocks = n_ff // block
    n_hot = round(hot_fraction * n_blocks)

    def neurons(blocks: np.ndarray) -> np.ndarray:           # the blocks' neuron ids, in order
        return (np.sort(blocks)[:, None] * block + np.arange(block)).reshape(-1).astype(np.int64)

    splits = []
    for layer in range(num_layers):
        if frequencies is None:
            order = np.arange(n_blocks)
        else:
            score = np.asarray(frequencies[layer], dtype=np.float64).reshape(n_blocks, block).sum(1)
            order = np.argsort(-score, kind="stable")
        splits.append(LayerSplit(neurons(order[:n_hot]), neurons(order[n_hot:])))
    return splits


def natural_layer_order(names: Sequence[str]) -> list[str]:
    """``layer_2`` before ``layer_10`` (PowerInfer sorted these lexicographically and misplaced layers)."""
    import re

    return sorted(names, key=lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)])


def place_topk(frequencies: Sequence[np.ndarray], capacity: int, tau_hot: float | None = None) -> list[LayerSplit]:
    """Global top-``capacity`` neurons by activation frequency over all layers (and >= ``tau_hot``)."""
    flat = np.concatenate([np.asarray(f, dtype=np.float64) for f in frequencies])
    order = np.argsort(-flat, kind="stable")[:max(0, capacity)]
    if tau_hot is not None:
        order = order[flat[order] >= tau_hot]
    return _splits_from_flat(frequencies, order)


def place_ilp(frequencies: Sequence[np.ndarray], capacity: int, min_per_layer: Sequence[int] | int = 0,
              tau_hot: float | None = None, max_variables: int = 4096) -> list[LayerSplit]:
    """PowerInfer's placement ILP: maximize the summed frequency of hot neurons subject to the capacity,
    where a layer either keeps no hot neuron or at least C_l of them (so its GPU part is worth a sync).

    For fixed counts k_l the best choice is each layer's k_l most frequent neurons, so the ILP decides
    integer k_l and binary y_l (C_l y_l <= k_l <= n_l y_l, sum k_l <= capacity), with each layer's
    frequency-sorted neurons as continuous fill variables. With over ``max_variables`` neurons those are
    grouped into sorted blocks (HiGHS takes minutes on 100k neuron-level columns); exact at block size 1.
    With C_l = 0 the optimum is the global top-k.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix, diags, hstack

    L = len(frequencies)
    c_l = np.full(L, min_per_layer, dtype=np.float64) if np.isscalar(min_per_layer) else np.asarray(min_per_layer, float)
    orders, sizes, weights, layer_of = [], [], [], []
    block = max(1, -(-sum(len(f) for f in frequencies) // max_variables))
    for layer, f in enumerate(frequencies):
        f = np.asarray(f, dtype=np.float64)
        allowed = np.flatnonzero(f >= tau_hot) if tau_hot is not None else np.arange(len(f))
        order = allowed[np.argsort(-f[allowed], kind="stable")]
        orders.append(order)
        for start in range(0, len(order), block):
            part = f[order[start:start + block]]
            sizes.append(len(part))
            weights.append(part.sum())
            layer_of.append(layer)
    nb, sizes_a = len(sizes), np.asarray(sizes, float)
    member = coo_matrix((sizes_a, (layer_of, np.arange(nb))), shape=(L, nb))        # neurons taken per layer
    eye, none = diags(np.ones(L)), coo_matrix((L, L))
    n_l = np.array([len(o) for o in orders], float)
    constraints = [
        LinearConstraint(hstack([member, -eye, none]), 0, 0),                                   # k_l = sum
        LinearConstraint(hstack([coo_matrix((1, nb)), np.ones((1, L)), coo_matrix((1, L))]), -np.inf, capacity),
        LinearConstraint(hstack([coo_matrix((L, nb)), eye, -diags(n_l)]), -np.inf, 0),        # k_l <= n_l y_l
        LinearConstraint(hstack([coo_matrix((L, nb)), eye, -diags(c_l)]), 0, np.inf),          # k_l >= C_l y_l
    ]
    res = milp(c=-np.concatenate([weights, np.zeros(2 * L)]), constraints=constraints,
               integrality=np.concatenate([np.zeros(nb), np.ones(2 * L)]),
               bounds=Bounds(0, np.concatenate([np.ones(nb), n_l, np.ones(L)])))
    if not res.success:
        raise ValueError(f"placement ILP failed: {res.message}")
    counts = np.round(res.x[nb:nb + L]).astype(int)
    starts = np.cumsum([0] + [len(f) for f in frequencies])
    chosen = [starts[layer] + orders[layer][:k] for layer, k in enumerate(counts)]
    return _splits_from_flat(frequencies, np.concatenate(chosen))


def _splits_from_flat(frequencies: Sequence[np.ndarray], chosen: np.ndarray) -> list[LayerSplit]:
    starts = np.cumsum([0] + [len(f) for f in frequencies])
    splits = []
    for layer, f in enumerate(frequencies):
        sel = chosen[(chosen >= starts[layer]) & (chosen < starts[layer + 1])] - starts[layer]
        hot = np.sort(sel).astype(np.int64)
        splits.append(LayerSplit(hot, np.setdiff1d(np.arange(len(f)), hot).astype(np.int64)))
    return splits
