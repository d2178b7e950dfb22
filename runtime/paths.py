"""Where pinfer reads its configuration (``configs/``) and keeps what it builds (``PINFER_CACHE``)."""
from __future__ import annotations

import os
from pathlib import Path

CONFIG_DIR = Path(os.environ.get("PINFER_CONFIG_DIR", Path(__file__).resolve().parent.parent / "configs"))


def cache_dir() -> Path:
    """Assembled GGUFs, converted models and built kernels (``PINFER_CACHE``, default ``~/.cache/pinfer``)."""
    root = Path(os.environ.get("PINFER_CACHE", Path.home() / ".cache" / "pinfer"))
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    return root


QUANTIZED_PREFIX = "weights-"      # quantized containers beside a model's checkpoint (runtime/model/qweights.py)


def checkpoint_files(model_dir: Path) -> list[Path]:
    """A model directory's float safetensors files (not the quantized containers made from them)."""
    return sorted(f for f in Path(model_dir).glob("*.safetensors") if not f.name.startswith(QUANTIZED_PREFIX))
