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

ISAS = ("scalar", "avx2", "avx512")          # kernel paths, in the order of the library's codes
_P, _I, _I64, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "pinfer_best_isa": (_I, []), "pinfer_set_isa": (_I, [_I]), "pinfer_xblock_bytes": (_I, []),
    "pinfer_quantize_x": (None, [_P, _I64, _I64, _P]),
    "pinfer_dequantize_rows": (_I, [_P, _I, _I64, _I64, _P, _I64, _P, _I, _I]),
    "pinfer_gemv": (None, [_P, _I, _I64, _I64, _P, _I64, _P, _I, _P, _I64, _I]),
    "pinfer_qffn": (_I, [_P, _I, _I64, _P, _I64, _P, _I64, _P, _I64, _I, _I, _P, _I64, _P, _I64, _F, _F, _P, _I, _P,
                         _P, _I]),
    "pinfer_ffn_dense": (_I, [_P, _I, _I64, _P, _I64, _P, _I64, _I, _P, _I64, _I, _I64, _I, _P, _I]),
    "pinfer_attn_decode": (_I, [_P, _P, _I, _I64, _P, _P, _F, _P, _I, _P, _P, _I, _I, _I, _I, _P, _P, _P, _P, _I64,
                                _P, _P, _I]),
    "pinfer_predictor_scores": (_I, [_P, _I, _I64, _P, _I, _I64, _I64, _I64, _P, _I, _I64, _I64, _P, _P, _P, _I, _P, _P,
                                     _I, _P, _I]),
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
        if not self.data.flags.c_contiguous:
            raise ValueError("quantized rows must be C-contiguous (the kernels take rows as consecutive bytes)")
        object.__setattr__(self, "ptr", self.data.ctypes.data)

    @property
    def ld(self) -> int:
        """Bytes from one row to the next."""
        return self.data.shape[1]

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
    """One layer's FFN, neuron-major: row j of ``up``, ``down`` (down_j = column j of W_down) and, for gated
    FFNs, ``gate`` belongs to neuron j. Three matrices, each streamed on its own: a dense pass reads each
    contiguously (rows of one matrix strided between another's read at about half speed), and gate mode
    reads every gate row but only the passing neurons' up and down rows. ``down_t`` (optional) is W_down as it
    is, [d, n_ff]: a pass over every neuron reads it as one matrix-vector product of the activations instead of
    adding n_ff down rows (a dot product of 32 weights costs ~2/3 of an axpy of them)."""

    up: QMatrix               # [n_ff, d]
    down: QMatrix | None      # [n_ff, d]; None: a shard that only runs dense passes (through down_t)
    gate: QMatrix | None      # [n_ff, d], None when not gated
    down_t: QMatrix | None = None   # [d, n_ff]

    def __post_init__(self) -> None:
        if self.down is None and self.down_t is None:
            raise ValueError("an FFN needs its down rows or W_down")
        mats = [m for m in (self.up, self.down, self.gate) if m is not None]
        if len({m.shape for m in mats}) != 1:
            raise ValueError(f"FFN matrices of different shapes: {[m.shape for m in mats]}")
        if self.gate is not None and self.gate.fmt != self.up.fmt:
            raise ValueError(f"gate ({self.gate.fmt}) and up ({self.up.fmt}) rows must share a block format")
        if self.down_t is not None and self.down_t.shape != self.up.shape[::-1]:
            raise ValueError(f"down_t of shape {self.down_t.shape} for {self.up.shape[0]} neurons of {self.up.k}")

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def num_neurons(self) -> int:
        return self.up.shape[0]

    @property
    def d(self) -> int:
        return self.up.k

    def nbytes(self, num: int | None = None) -> int:
        """Bytes of ``num`` (all) neurons' rows, as one pass reads them."""
        per = sum(m.data.shape[1] for m in (self.up, self.down, self.gate) if m is not None)
        if self.down is None:                                  # W_down's blocks: a down row's bytes per neuron
            per += self.down_t.data.nbytes // max(1, self.num_neurons)
        return per * (self.num_neurons if num is None else num)

    def arrays(self) -> list[np.ndarray]:
        return [m.data for m in (self.up, self.down, self.gate, self.down_t) if m is not None]

    def subset(self, rows: np.ndarray, dense_only: bool = False) -> "QNeurons":
        """The given neurons' rows copied into memory of their own, in that order: a shard of scattered neurons
        streams them as consecutive rows (read where they lie, they cost ~20% more). ``dense_only`` (a shard that
        never skips a neuron): whole 32-neuron blocks keep W_down's own blocks (their columns of ``down_t``)
        instead of down rows, so the shard's dense pass computes exactly what the whole layer's does."""
        def pick(m: QMatrix | None) -> QMatrix | None:
            return None if m is None else QMatrix(np.ascontiguousarray(m.data[rows]), m.fmt, m.k)
        blocks = whole_blocks(rows) if dense_only and self.down_t is not None else None
        if blocks is None:
            return QNeurons(pick(self.up), pick(self.down), pick(self.gate))
        dt = self.down_t.data.reshape(self.d, self.num_neurons // QK, -1)[:, blocks]         # [d, blocks, bytes]
        return QNeurons(pick(self.up), None, pick(self.gate),
                        QMatrix(np.ascontiguousarray(dt.reshape(self.d, -1)), self.down_t.fmt, len(rows)))

    def matrices(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """The given neurons' rows dequantized: gate (gated FFNs), up, down, each fp32 [n, d]; down from W_down as
        it is where the layer has it (the blocks a dense pass computes with)."""
        out = {name: m.dequantize(rows) for name, m in (("gate", self.gate), ("up", self.up)) if m is not None}
        down = self.down.dequantize(rows) if self.down_t is None else self.down_t.dequantize().T[rows]
        return {**out, "down": down.contiguous()}


def whole_blocks(rows: np.ndarray) -> np.ndarray | None:
    """The block ids when ``rows`` (non-empty) are whole aligned 32-neuron blocks, each in order; else None."""
    rows = np.asarray(rows)
    if len(rows) == 0 or len(rows) % QK:
        return None
    starts = rows.reshape(-1, QK)[:, 0]
    ok = bool((starts % QK == 0).all() and (rows.reshape(-1, QK) == starts[:, None] + np.arange(QK)).all())
    return starts // QK if ok else None


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
    lib().pinfer_gemv(w.ptr, FORMAT_CODES[w.fmt], w.ld, k, None, n, xq.data_ptr(),
                      rows.shape[0], y.data_ptr(), n, num_threads or torch.get_num_threads())
    return y.view(*x.shape[:-1], n)


def qffn(x: torch.Tensor, w: QNeurons, idx: torch.Tensor | None, act: str, num_threads: int,
         row_mask: torch.Tensor | None = None, tau_gate: float | None = None,
         tau_a: float | torch.Tensor | None = None, out: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """sum over neurons j in ``idx`` (None: every neuron, in order) that row r needs of a_j(x_r) * down_j:
    x [N, d] -> [N, d] (into ``out``), and the number of (row, neuron) pairs computed.

    Row r needs neuron idx[jj] where ``row_mask`` [N, len(idx)] (bool) holds, |act(gate_j)| > ``tau_gate`` (the
    gate rows are read first; up/down rows only of the neurons that pass) and |a_j| > ``tau_a`` (the down row only
    of the large activations; a float32 tensor [w.num_neurons]: each row's own threshold, as WINA's
    tau / ||W_down[:, j]||); None means no such condition. Every neuron with none of them, and ``w.down_t``:
    the activations of all neurons, rounded to 8-bit blocks, times W_down as one matrix-vector product.
    """
    rows, g = _rows(x, w.d), w.gate
    y = out if out is not None else torch.empty(rows.shape[0], w.d, dtype=torch.float32)
    if tau_gate is not None and g is None:
        raise ValueError("a gate threshold needs a gated FFN")
    xq = quantize_x(rows)
    gate_ptr, ld_g = (None, 0) if g is None else (g.ptr, g.ld)
    if idx is None and w.down_t is not None and row_mask is None and tau_gate is None and tau_a is None:
        dt = w.down_t
        rc = lib().pinfer_ffn_dense(xq.data_ptr(), rows.shape[0], w.d, w.up.ptr, w.up.ld, gate_ptr, ld_g,
                                    FORMAT_CODES[w.up.fmt], dt.ptr, dt.ld, FORMAT_CODES[dt.fmt], dt.k, ACT_CODES[act],
                                    y.data_ptr(), num_threads)
        if rc != 0:
            raise MemoryError("quantized FFN kernel could not allocate its activation buffers")
        return y, rows.shape[0] * w.num_neurons
    if w.down is None:
        raise ValueError("this shard holds W_down's blocks, not down rows: it runs dense passes only")
    idx = torch.arange(w.num_neurons) if idx is None else idx.to(torch.int64).contiguous()
    m = None if row_mask is None else row_mask.to(torch.uint8).contiguous()
    used = ctypes.c_int64(0)
    tau_each = tau_a.to(torch.float32).contiguous() if isinstance(tau_a, torch.Tensor) else None   # held: read by C
    if tau_each is not None and tau_each.numel() != w.num_neurons:
        raise ValueError(f"per-neuron thresholds: {tau_each.numel()} for {w.num_neurons} neurons")
    rc = lib().pinfer_qffn(xq.data_ptr(), rows.shape[0], w.d, w.up.ptr, w.up.ld, w.down.ptr, w.down.ld, gate_ptr, ld_g,
                           FORMAT_CODES[w.up.fmt], FORMAT_CODES[w.down.fmt], idx.data_ptr(), idx.numel(),
                           None if m is None else m.data_ptr(), 0 if m is None else m.stride(0),
                           -1.0 if tau_gate is None else tau_gate,
                           -1.0 if tau_a is None or tau_each is not None else tau_a,
                           None if tau_each is None else tau_each.data_ptr(), ACT_CODES[act], y.data_ptr(),
                           ctypes.addressof(used), num_threads)
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


def predictor_scores(x: torch.Tensor, proj: QMatrix, rank: int, expand: QMatrix, sigma: torch.Tensor,
                     nodes: torch.Tensor, node_weights: torch.Tensor, up_var: torch.Tensor | None,
                     weight: torch.Tensor | None, act: str, num_threads: int) -> torch.Tensor:
    """A layer predictor's scores [N, n] for x [N, d] in one call (``runtime/sparsity/predictor.py`` says what
    they estimate): ``proj`` [rank + sketch, d] and ``expand`` [m n, rank] rows, the per-neuron ``sigma`` [n],
    ``up_var`` [n] (gated FFNs), ``weight`` [n] (optional) and the quadrature's nodes and weights [K]; every
    float tensor fp32 and contiguous."""
    rows = _rows(x, proj.k)
    n = sigma.numel()
    if expand.shape != ((2 if up_var is not None else 1) * n, rank) or proj.shape[0] < rank:
        raise ValueError(f"predictor of {n} neurons and rank {rank}: projection {proj.shape}, expansion {expand.shape}")
    scores = torch.empty(rows.shape[0], n, dtype=torch.float32)
    rc = lib().pinfer_predictor_scores(rows.data_ptr(), rows.shape[0], proj.k, proj.ptr, FORMAT_CODES[proj.fmt],
                                       proj.ld, proj.shape[0], rank, expand.ptr, FORMAT_CODES[expand.fmt], expand.ld, n,
                                       sigma.data_ptr(), nodes.data_ptr(), node_weights.data_ptr(), nodes.numel(),
                                       None if up_var is None else up_var.data_ptr(),
                                       None if weight is None else weight.data_ptr(), ACT_CODES[act],
                                       scores.data_ptr(), num_threads)
    if rc != 0:
        raise MemoryError("predictor kernel could not allocate its scratch memory")
    return scores


def embed_rows(w: QMatrix, tokens: torch.Tensor) -> torch.Tensor:
    """Rows ``tokens`` [...] of W dequantized: [..., k] fp32 (the embedding lookup)."""
    idx = tokens.reshape(-1).to(torch.int64).contiguous()
    if idx.numel() and not 0 <= int(idx.min()) <= int(idx.max()) < w.data.shape[0]:
        raise IndexError(f"token ids must be in [0, {w.data.shape[0]}), got {idx.min()}..{idx.max()}")
    out = torch.empty(idx.numel(), w.k, dtype=torch.float32)
    lib().pinfer_dequantize_rows(w.ptr, FORMAT_CODES[w.fmt], w.ld, w.k, idx.data_ptr(), idx.numel(), out.data_ptr(),
                                 0, 1)
    return out.view(*tokens.shape, w.k)


__all__ = ["BLOCK_BYTES", "QMatrix", "QNeurons", "attention_decode", "available_isas", "embed_rows", "predictor_scores",
           "qffn", "qlinear", "quantize_x", "set_isa", "whole_blocks"]
