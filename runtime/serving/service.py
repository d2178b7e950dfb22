"""``pinfer serve``: the engine as a named, detached Ray actor that many client processes share."""
from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from actors.endpoint import EngineEndpoint
from runtime.config import EngineConfig
from runtime.hybrid.cluster import NAMESPACE, RAY_ENV
from runtime.hybrid.driver import MAX_CALLERS

logger = logging.getLogger(__name__)


class EngineService(EngineEndpoint):
    """Holds one hybrid ``LLM`` inside the cluster, built from the whole engine config it was given; its
    executors are this actor's children. Threaded: every caller's request goes straight on to the GPU
    executor's engine, which batches them continuously."""

    def __init__(self, config: EngineConfig) -> None:
        from runtime.llm import LLM

        self.engine = LLM(config=config, is_hybrid=True)

    def info(self) -> dict[str, Any]:
        return {"model": self.engine.model_name, "model_dir": str(self.engine.model_dir),
                "max_model_len": self.engine.max_model_len, "config": asdict(self.engine.config)}

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        return self.engine.apply_chat_template(messages)

    def shutdown(self) -> None:
        self.engine.shutdown()


def start_service(config: EngineConfig) -> tuple[Any, dict[str, Any]]:
    """Create the detached engine actor ``config.engine_name`` and wait until its model is loaded."""
    import ray

    name = config.engine_name
    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        pass
    else:
        raise ValueError(f"an engine named {name!r} already runs on this cluster (pinfer stop --name {name})")
    actor = ray.remote(num_cpus=0, max_concurrency=MAX_CALLERS)(EngineService).options(
        name=name, namespace=NAMESPACE, lifetime="detached",
        runtime_env={"env_vars": dict(RAY_ENV)}).remote(config)
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

    try:
        actor = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    try:
        ray.get(actor.shutdown.remote(), timeout=60)
    finally:
        ray.kill(actor, no_restart=True)
    return True
