"""Client of an engine started by ``pinfer serve``: ``connect().generate(...)`` like ``LLM.generate``."""
from __future__ import annotations

from runtime.errors import EngineDeadError
from runtime.outputs import RequestOutput
from runtime.sampling import SamplingParams


class Client:
    def __init__(self, actor, name: str) -> None:
        self._actor = actor
        self.name = name

    def generate(self, prompts: str | list[str],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Same signature and result as ``LLM.generate``."""
        import ray
        from ray.exceptions import RayActorError

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        params = params or SamplingParams()
        plist = list(params) if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        try:
            return ray.get(self._actor.generate.remote(prompts, plist))
        except RayActorError as e:
            raise EngineDeadError(f"engine {self.name!r} is gone: {e}") from None

    def info(self) -> dict[str, str]:
        import ray

        return ray.get(self._actor.info.remote())


def connect(address: str = "auto", name: str | None = None) -> Client:
    """Attach to the cluster at ``address`` and to the engine actor ``name`` (configs/engine.yaml default)."""
    import ray

    from runtime.cluster import NAMESPACE, ensure_ray
    from runtime.engine_config import EngineConfig

    name = name or EngineConfig.load().engine_name
    ensure_ray(address)
    try:
        actor = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        raise EngineDeadError(f"no engine named {name!r} on the cluster at {address!r}; start one with "
                              f"`pinfer serve`") from None
    return Client(actor, name)
