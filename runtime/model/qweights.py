"""The quantized weights container: ``weights-<format>.safetensors`` beside a converted model.

A plain safetensors file (no pickle), tensors stored as uint8 block rows (``qformat``) plus the small fp32
tensors (norms, biases). Per layer: ``model.layers.<i>.self_attn.qkv`` (q, k, v rows stacked),
``...self_attn.o``, and the FFN neuron-major, three matrices whose row j belongs to neuron j: ``...mlp.gate``
(gated FFNs), ``...mlp.up`` and ``...mlp.down`` (down_j = column j of W_down, re-quantized: its GGUF blocks
run along the neuron axis); each streams contiguously, and the sparse modes pick rows of each. Plus
``...mlp.down_t``: W_down as it is (the GGUF's own blocks), which a dense pass over every neuron reads as a
matrix-vector product (cheaper than adding down rows). ``lm_head`` (the embedding too when tied) and
``embed`` (untied). The header's metadata names each tensor's block format
and which tensors kept the GGUF's own blocks. Files are memory-mapped, never read whole.

Formats: ``q8`` = every matrix in Q8_0; ``q4`` = attention, FFN gate and up in Q4_1, the FFN down rows and the
embedding/LM head in Q8_0 (down rows re-rounded to 4 bits cost SmolLM2 a quarter of its greedy argmaxes;
llama.cpp's 4-bit mixes keep the output layer wider too).
"""
from __future__ import annotations

import json
import logging
import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from runtime.model.checkpoint import Checkpoint
from runtime.model.config import ModelConfig
from runtime.model.kernels.quantized import QMatrix, QNeurons
from runtime.model.qformat import QK, exact_blocks, quantize
from runtime.paths import QUANTIZED_PREFIX

logger = logging.getLogger(__name__)

QUANTIZED_FORMATS = ("q8", "q4")
LAYOUT = 2          # 2: the FFN's gate, up and down rows as three matrices, plus W_down as it is (down_t)
# role -> block format, per weights format
POLICY = {
    "q8": {"attn": "q8_0", "ffn": "q8_0", "ffn_down": "q8_0", "head": "q8_0"},
    "q4": {"attn": "q4_1", "ffn": "q4_1", "ffn_down": "q8_0", "head": "q8_0"},
}

# name -> (fp32 values [rows, k] or [n], the GGUF's raw blocks [rows, bytes] or None, GGUF type name or None)
TensorFn = Callable[[str], tuple[np.ndarray, np.ndarray | None, str | None]]


class WeightsFileError(ValueError):
    """A quantized weights file is missing, truncated or not what its header says."""


class StaleWeightsError(WeightsFileError):
    """A quantized weights file of an older layout (rebuilt when its float checkpoint is at hand)."""


def weights_path(model_dir: str | Path, weights: str) -> Path:
    return Path(model_dir) / f"{QUANTIZED_PREFIX}{weights}.safetensors"


