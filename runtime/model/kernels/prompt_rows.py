"""Many activation rows at once (a prompt's tokens): block weights dequantized chunk by chunk, multiplied in float.

One token's product is bound by the bytes of the weights, which the 8-bit kernels read once (``quantized.c``). A
prompt's T tokens are bound by arithmetic instead, where the 8-bit kernels reach ~45 GMAC/s on two AVX-512 cores
and the CPU's float matrix units (oneDNN: AMX or AVX-512 BF16 in bfloat16, else AVX2/AVX-512 FMA in fp32) many
times that. So from ``PROMPT_ROWS`` rows on, a matrix is dequantized ``CHUNK_ELEMS`` weights at a time into a
per-thread scratch (a chunk stays in cache while it is multiplied; nothing of model size is ever allocated) and
multiplied in the CPU's fast float type. The weights' values are kept exactly in fp32 (scale x 8-bit value) and
to bfloat16's 8 bits where that is the compute type; activations stay fp32 or bfloat16 instead of 8-bit blocks.
The FFN's modes apply the same conditions as the 8-bit kernel (predictor mask, |act(gate)| > tau_gate,
|a_j| > tau_a or a neuron's own threshold), computed for every neuron of the chunk and masked.
"""
from __future__ import annotations

import threading
from functools import cache

import torch

from runtime.config import prompt_compute_dtype
from runtime.model.activations import ACTIVATIONS
from runtime.model.kernels.quantized import QMatrix, QNeurons, lib
from runtime.model.qformat import BLOCK_BYTES, FORMAT_CODES, QK

PROMPT_ROWS = 24                # rows from which products run here (fewer: the 8-bit kernels; ~16 break even on AMX)
CHUNK_ELEMS = 1 << 22           # weights dequantized at a time (8 MiB in bfloat16)


@cache
def compute_dtype() -> torch.dtype:
    """bfloat16 where the CPU multiplies it natively, else fp32 (torch emulates bfloat16 ~7x slower)."""
    return getattr(torch, prompt_compute_dtype())


class _Scratch(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}


_scratch = _Scratch()


def _dequantized(w: QMatrix, name: str, rows: slice, cols: slice | None = None,
                 num_threads: int = 1) -> torch.Tensor:
    """W[rows, cols] dequantized [n, k] in the compute type, in this thread's scratch buffer ``name`` (valid until
    its next use). ``cols`` (whole 32-blocks) picks a part of every row."""
    c0, c1 = (0, w.k) if cols is None else (cols.start, cols.stop)
    n, k, dtype = rows.stop - rows.start, c1 - c0, compute_dtype()
    buf = _scratch.buffers.get(name)
    if buf is None or buf.dtype != dtype or buf.numel() < n * k:
        buf = _scratch.buffers[name] = torch.empty(max(n * k, CHUNK_ELEMS), dtype=dtype)
    out = buf[:n * k].view(n, k)
    base = w.ptr + rows.start * w.ld + c0 // QK * BLOCK_BYTES[w.fmt]
    if lib().pinfer_dequantize_rows(base, FORMAT_CODES[w.fmt], w.ld, k, None, n, out.data_ptr(),
                                    int(dtype == torch.bfloat16), num_threads) != 0:
        raise MemoryError("could not allocate the dequantization buffers")
    return out


def _chunks(n: int, k: int) -> list[slice]:
    """Row ranges of about CHUNK_ELEMS weights each (whole 32-row blocks, so W_down's columns split on blocks)."""
    step = max(QK, CHUNK_ELEMS // max(1, k) // QK * QK)
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def prompt_linear(x: torch.Tensor, w: QMatrix, num_threads: int = 1) -> torch.Tensor:
    """x [N, k] fp32 -> x @ W.T [N, n] fp32."""
    n = w.shape[0]
    xs = x.to(compute_dtype())
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    for r in _chunks(n, w.k):
        y[:, r] = xs @ _dequantized(w, "linear", r, num_threads=num_threads).T
    return y


def prompt_ffn(x: torch.Tensor, w: QNeurons, act: str, num_threads: int = 1, row_mask: torch.Tensor | None = None,
               tau_gate: float | None = None, tau_a: float | torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """sum over every neuron j of this FFN that row r needs of a_j(x_r) * down_j, x [N, d] fp32 -> [N, d] (into
    ``out``), and the number of (row, neuron) pairs computed. Conditions as ``quantized.qffn``'s, for all of
    ``w``'s neurons in order: ``row_mask`` [N, n_ff] bool, ``tau_gate``, ``tau_a`` (a float or [n_ff] fp32)."""
    dtype, f = compute_dtype(), ACTIVATIONS[act]
    xs = x.to(dtype)
    y = out if out is not None else torch.empty(x.shape[0], w.d, dtype=torch.float32)
    y.zero_()
    used = 0
    for r in _chunks(w.num_neurons, w.d):
        u = (xs @ _dequantized(w.up, "up", r, num_threads=num_threads).T).float()                   # [N, c]
        keep = None if row_mask is None else row_mask[:, r]
        if w.gate is not None:
            g = f((xs @ _dequantized(w.gate, "gate", r, num_threads=num_threads).T).float())       # [N, c]
            if tau_gate is not None:
                keep = _and(keep, g.abs() > tau_gate)
            a = g * u
        else:
            a = f(u)
        if tau_a is not None:
            keep = _and(keep, a.abs() > (tau_a[r] if isinstance(tau_a, torch.Tensor) else tau_a))
        if keep is not None:
            a = a * keep
            used += int(keep.sum())
        else:
            used += a.numel()
        if w.down is not None:                                        # down rows, neuron-major [c, d]
            y += a.to(dtype) @ _dequantized(w.down, "down", r, num_threads=num_threads)
        else:                                                          # W_down's columns r [d, c]
            y += a.to(dtype) @ _dequantized(w.down_t, "down", slice(0, w.d), r, num_threads).T
    return y, used


def _and(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else a & b
