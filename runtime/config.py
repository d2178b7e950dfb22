"""Engine options: one validated object, resolved once (``configs/engine.yaml``, then CLI flags, then keyword
arguments) and handed unchanged to ``LLM``, the hybrid driver, both executors, the served engine and the
eval harness. Adding an option means one field here and its use site: the YAML key, the CLI flag
(``runtime/cli/args.py`` builds the flags from these fields) and the ``LLM(...)`` keyword follow."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from runtime.paths import CONFIG_DIR

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16"}
SPARSITY_MODES = ("dense", "gate", "predictor", "down", "wina")
WEIGHT_FORMATS = ("q8", "q4", "fp32")
PLACEMENTS = ("fraction", "topk", "ilp")
# Options that only mean something on the hybrid runtime: setting one (and not is_hybrid) selects it.
DEFAULT_SLOT_TOKENS = 2048     # default KV-cache budget: this many positions per batch slot (see kv_cache_tokens)
HYBRID_OPTIONS = ("address", "hot_fraction", "placement", "memory_budget_mb", "tau_hot", "min_per_layer")


_WARNED: list[bool] = []


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512_BF16 or AMX-BF16 in /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def prompt_compute_dtype() -> str:
    """The float type quantized weights multiply a prompt's rows in (``model/kernels/prompt_rows.py``)."""
    return "bfloat16" if native_bf16() else "float32"


