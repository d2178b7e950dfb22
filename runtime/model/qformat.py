"""Block-quantized weight formats (ggml's Q8_0 and Q4_1), in numpy: encode, decode, and the exact
mapping of a GGUF tensor's own blocks onto them.

A row of ``k`` inputs is ``k / 32`` blocks along the input dimension:

- ``q8_0``: fp16 d, int8 q[32] (34 bytes, 8.5 bits/weight), w = d * q.
- ``q4_1``: fp16 d, fp16 m, 16 bytes of nibbles (20 bytes, 5 bits/weight), w = d * q + m, q in 0..15;
  byte i holds element i (low nibble) and element i + 16 (high nibble).

``exact_blocks`` re-expresses a GGUF tensor without a second rounding where the source allows it:
Q8_0, Q5_0 and Q4_0 blocks are 8-bit blocks with the same scale, Q4_1 blocks are Q4_1 blocks and Q4_0
blocks are Q4_1 blocks with m = -8 d. Everything else (K-quants, floats, transposed rows) is quantized
from its fp32 values by ``quantize``.
"""
from __future__ import annotations

import numpy as np

QK = 32
BLOCK_BYTES = {"q8_0": 34, "q4_1": 20}
FORMAT_CODES = {"q8_0": 0, "q4_1": 1}


def row_bytes(fmt: str, k: int) -> int:
    if k % QK:
        raise ValueError(f"row length {k} is not a multiple of the block size {QK}")
    return k // QK * BLOCK_BYTES[fmt]


def _halves(v: np.ndarray) -> np.ndarray:
    """fp16 values [..., nb] -> their bytes [..., nb, 2]."""
    return v.astype(np.float16).view(np.uint8).reshape(*v.shape, 2)


def pack(fmt: str, d: np.ndarray, q: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """Blocks from scales d [rows, nb] (fp16-representable), levels q [rows, nb, 32] and mins m -> uint8 rows."""
    rows, nb = d.shape
    out = np.empty((rows, nb, BLOCK_BYTES[fmt]), dtype=np.uint8)
    out[..., :2] = _halves(d)
    if fmt == "q8_0":
        out[..., 2:] = q.astype(np.int8).view(np.uint8)
    else:
        out[..., 2:4] = _halves(m)
        q = q.astype(np.uint8)
        out[..., 4:] = q[..., :16] | (q[..., 16:] << 4)
    return out.reshape(rows, nb * BLOCK_BYTES[fmt])


def quantize(x: np.ndarray, fmt: str) -> np.ndarray:
    """Round fp32 rows x [rows, k] to blocks (round-to-nearest per block) -> uint8 [rows, row_bytes]."""
    rows, k = x.shape
    row_bytes(fmt, k)
    b = np.asarray(x, dtype=np.float32).reshape(rows, k // QK, QK)
    if fmt == "q8_0":
        d = (np.abs(b).max(-1) / 127).astype(np.float16).astype(np.float32)
        inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
        return pack(fmt, d, np.clip(np.rint(b * inv[..., None]), -127, 127))
    lo, hi = b.min(-1), b.max(-1)
    m = lo.astype(np.float16).astype(np.float32)
    d = ((hi - m) / 15).astype(np.float16).astype(np.float32)
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    return pack(fmt, d, np.clip(np.rint((b - m[..., None]) * inv[..., None]), 0, 15), m)


def dequantize(raw: np.ndarray, fmt: str, k: int) -> np.ndarray:
    """uint8 rows [rows, row_bytes] -> fp32 [rows, k] (d * q (+ m), in fp32 as the kernels compute it)."""
    rows = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(rows, k // QK, BLOCK_BYTES[fmt])
    d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)[..., None]
    if fmt == "q8_0":
        return (d * b[..., 2:].view(np.int8).astype(np.float32)).reshape(rows, k)
    m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)[..., None]
    nib = b[..., 4:]
    q = np.concatenate([nib & 0xF, nib >> 4], axis=-1).astype(np.float32)
    return (d * q + m).reshape(rows, k)


_GGUF_BLOCKS = {"Q8_0": 34, "Q5_0": 22, "Q4_0": 18, "Q4_1": 20}   # 32-element GGUF blocks starting with fp16 d


def exact_blocks(raw: np.ndarray, values: np.ndarray, gguf_type: str, fmt: str) -> np.ndarray | None:
    """The GGUF blocks ``raw`` [rows, bytes] of fp32 ``values`` [rows, k] in ``fmt`` with no second rounding,
    or None where the source's blocks do not map onto ``fmt`` (checked: the result decodes to ``values``)."""
    rows, k = values.shape
    if gguf_type not in _GGUF_BLOCKS or raw.shape != (rows, k // QK * _GGUF_BLOCKS[gguf_type]):
        return None
    blocks = raw.reshape(rows, k // QK, _GGUF_BLOCKS[gguf_type])
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    if fmt == "q8_0" and gguf_type in ("Q8_0", "Q5_0", "Q4_0"):
        inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
        out = pack(fmt, d, np.rint(values.reshape(rows, -1, QK) * inv[..., None]))
    elif fmt == "q4_1" and gguf_type == "Q4_1":
        out = np.ascontiguousarray(raw).reshape(rows, -1)
    elif fmt == "q4_1" and gguf_type == "Q4_0":
        out = np.empty((rows, k // QK, 20), dtype=np.uint8)
        out[..., :2] = blocks[..., :2]
        out[..., 2:4] = _halves(-8 * d)
        out[..., 4:] = blocks[..., 2:]
        out = out.reshape(rows, -1)
    else:
        return None
    return out if np.array_equal(dequantize(out, fmt, k), values) else None
