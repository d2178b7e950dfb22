"""pinfer runtime: the public API (``LLM``, ``SamplingParams``) and the dense reference engine."""
from runtime.outputs import RequestOutput
from runtime.sampling import SamplingParams


def __getattr__(name: str):
    if name == "LLM":                      # lazy: importing torch is not needed for SamplingParams
        from runtime.llm import LLM
        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "RequestOutput", "SamplingParams"]
