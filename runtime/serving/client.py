"""Client of an engine started by ``pinfer serve``: ``connect().generate(...)`` like ``LLM.generate``, plus
``agenerate`` (asyncio) and ``stream`` / ``astream`` (text as tokens arrive): the same ``EngineClient``."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from actors.endpoint import RemoteEngine
from runtime.errors import EngineDeadError
from runtime.serving.replicas import ReplicaClient, connect_replicas
from runtime.serving.served import ServedEngine


class Client(ServedEngine):
    """Requests from every client are batched together on the engine."""

    def __init__(self, actor: Any, name: str) -> None:
        self._actor = actor
        self.name = name
        self._remote = RemoteEngine(lambda: actor, self._engine_gone)

    @contextmanager
    def _engine_gone(self) -> Iterator[None]:
        from ray.exceptions import RayActorError

        try:
            yield
        except RayActorError as e:
            raise EngineDeadError(f"engine {self.name!r} is gone: {e}") from None


def connect(address: str = "auto", name: str | None = None) -> Client | ReplicaClient:
    """Attach to the cluster at ``address`` and to the engine ``name`` (configs/engine.yaml default): one engine
    actor, or the replicas of ``pinfer serve --replicas``."""
    import ray

    from runtime.config import EngineConfig
    from runtime.hybrid.cluster import NAMESPACE, ensure_ray

    name = name or EngineConfig.load().engine_name
    ensure_ray(address)
    try:
        actor = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        replicas = connect_replicas(name)
        if replicas is not None:
            return replicas
        raise EngineDeadError(f"no engine named {name!r} on the cluster at {address!r}; start one with "
                              f"`pinfer serve`") from None
    return Client(actor, name)
