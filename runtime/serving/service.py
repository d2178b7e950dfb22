"""``pinfer serve``: the engine as a named, detached Ray actor that many client processes share."""
from __future__ import annotations

import logging
from collections.abc import Iterator

from runtime.hybrid.driver import MAX_CALLERS
from runtime.outputs import RequestOutput
from runtime.sampling import SamplingParams
from runtime.core.handles import StreamChunk

logger = logging.getLogger(__name__)


class EngineService:
    """Holds one hybrid LLM inside the cluster; its executors are this actor's children. Threaded: every
    caller's request goes straight to the GPU executor's engine, which batches them continuously."""

    def __init__(self, model: str | None, hot_fraction: float | None, dtype: str | None,
                 memory_budget_bytes: int | None) -> None:
        from runtime.llm import LLM

        self.llm = LLM(model, hot_fraction=hot_fraction, address="auto", dtype=dtype,
                       memory_budget_bytes=memory_budget_bytes)

    def info(self) -> dict[str, str | int]:
        return {"model": self.llm.model_name, "model_dir": str(self.llm.model_dir),
                "max_model_len": self.llm.max_model_len}

    def generate(self, prompts: list[str], params: list[SamplingParams]) -> list[RequestOutput]:
        return self.llm.generate(prompts, params)

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[StreamChunk]:
        yield from self.llm.stream(prompt, params)

    def abort(self, request_id: str) -> None:
        self.llm.abort(request_id)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        return self.llm.tokenizer.apply_chat_template(messages)

    def shutdown(self) -> None:
        self.llm.shutdown()


def start_service(name: str, model: str | None, hot_fraction: float | None, dtype: str | None,
                  memory_budget_bytes: int | None):
    """Create the detached engine actor ``name`` and wait until its model is loaded."""
    import ray

    from runtime.hybrid.cluster import NAMESPACE, RAY_ENV

    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        pass
    else:
        raise ValueError(f"an engine named {name!r} already runs on this cluster (pinfer stop --name {name})")
    actor = ray.remote(num_cpus=0, max_concurrency=MAX_CALLERS)(EngineService).options(
        name=name, namespace=NAMESPACE, lifetime="detached",
        runtime_env={"env_vars": dict(RAY_ENV)}).remote(model, hot_fraction, dtype, memory_budget_bytes)
    try:
        info = ray.get(actor.info.remote())
    except Exception:
        ray.kill(actor)
        raise
    logger.info("engine %s serves %s", name, info["model"])
    return actor, info


def stop_service(name: str) -> bool:
    """Shut the named engine down (its executors and shared memory with it); False if none runs."""
    import ray

    from runtime.hybrid.cluster import NAMESPACE

    try:
        actor = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    try:
        ray.get(actor.shutdown.remote(), timeout=60)
    finally:
        ray.kill(actor, no_restart=True)
    return True