def write_quantized(path: Path, cfg: ModelConfig, weights: str, get: TensorFn, has: Callable[[str], bool],
                    source: str) -> dict[str, bool]:
    """Write the container for ``weights`` from tensors by Hugging Face name; returns name -> kept exactly."""
    from safetensors.numpy import save_file

    policy = POLICY[weights]
    out: dict[str, np.ndarray] = {}
    formats: dict[str, str] = {}
    exact: dict[str, bool] = {}

    def blocks(name: str, fmt: str, transpose: bool = False) -> np.ndarray:
        values, raw, kind = get(name)
        if transpose:                                   # W_down columns: blocks must run along d
            values, raw, name = np.ascontiguousarray(values.T), None, name + ".T"
        kept = None if raw is None else exact_blocks(raw, values, kind, fmt)
        exact[name] = kept is not None
        return kept if kept is not None else quantize(values, fmt)

    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        out[a + "qkv"] = np.concatenate([blocks(a + f"{n}_proj.weight", policy["attn"]) for n in "qkv"])
        out[a + "o"] = blocks(a + "o_proj.weight", policy["attn"])
        formats[a + "qkv"] = formats[a + "o"] = policy["attn"]
        out[m + "up"] = blocks(m + "up_proj.weight", policy["ffn"])
        out[m + "down"] = blocks(m + "down_proj.weight", policy["ffn_down"], True)
        if cfg.is_gated_ffn:
            out[m + "gate"] = blocks(m + "gate_proj.weight", policy["ffn"])
        if cfg.intermediate_size % QK == 0:
            out[m + "down_t"] = blocks(m + "down_proj.weight", policy["ffn_down"])
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            out[p + name] = get(p + name)[0].astype(np.float32)
        if cfg.attention_bias:
            out[a + "qkv_bias"] = np.concatenate([get(a + f"{n}_proj.bias")[0] for n in "qkv"]).astype(np.float32)
    out["model.norm.weight"] = get("model.norm.weight")[0].astype(np.float32)
    tied = cfg.tie_word_embeddings or not has("lm_head.weight")
    out["lm_head"] = blocks("model.embed_tokens.weight" if tied else "lm_head.weight", policy["head"])
    formats["lm_head"] = policy["head"]
    if not tied:
        out["embed"] = blocks("model.embed_tokens.weight", policy["head"])
        formats["embed"] = policy["head"]
    meta = {"pinfer_weights": weights, "layout": str(LAYOUT), "formats": json.dumps(formats), "ffn_formats": json.dumps(
        [policy["ffn"], policy["ffn_down"]]), "exact": json.dumps(exact), "source": source}
    tmp = path.with_suffix(f".{os.getpid()}.partial")
    save_file(out, str(tmp), metadata=meta)
    os.replace(tmp, path)
    logger.info("wrote %s: %d of %d matrices kept the source's blocks exactly", path.name, sum(exact.values()),
                len(exact))
    return exact


def quantize_checkpoint(model_dir: Path, weights: str) -> Path:
    """Build ``weights-<format>`` from the directory's float safetensors (every matrix rounded once)."""
    ckpt = Checkpoint(model_dir)
    path = weights_path(model_dir, weights)
    write_quantized(path, ModelConfig.load(model_dir), weights,
                    lambda n: (ckpt.get(n, torch.float32).numpy(), None, None), ckpt.__contains__, "safetensors")
    return path


_DTYPES = {"U8": np.uint8, "F32": np.float32}


