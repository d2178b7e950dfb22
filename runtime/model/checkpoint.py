"""Hugging Face-layout safetensors checkpoints: tensor lookup by name, memory-mapped, never pickle."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open

from runtime.paths import checkpoint_files


def _safetensors_files(model_dir: Path) -> list[Path]:
    files = checkpoint_files(model_dir)
    if not files:
        pickles = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt*")]
        hint = f" (found {pickles}: pickle checkpoints are never loaded; convert them to safetensors)" if pickles else ""
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}{hint}")
    return files


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1}


class Checkpoint:
    """Tensor lookup across (possibly sharded) safetensors files, each opened memory-mapped once."""

    def __init__(self, model_dir: Path) -> None:
        self._handles = [safe_open(str(f), framework="pt") for f in _safetensors_files(model_dir)]
        self._where = {k: h for h in self._handles for k in h.keys()}

    def names(self) -> list[str]:
        return list(self._where)

    def nbytes(self, name: str) -> int:
        """Bytes of the stored tensor (its on-disk dtype), without reading it."""
        sl = self._where[name].get_slice(name)
        return math.prod(sl.get_shape()) * _DTYPE_BYTES[sl.get_dtype()]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"checkpoint has no tensor {name!r}")
        return self._where[name].get_tensor(name).to(dtype)
