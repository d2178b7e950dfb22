"""The CUDA path of the executors (skipped without a CUDA device): a shard on the GPU equals the same shard on
the CPU in every sparse mode, and the GPU executor in gate mode equals the in-process gate engine at any split."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from runtime import EngineConfig
from runtime.model.config import ModelConfig
from runtime.model.ffn_shard import FFNShard
from runtime.sparsity.online import mode_thresholds
from tests.test_executors import GREEDY, PROMPTS, Executors, _local

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU executor's path)")


@pytest.mark.parametrize("mode", ["dense", "gate", "down", "wina"])
@pytest.mark.parametrize("rows", [1, 3])
def test_a_shard_on_the_gpu_equals_it_on_the_cpu(calibrated_tiny: Path, mode: str, rows: int) -> None:
    cfg = ModelConfig.load(calibrated_tiny)
    config = EngineConfig.resolve(model=str(calibrated_tiny), sparsity=mode, activation_sparsity=0.5, weights="fp32")
    tau = mode_thresholds(calibrated_tiny, config)
    rng = np.random.default_rng(1)
    neurons = [np.sort(rng.choice(cfg.intermediate_size, 60, replace=False)) for _ in range(cfg.num_hidden_layers)]
    cpu, gpu = (FFNShard.load(calibrated_tiny, neurons, torch.float32, device, mode, tau) for device in ("cpu", "cuda"))
    x = torch.randn(rows, cfg.hidden_size)
    for layer in range(cfg.num_hidden_layers):
        want = cpu.partial(layer, x)
        got = gpu.partial(layer, x.cuda()).cpu()
        assert (got - want).abs().max().item() < 1e-4 * max(1.0, want.abs().max().item()), (mode, layer)


@pytest.mark.parametrize("mode", ["gate", "wina"])
@pytest.mark.parametrize("hot", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("cpu_threads", [1, None])
def test_threshold_modes_on_the_gpu_equal_the_in_process_engine(calibrated_tiny: Path, executors, hot: float,
                                                                cpu_threads: int | None, mode: str) -> None:
    gate = dict(sparsity=mode, activation_sparsity=0.5)
    local = _local(calibrated_tiny, **gate)
    ex = Executors(calibrated_tiny, hot_fraction=hot, cpu_threads=cpu_threads, **gate)
    executors.append(ex)
    for p in PROMPTS:
        ref = local.prompt_logits(p)
        assert (ex.gpu.prompt_logits(p) - ref).abs().max().item() < 1e-3 * ref.abs().max().item(), p
    assert [o.token_ids for o in ex.gpu.generate(PROMPTS, [GREEDY] * 3)] == \
        [o.token_ids for o in local.generate(PROMPTS, GREEDY)]
    local.shutdown()


def test_dense_mode_with_profiled_placement_equals_the_in_process_engine(calibrated_tiny: Path, executors) -> None:
    local = _local(calibrated_tiny)
    ex = Executors(calibrated_tiny, hot_fraction=0.4)
    executors.append(ex)
    assert [o.token_ids for o in ex.gpu.generate(PROMPTS, [GREEDY] * 3)] == \
        [o.token_ids for o in local.generate(PROMPTS, GREEDY)]
    local.shutdown()