def _option(default: Any, help: str, flag: str | None = None, choices: tuple[str, ...] | None = None,
            cli: bool = True) -> Any:
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "cli": cli})


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How an engine runs a model. ``resolve`` builds one; ``for_model`` decides what was left open."""

    model: str | None = _option(None, "registry name, model directory or .gguf file (default: the registry's)")
    is_hybrid: bool = _option(False, "run on the GPU/CPU executor actors over Ray instead of in this process",
                              flag="--hybrid")
    address: str | None = _option(None, "Ray cluster to attach to ('auto': the local `ray start` one; default: "
                                        "RAY_ADDRESS, else an embedded cluster)")
    placement: str = _option("fraction", "how the GPU executor's hot neurons are chosen: 'fraction' (hot_fraction "
                                         "of each layer), 'topk' or 'ilp' (the solver of `pinfer place` under "
                                         "memory_budget_mb and/or tau_hot)", choices=PLACEMENTS)
    hot_fraction: float = _option(0.5, "placement 'fraction': share of each layer's FFN neurons on the GPU "
                                       "executor (the most frequently active ones when calibrated)")
    memory_budget_mb: float | None = _option(None, "GPU executor memory for its dense part, hot neurons and KV "
                                                   "cache; 'topk'/'ilp' fill what is left with hot neurons")
    tau_hot: float | None = _option(None, "'topk'/'ilp': only neurons active at least this often go hot")
    min_per_layer: int = _option(0, "'ilp': C_l, the fewest hot neurons of a layer that has any")
    weights: str = _option("q8", "weight storage: 'q8' / 'q4' block-quantized rows run by the SIMD kernels "
                                 "(made from the GGUF's own blocks where they map; q8 is HumanEval- and "
                                 "perplexity-equal to fp32), 'fp32' dequantized floats in `dtype` (the exactness "
                                 "reference)", choices=WEIGHT_FORMATS)
    dtype: str = _option("float32", "float weights and activations ('fp32' weights; the GPU executor on CUDA)",
                         choices=DTYPES)
    sparsity: str = _option("dense", "which FFN neurons each token computes: 'gate' (up/down rows where "
                                     "|act(gate)| > tau_gate), 'predictor' (where the predictor says), 'down' "
                                     "(gate/up of all, down rows where |a| > tau_act), 'wina' (down rows where "
                                     "|a_j| * ||W_down[:, j]|| > tau_wina); the sparse modes need "
                                     "`pinfer prepare`", choices=SPARSITY_MODES)
    activation_sparsity: float = _option(0.0, "target share of inactive (token, neuron) pairs for the sparse modes")
    max_batch_size: int = _option(16, "sequences decoded together (KV-cache slots)")
    max_model_len: int | None = _option(None, "context length (default: the model's own)")
    kv_cache_tokens: int | None = _option(None, "KV-cache budget in token positions, over all running sequences "
                                                "(a request reserves prompt + max_tokens; default: max_batch_size "
                                                "x min(max_model_len, 2048), at least max_model_len)")
    num_threads: int | None = _option(None, "torch threads of the in-process engine (default: all cores)",
                                      flag="--threads")
    gpu_threads: int | None = _option(None, "torch threads of the GPU executor (default 1)")
    cpu_threads: int | None = _option(None, "threads of the CPU executor (default: the other cores)")
    engine_name: str = _option("pinfer-engine", "Ray actor name that `pinfer serve` registers and clients "
                                                "connect to", cli=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", _DTYPE_ALIASES.get(self.dtype, self.dtype))
        problems = []

        def check(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        def number(name: str, kind: type = float) -> bool:
            value = getattr(self, name)
            ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
            check(ok, f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}")
            return ok

        for name in ("weights", "dtype", "sparsity", "placement"):
            allowed = {"weights": WEIGHT_FORMATS, "dtype": DTYPES, "sparsity": SPARSITY_MODES,
                       "placement": PLACEMENTS}[name]
            check(getattr(self, name) in allowed, f"{name} must be one of {', '.join(allowed)}; "
                                                  f"got {getattr(self, name)!r}")
        check(isinstance(self.is_hybrid, bool), f"is_hybrid must be true or false, got {self.is_hybrid!r}")
        if number("hot_fraction"):
            check(0.0 <= self.hot_fraction <= 1.0, f"hot_fraction must be in [0, 1], got {self.hot_fraction!r}")
        if number("activation_sparsity"):
            check(0.0 <= self.activation_sparsity < 1.0,
                  f"activation_sparsity must be in [0, 1), got {self.activation_sparsity!r}")
        if number("max_batch_size", int):
            check(self.max_batch_size >= 1, f"max_batch_size must be >= 1, got {self.max_batch_size!r}")
        if number("min_per_layer", int):
            check(self.min_per_layer >= 0, f"min_per_layer must be >= 0, got {self.min_per_layer!r}")
        for name, low in (("max_model_len", 2), ("kv_cache_tokens", 2), ("num_threads", 1), ("gpu_threads", 1), ("cpu_threads", 1)):
            if getattr(self, name) is not None and number(name, int):
                check(getattr(self, name) >= low, f"{name} must be >= {low} or null, got {getattr(self, name)!r}")
        for name in ("memory_budget_mb", "tau_hot"):
            if getattr(self, name) is not None and number(name):
                check(getattr(self, name) > 0 or name == "tau_hot" and getattr(self, name) == 0,
                      f"{name} must be > 0 or null, got {getattr(self, name)!r}")
        if self.placement != "fraction":
            check(self.memory_budget_mb is not None or self.tau_hot is not None,
                  f"placement {self.placement!r} needs memory_budget_mb and/or tau_hot")
        if problems:
            raise ValueError("engine config: " + "; ".join(problems))

    # ---- building one ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path | None = None) -> "EngineConfig":
        """The defaults in ``configs/engine.yaml`` (``path``); unknown keys are errors."""
        path = path or CONFIG_DIR / "engine.yaml"
        raw = yaml.safe_load(path.read_text()) or {}
        unknown = sorted(set(raw) - set(cls.option_names()))
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(cls.option_names())}")
        return cls(**raw)

    @classmethod
    def resolve(cls, base: "EngineConfig | None" = None, /, **options: Any) -> "EngineConfig":
        """``base`` (default: ``configs/engine.yaml``) with every option that is not None applied on top.
        Setting an option of the hybrid runtime (``HYBRID_OPTIONS``) without ``is_hybrid`` selects it."""
        given = {k: v for k, v in options.items() if v is not None}
        unknown = sorted(set(given) - set(cls.option_names()))
        if unknown:
            raise TypeError(f"unknown engine options {unknown}; known: {sorted(cls.option_names())}")
        if "is_hybrid" not in given and any(k in given for k in HYBRID_OPTIONS):
            given["is_hybrid"] = True
        return replace(base or cls.load(), **given)

    def for_model(self, model: str, context_len: int) -> "EngineConfig":
        """This config with what it left open decided for one model on this machine: the model's name, the
        context length (at most the model's ``context_len``), the KV-cache budget and the thread counts."""
        cores = os.cpu_count() or 1
        gpu_threads = self.gpu_threads or 1
        max_len = min(self.max_model_len or context_len, context_len)
        kv_tokens = self.kv_cache_tokens or max(max_len, self.max_batch_size * min(max_len, DEFAULT_SLOT_TOKENS))
        return replace(self, model=model, max_model_len=max_len, kv_cache_tokens=kv_tokens,
                       num_threads=self.num_threads or cores, gpu_threads=gpu_threads,
                       cpu_threads=self.cpu_threads or max(1, cores - gpu_threads))

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    # ---- derived values ----------------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        return self.weights != "fp32"

    @property
    def cpu_dtype(self) -> str:
        """What the CPU computes in: float32 for quantized kernels, else ``dtype``, except that bfloat16 on a
        CPU without native bf16 (torch emulates it, ~7x slower than float32) falls back to float32, said once."""
        if self.quantized:
            return "float32"
        if self.dtype == "bfloat16" and not native_bf16():
            if not _WARNED:
                _WARNED.append(True)
                logger.warning("bfloat16 on this CPU (no AVX512_BF16/AMX) is emulated and ~7x slower than float32: "
                               "computing in float32 instead (weights='q8' or 'q4' are faster still)")
            return "float32"
        return self.dtype

    @property
    def bytes_per_value(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def memory_budget_bytes(self) -> int | None:
        return None if self.memory_budget_mb is None else int(self.memory_budget_mb * 2**20)
