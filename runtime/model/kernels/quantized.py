"""Block-quantized matrices and their kernels (``quantized.c``, built at first use, called through ctypes).

``QMatrix`` is a matrix of output rows in one block format; ``QNeurons`` is one layer's FFN, neuron-major
(neuron j = its up and down rows, contiguous; the gate rows as a matrix of their own). Both hold memory-mapped
bytes (processes that map the same file share its pages) or, for a shard of some neurons, a copy of their rows.
Activations are fp32 torch tensors, quantized to 8-bit blocks once per call inside the kernel library.
"""
from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from runtime.model.activations import ACT_CODES
from runtime.model.kernels.build import build_library
from runtime.model.qformat import BLOCK_BYTES, FORMAT_CODES, QK, dequantize, row_bytes

logger = logging.getLogger(__name__)

ISAS = ("scalar", "avx2")          # kernel paths, in the order of the library's codes
_P, _I, _I64, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "pinfer_best_isa": (_I, []), "pinfer_set_isa": (_I, [_I]), "pinfer_xblock_bytes": (_I, []),
    "pinfer_quantize_x": (None, [_P, _I64, _I64, _P]),
    "pinfer_dequantize_rows": (None, [_P, _I, _I64, _I64, _P, _I64, _P]),
    "pinfer_gemv": (None, [_P, _I, _I64, _I64, _P, _I64, _P, _I, _P, _I64, _I]),
    "pinfer_qffn": (_I, [_P, _I, _I64, _P, _I64, _P, _I64, _I, _I, _P, _I64, _P, _I64, _F, _F, _I, _P, _P, _I]),
    "pinfer_attn_decode": (_I, [_P, _P, _I, _I64, _P, _P, _F, _P, _I, _P, _P, _I, _I, _I, _I, _P, _P, _P, _P, _I64,
                                _P, _P, _I]),
}
_lib: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    """The kernel library (built on first use); quantized weights cannot run without it."""
    global _lib
    if _lib is None:
        built = build_library(Path(__file__).with_name("quantized.c"))
        if built is None:
            raise RuntimeError("the quantized kernels could not be built (is gcc installed?); "
                               "use weights='fp32' on this machine")
        for name, (res, args) in _SIGNATURES.items():
            fn = getattr(built, name)
            fn.restype, fn.argtypes = res, args
        _lib = built
    return _lib


def available_isas() -> list[str]:
    """Kernel paths this machine runs, portable first."""
    return list(ISAS[: lib().pinfer_best_isa() + 1])


def set_isa(name: str) -> None:
    """Select a kernel path (tests compare them; the best one is the default)."""
    if name not in ISAS or lib().pinfer_set_isa(ISAS.index(name)) != 0:
        raise ValueError(f"kernel path {name!r} is not available here (available: {available_isas()})")


@dataclass(frozen=True, slots=True)
class QMatrix:
    """Rows [n, k/32 blocks] of one format: y = x @ W.T for x [..., k]."""

    data: np.ndarray          # uint8 [n, row_bytes(fmt, k)]
    fmt: str
    k: int
    ptr: int = field(init=False, repr=False, compare=False)      # data's address, taken once for the kernels

    def __post_init__(self) -> None:
        if self.data.dtype != np.uint8 or self.data.ndim != 2 or self.data.shape[1] != row_bytes(self.fmt, self.k):
            raise ValueError(f"{self.fmt} matrix of {self.k} inputs needs uint8 rows of "
                             f"{row_bytes(self.fmt, self.k)} bytes, got {self.data.dtype} {self.data.shape}")
        object.__setattr__(self, "ptr", _address(self.data))

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape[0], self.k

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def dequantize(self, rows: np.ndarray | None = None) -> torch.Tensor:
        """fp32 [n, k] (or the given rows)."""
        raw = self.data if rows is None else self.data[rows]
        return torch.from_numpy(dequantize(raw, self.fmt, self.k))


