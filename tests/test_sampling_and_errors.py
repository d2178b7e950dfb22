"""Sampling controls and bad input: each has a visible effect or a clear error."""
from __future__ import annotations

from pathlib import Path

import pytest

from runtime import LLM, SamplingParams
from runtime.errors import InvalidRequestError
from runtime.sampling import Sampler


@pytest.fixture(scope="module")
def llm(tiny_model_dir: Path) -> LLM:
    return LLM(str(tiny_model_dir))


@pytest.mark.parametrize("bad", [
    dict(max_tokens=0), dict(max_tokens=-3), dict(max_tokens=2.5), dict(temperature=-0.1),
    dict(temperature=float("nan")), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(seed=-1),
    dict(seed=2**64), dict(seed=1e23), dict(stop=[""]), dict(stop=[3]),
])
def test_invalid_sampling_values_are_rejected(bad: dict) -> None:
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**bad)
    assert next(iter(bad)) in str(e.value)


def test_empty_prompt_is_rejected(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="non-empty"):
        llm.generate([""], SamplingParams(max_tokens=4))


def test_prompt_plus_max_tokens_beyond_context_is_rejected_before_any_work(llm: LLM) -> None:
    ctx = llm.max_model_len
    with pytest.raises(InvalidRequestError, match="exceeds the model context"):
        llm.generate(["ok", "y" * (ctx - 5)], SamplingParams(max_tokens=10))


def test_greedy_is_deterministic_and_equals_top_k_1(llm: LLM) -> None:
    greedy = llm.generate("abc", SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    again = llm.generate("abc", SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    topk1 = llm.generate("abc", SamplingParams(max_tokens=10, temperature=1.0, top_k=1, ignore_eos=True))[0]
    assert greedy.token_ids == again.token_ids == topk1.token_ids


def test_a_tiny_temperature_is_greedy(llm: LLM) -> None:
    """1e-40 would overflow the logits to inf and the probabilities to NaN: below 1e-5 it means greedy."""
    greedy = llm.generate("abc", SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    tiny = llm.generate("abc", SamplingParams(max_tokens=10, temperature=1e-40, ignore_eos=True))[0]
    assert tiny.token_ids == greedy.token_ids


def test_an_error_in_one_request_fails_it_alone(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Sampler.__call__

    def flaky(self: Sampler, logits):
        if self.params.seed == 13:
            raise RuntimeError("the sampler broke")
        return real(self, logits)

    monkeypatch.setattr(Sampler, "__call__", flaky)
    engine = llm._requests()
    bad = engine.submit("abc", SamplingParams(max_tokens=8, temperature=0.7, seed=13, ignore_eos=True))
    good = engine.submit("abc", SamplingParams(max_tokens=8, temperature=0.7, seed=1, ignore_eos=True))
    with pytest.raises(RuntimeError, match="the sampler broke"):
        bad.result()
    assert len(good.result().token_ids) == 8                        # batched with it, unharmed
    assert len(llm.generate("abc", SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids) == 3


def test_seed_makes_sampling_reproducible(llm: LLM) -> None:
    p = dict(max_tokens=24, temperature=1.5, ignore_eos=True)
    a = llm.generate("abc", SamplingParams(seed=7, **p))[0].token_ids
    b = llm.generate("abc", SamplingParams(seed=7, **p))[0].token_ids
    c = llm.generate("abc", SamplingParams(seed=8, **p))[0].token_ids
    assert a == b and a != c


def test_tiny_top_p_is_greedy(llm: LLM) -> None:
    greedy = llm.generate("abc", SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    nucleus = llm.generate("abc", SamplingParams(max_tokens=10, temperature=1.0, top_p=1e-6, seed=1,
                                                 ignore_eos=True))[0]
    assert nucleus.token_ids == greedy.token_ids


def test_max_tokens_and_stop_strings(llm: LLM) -> None:
    full = llm.generate("abc", SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 20
    stop = full.text[5:7]
    cut = llm.generate("abc", SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[:full.text.index(stop)]


def test_eos_ends_the_request(llm: LLM) -> None:
    eos = llm.eos_token_ids
    out = llm.generate("abc", SamplingParams(max_tokens=200, temperature=3.0, seed=3))[0]
    for seed in range(4, 60):                      # sample until some run hits EOS (vocab is 257 tokens)
        if out.finish_reason == "stop":
            break
        out = llm.generate("abc", SamplingParams(max_tokens=200, temperature=3.0, seed=seed))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in eos and out.stop_reason in eos
    assert "<|endoftext|>" not in out.text


def test_chat_uses_the_template(llm: LLM) -> None:
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<user>hi\n<assistant>"
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=3, temperature=0.0))
    assert out.prompt == prompt


def test_shut_down_llm_refuses_work(tiny_model_dir: Path) -> None:
    llm = LLM(str(tiny_model_dir))
    llm.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate("a")
