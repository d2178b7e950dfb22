"""Engine defaults from ``configs/engine.yaml``: a dataclass validated on load (unknown keys are errors)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from runtime.model.registry import CONFIG_DIR


@dataclass(slots=True, frozen=True)
class EngineConfig:
    hot_fraction: float = 0.5
    dtype: str = "float32"
    max_batch_size: int = 16
    max_model_len: int | None = None
    memory_budget_mb: float | None = None
    engine_name: str = "pinfer-engine"

    def __post_init__(self) -> None:
        if not 0.0 <= self.hot_fraction <= 1.0:
            raise ValueError(f"hot_fraction must be in [0, 1], got {self.hot_fraction!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2 or null, got {self.max_model_len!r}")
        if self.memory_budget_mb is not None and self.memory_budget_mb <= 0:
            raise ValueError(f"memory_budget_mb must be > 0 or null, got {self.memory_budget_mb!r}")

    @property
    def memory_budget_bytes(self) -> int | None:
        return None if self.memory_budget_mb is None else int(self.memory_budget_mb * 2**20)

    @classmethod
    def load(cls, path: Path | None = None) -> "EngineConfig":
        path = path or CONFIG_DIR / "engine.yaml"
        raw = yaml.safe_load(path.read_text()) or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**raw)
