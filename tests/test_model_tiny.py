"""Dense engine on tiny random-weight checkpoints in Hugging Face layout: every architecture variant
against transformers, and the KV-cache / batching invariants."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from runtime import LLM, SamplingParams
from runtime.core.runners import DenseRunner
from runtime.model.transformer import StepInput
from runtime.model.weights import load_transformer
from tests.conftest import make_tiny_model

VARIANTS = {
    "llama": dict(model_type="llama"),
    "qwen2-bias": dict(model_type="qwen2"),
    "relu-llama": dict(model_type="llama", hidden_act="relu"),      # ReluLLaMA / ProSparse-style ReGLU
    "tied": dict(model_type="llama", tie=True),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / request.param, **VARIANTS[request.param])


def _hf(model_dir: Path):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def test_hf_directory_matches_transformers(variant: Path) -> None:
    llm, hf = LLM(str(variant), weights="fp32"), _hf(variant)
    ids = llm.tokenizer.encode("hello tiny model, how are you?")
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (llm.token_logits(ids) - ref).abs().max().item() < 1e-4
    out = llm.generate("hello", SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0]
    cfg = copy.deepcopy(hf.generation_config)
    cfg.eos_token_id, cfg.pad_token_id, cfg.do_sample = -1, 0, False
    prompt = torch.tensor([llm.tokenizer.encode("hello")])
    with torch.inference_mode():
        ref_ids = hf.generate(prompt, generation_config=cfg, max_new_tokens=16)[0, prompt.shape[1]:].tolist()
    assert out.token_ids == ref_ids


def test_incremental_decode_equals_full_forward(tiny_model_dir: Path) -> None:
    llm = LLM(str(tiny_model_dir), weights="fp32")
    runner = DenseRunner(load_transformer(tiny_model_dir))
    ids = llm.tokenizer.encode("the kv cache must not change anything")
    full = llm.token_logits(ids)
    cache = runner.new_cache(1, len(ids))
    split = 5
    steps = [runner.forward(torch.tensor([ids[:split]]), StepInput.build([0], split, [0]), cache)[0]]
    for pos in range(split, len(ids)):
        steps.append(runner.forward(torch.tensor([[ids[pos]]]), StepInput.build([pos], 1, [0]), cache)[0])
    assert torch.allclose(torch.stack(steps), full[split - 1:], atol=1e-5)


def test_batched_requests_equal_single_requests(tiny_model_dir: Path) -> None:
    """Sequences of different lengths decoded together give what each gives alone (masking is right)."""
    llm = LLM(str(tiny_model_dir), max_batch_size=8)
    prompts = ["a", "a much longer prompt than the first", "mid length one", "x" * 40]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    together = llm.generate(prompts, params)
    alone = [llm.generate(p, params)[0] for p in prompts]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]


def test_bfloat16_tracks_float32(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("runtime.config.native_bf16", lambda: True)      # the bf16 arithmetic on any CPU
    ids = LLM(str(tiny_model_dir)).tokenizer.encode("bf16 should be close")
    f32 = LLM(str(tiny_model_dir), weights="fp32").token_logits(ids)
    b16 = LLM(str(tiny_model_dir), weights="fp32", dtype="bfloat16").token_logits(ids)
    assert b16.dtype == torch.float32 and torch.isfinite(b16).all()
    assert (b16 - f32).abs().max().item() < 0.1 * f32.abs().max().item()
    assert (b16.argmax(-1) == f32.argmax(-1)).float().mean().item() >= 0.8
