"""A subset of every layer's FFN neurons, and the partial FFN sum over the ones a token needs.

Modes (the same on both executors):
- ``dense``: every neuron; input-major weights for the fastest dense matrix-vector product.
- ``gate`` (CATS): the gate of every neuron is computed; up/down rows only where |act(gate)| > tau_gate.
- ``predictor`` (PowerInfer): gate/up/down rows only of the neurons the predictor's mask selects.
- ``down``: gate and up of every neuron; the down rows only where |a_j| > tau_act (the exact mask's quality,
  a third of the FFN's bytes to save).
- ``wina`` (WINA): ``down`` with each neuron's own threshold, |a_j| * ||W_down[:, j]|| > tau_wina, i.e. |a_j| >
  tau_wina / ||W_down[:, j]||: a neuron counts by what it adds to the output, not by its activation alone.
Sparse modes keep the weights neuron-major (one neuron = consecutive rows) for the sparse kernel; a
batch reads the union of its rows' neurons once, and each row keeps only its own active neurons.

Quantized weights (q8/q4) are neuron-major in every mode: a shard of a whole layer reads the container's
memory-mapped rows; a shard of some neurons (a hot/cold split) copies its rows into memory of its own, in its
order, so it streams consecutive rows (each neuron still lives in one executor only); in dense mode a shard of
whole 32-neuron blocks (the placement splits dense layers so) keeps W_down's own blocks for its neurons and
computes what the whole layer's dense pass does, as one matrix-vector product. The block kernels read
exactly the neurons a token needs; a prompt's rows (``PROMPT_ROWS`` or more) are multiplied in float on the rows
dequantized chunk by chunk, with the same conditions (``kernels/prompt_rows.py``). On devices without the
kernels the rows are dequantized into the float layouts.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from runtime.config import SPARSITY_MODES
from runtime.model.activations import ACTIVATIONS
from runtime.model.checkpoint import Checkpoint
from runtime.model.config import ModelConfig
from runtime.model.kernels.prompt_rows import PROMPT_ROWS, prompt_ffn
from runtime.model.kernels.quantized import QNeurons, qffn
from runtime.model.kernels.sparse_ffn import sparse_ffn
from runtime.model.qweights import open_quantized
from runtime.model.transformer import ffn_activations

DOWN_MODES = ("down", "wina")        # every gate and up row, the down rows of the large activations only


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """What one executor holds: per layer, the global ids of its neurons; and the sparse mode's per-layer
    thresholds (gate: on |act(gate)|; down: on |a|; wina: on |a_j|, one per neuron [n_ff], by global id; None
    otherwise). Sent to each executor actor when it starts."""

    neurons: list[np.ndarray]
    thresholds: list[float | np.ndarray] | None = None


def _is_every(ids: np.ndarray, n: int) -> bool:
    """Whether ``ids`` is 0..n-1 in order (the whole layer)."""
    ids = np.asarray(ids)
    return len(ids) == n and bool((ids == np.arange(n)).all())


class FFNShard:
    def __init__(self, cfg: ModelConfig, neurons: Sequence[np.ndarray], mode: str,
                 weights: dict[str, list[torch.Tensor]] | list[QNeurons],
                 thresholds: Sequence[float | np.ndarray] | None = None, num_threads: int = 1) -> None:
        if mode not in SPARSITY_MODES:
            raise ValueError(f"sparsity mode must be one of {SPARSITY_MODES}, got {mode!r}")
        self.cfg, self.mode, self.num_threads = cfg, mode, num_threads
        self.act_name = cfg.hidden_act
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.neurons = [torch.as_tensor(np.asarray(n), dtype=torch.long) for n in neurons]   # global ids per layer
        self.w = weights
        # Quantized: layer l's QNeurons holds exactly this shard's neurons, row i = neuron neurons[l][i].
        self.quantized: list[QNeurons] | None = weights if isinstance(weights, list) else None
        if self.quantized is not None:
            if [q.num_neurons for q in self.quantized] != [len(n) for n in self.neurons]:
                raise ValueError("quantized layers must hold exactly the shard's neurons, in order")
            # Local row ids; None for a layer of every neuron with W_down as it is (a dense pass reads that).
            self._local = [None if q.down_t is not None else torch.arange(len(n))
                           for q, n in zip(self.quantized, self.neurons)]
        if mode in ("gate", *DOWN_MODES) and thresholds is None:
            raise ValueError(f"{mode} mode needs its per-layer thresholds")
        # Per layer: one threshold, or (wina) this shard's neurons' own, in its order, where its weights live.
        device = "cpu" if self.quantized is not None else next(t.device for ts in weights.values() for t in ts)
        self.tau: list[float | torch.Tensor] | None = None if thresholds is None else [
            float(t) if np.ndim(t) == 0 else torch.as_tensor(np.asarray(t, dtype=np.float32))[ids].to(device)
            for t, ids in zip(thresholds, self.neurons)]
        self.num_computed = 0            # neurons computed (summed over layers and steps), for achieved sparsity
        self.num_offered = 0

    @classmethod
    def load(cls, model_dir: str | Path, neurons: Sequence[np.ndarray], dtype: torch.dtype,
             device: torch.device | str = "cpu", mode: str = "dense",
             thresholds: Sequence[float | np.ndarray] | None = None,
             num_threads: int = 1, weights: str = "fp32", dequantize: bool | None = None) -> "FFNShard":
        """Only the given neurons' rows of the checkpoint (memory-mapped), laid out for ``mode``. Quantized
        ``weights`` stay quantized on the CPU unless ``dequantize`` (default: on other devices)."""
        cfg = ModelConfig.load(model_dir)
        if mode == "gate" and not cfg.is_gated_ffn:
            raise ValueError("gate mode needs a gated FFN (SwiGLU/ReGLU); this model has none")
        if weights != "fp32":
            q = open_quantized(model_dir, weights)
            layers = [q.neurons(i, cfg) for i in range(cfg.num_hidden_layers)]
            if not (torch.device(device).type != "cpu" if dequantize is None else dequantize):
                # Every neuron: the mapped layer as it is; a subset: its rows copied, consecutive (and the
                # layer's mapped pages dropped, so that each neuron is held by one executor only).
                own = []
                for q_l, idx in zip(layers, neurons):
                    if _is_every(idx, q_l.num_neurons):
                        own.append(q_l)
                    else:
                        own.append(q_l.subset(np.asarray(idx), dense_only=mode == "dense"))
                        q.release(q_l.arrays())
                return cls(cfg, neurons, mode, own, thresholds, num_threads)

            def rows_of(layer: int, idx: np.ndarray) -> dict[str, torch.Tensor]:     # [n, d] each
                return layers[layer].matrices(idx)
        else:
            ckpt = Checkpoint(Path(model_dir))

            def rows_of(layer: int, idx: np.ndarray) -> dict[str, torch.Tensor]:     # [n, d] each
                p, rows = f"model.layers.{layer}.mlp.", torch.as_tensor(idx, dtype=torch.long)
                m = {n: ckpt.get(p + f"{n}_proj.weight", dtype)[rows] for n in ("gate", "up")
                     if cfg.is_gated_ffn or n == "up"}
                m["down"] = ckpt.get(p + "down_proj.weight", dtype)[:, rows].t()
                return m
        w: dict[str, list[torch.Tensor]] = {k: [] for k in ("gate_up_t", "down_t", "gate_t", "rows")}
        for layer, idx in enumerate(neurons):
            m = {k: v.to(dtype) for k, v in rows_of(layer, np.asarray(idx)).items()}
            mats, down = [m[k] for k in ("gate", "up") if k in m], m["down"]
            if mode in ("dense", *DOWN_MODES):
                w["gate_up_t"].append(torch.stack([t.t() for t in mats], dim=2).contiguous().to(device))
                w["down_t"].append(down.contiguous().to(device))
            elif mode == "gate":                           # dense gate GEMV, then (up, down) rows per neuron
                w["gate_t"].append(m["gate"].t().contiguous().to(device))
                w["rows"].append(torch.stack([m["up"], down], dim=1).contiguous().to(device))    # [n, 2, d]
            else:
                w["rows"].append(torch.stack([*mats, down], dim=1).contiguous().to(device))      # [n, 3|2, d]
        return cls(cfg, neurons, mode, w, thresholds, num_threads)

    def num_neurons(self, layer: int) -> int:
        return len(self.neurons[layer])

    def nbytes(self) -> int:
        """Bytes of this shard's neurons (for quantized weights: the mapped rows it reads)."""
        if self.quantized is not None:
            return sum(q.nbytes(len(n)) for q, n in zip(self.quantized, self.neurons))
        return sum(t.numel() * t.element_size() for ts in self.w.values() for t in ts)

    def partial(self, layer: int, x: torch.Tensor, out: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """sum over this shard's needed neurons j of a_j(x) * down_j; x [N, d] -> [N, d] (into ``out``).

        ``mask`` [N, n_ff] bool (per row, global neuron ids) selects neurons in predictor mode.
        """
        n_local = self.num_neurons(layer)
        self.num_offered += n_local
        if self.quantized is not None:
            return self._quantized_partial(layer, x, out, mask)
        self.num_offered += n_local * (x.shape[0] - 1)
        if self.mode in ("dense", *DOWN_MODES):
            a = ffn_activations(x, self.w["gate_up_t"][layer], self.act)                  # [N, n]
            if self.mode in DOWN_MODES:
                tau = self.tau[layer]                                                      # a float, or [n]
                keep = a.abs() > tau                                                       # [N, n]
                self.num_computed += int(keep.sum())
                a = a * keep
            else:
                self.num_computed += n_local * x.shape[0]
            return torch.matmul(a, self.w["down_t"][layer], out=out)                       # [N, n] @ [n, d]
        gate_act = None
        if self.mode == "gate":
            gate_act = self.act(x @ self.w["gate_t"][layer])                               # [N, n]
            local = gate_act.abs() > self.tau[layer]                                       # [N, n]
        else:
            if mask is None:
                raise ValueError("predictor mode needs the predictor's mask")
            local = mask[:, self.neurons[layer]]                                           # [N, n]
        idx = local.any(0).nonzero().squeeze(1)
        self.num_computed += int(local.sum())
        return sparse_ffn(x, self.w["rows"][layer], idx, self.act_name, self.num_threads, gate_act, out,
                          row_mask=local if x.shape[0] > 1 else None)

    def _quantized_partial(self, layer: int, x: torch.Tensor, out: torch.Tensor | None,
                           mask: torch.Tensor | None) -> torch.Tensor:
        """One call of the 8-bit kernel (the conditions applied inside it, neuron by neuron) or of the prompt path."""
        q, ids, n = self.quantized[layer], self.neurons[layer], x.shape[0]
        self.num_offered += len(ids) * (n - 1)
        row_mask = None
        if self.mode == "predictor":
            if mask is None:
                raise ValueError("predictor mode needs the predictor's mask")
            row_mask = mask[:, ids]                                                        # [N, n]
        tau = None if self.tau is None else self.tau[layer]
        conditions = {"row_mask": row_mask, "out": out, "tau_gate": tau if self.mode == "gate" else None,
                      "tau_a": tau if self.mode in DOWN_MODES else None}
        if n >= PROMPT_ROWS:                                    # a prompt's rows: float products, chunk by chunk
            y, used = prompt_ffn(x, q, self.act_name, self.num_threads, **conditions)
        else:
            y, used = qffn(x, q, self._local[layer], self.act_name, self.num_threads, **conditions)
        self.num_computed += used
        return y
