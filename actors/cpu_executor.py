"""CPU executor: the cold FFN neurons of every layer, served on a doorbell loop thread.

Per request it reads the hidden rows (and in predictor mode the mask) from the shared arena, computes
its partial FFN sum straight into the arena's ``y_cold`` rows and answers with the layer's start/end times.
"""
from __future__ import annotations

import logging
import os
import threading

import torch

from actors.endpoint import ControlEndpoint
from runtime.config import EngineConfig
from runtime.model.ffn_shard import FFNShard, ShardSpec
from scheduler.channel import ArenaRef, LayerArena, serve_cold
from scheduler.doorbell import DoorbellListener

logger = logging.getLogger(__name__)


class CPUExecutor(ControlEndpoint):
    def __init__(self, config: EngineConfig, model_dir: str, spec: ShardSpec) -> None:
        self.num_threads = config.cpu_threads
        self.dtype = getattr(torch, config.cpu_dtype)
        self.shard = FFNShard.load(model_dir, spec.neurons, self.dtype, "cpu", config.sparsity, spec.thresholds,
                                   self.num_threads, config.weights)
        self._listener: DoorbellListener | None = None
        self._arena: LayerArena | None = None
        self._thread: threading.Thread | None = None
        logger.info("CPU executor: %.1f MB of cold neurons", self.shard.nbytes() / 1e6)

    def attach(self, arena: ArenaRef) -> str:
        """Map the hot side's arena and start serving; returns the doorbell socket path to connect to."""
        self._arena = LayerArena(arena.layout, name=arena.name)
        self._listener = DoorbellListener()
        self._thread = threading.Thread(target=self._serve, name="cpu-executor-loop", daemon=True)
        self._thread.start()
        return self._listener.path

    def pid(self) -> int:
        return os.getpid()

    def _serve(self) -> None:
        torch.set_num_threads(self.num_threads)        # per thread under OpenMP: set it in the loop thread
        x, y = torch.from_numpy(self._arena.x), torch.from_numpy(self._arena.y_cold)
        mask = torch.from_numpy(self._arena.mask) if self.shard.mode == "predictor" else None

        def cold_ffn(layer: int, n: int) -> None:
            rows = None if mask is None else mask[:n]
            if self.dtype == torch.float32:
                self.shard.partial(layer, x[:n], out=y[:n], mask=rows)
            else:
                y[:n].copy_(self.shard.partial(layer, x[:n].to(self.dtype), mask=rows))

        serve_cold(self._listener.accept(), cold_ffn)

    def shutdown(self) -> None:
        if self._listener is not None:
            self._listener.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._arena is not None:
            self._arena.close()
