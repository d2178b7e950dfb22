"""The public entry point: ``LLM(model).generate(prompts, SamplingParams(...))``."""
from __future__ import annotations

import logging
import os

import torch

from runtime.engine import DenseRunner, Engine
from runtime.outputs import RequestOutput
from runtime.registry import default_model, resolve_model
from runtime.sampling import SamplingParams
from runtime.tokenizer import TextTokenizer
from runtime.weights import load_transformer

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


class LLM:
    """A loaded model that generates text.

    ``model`` is a registry name (``pinfer models`` lists them), a model directory (pinfer or Hugging
    Face safetensors layout) or a ``.gguf`` file; ``None`` takes the registry default.
    """

    def __init__(self, model: str | None = None, *, dtype: str | torch.dtype = "float32",
                 num_threads: int | None = None, max_model_len: int | None = None,
                 max_batch_size: int = 16) -> None:
        self.model_name = model or default_model()
        self.model_dir = resolve_model(self.model_name)
        torch.set_num_threads(num_threads or os.cpu_count() or 1)
        self.dtype = parse_dtype(dtype)
        self.tokenizer = TextTokenizer(self.model_dir)
        self._engine: Engine | None = Engine(DenseRunner(load_transformer(self.model_dir, self.dtype)),
                                             self.tokenizer, max_model_len, max_batch_size)

    def generate(self, prompts: str | list[str],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Complete each prompt; one output per prompt, in order."""
        if self._engine is None:
            raise RuntimeError("this LLM was shut down")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        params = params or SamplingParams()
        plist = list(params) if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        return self._engine.generate(prompts, plist)

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None) -> RequestOutput:
        """Answer one conversation (``[{"role": "user", "content": ...}, ...]``) through the chat template."""
        return self.generate(self.tokenizer.apply_chat_template(messages), params)[0]

    def shutdown(self) -> None:
        self._engine = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
