"""The FFN activation functions, by the names model configs use, and their codes in the C kernels."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "relu": F.relu, "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
ACT_CODES = {"silu": 0, "relu": 1, "gelu": 2, "gelu_pytorch_tanh": 3}      # actf() in kernels/sparse_ffn.c, kernels/quantized.c
