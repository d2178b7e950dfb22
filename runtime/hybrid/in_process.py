"""The hybrid runtime's two executors in this process, wired as the driver wires them, without Ray.

The per-layer data plane is the real one (the shared arena, the doorbell socket, the CPU executor's loop
thread); only the control calls are plain method calls. For tests, and for a GPU machine without Ray
(``benchmarks/cuda_check.py``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from actors.cpu_executor import CPUExecutor
from actors.gpu_executor import MAX_ROWS, GPUExecutor
from runtime.config import EngineConfig
from runtime.hybrid.placement import place
from runtime.model.config import ModelConfig
from runtime.model.ffn_shard import ShardSpec
from runtime.sparsity.online import mode_thresholds


class ExecutorPair:
    """``gpu`` serves requests (``generate``, ``prompt_logits``...); ``cpu`` holds the cold neurons. ``config`` is
    resolved for the model (``EngineConfig.for_model``); ``device`` and ``dequantize`` go to the GPU executor."""

    def __init__(self, config: EngineConfig, model_dir: str | Path, max_rows: int = MAX_ROWS,
                 device: str | None = None, dequantize: bool | None = None) -> None:
        self.config, self.model_dir = config, str(model_dir)
        self._threads = torch.get_num_threads()              # the executors set this process's; restored on close
        splits = place(config, Path(model_dir), ModelConfig.load(model_dir))
        tau = mode_thresholds(Path(model_dir), config)
        self.gpu = GPUExecutor(config, self.model_dir, ShardSpec([s.hot for s in splits], tau), device, max_rows,
                               dequantize)
        self.cold = ShardSpec([s.cold for s in splits], tau)
        self.cpu = self.attach_cpu()

    def attach_cpu(self) -> CPUExecutor:
        """A new CPU executor, connected to the GPU executor (as the driver replaces a dead one)."""
        cpu = CPUExecutor(self.config, self.model_dir, self.cold)
        self.gpu.connect(cpu.attach(self.gpu.arena_ref()))
        return cpu

    def close(self) -> None:
        self.gpu.shutdown()
        self.cpu.shutdown()
        torch.set_num_threads(self._threads)