@dataclass(frozen=True, slots=True)
class QNeurons:
    """One layer's FFN, neuron-major: row j = [up_j][down_j] (down_j = column j of W_down), and for gated FFNs
    the gate rows as their own matrix (gate mode computes every gate: a contiguous matrix streams at full
    speed, where gate rows strided between up/down rows read at half of it)."""

    data: np.ndarray          # uint8 [n_ff, row_bytes(fmt_gu, d) + row_bytes(fmt_down, d)]
    gate: np.ndarray | None   # uint8 [n_ff, row_bytes(fmt_gu, d)], None when not gated
    fmt_gu: str
    fmt_down: str
    d: int
    ptr: int = field(init=False, repr=False, compare=False)              # addresses of data and gate
    gate_ptr: int | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ptr", _address(self.data))
        object.__setattr__(self, "gate_ptr", None if self.gate is None else _address(self.gate))
        want = row_bytes(self.fmt_gu, self.d) + row_bytes(self.fmt_down, self.d)
        if self.data.dtype != np.uint8 or self.data.ndim != 2 or self.data.shape[1] != want:
            raise ValueError(f"FFN neurons ({self.fmt_gu}/{self.fmt_down}, d={self.d}) need uint8 rows of "
                             f"{want} bytes, got {self.data.dtype} {self.data.shape}")
        if self.gate is not None:
            QMatrix(self.gate, self.fmt_gu, self.d)                           # checks its shape
            if self.gate.shape[0] != self.data.shape[0]:
                raise ValueError(f"{self.gate.shape[0]} gate rows for {self.data.shape[0]} neurons")

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def num_neurons(self) -> int:
        return self.data.shape[0]

    def nbytes(self, num: int | None = None) -> int:
        per = self.data.shape[1] + (0 if self.gate is None else self.gate.shape[1])
        return per * (self.num_neurons if num is None else num)

    def subset(self, rows: np.ndarray) -> "QNeurons":
        """The given neurons' rows copied into memory of their own, in that order: a shard of scattered neurons
        streams them as consecutive rows (read where they lie, they cost ~20% more)."""
        return QNeurons(np.ascontiguousarray(self.data[rows]),
                        None if self.gate is None else np.ascontiguousarray(self.gate[rows]),
                        self.fmt_gu, self.fmt_down, self.d)

    def matrices(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """The given neurons' rows dequantized: gate (gated FFNs), up, down, each fp32 [n, d]."""
        raw, gu = self.data[rows], row_bytes(self.fmt_gu, self.d)
        out = {} if self.gate is None else {"gate": torch.from_numpy(dequantize(self.gate[rows], self.fmt_gu, self.d))}
        out["up"] = torch.from_numpy(dequantize(raw[:, :gu], self.fmt_gu, self.d))
        out["down"] = torch.from_numpy(dequantize(raw[:, gu:], self.fmt_down, self.d))
        return out


def _address(a: np.ndarray) -> int:
    """The address of a C-contiguous array's first byte (the kernels take rows as consecutive bytes)."""
    if not a.flags.c_contiguous:
        raise ValueError("quantized rows must be C-contiguous")
    return a.ctypes.data


def quantize_x(x: torch.Tensor) -> torch.Tensor:
    """fp32 rows x [N, k] -> their 8-bit activation blocks (an opaque byte buffer for the kernels)."""
    n, k = x.shape
    xq = torch.empty(n * (k // QK) * lib().pinfer_xblock_bytes(), dtype=torch.uint8)
    lib().pinfer_quantize_x(x.data_ptr(), n, k, xq.data_ptr())
    return xq


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise TypeError(f"quantized kernels take fp32 CPU activations, got {x.dtype} on {x.device}")
    return x.reshape(-1, k).contiguous()


def qlinear(x: torch.Tensor, w: QMatrix, num_threads: int | None = None) -> torch.Tensor:
    """x [..., k] fp32 -> x @ W.T [..., n]."""
    n, k = w.shape
    rows = _rows(x, k)
    y = torch.empty(rows.shape[0], n, dtype=torch.float32)
    xq = quantize_x(rows)                                 # held: the kernel reads it
    lib().pinfer_gemv(w.ptr, FORMAT_CODES[w.fmt], w.data.shape[1], k, None, n, xq.data_ptr(),
                      rows.shape[0], y.data_ptr(), n, num_threads or torch.get_num_threads())
    return y.view(*x.shape[:-1], n)


def qffn(x: torch.Tensor, w: QNeurons, idx: torch.Tensor, act: str, num_threads: int,
         row_mask: torch.Tensor | None = None, tau_gate: float | None = None, tau_a: float | None = None,
         out: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """sum over neurons j in ``idx`` that row r needs of a_j(x_r) * down_j: x [N, d] -> [N, d] (into ``out``),
    and the number of (row, neuron) pairs computed.

    Row r needs neuron idx[jj] where ``row_mask`` [N, len(idx)] (bool) holds, |act(gate_j)| > ``tau_gate`` (the
    gate rows are read first; up/down rows only of the neurons that pass) and |a_j| > ``tau_a`` (the down row only
    of the large activations); None means no such condition.
    """
    rows, idx = _rows(x, w.d), idx.to(torch.int64).contiguous()
    y = out if out is not None else torch.empty(rows.shape[0], w.d, dtype=torch.float32)
    m = None if row_mask is None else row_mask.to(torch.uint8).contiguous()
    if tau_gate is not None and w.gate is None:
        raise ValueError("a gate threshold needs a gated FFN")
    used = ctypes.c_int64(0)
    xq = quantize_x(rows)
    rc = lib().pinfer_qffn(xq.data_ptr(), rows.shape[0], w.d, w.ptr, w.data.shape[1],
                           w.gate_ptr, 0 if w.gate is None else w.gate.shape[1],
                           FORMAT_CODES[w.fmt_gu], FORMAT_CODES[w.fmt_down], idx.data_ptr(), idx.numel(),
                           None if m is None else m.data_ptr(), 0 if m is None else m.stride(0),
                           -1.0 if tau_gate is None else tau_gate, -1.0 if tau_a is None else tau_a,
                           ACT_CODES[act], y.data_ptr(), ctypes.addressof(used), num_threads)
    if rc != 0:
        raise MemoryError("quantized FFN kernel could not allocate its per-thread buffers")
    return y, used.value


def attention_decode(x: torch.Tensor, norm1: torch.Tensor, norm2: torch.Tensor, eps: float, w_qkv: QMatrix,
                     b_qkv: torch.Tensor | None, w_o: QMatrix, heads: int, kv_heads: int, cos: torch.Tensor,
                     sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     positions: torch.Tensor, num_threads: int) -> torch.Tensor:
    """One decode step's attention block in one call, in place on the residual stream x [B, d] (fp32,
    contiguous): x += W_o attention(rope(W_qkv norm1(x) + b)), keys/values written to the caches [S, KV, max_len,
    hd] at ``positions`` [B] of ``slots`` [B] (int64); returns norm2(x) [B, d], the FFN's input. cos/sin [B, hd].
    Every tensor contiguous: the step prepares them once for all layers."""
    B, d = x.shape
    hd = cos.shape[-1]
    h = torch.empty_like(x)
    rc = lib().pinfer_attn_decode(x.data_ptr(), h.data_ptr(), B, d, norm1.data_ptr(), norm2.data_ptr(), eps,
                                  w_qkv.ptr, FORMAT_CODES[w_qkv.fmt], None if b_qkv is None else b_qkv.data_ptr(),
                                  w_o.ptr, FORMAT_CODES[w_o.fmt], heads, kv_heads, hd, cos.data_ptr(),
                                  sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[2],
                                  slots.data_ptr(), positions.data_ptr(), num_threads)
    if rc != 0:
        raise MemoryError("fused attention kernel could not allocate its scratch memory")
    return h


def embed_rows(w: QMatrix, tokens: torch.Tensor) -> torch.Tensor:
    """Rows ``tokens`` [...] of W dequantized: [..., k] fp32 (the embedding lookup)."""
    idx = tokens.reshape(-1).to(torch.int64).contiguous()
    if idx.numel() and not 0 <= int(idx.min()) <= int(idx.max()) < w.data.shape[0]:
        raise IndexError(f"token ids must be in [0, {w.data.shape[0]}), got {idx.min()}..{idx.max()}")
    out = torch.empty(idx.numel(), w.k, dtype=torch.float32)
    lib().pinfer_dequantize_rows(w.ptr, FORMAT_CODES[w.fmt], w.data.shape[1], w.k, idx.data_ptr(),
                                 idx.numel(), out.data_ptr())
    return out.view(*tokens.shape, w.k)


__all__ = ["BLOCK_BYTES", "QMatrix", "QNeurons", "attention_decode", "available_isas", "embed_rows", "qffn", "qlinear",
           "quantize_x", "set_isa"]
