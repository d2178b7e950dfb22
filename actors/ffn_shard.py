"""A subset of every layer's FFN neurons, and the partial FFN sum over it."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from runtime.config import ModelConfig
from runtime.model import ACTIVATIONS, ffn_activations
from runtime.weights import Checkpoint


class FFNShard:
    """Neurons ``idx[l]`` of layer l: ``w_gate_up_t[l]`` [d, n_l, 2|1], ``w_down_t[l]`` [n_l, d]."""

    def __init__(self, cfg: ModelConfig, w_gate_up_t: list[torch.Tensor], w_down_t: list[torch.Tensor]) -> None:
        self.cfg = cfg
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.w_gate_up_t = w_gate_up_t
        self.w_down_t = w_down_t

    @classmethod
    def load(cls, model_dir: str | Path, neurons: Sequence[np.ndarray], dtype: torch.dtype,
             device: torch.device | str = "cpu") -> "FFNShard":
        """Read only the given neurons' rows from the checkpoint (memory-mapped)."""
        cfg = ModelConfig.load(model_dir)
        ckpt = Checkpoint(Path(model_dir))
        mats = ["gate", "up"] if cfg.is_gated_ffn else ["up"]
        gu, down = [], []
        for layer, idx in enumerate(neurons):
            rows = torch.as_tensor(idx, dtype=torch.long)
            p = f"model.layers.{layer}.mlp."
            gu.append(torch.stack([ckpt.get(p + f"{m}_proj.weight", dtype)[rows].t() for m in mats], dim=2)
                      .contiguous().to(device))                                         # [d, n, 2]
            down.append(ckpt.get(p + "down_proj.weight", dtype)[:, rows].t().contiguous().to(device))   # [n, d]
        return cls(cfg, gu, down)

    def num_neurons(self, layer: int) -> int:
        return self.w_down_t[layer].shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.w_gate_up_t, *self.w_down_t))

    def partial(self, layer: int, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """sum over this shard's neurons j of a_j(x) * down_j; x [N, d] -> [N, d] (into ``out`` if given)."""
        a = ffn_activations(x, self.w_gate_up_t[layer], self.act)                # [N, n]
        return torch.matmul(a, self.w_down_t[layer], out=out)                    # [N, n] @ [n, d]
