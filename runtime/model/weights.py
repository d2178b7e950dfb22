"""Load a Hugging Face-layout safetensors checkpoint (memory-mapped, never pickle) into a Transformer."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open

from runtime.model.config import ModelConfig
from runtime.model.transformer import Transformer, rope_inv_freq

logger = logging.getLogger(__name__)


def _safetensors_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt*")]
        hint = f" (found {pickles}: pickle checkpoints are never loaded; convert them to safetensors)" if pickles else ""
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}{hint}")
    return files


class Checkpoint:
    """Tensor lookup across (possibly sharded) safetensors files, each opened memory-mapped once."""

    def __init__(self, model_dir: Path) -> None:
        self._handles = [safe_open(str(f), framework="pt") for f in _safetensors_files(model_dir)]
        self._where = {k: h for h in self._handles for k in h.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"checkpoint has no tensor {name!r}")
        return self._where[name].get_tensor(name).to(dtype)


def load_transformer(model_dir: str | Path, dtype: torch.dtype = torch.float32,
                     cfg: ModelConfig | None = None, with_ffn: bool = True) -> Transformer:
    """Build the dense model from ``model_dir`` (config.json + *.safetensors) in ``dtype``.

    ``with_ffn=False`` leaves the FFN weights empty: the hybrid runtime keeps them in neuron shards.
    """
    model_dir = Path(model_dir)
    cfg = cfg or ModelConfig.load(model_dir)
    ckpt = Checkpoint(model_dir)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.inv_freq = rope_inv_freq(cfg)

    def t(name: str) -> torch.Tensor:                   # [out, in] on disk -> [in, out] in memory
        return ckpt.get(name, dtype).t().contiguous()

    model.norm.data = ckpt.get("model.norm.weight", dtype)
    tied = cfg.tie_word_embeddings or "lm_head.weight" not in ckpt
    model.lm_head_t.data = t("model.embed_tokens.weight" if tied else "lm_head.weight")
    if tied:
        model.embed = model.lm_head_t.t()
    else:
        model.embed.data = ckpt.get("model.embed_tokens.weight", dtype)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        layer.attn_norm.data = ckpt.get(p + "input_layernorm.weight", dtype)
        layer.ffn_norm.data = ckpt.get(p + "post_attention_layernorm.weight", dtype)
        a = p + "self_attn."
        layer.attn.w_qkv_t.data = torch.cat([t(a + f"{n}_proj.weight") for n in "qkv"], dim=1)
        if cfg.attention_bias:
            layer.attn.b_qkv.data = torch.cat([ckpt.get(a + f"{n}_proj.bias", dtype) for n in "qkv"])
        layer.attn.w_o_t.data = t(a + "o_proj.weight")
        m = p + "mlp."
        mats = ["gate", "up"] if cfg.is_gated_ffn else ["up"]
        if not with_ffn:
            layer.ffn.w_gate_up_t.data = torch.empty(cfg.hidden_size, 0, len(mats), dtype=dtype)
            layer.ffn.w_down_t.data = torch.empty(0, cfg.hidden_size, dtype=dtype)
            continue
        layer.ffn.w_gate_up_t.data = torch.stack([t(m + f"{n}_proj.weight") for n in mats], dim=2)  # [d, n_ff, 2]
        layer.ffn.w_down_t.data = t(m + "down_proj.weight")                                           # [n_ff, d]
    logger.info("loaded %s: %d layers, d=%d, n_ff=%d, %s", model_dir, cfg.num_hidden_layers,
                cfg.hidden_size, cfg.intermediate_size, dtype)
    return model.eval()
