"""Neuron-aware sparse FFN: the C kernel (built once with the system compiler, called through ctypes,
which releases the GIL) and the PyTorch formulation it must equal."""
from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch

from runtime.model.activations import ACT_CODES, ACTIVATIONS
from runtime.model.kernels.build import build_library

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("sparse_ffn.c")
_lib: ctypes.CDLL | None | bool = None          # None: not tried yet; False: unavailable


def _load() -> ctypes.CDLL | None:
    global _lib
    if _lib is None:
        lib = build_library(_SOURCE)
        if lib is None:
            logger.warning("sparse FFN kernel unavailable; using the PyTorch formulation")
        else:
            lib.pinfer_sparse_ffn.restype = ctypes.c_int
            lib.pinfer_sparse_ffn.argtypes = [
                ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                ctypes.c_void_p, ctypes.c_int]
        _lib = lib or False
    return _lib or None


def kernel_available() -> bool:
    return _load() is not None


def sparse_ffn_reference(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, act: str,
                         gate_act: torch.Tensor | None = None, row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch formulation: x [N, d], w [n, 3|2, d] (gate, up, down | up, down), idx [k] -> y [N, d];
    ``row_mask`` [N, n] keeps a_j(x_r) only where row r needs neuron j."""
    rows = w.index_select(0, idx)                                   # [k, 3|2, d]
    up = x @ rows[:, -2].t()                                        # [N, k]
    if gate_act is not None:
        a = gate_act.index_select(1, idx) * up
    elif w.shape[1] == 3:
        a = ACTIVATIONS[act](x @ rows[:, 0].t()) * up
    else:
        a = ACTIVATIONS[act](up)
    if row_mask is not None:
        a = a * row_mask.index_select(1, idx)
    return a @ rows[:, -1]                                          # [N, k] @ [k, d]


def sparse_ffn(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, act: str, num_threads: int = 1,
               gate_act: torch.Tensor | None = None, out: torch.Tensor | None = None,
               row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of a_j(x) * down_j over neurons ``idx`` of ``w``, reading only those neurons' rows."""
    lib = _load()
    if (lib is None or x.dtype != torch.float32 or w.dtype != torch.float32 or x.device.type != "cpu"
            or w.device.type != "cpu"):
        y = sparse_ffn_reference(x, w, idx, act, gate_act, row_mask)
        return out.copy_(y) if out is not None else y
    x, w = x.contiguous(), w.contiguous()          # no-ops for the shards' own weights
    idx = idx.to(torch.int64).contiguous()
    y = out if out is not None else torch.empty(x.shape[0], x.shape[1], dtype=torch.float32)
    g = None if gate_act is None else gate_act.contiguous()
    m = None if row_mask is None else row_mask.to(torch.uint8).contiguous()
    rc = lib.pinfer_sparse_ffn(x.data_ptr(), x.shape[0], x.shape[1], w.data_ptr(), w.shape[1], idx.data_ptr(),
                               idx.numel(), None if g is None else g.data_ptr(), 0 if g is None else g.stride(0),
                               None if m is None else m.data_ptr(), 0 if m is None else m.stride(0),
                               ACT_CODES[act], y.data_ptr(), num_threads)
    if rc != 0:
        raise MemoryError("sparse FFN kernel could not allocate its per-thread buffers")
    return y