class QuantizedCheckpoint:
    """A memory-mapped container; every tensor checked against the header and the file's size."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise WeightsFileError(f"{path}: header of {n} bytes does not fit a {size}-byte file")
                header = json.loads(f.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsFileError(f"{path}: not a readable safetensors file ({e}); delete it to rebuild it") from e
        meta = header.pop("__metadata__", {}) or {}
        if "pinfer_weights" not in meta:
            raise WeightsFileError(f"{path}: no pinfer_weights metadata: not a pinfer quantized weights file")
        if meta.get("layout") != str(LAYOUT):
            raise StaleWeightsError(f"{path}: written in an older layout ({meta.get('layout', 1)}, now {LAYOUT}); "
                                    "delete it to rebuild it")
        self.weights = meta["pinfer_weights"]
        self.formats: dict[str, str] = json.loads(meta["formats"])
        self.ffn_formats: list[str] = json.loads(meta["ffn_formats"])
        self.exact: dict[str, bool] = json.loads(meta.get("exact", "{}"))
        data_start = 8 + n
        self._map = np.memmap(path, dtype=np.uint8, mode="r")
        self._tensors: dict[str, np.ndarray] = {}
        for name, info in header.items():
            begin, end = info["data_offsets"]
            dtype = _DTYPES.get(info["dtype"])
            shape = tuple(info["shape"])
            if dtype is None or data_start + end > size or end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize:
                raise WeightsFileError(f"{path}: tensor {name!r} ({info['dtype']} {list(shape)}, bytes {begin}..{end}) "
                                       f"does not fit the {size}-byte file: truncated or corrupt; delete it to rebuild it")
            self._tensors[name] = self._map[data_start + begin:data_start + end].view(dtype).reshape(shape)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def names(self) -> list[str]:
        return list(self._tensors)

    def nbytes(self, name: str) -> int:
        return self._get(name).nbytes

    def _get(self, name: str) -> np.ndarray:
        if name not in self._tensors:
            raise WeightsFileError(f"{self.path}: no tensor {name!r}")
        return self._tensors[name]

    def release(self, arrays: list[np.ndarray | None]) -> None:
        """Drop this process's mapped pages of ``arrays`` (views of this file) once their bytes live elsewhere:
        they stop counting in its memory; touching them again would read them back from the page cache."""
        base, page = self._map.ctypes.data, mmap.PAGESIZE
        for a in arrays:
            if a is None or a.nbytes == 0:
                continue
            start = a.ctypes.data - base
            if not 0 <= start <= len(self._map) - a.nbytes:
                raise ValueError("release() takes views of this weights file")
            first, last = -(-start // page) * page, (start + a.nbytes) // page * page     # whole pages inside
            if last > first:
                self._map._mmap.madvise(mmap.MADV_DONTNEED, first, last - first)

    def matrix(self, name: str, k: int) -> QMatrix:
        return QMatrix(self._get(name), self.formats[name], k)

    def neurons(self, layer: int, cfg: ModelConfig) -> QNeurons:
        m = f"model.layers.{layer}.mlp."
        fmt_gu, fmt_down, d = *self.ffn_formats, cfg.hidden_size
        return QNeurons(QMatrix(self._get(m + "up"), fmt_gu, d), QMatrix(self._get(m + "down"), fmt_down, d),
                        QMatrix(self._get(m + "gate"), fmt_gu, d) if cfg.is_gated_ffn else None,
                        QMatrix(self._get(m + "down_t"), fmt_down, cfg.intermediate_size) if m + "down_t" in self
                        else None)

    def floats(self, name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(self._get(name)))      # small: copied out of the map


def open_quantized(model_dir: str | Path, weights: str) -> QuantizedCheckpoint:
    """The container for ``weights`` in ``model_dir``, built from its float checkpoint on first use when the
    conversion did not write it (a user's safetensors directory)."""
    if weights not in QUANTIZED_FORMATS:
        raise ValueError(f"quantized weights must be one of {QUANTIZED_FORMATS}, got {weights!r}")
    path = weights_path(model_dir, weights)
    if path.is_file():
        try:
            return QuantizedCheckpoint(path)
        except StaleWeightsError as e:
            logger.info("%s: rebuilding", e)
    logger.info("quantizing %s to %s (first use only)", model_dir, weights)
    quantize_checkpoint(Path(model_dir), weights)
    return QuantizedCheckpoint(path)


def bytes_per_token(model_dir: str | Path, weights: str) -> int:
    """Weight bytes one decode step reads: every matrix once, except an untied input embedding (one row)."""
    if weights == "fp32":
        ckpt = Checkpoint(Path(model_dir))
        names = [n for n in ckpt.names() if not (n == "model.embed_tokens.weight" and "lm_head.weight" in ckpt)]
        return sum(ckpt.nbytes(n) for n in names)
    return sum(bytes_by_part(model_dir, weights).values())


def bytes_by_part(model_dir: str | Path, weights: str) -> dict[str, int]:
    """``bytes_per_token`` of quantized weights split by what reads them: ``gate``, ``up``, ``down`` (the FFNs'
    three matrices, which the sparse modes skip rows of), ``attention`` (q, k, v, o), ``head`` (the LM head) and
    ``other`` (norms, biases)."""
    q = open_quantized(model_dir, weights)
    parts = dict.fromkeys(("gate", "up", "down", "attention", "head", "other"), 0)
    for name in q.names():
        if name == "embed" or name.endswith(".down_t"):    # one row a token / the same blocks as the down rows
            continue
        last = name.rsplit(".", 1)[-1]
        part = (last if ".mlp." in name else "attention" if ".self_attn." in name and last in ("qkv", "o")
                else "head" if name == "lm_head" else "other")
        parts[part] += q.nbytes(name)
    return parts
