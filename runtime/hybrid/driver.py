"""Driver side of the hybrid runtime: starts the two executor actors, wires their data plane, serves
requests through the GPU executor, restarts a dead CPU executor, and tears everything down."""
from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runtime.hybrid.cluster import RAY_ENV, cluster_has_gpu, ensure_ray
from runtime.model.config import ModelConfig
from runtime.errors import EngineDeadError
from runtime.outputs import RequestOutput
from runtime.sampling import SamplingParams
from runtime.sparsity.modes import SparsityConfig
from runtime.core.handles import StreamChunk
from scheduler.layer_scheduler import LayerEvent
from scheduler.placement import LayerSplit, split_by_fraction

logger = logging.getLogger(__name__)
MAX_CALLERS = 256            # concurrent requests an executor actor (and the engine service) accepts


class HybridEngine:
    def __init__(self, model_dir: Path, *, hot_fraction: float, dtype: str = "float32",
                 address: str | None = None, memory_budget_bytes: int | None = None,
                 max_batch_size: int = 16, max_model_len: int | None = None,
                 gpu_threads: int | None = None, cpu_threads: int | None = None,
                 sparsity: SparsityConfig = SparsityConfig()) -> None:
        import ray

        self.model_dir = model_dir
        cfg = ModelConfig.load(model_dir)
        self.sparsity = sparsity
        self.splits: list[LayerSplit] = split_by_fraction(cfg.num_hidden_layers, cfg.intermediate_size,
                                                          hot_fraction, sparsity.frequencies(model_dir))
        self.owns_cluster = ensure_ray(address)
        on_gpu = cluster_has_gpu()
        cores = os.cpu_count() or 2
        # Keep intra-op threads <= cores: on CUDA the GPU executor only launches kernels.
        self.gpu_threads = gpu_threads or 1
        self.cpu_threads = cpu_threads or max(1, cores - (1 if on_gpu else self.gpu_threads))
        self.dtype = dtype
        env = {"runtime_env": {"env_vars": dict(RAY_ENV)}}
        from actors.cpu_executor import CPUExecutor
        from actors.gpu_executor import GPUExecutor

        # Threaded: many callers wait on it at once while its engine thread batches their requests.
        self._gpu_cls = ray.remote(num_cpus=0, num_gpus=1 if on_gpu else 0, max_concurrency=MAX_CALLERS,
                                   **env)(GPUExecutor)
        self._cpu_cls = ray.remote(num_cpus=0, max_restarts=0, **env)(CPUExecutor)
        self.gpu = self._gpu_cls.remote(str(model_dir), self.splits, dtype, None, memory_budget_bytes,
                                        self.gpu_threads, max_batch_size, max_model_len, sparsity=sparsity)
        self.cpu = None
        self._restart_lock = threading.Lock()
        try:
            ray.get(self.gpu.__ray_ready__.remote())
            self._start_cpu_executor()
        except Exception:
            self.shutdown()
            raise
        atexit.register(self.shutdown)

    def _start_cpu_executor(self) -> None:
        import ray

        self.cpu = self._cpu_cls.remote(str(self.model_dir), [s.cold for s in self.splits], self.dtype,
                                        self.cpu_threads, self.sparsity.mode, self.sparsity.tau_gate(self.model_dir))
        arena_name, specs = ray.get(self.gpu.arena_info.remote())
        path = ray.get(self.cpu.attach.remote(arena_name, specs))
        ray.get(self.gpu.connect.remote(path))

    def generate(self, prompts: list[str], params: list[SamplingParams]) -> list[RequestOutput]:
        return self._call("generate", prompts, params)

    async def agenerate(self, prompt: str, params: SamplingParams) -> RequestOutput:
        with self._faults():
            return (await self._gpu().generate.remote([prompt], [params]))[0]

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[StreamChunk]:
        """Chunks as the GPU executor's engine produces them; closing early cancels the request."""
        import ray

        with self._faults():
            gen = self._gpu().stream.remote(prompt, params)
            request_id, finished = None, False
            try:
                for ref in gen:
                    chunk: StreamChunk = ray.get(ref)
                    request_id, finished = chunk.request_id, chunk.finished
                    yield chunk
            finally:
                if request_id is not None and not finished and self.gpu is not None:
                    self.gpu.abort.remote(request_id)

    def abort(self, request_id: str) -> None:
        self._gpu().abort.remote(request_id)

    def prompt_logits(self, prompt: str):
        return self._call("prompt_logits", prompt)

    def _gpu(self):
        if self.gpu is None:
            raise EngineDeadError("the engine was shut down")
        return self.gpu

    def _call(self, method: str, *args: object):
        import ray

        with self._faults():
            return ray.get(getattr(self._gpu(), method).remote(*args))

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

    def trace(self, on: bool | None = None) -> list[LayerEvent]:
        """Turn per-layer timing on/off (``on``), or fetch the recorded events (``None``)."""
        import ray

        if on is not None:
            ray.get(self.gpu.set_tracing.remote(on))
            return []
        return ray.get(self.gpu.trace_events.remote())

    def cpu_executor_pid(self) -> int:
        import ray

        return ray.get(self.cpu.pid.remote())

    def shutdown(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        for actor in (self.gpu, self.cpu):
            if actor is None:
                continue
            try:
                ray.get(actor.shutdown.remote(), timeout=10)
            except Exception:                     # already dead: nothing of its own to release
                pass
            ray.kill(actor, no_restart=True)
        self.gpu = self.cpu = None
        if self.owns_cluster:
            ray.shutdown()
            self.owns_cluster = False
