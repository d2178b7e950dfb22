"""Model hyper-parameters: one dataclass, read from a Hugging Face-style ``config.json``."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

# config.json keys that describe things pinfer does not use; accepted and ignored.
_IGNORED_HF_KEYS = {
    "architectures", "torch_dtype", "dtype", "transformers_version", "use_cache", "initializer_range",
    "pretraining_tp", "mlp_bias", "use_sliding_window", "sliding_window", "max_window_layers",
    "attention_dropout", "pad_token_id", "bos_token_id", "eos_token_id", "_name_or_path", "layer_types",
    "is_llama_config", "rope_interleaved", "num_experts_per_tok", "quantization_config", "auto_map",
    "qkv_bias", "hidden_dropout", "attention_probs_dropout_prob", "output_attentions",
    "output_hidden_states", "return_dict", "tokenizer_class", "model_max_length",
}
_ACTIVATIONS = {"silu", "relu", "gelu", "gelu_pytorch_tanh"}


@dataclass(slots=True)
class ModelConfig:
    """Decoder-only LLaMA/Qwen2-family transformer; names follow Hugging Face ``config.json``."""

    model_type: str                      # "llama" | "qwen2" | "mistral" ...
    vocab_size: int
    hidden_size: int                     # d
    intermediate_size: int               # n_ff, number of FFN neurons per layer
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    head_dim: int = 0                    # 0: hidden_size // num_attention_heads
    hidden_act: str = "silu"             # FFN activation; "relu" for ReluLLaMA / ProSparse
    is_gated_ffn: bool = True            # act(gate) * up (SwiGLU/ReGLU); False: act(up) only
    attention_bias: bool = False         # q/k/v biases (Qwen2)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} not supported; expected one of {sorted(_ACTIVATIONS)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` dict (or one that pinfer wrote); unknown keys are errors."""
        raw = dict(raw)
        rope = raw.pop("rope_parameters", None)        # transformers >= 5 nests the rope settings
        if rope:
            raw.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                raw.setdefault("rope_scaling", rope)
        if "qwen2" in str(raw.get("model_type", "")) and "attention_bias" not in raw:
            raw["attention_bias"] = True              # Qwen2 checkpoints always carry q/k/v biases
        eos = raw.pop("eos_token_id", None)
        if "eos_token_ids" not in raw:
            raw["eos_token_ids"] = [] if eos is None else (list(eos) if isinstance(eos, list) else [eos])
        bos = raw.pop("bos_token_id", None)
        raw.setdefault("bos_token_id", bos)
        if raw.get("head_dim") is None:
            raw.pop("head_dim", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in raw if k not in known and k not in _IGNORED_HF_KEYS)
        if unknown:
            raise ValueError(f"unknown config.json keys {unknown}; known: {sorted(known)}")
        return cls(**{k: v for k, v in raw.items() if k in known})

    @classmethod
    def load(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a model directory")
        return cls.from_dict(json.loads(path.read_text()))

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` that both pinfer and transformers read."""
        d = asdict(self)
        eos = d.pop("eos_token_ids")
        d["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        d["architectures"] = ["Qwen2ForCausalLM" if self.model_type == "qwen2" else "LlamaForCausalLM"]
        return d
