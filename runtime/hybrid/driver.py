"""Driver side of the hybrid runtime: places the neurons, starts the two executor actors, wires their data
plane, serves requests through the GPU executor, replaces a dead CPU executor, and tears everything down."""
from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from actors.endpoint import RemoteEngine
from runtime.config import EngineConfig
from runtime.errors import EngineDeadError
from runtime.hybrid.cluster import EXECUTOR_ENV, cluster_has_gpu, ensure_ray
from runtime.hybrid.placement import place
from runtime.model.config import ModelConfig
from runtime.model.ffn_shard import ShardSpec
from runtime.sparsity.online import mode_thresholds
from scheduler.layer_scheduler import LayerEvent

logger = logging.getLogger(__name__)
MAX_CALLERS = 256            # concurrent requests an executor actor (and the engine service) accepts


class HybridEngine(RemoteEngine):
    """Requests go to the GPU executor's engine (``RemoteEngine``); this class owns the actors' lifecycle."""

    def __init__(self, config: EngineConfig, model_dir: Path) -> None:
        import ray
        from ray.util import get_current_placement_group
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

        from actors.cpu_executor import CPUExecutor
        from actors.gpu_executor import GPUExecutor

        super().__init__(self._live_gpu, self._faults)
        self.config, self.model_dir = config, model_dir
        self.gpu = self.cpu = None
        # Placement first: a budget that cannot hold it is refused before any actor starts.
        splits = place(config, model_dir, ModelConfig.load(model_dir))
        thresholds = mode_thresholds(model_dir, config)
        self._cold_spec = ShardSpec([s.cold for s in splits], thresholds)
        self.owns_cluster = ensure_ray(config.address)
        # Both executors beside this process: in its placement group's bundle (a replica's, which holds the GPU the
        # GPU executor asks for), else on its node. Their per-layer data plane is shared memory: it never crosses
        # nodes.
        group = get_current_placement_group()
        here = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0) if group is not None else \
            NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        options: dict[str, Any] = {"num_cpus": 0, "runtime_env": {"env_vars": dict(EXECUTOR_ENV)},
                                   "scheduling_strategy": here}
        # Threaded: many callers wait on it at once while its engine thread batches their requests.
        gpu_cls = ray.remote(num_gpus=1 if cluster_has_gpu() else 0, max_concurrency=MAX_CALLERS, **options)(GPUExecutor)
        self._cpu_cls = ray.remote(max_restarts=0, **options)(CPUExecutor)
        self._restart_lock = threading.Lock()
        try:
            self.gpu = gpu_cls.remote(config, str(model_dir), ShardSpec([s.hot for s in splits], thresholds))
            self._rpc(self.gpu, "pid")                         # ready: weights loaded
            self._start_cpu_executor()
        except Exception:
            self.shutdown()
            raise
        atexit.register(self.shutdown)

    def _rpc(self, actor: Any, method: str, *args: Any, timeout: float | None = None) -> Any:
        """A control call, waited for."""
        import ray

        return ray.get(actor.execute_method.remote(method, *args), timeout=timeout)

    def _start_cpu_executor(self) -> None:
        self.cpu = self._cpu_cls.remote(self.config, str(self.model_dir), self._cold_spec)
        path = self._rpc(self.cpu, "attach", self._rpc(self.gpu, "arena_ref"))
        self._rpc(self.gpu, "connect", path)

    def _live_gpu(self) -> Any:
        if self.gpu is None:
            raise EngineDeadError("the engine was shut down")
        return self.gpu

    @contextmanager
    def _faults(self) -> Iterator[None]:
        """Executor deaths become EngineDeadError, never a hang; a dead CPU executor is replaced once."""
        from ray.exceptions import RayActorError

        cpu = self.cpu
        try:
            yield
        except EngineDeadError as e:            # the CPU executor died: fail this request, heal for the next
            with self._restart_lock:
                if self.cpu is cpu and self.gpu is not None:      # not yet replaced by a concurrent caller
                    logger.warning("CPU executor failed (%s); starting a new one", e)
                    self._restart_cpu_executor()
            raise EngineDeadError(f"request failed: {e}. A new CPU executor was started; retry the request.") from None
        except RayActorError as e:
            raise EngineDeadError(f"the GPU executor died: {e}") from None

    def _restart_cpu_executor(self) -> None:
        import ray

        if self.cpu is not None:
            ray.kill(self.cpu, no_restart=True)
        self._start_cpu_executor()

    # ---- what only the hybrid runtime has ------------------------------------------------------------
    def set_tracing(self, on: bool) -> None:
        self._rpc(self._live_gpu(), "set_tracing", on)

    def trace_events(self) -> list[LayerEvent]:
        return self._rpc(self._live_gpu(), "trace_events")

    def hot_neurons(self) -> list[np.ndarray]:
        return self._rpc(self._live_gpu(), "hot_neurons")

    def executor_pids(self) -> dict[str, int]:
        return {"gpu": self._rpc(self._live_gpu(), "pid"), "cpu": self._rpc(self.cpu, "pid")}

    def executor_nodes(self) -> dict[str, str]:
        """The Ray node each executor runs on (both the engine owner's)."""
        return {"gpu": self._rpc(self._live_gpu(), "node_id"), "cpu": self._rpc(self.cpu, "node_id")}

    def shutdown(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        for actor in (self.gpu, self.cpu):
            if actor is None:
                continue
            try:
                self._rpc(actor, "shutdown", timeout=10)
            except Exception:                     # already dead: nothing of its own to release
                pass
            ray.kill(actor, no_restart=True)
        self.gpu = self.cpu = None
        if self.owns_cluster:
            ray.shutdown()
            self.owns_cluster = False
