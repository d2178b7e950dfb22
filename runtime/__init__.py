"""pinfer: the public API (``LLM``, ``SamplingParams``, ``EngineConfig``) of the PowerInfer-style engine."""
import os

# pinfer's sparse FFN kernel runs OpenMP threads in torch's own pool; with the default active wait,
# threads left spinning after each torch op take the cores from it (10x slower on 2 cores). Must be
# set before torch starts its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from runtime.config import EngineConfig  # noqa: E402
from runtime.outputs import EngineStats, RequestOutput, StreamChunk  # noqa: E402
from runtime.sampling import SamplingParams  # noqa: E402


def __getattr__(name: str):
    if name == "LLM":                      # lazy: importing torch is not needed for SamplingParams
        from runtime.llm import LLM
        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "EngineConfig", "EngineStats", "RequestOutput", "SamplingParams", "StreamChunk"]
