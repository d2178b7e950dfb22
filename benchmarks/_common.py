"""Helpers shared by the benchmark scripts (imported first: ``runtime`` sets OpenMP's wait before torch loads)."""
from __future__ import annotations

import runtime  # noqa: F401  (first, before any torch import: see runtime/__init__.py)

import logging
import os
import platform
import warnings
from pathlib import Path
from typing import Any


def quiet_logs() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)


def cpu_model() -> str:
    """The CPU's model name (benchmarks name the machine they ran on)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hf_model_for(llm: Any, dtype: str) -> Any:
    """transformers' model on the very weights ``llm`` runs (its converted safetensors directory)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(str(llm.model_dir), dtype=getattr(torch, dtype))
    return model.eval()
