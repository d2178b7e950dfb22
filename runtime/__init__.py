"""pinfer: the public API (``LLM``, ``SamplingParams``, ``EngineConfig``) of the PowerInfer-style engine."""
import logging
import os
import sys

from runtime.hybrid.cluster import RAY_ENV

# Set before torch and Ray read them, at their import: Ray's token authentication and worker niceness, and how
# long an idle OpenMP thread waits for the next parallel region before it sleeps. A decode step runs several
# regions a layer, tens of microseconds apart; unset, libgomp sleeps at once here (the engine's thread and the
# main thread each have a pool: more threads than cores), and every region pays a wake-up: qwen2.5-coder-0.5b q8
# decoded at 23.2 tok/s, 30.0 with GOMP_SPINCOUNT (prefill 142 -> 248; `benchmarks/bench_vs_llamacpp.py`, 2-core
# Xeon). Unbounded spinning (the default without PASSIVE) left threads taking the cores from the kernels.
if "torch" in sys.modules and "GOMP_SPINCOUNT" not in os.environ:
    logging.getLogger(__name__).warning("torch was imported before runtime: its OpenMP threads sleep between "
                                        "parallel regions, decode is slower (import runtime first, or set "
                                        "GOMP_SPINCOUNT=%s)", RAY_ENV["GOMP_SPINCOUNT"])
for _key, _value in RAY_ENV.items():
    os.environ.setdefault(_key, _value)
from runtime.config import EngineConfig  # noqa: E402
from runtime.outputs import EngineStats, RequestOutput, StreamChunk  # noqa: E402
from runtime.sampling import SamplingParams  # noqa: E402


def __getattr__(name: str):
    if name == "LLM":                      # lazy: importing torch is not needed for SamplingParams
        from runtime.llm import LLM
        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "EngineConfig", "EngineStats", "RequestOutput", "SamplingParams", "StreamChunk"]
