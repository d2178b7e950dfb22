"""Load a model directory (float safetensors, or a quantized container) into a Transformer."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from runtime.model.checkpoint import Checkpoint
from runtime.model.config import ModelConfig
from runtime.model.kernels.quantized import QMatrix
from runtime.model.qweights import open_quantized
from runtime.model.transformer import Transformer, rope_inv_freq

logger = logging.getLogger(__name__)


def load_transformer(model_dir: str | Path, dtype: torch.dtype = torch.float32,
                     cfg: ModelConfig | None = None, with_ffn: bool = True, weights: str = "fp32",
                     dequantize: bool = False) -> Transformer:
    """Build the dense model from ``model_dir`` (config.json + *.safetensors) in ``dtype``.

    ``with_ffn=False`` leaves the FFN weights empty: the hybrid runtime keeps them in neuron shards.
    ``weights`` q8/q4: projections, embedding and head from the quantized container (the FFN always lives
    in shards then); ``dequantize`` turns them into ``dtype`` tensors (for devices without the kernels).
    """
    model_dir = Path(model_dir)
    cfg = cfg or ModelConfig.load(model_dir)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.inv_freq = rope_inv_freq(cfg)
    if weights != "fp32":
        return _load_quantized(model, model_dir, weights, dtype, dequantize)
    ckpt = Checkpoint(model_dir)

    def t(name: str) -> torch.Tensor:                   # [out, in] on disk -> [in, out] in memory
        return ckpt.get(name, dtype).t().contiguous()

    model.norm.data = ckpt.get("model.norm.weight", dtype)
    tied = cfg.tie_word_embeddings or "lm_head.weight" not in ckpt
    model.lm_head_t.data = t("model.embed_tokens.weight" if tied else "lm_head.weight")
    if tied:
        model.embed = None
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
    model.dtype = dtype
    logger.info("loaded %s: %d layers, d=%d, n_ff=%d, %s", model_dir, cfg.num_hidden_layers,
                cfg.hidden_size, cfg.intermediate_size, dtype)
    return model.eval()


def _load_quantized(model: Transformer, model_dir: Path, weights: str, dtype: torch.dtype,
                    dequantize: bool) -> Transformer:
    cfg = model.cfg
    q = open_quantized(model_dir, weights)

    def put(module: nn.Module, name: str, m: QMatrix, rows: bool = False) -> None:
        module._parameters.pop(name, None)                    # a quantized matrix is not a Parameter
        if dequantize:                                        # output rows -> input-major float (or rows)
            w = m.dequantize() if rows else m.dequantize().t().contiguous()
            setattr(module, name, nn.Parameter(w.to(dtype), requires_grad=False))
        else:
            setattr(module, name, m)

    d, hd = cfg.hidden_size, cfg.head_dim
    model.norm.data = q.floats("model.norm.weight").to(model.norm.dtype)
    head = q.matrix("lm_head", d)
    put(model, "lm_head_t", head)
    if "embed" in q:
        put(model, "embed", q.matrix("embed", d), rows=True)
    else:
        model.embed = None
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        layer.attn_norm.data = q.floats(p + "input_layernorm.weight")
        layer.ffn_norm.data = q.floats(p + "post_attention_layernorm.weight")
        put(layer.attn, "w_qkv_t", q.matrix(p + "self_attn.qkv", d))
        put(layer.attn, "w_o_t", q.matrix(p + "self_attn.o", cfg.num_attention_heads * hd))
        if cfg.attention_bias:
            layer.attn.b_qkv.data = q.floats(p + "self_attn.qkv_bias")
        layer.ffn.w_gate_up_t.data = torch.empty(d, 0, 2 if cfg.is_gated_ffn else 1)
        layer.ffn.w_down_t.data = torch.empty(0, d)
    if dequantize:
        model.to(dtype)
    model.dtype = dtype if dequantize else torch.float32
    logger.info("loaded %s: %d layers, %s weights (%.1f MB)%s", model_dir, cfg.num_hidden_layers, weights,
                model.weight_bytes() / 1e6, f", dequantized to {dtype}" if dequantize else "")
    return model.eval()
