"""Shared fixtures: a tiny random-weight model directory, and the real SmolLM2 with its HF twin."""
from __future__ import annotations

import importlib.util
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import runtime  # noqa: F401  (before torch: it sets OpenMP's wait as every pinfer process has it)
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*GGUF.*")

TINY_EOS = "<|endoftext|>"


def write_tiny_tokenizer(out: Path) -> None:
    """A byte-level BPE over the 256 byte symbols (no merges) plus an EOS token."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(TINY_EOS, special=True)])
    tok.save(str(out / "tokenizer.json"))
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}" \
               "{% if add_generation_prompt %}<assistant>{% endif %}"
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": TINY_EOS, "bos_token": None, "add_bos_token": False, "chat_template": template}))


def make_tiny_model(out: Path, model_type: str = "llama", hidden_act: str = "silu", seed: int = 0,
                    tie: bool = False) -> Path:
    """A random-weight LLaMA/Qwen2-style model in Hugging Face layout (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(out)
    vocab, d, ff, n_layers, n_heads, n_kv, hd = 257, 64, 160, 3, 4, 2, 16
    cfg = {
        "architectures": ["Qwen2ForCausalLM" if model_type == "qwen2" else "LlamaForCausalLM"],
        "model_type": model_type, "vocab_size": vocab, "hidden_size": d, "intermediate_size": ff,
        "num_hidden_layers": n_layers, "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": hidden_act,
        "tie_word_embeddings": tie, "bos_token_id": None, "eos_token_id": 256,
    }
    if model_type == "llama":
        cfg["attention_bias"] = False
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    sd = {"model.embed_tokens.weight": rnd(vocab, d, scale=1.0), "model.norm.weight": 1 + rnd(d)}
    if not tie:
        sd["lm_head.weight"] = rnd(vocab, d)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + rnd(d)
        sd[p + "post_attention_layernorm.weight"] = 1 + rnd(d)
        for name, rows in (("q", n_heads * hd), ("k", n_kv * hd), ("v", n_kv * hd)):
            sd[p + f"self_attn.{name}_proj.weight"] = rnd(rows, d, scale=0.2)
            if model_type == "qwen2":
                sd[p + f"self_attn.{name}_proj.bias"] = rnd(rows)
        sd[p + "self_attn.o_proj.weight"] = rnd(d, n_heads * hd)
        sd[p + "mlp.gate_proj.weight"] = rnd(ff, d, scale=0.2)
        sd[p + "mlp.up_proj.weight"] = rnd(ff, d, scale=0.2)
        sd[p + "mlp.down_proj.weight"] = rnd(d, ff)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def calibrated_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with its activation profile and the 50% calibration (gate thresholds, frequencies)."""
    from runtime.model.tokenizer import TextTokenizer
    from runtime.model.weights import load_transformer
    from runtime.sparsity.profile import calibrate, profile

    d = make_tiny_model(tmp_path_factory.mktemp("calibrated") / "tiny", seed=3)
    profile(load_transformer(d), d, TextTokenizer(d).encode, num_tokens=2048)
    calibrate(d, 0.5)
    return d


@pytest.fixture
def executors() -> Iterator[list]:
    """Executor pairs a test makes (tests/test_executors.py: Executors), closed after it."""
    made: list = []
    yield made
    for e in made:
        e.close()


def gguf_location(name: str) -> tuple[str, str]:
    """(directory, file name) of a registry model's GGUF, for transformers' own GGUF loader."""
    from runtime.model.registry import _verified_gguf, load_registry

    path = _verified_gguf(load_registry()[1][name])
    return str(path.parent), path.name


def hf_from_gguf(name: str):
    """transformers' tokenizer and fp32 model, loaded by transformers itself from the same GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    directory, file = gguf_location(name)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, dtype=torch.float32).eval()
    return tok, model


def has_package_data(name: str) -> bool:
    from runtime.model.registry import load_registry

    first = load_registry()[1][name].files[0].split("/")[0]
    return importlib.util.find_spec(first) is not None
