"""The two executors in this process, without Ray: the hybrid runtime's exactness (fp32, chunked prefill),
bfloat16, gate mode, and a failing cold side."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runtime import LLM, EngineConfig, SamplingParams
from runtime.errors import EngineDeadError
from runtime.hybrid.in_process import ExecutorPair
from runtime.model.config import ModelConfig

PROMPTS = ["hello tiny model", "x" * 40, "def f(a, b):\n    return"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


class Executors(ExecutorPair):
    """The executor pair for a model directory and engine options; fp32 weights (the exactness reference) unless
    ``weights`` says otherwise."""

    def __init__(self, model_dir: Path, max_rows: int = 256, **options) -> None:
        options.setdefault("weights", "fp32")
        config = EngineConfig.resolve(model=str(model_dir), is_hybrid=True, **options).for_model(
            str(model_dir), ModelConfig.load(model_dir).max_position_embeddings)
        super().__init__(config, model_dir, max_rows)


def _local(model_dir: Path, **options) -> LLM:
    return LLM(str(model_dir), num_threads=1, **{"weights": "fp32", **options})


def test_executors_equal_the_in_process_engine_with_chunked_prefill(tiny_model_dir: Path, executors) -> None:
    local = _local(tiny_model_dir)
    ex = Executors(tiny_model_dir, max_rows=4, hot_fraction=0.5)      # every prompt is longer than 4 rows
    executors.append(ex)
    for p in PROMPTS:
        assert (ex.gpu.prompt_logits(p) - local.prompt_logits(p)).abs().max().item() < 1e-4
    want = [o.token_ids for o in local.generate(PROMPTS, GREEDY)]
    assert [o.token_ids for o in ex.gpu.generate(PROMPTS, [GREEDY] * 3)] == want
    assert [len(n) for n in ex.gpu.hot_neurons()] == [80, 80, 80]      # 0.5 of 160 per layer
    local.shutdown()


def test_executors_in_bfloat16_track_the_in_process_engine(tiny_model_dir: Path, executors,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("runtime.config.native_bf16", lambda: True)      # the bf16 arithmetic on any CPU
    ex = Executors(tiny_model_dir, hot_fraction=0.3, dtype="bfloat16")
    executors.append(ex)
    local16, local32 = _local(tiny_model_dir, dtype="bfloat16"), _local(tiny_model_dir)
    for p in PROMPTS:
        ours, ref16, ref32 = ex.gpu.prompt_logits(p), local16.prompt_logits(p), local32.prompt_logits(p)
        assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
        scale = ref32.abs().max().item()
        assert (ours - ref16).abs().max().item() < 0.05 * scale          # two bf16 partials vs one bf16 sum
        assert (ours - ref32).abs().max().item() < 0.1 * scale
    local16.shutdown(), local32.shutdown()


def test_executors_in_gate_mode_equal_the_in_process_gate_engine(calibrated_tiny: Path, executors) -> None:
    gate = dict(sparsity="gate", activation_sparsity=0.5)
    local_gate, local_dense = _local(calibrated_tiny, **gate), _local(calibrated_tiny)
    ex = Executors(calibrated_tiny, hot_fraction=0.4, **gate)
    executors.append(ex)
    want = [o.token_ids for o in local_gate.generate(PROMPTS, GREEDY)]
    assert [o.token_ids for o in ex.gpu.generate(PROMPTS, [GREEDY] * 3)] == want
    assert want != [o.token_ids for o in local_dense.generate(PROMPTS, GREEDY)]     # gate mode really skips
    assert 0.3 < local_gate.achieved_sparsity() < 0.7
    local_gate.shutdown(), local_dense.shutdown()


def test_a_failing_cold_side_fails_the_request_and_a_new_one_heals(tiny_model_dir: Path, executors) -> None:
    ex = Executors(tiny_model_dir, hot_fraction=0.5)
    executors.append(ex)
    want = ex.gpu.generate(PROMPTS[:1], [GREEDY])[0].token_ids

    def broken(*args, **kwargs):
        raise RuntimeError("cold neurons lost")

    ex.cpu.shard.partial = broken
    with pytest.raises(EngineDeadError, match="CPU executor failed mid-request.*cold neurons lost"):
        ex.gpu.generate(PROMPTS[:1], [GREEDY])
    assert ex.gpu.scheduler is None                                  # detached until a CPU executor connects
    ex.cpu.shutdown()
    ex.cpu = ex.attach_cpu()
    assert ex.gpu.generate(PROMPTS[:1], [GREEDY])[0].token_ids == want
