"""The ``pinfer`` command line, run as a user would run it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PINFER = [sys.executable, "-m", "runtime.cli"]


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*PINFER, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("sub", [[], ["generate"], ["serve"], ["stop"], ["convert"], ["models"], ["download"]])
def test_every_subcommand_has_help(sub: list[str]) -> None:
    r = run(*sub, "--help")
    assert r.returncode == 0 and "usage: pinfer" in r.stdout


def test_generate_default_model_greedy() -> None:
    r = run("generate", "def fib(n):", "--max-tokens", "12", "--json", "--local")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) == 12 and out["finish_reason"] == "length"
    assert "return" in out["text"] or "if" in out["text"]       # SmolLM2 writes code for this prompt


def test_generate_bad_input_is_a_clear_error(tiny_model_dir: Path) -> None:
    r = run("generate", "hi", "--model", str(tiny_model_dir), "--top-p", "2")
    assert r.returncode == 2 and "top_p must be in (0, 1]" in r.stderr
    r = run("generate", "hi", "--model", "no-such-model")
    assert r.returncode == 2 and "Known models" in r.stderr


def test_served_engine_flags_that_contradict_each_other_are_refused() -> None:
    r = run("serve", "--replicas", "2", "--local", "--http")
    assert r.returncode == 2 and "--replicas runs hybrid engines" in r.stderr
    r = run("eval", "humaneval", "--engine", "pinfer-engine", "--sparsity", "gate")
    assert r.returncode == 2 and "drop the engine flags ['sparsity']" in r.stderr


def test_models_lists_the_registry() -> None:
    r = run("models")
    assert r.returncode == 0 and "smollm2-135m" in r.stdout and "qwen2.5-coder-1.5b" in r.stdout


def test_convert_gguf_gives_a_loadable_directory(tmp_path: Path) -> None:
    from runtime import LLM
    from runtime.model.weights import load_transformer
    from tests.conftest import gguf_location

    directory, name = gguf_location("smollm2-135m")
    r = run("convert", str(Path(directory) / name), str(tmp_path / "smol"))
    assert r.returncode == 0, r.stderr
    assert {p.name for p in (tmp_path / "smol").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    converted, registry_model = LLM(str(tmp_path / "smol")), LLM("smollm2-135m")
    a = load_transformer(converted.model_dir).lm_head_t
    assert torch.equal(a, load_transformer(registry_model.model_dir).lm_head_t)
