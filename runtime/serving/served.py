"""What a client of an engine that runs elsewhere on the cluster knows about it (one engine actor, or the
replicas of ``pinfer serve --replicas``): its model, engine config, chat template and counters, through the one
``call`` of its request surface; and, on this machine, the model's directory and tokenizer (the eval harness
builds prompts and records settings with them)."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from runtime.api import EngineClientBase
from runtime.config import EngineConfig
from runtime.outputs import EngineStats


class ServedEngine(EngineClientBase):
    """``self._remote``: the request surface (``generate``, ``stream``..., and ``call(method, *args)``)."""

    name: str
    _remote: Any

    def _requests(self) -> Any:
        return self._remote

    def info(self) -> dict[str, Any]:
        """The served model, its context length and the engine config it runs (one replica's, for replicas)."""
        return self._remote.call("info")

    @cached_property
    def model_name(self) -> str:
        """Name of the model the engine serves."""
        return str(self.info()["model"])

    @cached_property
    def config(self) -> EngineConfig:
        """The engine config the served engine runs."""
        return EngineConfig(**self.info()["config"])

    @cached_property
    def model_dir(self) -> Path:
        """The served model's directory on this machine (resolved by name, as the engine resolved it)."""
        from runtime.model.registry import resolve_model

        return resolve_model(self.config.model)

    @cached_property
    def tokenizer(self) -> Any:
        from runtime.model.tokenizer import TextTokenizer

        return TextTokenizer(self.model_dir)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        return self._remote.call("apply_chat_template", messages)

    def stats(self) -> EngineStats:
        """The engine's counters (one replica's, for replicas)."""
        return self._remote.call("stats")

    def achieved_sparsity(self, reset: bool = False) -> float | None:
        """Not tracked for engines elsewhere (as for the hybrid runtime)."""
        return None
