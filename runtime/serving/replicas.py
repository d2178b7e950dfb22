"""Engine replicas behind one endpoint: ``pinfer serve --replicas N`` as a Ray Serve application.

Each replica is one hybrid engine: a Serve replica actor holding an ``LLM`` whose GPU and CPU executors are
its children, placed in the replica's placement-group bundle on its node (``runtime/hybrid/driver.py``: the
per-layer shared-memory data plane never crosses nodes). A replica reserves the CPUs its engine computes with
(a placement-group bundle of ``gpu_threads + cpu_threads`` CPUs on one node, one each by default), so replicas
spread over nodes by capacity. Serve routes every request to the less loaded of two live replicas it samples
(queue lengths), restarts a replica whose engine fails its health check or whose node dies (where capacity
exists), and carries streams as generators. Serve's own HTTP
proxy stays off: the endpoint is pinfer's OpenAI-compatible server (auth, connection caps, deadlines) over a
``ReplicaClient``, which has the same interface as ``LLM`` and ``connect()``'s client.

What crosses nodes: requests, streamed chunks and results (Ray object transfers); nothing per layer.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import asdict, replace
from typing import Any

from runtime.api import acancel_on_exit, cancel_on_exit, new_request_id
from runtime.config import EngineConfig
from runtime.errors import EngineDeadError
from runtime.hybrid.cluster import RAY_ENV, cluster_has_gpu
from runtime.outputs import EngineStats, RequestOutput, StreamChunk
from runtime.sampling import SamplingParams
from runtime.serving.served import ServedEngine

logger = logging.getLogger(__name__)
DEPLOYMENT = "engine"
MAX_ONGOING = 256             # requests a replica takes at once (its engine batches them continuously)


class EngineReplica:
    """One Serve replica: a hybrid engine. Async methods: the replica's event loop never blocks on the engine."""

    def __init__(self, config: EngineConfig) -> None:
        import ray
        from ray import serve

        from runtime.llm import LLM

        self.engine = LLM(config=config, is_hybrid=True)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.node = ray.get_runtime_context().get_node_id()
        group = ray.util.get_current_placement_group()
        self.group = None if group is None else group.id.hex()        # the bundle its executors share with it

    async def generate(self, prompt: str, params: SamplingParams) -> RequestOutput:
        out = await self.engine.agenerate(prompt, params)
        out.metrics["replica"] = self.replica            # which replica answered (routing is Serve's)
        return out

    async def stream(self, prompt: str, params: SamplingParams, request_id: str) -> AsyncIterator[StreamChunk]:
        """Chunks as they come; a caller that cancels the stream aborts the request on this engine."""
        async with aclosing(self.engine.astream(prompt, params, request_id)) as chunks:
            async for chunk in chunks:
                yield chunk

    def info(self) -> dict[str, Any]:
        return {"model": self.engine.model_name, "model_dir": str(self.engine.model_dir),
                "max_model_len": self.engine.max_model_len, "config": asdict(self.engine.config),
                "replica": self.replica, "node": self.node, "pid": os.getpid(),
                "executor_nodes": self.engine.executor_nodes(), "executor_pids": self.engine.executor_pids(),
                "placement_group": self.group}

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        return self.engine.apply_chat_template(messages)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def check_health(self) -> None:
        """Serve's periodic probe (every 2 s): both executors must answer; a dead one raises here, and Serve
        replaces this replica with a new one (its executors die with it)."""
        self.engine.executor_pids()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


class ReplicaEngine:
    """The engine-shaped request surface over a Serve handle: each request goes to the replica Serve picks."""

    def __init__(self, handle: Any, name: str) -> None:
        self.handle, self.name = handle, name
        self._streams: dict[str, Any] = {}               # request id -> its response generator (for abort)
        self._lock = threading.Lock()

    @contextmanager
    def faults(self) -> Iterator[None]:
        """A replica that died under a request: EngineDeadError (retry it: the next goes to a live replica)."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        try:
            yield
        except (RayActorError, ActorUnavailableError) as e:
            raise EngineDeadError(f"a replica of {self.name!r} died under this request ({type(e).__name__}); "
                                  f"retry it") from None

    def generate(self, prompts: list[str], params: list[SamplingParams]) -> list[RequestOutput]:
        responses = [self.handle.generate.remote(p, sp) for p, sp in zip(prompts, params)]    # spread at once
        with self.faults():
            return [r.result() for r in responses]

    async def agenerate(self, prompt: str, params: SamplingParams) -> RequestOutput:
        with self.faults():
            return await self.handle.generate.remote(prompt, params)

    def _open(self, prompt: str, params: SamplingParams, request_id: str | None) -> tuple[str, Any]:
        request_id = request_id or new_request_id()
        gen = self.handle.options(stream=True).stream.remote(prompt, params, request_id)
        with self._lock:
            self._streams[request_id] = gen
        return request_id, gen

    def _close(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)

    def stream(self, prompt: str, params: SamplingParams, request_id: str | None = None) -> Iterator[StreamChunk]:
        request_id, gen = self._open(prompt, params, request_id)
        try:
            with self.faults():
                yield from cancel_on_exit(iter(gen), gen.cancel)
        finally:
            self._close(request_id)

    async def astream(self, prompt: str, params: SamplingParams,
                      request_id: str | None = None) -> AsyncIterator[StreamChunk]:
        request_id, gen = self._open(prompt, params, request_id)
        try:
            with self.faults():
                async with aclosing(acancel_on_exit(gen.__aiter__(), gen.cancel)) as chunks:
                    async for chunk in chunks:
                        yield chunk
        finally:
            self._close(request_id)

    def abort(self, request_id: str) -> None:
        """Cancel a stream of this client by id (the replica running it aborts the request)."""
        with self._lock:
            gen = self._streams.get(request_id)
        if gen is not None:
            gen.cancel()

    def call(self, method: str, *args: Any) -> Any:
        with self.faults():
            return getattr(self.handle, method).remote(*args).result()


class ReplicaClient(ServedEngine):
    """Requests spread over every live replica; the same interface as ``LLM`` and a served engine's client."""

    def __init__(self, handle: Any, name: str) -> None:
        self.name = name
        self._remote = ReplicaEngine(handle, name)


