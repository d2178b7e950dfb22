"""GGUF -> pinfer model directory (``config.json``, ``model.safetensors``, ``tokenizer.json``).

The output uses Hugging Face tensor names and layout, so transformers can load the same directory:
llama.cpp's row permutation of Q/K in ``llama`` GGUFs is undone here, and every model then uses
rotate-half (NeoX) rope.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from runtime.model.config import ModelConfig
from runtime.model.qweights import QUANTIZED_FORMATS, weights_path, write_quantized
from runtime.model.tokenizer import build_tokenizer_json

logger = logging.getLogger(__name__)

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
SUPPORTED_ARCHS = ("llama", "qwen2")


def _field(fields: dict[str, Any], key: str, default: Any = None) -> Any:
    f = fields.get(key)
    return default if f is None else f.contents()


def _hf_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")                  # suffix: weight | bias
    if base.startswith("blk."):
        _, layer, kind = base.split(".", 2)
        if kind not in _LAYER_NAMES:
            raise ValueError(f"unsupported GGUF tensor {gguf_name!r}")
        return f"model.layers.{layer}.{_LAYER_NAMES[kind]}.{suffix}"
    if base not in _TOP_NAMES:
        raise ValueError(f"unsupported GGUF tensor {gguf_name!r}")
    return f"{_TOP_NAMES[base]}.{suffix}"


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation: rows per head go from interleaved pairs back to halves."""
    out_dim = w.shape[0]
    half = out_dim // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf_config(fields: dict[str, Any]) -> ModelConfig:
    arch = _field(fields, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} not supported; supported: {SUPPORTED_ARCHS}")
    n_vocab = len(fields["tokenizer.ggml.tokens"].data)
    eos = _field(fields, "tokenizer.ggml.eos_token_id")
    eot = _field(fields, "tokenizer.ggml.eot_token_id")
    eos_ids = [i for i in dict.fromkeys([eos, eot]) if i is not None]
    n_head = int(_field(fields, f"{arch}.attention.head_count"))
    d = int(_field(fields, f"{arch}.embedding_length"))
    return ModelConfig(
        model_type=arch,
        vocab_size=n_vocab,
        hidden_size=d,
        intermediate_size=int(_field(fields, f"{arch}.feed_forward_length")),
        num_hidden_layers=int(_field(fields, f"{arch}.block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=int(_field(fields, f"{arch}.attention.head_count_kv", n_head)),
        max_position_embeddings=int(_field(fields, f"{arch}.context_length")),
        rms_norm_eps=float(_field(fields, f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(fields, f"{arch}.rope.freq_base", 10000.0)),
        head_dim=int(_field(fields, f"{arch}.attention.key_length", d // n_head)),
        attention_bias=False,           # set from the tensors below
        tie_word_embeddings=False,      # set from the tensors below
        bos_token_id=_field(fields, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_ids,
    )


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32",
                 quantized: tuple[str, ...] = QUANTIZED_FORMATS) -> Path:
    """Dequantize a GGUF into a pinfer model directory, plus the quantized containers ``quantized`` made
    from the GGUF's own blocks where they map exactly; returns ``out_dir``."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    reader = GGUFReader(str(gguf_path))
    fields = reader.fields
    cfg = read_gguf_config(fields)
    names = {t.name for t in reader.tensors}
    cfg.attention_bias = "blk.0.attn_q.bias" in names
    cfg.tie_word_embeddings = "output.weight" not in names

    values: dict[str, np.ndarray] = {}
    blocks: dict[str, tuple[np.ndarray, str]] = {}        # GGUF's raw blocks [rows, bytes] and type, by HF name
    for t in tqdm(reader.tensors, desc=f"dequantize {Path(gguf_path).name}", unit="tensor", leave=False):
        shape = [int(s) for s in reversed(t.shape)]
        w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        raw = np.asarray(t.data).reshape(shape[0], -1) if len(shape) == 2 else None
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if cfg.model_type == "llama" and kind in ("attn_q", "attn_k"):
            heads = cfg.num_attention_heads if kind == "attn_q" else cfg.num_key_value_heads
            w = _unpermute_rope_rows(w, heads)
            raw = None if raw is None else _unpermute_rope_rows(raw, heads)
        name = _hf_name(t.name)
        values[name] = w
        if raw is not None:
            blocks[name] = (raw, t.tensor_type.name)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_json, tokenizer_cfg = build_tokenizer_json(fields)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_cfg, ensure_ascii=False, indent=1))
    state = {k: torch.from_numpy(v).to(torch_dtype) for k, v in values.items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "source": Path(gguf_path).name})
    del state
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(hf, indent=1))

    def get(name: str) -> tuple[np.ndarray, np.ndarray | None, str | None]:
        raw, kind = blocks.get(name, (None, None))
        return values[name], raw, kind

    made = []
    for weights in quantized:
        try:
            write_quantized(weights_path(out, weights), cfg, weights, get, values.__contains__, Path(gguf_path).name)
            made.append(weights)
        except ValueError as e:                        # e.g. rows that are not whole 32-element blocks
            logger.warning("no %s weights for %s (fp32 is unaffected): %s", weights, Path(gguf_path).name, e)
    logger.info("converted %s -> %s (%d tensors, %s; quantized: %s)", gguf_path, out, len(values), dtype,
                ", ".join(made) or "none")
    return out
