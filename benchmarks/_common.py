"""Helpers shared by the benchmark scripts (imported first: ``runtime`` sets OpenMP's wait before torch loads)."""
from __future__ import annotations

import runtime  # noqa: F401  (first, before any torch import: see runtime/__init__.py)
from runtime.model.kernels.build import cpu_model  # noqa: F401  (benchmarks name the CPU they ran on)

import logging
import os
import warnings
from typing import Any


def quiet_logs() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)


def hf_model_for(llm: Any, dtype: str) -> Any:
    """transformers' model on the very weights ``llm`` runs (its converted safetensors directory)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(str(llm.model_dir), dtype=getattr(torch, dtype))
    return model.eval()
