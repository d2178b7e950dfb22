"""pinfer: the public API (``LLM``, ``SamplingParams``, ``EngineConfig``) of the PowerInfer-style engine."""
import os

from runtime.hybrid.cluster import RAY_ENV

# Set before torch and Ray read them, at their import: OMP_WAIT_POLICY=PASSIVE (pinfer's kernels run OpenMP
# threads beside torch's; with the default active wait, threads left spinning after each torch op take the
# cores from them, 10x slower on 2 cores), Ray's token authentication and worker niceness.
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