def replica_threads(config: EngineConfig) -> EngineConfig:
    """``config`` with its executors' thread counts fixed (default one each): what a replica computes with, and
    so reserves, wherever it lands."""
    return replace(config, gpu_threads=config.gpu_threads or 1, cpu_threads=config.cpu_threads or 1)


def check_capacity(replicas: int, cpus: float) -> None:
    """Refuse at once (rather than wait forever) when the live nodes cannot place ``replicas`` bundles of ``cpus``."""
    import ray

    fits = sum(int(n["Resources"].get("CPU", 0) // cpus) for n in ray.nodes() if n["Alive"])
    if fits < replicas:
        raise ValueError(f"{replicas} replica(s) of {cpus:g} CPUs each do not fit this cluster (room for {fits}); "
                         f"add nodes (`ray start --address ...`), or lower --gpu-threads, --cpu-threads or --replicas")


def start_replicas(config: EngineConfig, replicas: int, max_replicas: int | None = None,
                   **autoscaling: float) -> ReplicaClient:
    """Deploy ``replicas`` engines as the Serve application ``config.engine_name``; returns once they answer. With
    ``max_replicas``, Serve grows the deployment up to that many while more than ``max_batch_size`` requests per
    replica are in flight, and shrinks it back to ``replicas`` when idle (``autoscaling``: Serve's other
    autoscaling settings, e.g. ``upscale_delay_s``)."""
    from ray import serve

    if replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {replicas}")
    if max_replicas is not None and max_replicas < replicas:
        raise ValueError(f"--max-replicas ({max_replicas}) must be at least --replicas ({replicas})")
    config = replica_threads(config)
    cpus = float(config.gpu_threads + config.cpu_threads)
    check_capacity(replicas, cpus)
    serve.start(proxy_location="Disabled")   # no Serve HTTP proxy (it would bind 0.0.0.0): pinfer's API is the endpoint
    scaling = {"num_replicas": replicas} if max_replicas is None else {"autoscaling_config": {
        "min_replicas": replicas, "initial_replicas": replicas, "max_replicas": max_replicas,
        "target_ongoing_requests": config.max_batch_size, "upscale_delay_s": 10.0, "downscale_delay_s": 60.0,
        **autoscaling}}
    app = serve.deployment(
        EngineReplica, name=DEPLOYMENT, max_ongoing_requests=MAX_ONGOING, **scaling,
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": dict(RAY_ENV)}},
        placement_group_bundles=[{"CPU": cpus, **({"GPU": 1.0} if cluster_has_gpu() else {})}],
        placement_group_strategy="STRICT_PACK",
        health_check_period_s=2.0, health_check_timeout_s=30.0, graceful_shutdown_timeout_s=10.0,
    ).bind(config)
    handle = serve.run(app, name=config.engine_name, route_prefix=None)
    logger.info("%d replica(s) of %s serve as %s", replicas, config.model, config.engine_name)
    return ReplicaClient(handle, config.engine_name)


def connect_replicas(name: str) -> ReplicaClient | None:
    """The replicas application ``name`` on the connected cluster, or None when there is none."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        if name not in serve.status().applications:
            return None
        return ReplicaClient(serve.get_app_handle(name), name)
    except RayServeException:                    # Serve does not run on this cluster
        return None


def stop_replicas(name: str) -> bool:
    """Delete the replicas application ``name`` (every replica and its executors); False if none runs."""
    from ray import serve

    if connect_replicas(name) is None:
        return False
    serve.delete(name)
    return True
