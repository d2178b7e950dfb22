"""Placement the runtime uses: the memory budget decides the hot set (fraction or solver), solver answers are
cached and reused, and the GPU executor holds exactly the solver's neurons while the engine stays exact."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime import LLM, EngineConfig
from runtime.hybrid import placement
from runtime.hybrid.placement import BudgetError, place
from runtime.model.config import ModelConfig
from runtime.sparsity import artifacts
from scheduler.placement import place_ilp, place_topk

# The tiny model (d=64, 160 neurons x 3 layers, untied head, vocab 257) in fp32 with 2 slots of 64 positions:
# dense part (attention, norms, embeddings, head) 280,832 B + KV cache 2 x 3 x 2 x 16 x 64 x 2 x 4 = 98,304 B;
# a neuron's 3 rows 768 B. A 0.5 MiB budget leaves (524,288 - 379,136) // 768 = 189 neurons: 63 per layer.
SMALL = dict(max_model_len=64, max_batch_size=2)
CAPACITY = 189


def _config(model_dir: Path, **options) -> EngineConfig:
    return EngineConfig.resolve(model=str(model_dir), **SMALL, **options).for_model(str(model_dir), 256)


def _frequencies(model_dir: Path) -> list[np.ndarray]:
    cal, _ = artifacts.load(model_dir, "calibration-s50", "")
    return [cal[f"layer_{i}.frequency"] for i in range(3)]


def test_a_budget_that_cannot_hold_the_hot_fraction_is_refused_with_what_fits(tiny_model_dir: Path) -> None:
    cfg = ModelConfig.load(tiny_model_dir)
    with pytest.raises(BudgetError, match=r"at most 63 hot neurons per layer fit \(hot_fraction <= 0\.394\)"):
        LLM(str(tiny_model_dir), hot_fraction=1.0, memory_budget_mb=0.5, weights="fp32", **SMALL)   # before Ray
    assert [len(s.hot) for s in place(_config(tiny_model_dir, hot_fraction=0.35, memory_budget_mb=0.5, weights="fp32"),
                                      tiny_model_dir, cfg)] == [56, 56, 56]
    # Dense layers of quantized weights split in whole 32-neuron blocks (0.35 of 5 blocks rounds to 2: 64 > 63).
    with pytest.raises(BudgetError, match=r"at most 32 hot neurons per layer fit \(hot_fraction <= 0\.200; dense "):
        place(_config(tiny_model_dir, hot_fraction=0.35, memory_budget_mb=0.5, weights="q8"), tiny_model_dir, cfg)
    assert [len(s.hot) for s in place(_config(tiny_model_dir, hot_fraction=0.2, memory_budget_mb=0.5, weights="q8"),
                                      tiny_model_dir, cfg)] == [32, 32, 32]
    with pytest.raises(BudgetError, match="not even the dense part"):
        place(_config(tiny_model_dir, hot_fraction=0.1, memory_budget_mb=0.2), tiny_model_dir, cfg)
    with pytest.raises(artifacts.MissingArtifactError, match="pinfer prepare"):   # the solver needs frequencies
        place(_config(tiny_model_dir, placement="topk", memory_budget_mb=0.5), tiny_model_dir, cfg)


def test_solver_placement_fills_the_budget_and_is_cached(calibrated_tiny: Path, monkeypatch) -> None:
    cfg, freqs = ModelConfig.load(calibrated_tiny), _frequencies(calibrated_tiny)
    topk = place(_config(calibrated_tiny, placement="topk", memory_budget_mb=0.5), calibrated_tiny, cfg)
    want = place_topk(freqs, CAPACITY)
    assert sum(len(s.hot) for s in topk) == CAPACITY
    assert all(np.array_equal(a.hot, b.hot) and np.array_equal(a.cold, b.cold) for a, b in zip(topk, want))
    ilp = place(_config(calibrated_tiny, placement="ilp", memory_budget_mb=0.5, min_per_layer=75), calibrated_tiny, cfg)
    assert all(len(s.hot) == 0 or len(s.hot) >= 75 for s in ilp) and sum(len(s.hot) for s in ilp) <= CAPACITY
    assert len(list((calibrated_tiny / "sparsity").glob("placement-*.json"))) >= 2

    def unreachable(*args, **kwargs):
        raise AssertionError("solved again instead of reusing the cached answer")

    monkeypatch.setattr(placement, "place_topk", unreachable)
    monkeypatch.setattr(placement, "place_ilp", unreachable)
    again = place(_config(calibrated_tiny, placement="topk", memory_budget_mb=0.5), calibrated_tiny, cfg)
    assert all(np.array_equal(a.hot, b.hot) for a, b in zip(again, topk))
    with_tau = _config(calibrated_tiny, placement="topk", memory_budget_mb=0.5, tau_hot=0.6)
    with pytest.raises(AssertionError, match="solved again"):              # other inputs: another answer
        place(with_tau, calibrated_tiny, cfg)


def test_pinfer_place_solves_what_the_engine_then_reuses(calibrated_tiny: Path, monkeypatch) -> None:
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "place", "--model", str(calibrated_tiny), "--placement",
                        "ilp", "--memory-budget-mb", "0.5", "--min-per-layer", "70", "--max-model-len", "64",
                        "--max-batch-size", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ilp:" in r.stdout and "of activations" in r.stdout
    monkeypatch.setattr(placement, "place_ilp", lambda *a, **k: pytest.fail("the CLI's answer was not reused"))
    splits = place(_config(calibrated_tiny, placement="ilp", memory_budget_mb=0.5, min_per_layer=70), calibrated_tiny,
                   ModelConfig.load(calibrated_tiny))
    want = place_ilp(_frequencies(calibrated_tiny), CAPACITY, 70)
    assert all(np.array_equal(a.hot, b.hot) for a, b in zip(splits, want))


def test_the_gpu_executor_holds_exactly_the_solvers_neurons_and_stays_exact(calibrated_tiny: Path) -> None:
    local = LLM(str(calibrated_tiny), weights="fp32", num_threads=1)
    prompts = ["hello tiny model", "def f(a, b):"]
    want = place_topk(_frequencies(calibrated_tiny), CAPACITY)
    llm = LLM(str(calibrated_tiny), weights="fp32", placement="topk", memory_budget_mb=0.5, **SMALL)
    try:
        held = llm.hot_neurons()
        assert [len(h) for h in held] == [len(s.hot) for s in want]
        assert all(np.array_equal(h, s.hot) for h, s in zip(held, want))
        for p in prompts:
            assert (llm.prompt_logits(p) - local.prompt_logits(p)).abs().max().item() < 1e-4
    finally:
        llm.shutdown()
        local.shutdown()
