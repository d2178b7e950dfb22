"""One engine config: YAML, then flags, then keywords; validated once; every field reaches the CLI."""
from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from runtime.cli.args import add_engine_args, engine_config
from runtime.config import EngineConfig


def test_yaml_unknown_keys_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "engine.yaml"
    path.write_text(yaml.safe_dump({"hot_fraction": 0.3, "hot_fractoin": 0.4}))
    with pytest.raises(ValueError, match=r"unknown keys \['hot_fractoin'\]; known: .*hot_fraction"):
        EngineConfig.load(path)
    path.write_text(yaml.safe_dump({"hot_fraction": 0.3, "dtype": "bf16"}))
    cfg = EngineConfig.load(path)
    assert cfg.hot_fraction == 0.3 and cfg.dtype == "bfloat16"          # aliases are normalized once


def test_the_shipped_yaml_names_every_option() -> None:
    raw = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "engine.yaml").read_text())
    assert set(raw) == set(EngineConfig.option_names())
    assert EngineConfig.load() == EngineConfig()                          # the file states the defaults


def test_bad_values_are_reported_together() -> None:
    with pytest.raises(ValueError) as e:
        EngineConfig(hot_fraction=1.5, dtype="fp16", max_batch_size=0, sparsity="magic")
    for part in ("hot_fraction must be in [0, 1], got 1.5", "dtype must be one of float32, bfloat16; got 'fp16'",
                 "max_batch_size must be >= 1, got 0", "sparsity must be one of"):
        assert part in str(e.value)
    with pytest.raises(ValueError, match="hot_fraction must be a number, got '0.5'"):
        EngineConfig(hot_fraction="0.5")
    with pytest.raises(ValueError, match="placement 'topk' needs memory_budget_mb and/or tau_hot"):
        EngineConfig(placement="topk")


def test_resolve_layers_options_and_infers_the_hybrid_runtime() -> None:
    base = EngineConfig(dtype="bfloat16", max_batch_size=4)
    cfg = EngineConfig.resolve(base, max_batch_size=8, max_model_len=None)   # None: not given
    assert (cfg.dtype, cfg.max_batch_size, cfg.max_model_len, cfg.is_hybrid) == ("bfloat16", 8, None, False)
    assert EngineConfig.resolve(base, hot_fraction=0.3).is_hybrid              # a hybrid option selects it
    assert not EngineConfig.resolve(base, hot_fraction=0.3, is_hybrid=False).is_hybrid
    with pytest.raises(TypeError, match="unknown engine options \\['hot_fractoin'\\]"):
        EngineConfig.resolve(base, hot_fractoin=0.3)


def test_for_model_decides_what_was_left_open() -> None:
    cfg = EngineConfig(max_model_len=100_000).for_model("m", context_len=2048)
    assert cfg.model == "m" and cfg.max_model_len == 2048 and cfg.num_threads >= 1
    assert cfg.gpu_threads == 1 and cfg.cpu_threads >= 1
    assert EngineConfig(max_model_len=512).for_model("m", 2048).max_model_len == 512
    # the KV-cache budget: 2048 positions a slot, never less than one request at full context
    assert cfg.kv_cache_tokens == 16 * 2048
    assert EngineConfig(max_batch_size=1).for_model("m", 32768).kv_cache_tokens == 32768
    assert EngineConfig(max_batch_size=4, kv_cache_tokens=1000).for_model("m", 4096).kv_cache_tokens == 1000
    with pytest.raises(ValueError, match="kv_cache_tokens must be >= 2"):
        EngineConfig(kv_cache_tokens=0)


def test_every_option_is_a_flag_and_flags_become_the_config() -> None:
    p = argparse.ArgumentParser()
    add_engine_args(p, is_hybrid=True)
    flags = {a.dest: a for a in p._actions}
    cli_fields = [f.name for f in fields(EngineConfig) if f.metadata["cli"]]
    assert set(cli_fields) <= set(flags) and all(flags[name].help for name in cli_fields)
    args = p.parse_args(["--sparsity", "gate", "--activation-sparsity", "0.5", "--max-model-len", "512",
                         "--threads", "1", "--memory-budget-mb", "64.5"])
    cfg = engine_config(args)
    assert (cfg.sparsity, cfg.activation_sparsity, cfg.max_model_len, cfg.num_threads, cfg.memory_budget_mb,
            cfg.is_hybrid) == ("gate", 0.5, 512, 1, 64.5, True)
    assert not engine_config(p.parse_args(["--local"])).is_hybrid
    p = argparse.ArgumentParser()
    add_engine_args(p, is_hybrid=None)                                     # eval: what the options imply
    assert not engine_config(p.parse_args([])).is_hybrid and engine_config(p.parse_args(["--hot-fraction", "0"])).is_hybrid


@pytest.mark.parametrize("sub", [["generate", "x"], ["serve"], ["batch", "--input", "i", "--output", "o"],
                                 ["eval", "humaneval"], ["place"]])
def test_each_engine_command_takes_every_engine_flag(sub: list[str]) -> None:
    r = subprocess.run([sys.executable, "-m", "runtime.cli", *sub[:1 if sub[0] != "eval" else 2], "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for f in fields(EngineConfig):
        if f.metadata["cli"]:
            assert (f.metadata["flag"] or "--" + f.name.replace("_", "-")) in r.stdout, (sub, f.name)


def test_llm_rejects_unknown_options(tiny_model_dir: Path) -> None:
    from runtime import LLM

    with pytest.raises(TypeError, match="unknown engine options"):
        LLM(str(tiny_model_dir), hot_fractoin=0.5)
    llm = LLM(str(tiny_model_dir), max_model_len=64, config=EngineConfig(max_batch_size=2))
    assert (llm.config.max_model_len, llm.config.max_batch_size, llm.max_model_len) == (64, 2, 64)
    llm.shutdown()


def test_bfloat16_without_native_support_computes_in_float32_and_says_so_once(monkeypatch, caplog) -> None:
    import runtime.config as config_module

    monkeypatch.setattr(config_module, "native_bf16", lambda: False)
    monkeypatch.setattr(config_module, "_WARNED", [])
    cfg = EngineConfig(dtype="bfloat16", weights="fp32")
    with caplog.at_level("WARNING", logger="runtime.config"):
        assert cfg.cpu_dtype == "float32" and cfg.cpu_dtype == "float32"
    assert len([r for r in caplog.records if "emulated" in r.message]) == 1
    assert EngineConfig(dtype="bfloat16", weights="q8").cpu_dtype == "float32"
    monkeypatch.setattr(config_module, "native_bf16", lambda: True)
    assert cfg.cpu_dtype == "bfloat16" and cfg.dtype == "bfloat16"
