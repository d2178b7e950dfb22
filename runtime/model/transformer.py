"""Dense reference transformer (LLaMA / Qwen2 family): the equations, with the FFN kept neuron-major.

Float weights are stored input-major (``x @ W_t``): on these CPUs that matrix-vector product streams memory
about twice as fast as ``F.linear(x, W)``. FFN neuron j owns the column pair ``w_gate_up_t[:, j] =
(gate_j, up_j)`` and the row ``w_down_t[j]``, so a subset of neurons is an index along the n_ff axis
of both; the hybrid runtime splits layers along that axis. Quantized weights are ``QMatrix`` rows that
``linear`` runs through the block kernels; a quantized FFN always lives in neuron shards (``ffn_shard``).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime.model.activations import ACTIVATIONS
from runtime.model.config import ModelConfig
from runtime.model.kernels.prompt_rows import PROMPT_ROWS, prompt_linear
from runtime.model.kernels.quantized import QMatrix, attention_decode, embed_rows, qlinear

# (layer index, normed hidden [N, d]) -> FFN output [N, d]; the hybrid runtime plugs in here.
FFNFn = Callable[[int, torch.Tensor], torch.Tensor]
# A projection: an input-major float tensor [in, out], or quantized output rows [out, in / 32 blocks].
Weight = torch.Tensor | QMatrix


def linear(x: torch.Tensor, w: Weight, num_threads: int | None = None) -> torch.Tensor:
    """x [..., in] -> [..., out] (quantized: on ``num_threads`` kernel threads, default torch's count; a prompt's
    rows in float on the dequantized rows, see ``kernels/prompt_rows.py``)."""
    if isinstance(w, torch.Tensor):
        return x @ w
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] >= PROMPT_ROWS:                                       # a prompt: float products
        return prompt_linear(rows, w, num_threads or torch.get_num_threads()).view(*x.shape[:-1], -1)
    return qlinear(x, w, num_threads)


def lookup(embed: Weight, tokens: torch.Tensor) -> torch.Tensor:
    """Embedding rows of tokens [B, T] -> [B, T, d]."""
    return embed[tokens] if isinstance(embed, torch.Tensor) else embed_rows(embed, tokens)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * w, computed in fp32 as the reference implementations do."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim/2], with linear or llama3 scaling when configured."""
    hd = cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd)
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
        inv = torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    elif kind != "default":
        raise ValueError(f"rope scaling {kind!r} not supported (default, linear, llama3)")
    return inv


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Per-layer key/value buffers for ``num_slots`` sequences of up to ``max_len`` tokens."""

    def __init__(self, cfg: ModelConfig, num_slots: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        shape = (cfg.num_hidden_layers, num_slots, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)      # [L, S, KV, max_len, hd]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len


@dataclass(slots=True)
class StepInput:
    """Where a forward pass writes and reads: token positions and cache slots, shared by all layers."""

    positions: torch.Tensor      # [B, T] absolute position of each input token
    slots: torch.Tensor          # [B, T] cache slot of each row (repeated along T)
    rows: slice | torch.Tensor   # cache slots to read: a slice when they are consecutive (no copy)
    ctx_len: int                 # keys to attend over: max(position) + 1
    mask: torch.Tensor | None    # [B, 1, T, ctx_len] bool, None when plain causal over one sequence
    is_causal: bool

    @staticmethod
    def build(start: list[int], num_tokens: int, slots: list[int], device: torch.device | str = "cpu") -> "StepInput":
        """Rows b hold tokens at positions ``start[b] .. start[b] + num_tokens - 1`` in cache slot ``slots[b]``."""
        pos = torch.tensor(start, dtype=torch.long, device=device)[:, None] + torch.arange(num_tokens, device=device)
        slot_t = torch.tensor(slots, dtype=torch.long, device=device)
        slot = slot_t[:, None].expand(-1, num_tokens)
        rows: slice | torch.Tensor = slot_t
        if slots == list(range(slots[0], slots[0] + len(slots))):
            rows = slice(slots[0], slots[0] + len(slots))
        ctx = max(start) + num_tokens
        if len(start) == 1 and start[0] == 0:      # one fresh sequence: SDPA's causal mask is enough
            return StepInput(pos, slot, rows, ctx, None, num_tokens > 1)
        if len(start) == 1 and num_tokens == 1:    # one token over its whole prefix: nothing to mask
            return StepInput(pos, slot, rows, ctx, None, False)
        mask = torch.arange(ctx, device=device)[None, None, :] <= pos[:, :, None]     # [B, T, ctx]
        return StepInput(pos, slot, rows, ctx, mask[:, None], False)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_out = (self.num_heads + 2 * self.num_kv) * self.head_dim
        self.w_qkv_t = nn.Parameter(torch.empty(cfg.hidden_size, qkv_out), requires_grad=False)
        self.b_qkv = nn.Parameter(torch.empty(qkv_out), requires_grad=False) if cfg.attention_bias else None
        self.w_o_t = nn.Parameter(torch.empty(self.num_heads * self.head_dim, cfg.hidden_size), requires_grad=False)
        self.num_threads: int | None = None

    def forward(self, x: torch.Tensor, step: StepInput, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV, hd = self.num_heads, self.num_kv, self.head_dim
        qkv = linear(x, self.w_qkv_t, self.num_threads)                        # [B, T, (H+2KV)*hd]
        if self.b_qkv is not None:
            qkv = qkv + self.b_qkv
        q, k, v = qkv.view(B, T, H + 2 * KV, hd).split([H, KV, KV], dim=2)    # [B, T, *, hd]
        q = q * cos + rotate_half(q) * sin                                      # cos/sin: [B, T, 1, hd]
        k = k * cos + rotate_half(k) * sin
        k_cache[step.slots, :, step.positions] = k                              # cache: [S, KV, max_len, hd]
        v_cache[step.slots, :, step.positions] = v
        keys = k_cache[step.rows, :, :step.ctx_len]                             # [B, KV, ctx, hd]
        values = v_cache[step.rows, :, :step.ctx_len]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=step.mask,
                                             is_causal=step.is_causal, enable_gqa=KV != H)  # [B, H, T, hd]
        return linear(out.transpose(1, 2).reshape(B, T, H * hd), self.w_o_t, self.num_threads)


class FFN(nn.Module):
    """y = sum_j act(gate_j . x) * (up_j . x) * down_j over neurons j (gated), or act(up_j . x) * down_j."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        n_mats = 2 if cfg.is_gated_ffn else 1
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.w_gate_up_t = nn.Parameter(torch.empty(cfg.hidden_size, cfg.intermediate_size, n_mats), requires_grad=False)
        self.w_down_t = nn.Parameter(torch.empty(cfg.intermediate_size, cfg.hidden_size), requires_grad=False)

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """Per-neuron activation a_j [N, n_ff] for x [N, d]."""
        return ffn_activations(x, self.w_gate_up_t, self.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activations(x) @ self.w_down_t                            # [N, n_ff] @ [n_ff, d]


def ffn_activations(x: torch.Tensor, w_gate_up_t: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """a = act(x W_gate^T) * (x W_up^T) for neurons ``w_gate_up_t`` [d, n, 2|1]; x [N, d] -> [N, n]."""
    d, n, n_mats = w_gate_up_t.shape
    gu = (x @ w_gate_up_t.view(d, n * n_mats)).view(x.shape[0], n, n_mats)
    return act(gu[..., 0]) * gu[..., 1] if n_mats == 2 else act(gu[..., 0])


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = nn.Parameter(torch.empty(cfg.hidden_size), requires_grad=False)
        self.ffn_norm = nn.Parameter(torch.empty(cfg.hidden_size), requires_grad=False)
        self.attn = Attention(cfg)
        self.ffn = FFN(cfg)

    def decode_attention(self, x: torch.Tensor, rows: "DecodeRows", k_cache: torch.Tensor, v_cache: torch.Tensor,
                         eps: float) -> torch.Tensor:
        """Quantized decode (one token per row): x [B, d] += attn(norm(x)) in place; returns ffn_norm(x)."""
        a = self.attn
        return attention_decode(x, self.attn_norm, self.ffn_norm, eps, a.w_qkv_t, a.b_qkv, a.w_o_t, a.num_heads,
                                a.num_kv, rows.cos, rows.sin, k_cache, v_cache, rows.slots, rows.positions,
                                a.num_threads or torch.get_num_threads())


@dataclass(slots=True)
class DecodeRows:
    """A decode step's per-row inputs of the fused attention call, made contiguous once for every layer."""

    cos: torch.Tensor            # [B, hd]
    sin: torch.Tensor            # [B, hd]
    slots: torch.Tensor          # [B] int64
    positions: torch.Tensor      # [B] int64

    @staticmethod
    def of(step: StepInput, cos: torch.Tensor, sin: torch.Tensor) -> "DecodeRows":
        B = step.slots.shape[0]
        return DecodeRows(cos.reshape(B, -1).contiguous(), sin.reshape(B, -1).contiguous(),
                          step.slots[:, 0].contiguous(), step.positions[:, 0].contiguous())


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = nn.Parameter(torch.empty(cfg.hidden_size), requires_grad=False)
        self.lm_head_t = nn.Parameter(torch.empty(cfg.hidden_size, cfg.vocab_size), requires_grad=False)
        # None: tied, the tokens' rows are the head's (token_rows).
        self.embed: Weight | None = None if cfg.tie_word_embeddings else \
            nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.dtype = torch.float32           # activations and KV cache
        self.fused_decode = True             # quantized decode steps run each attention block as one C call
        self.num_threads: int | None = None  # quantized kernels' threads (None: torch's count)

    def set_num_threads(self, n: int) -> None:
        """Threads of the quantized kernels outside the FFN (attention, head)."""
        self.num_threads = n
        for layer in self.layers:
            layer.attn.num_threads = n

    def token_rows(self) -> Weight:
        """[V, d] rows looked up per input token: the embedding, or in a tied model the head's own (a strided view
        of the float head's columns, taken where the head lives now; the quantized head's rows as they are)."""
        if self.embed is not None:
            return self.embed
        return self.lm_head_t.t() if isinstance(self.lm_head_t, torch.Tensor) else self.lm_head_t

    def weight_bytes(self) -> int:
        """Bytes of the weights held here (float parameters and quantized matrices, each counted once)."""
        mats = [self.lm_head_t, self.token_rows()] + [w for b in self.layers for w in (b.attn.w_qkv_t, b.attn.w_o_t)]
        quantized = {id(w): w.nbytes for w in mats if isinstance(w, QMatrix)}
        return sum(p.numel() * p.element_size() for p in self.parameters()) + sum(quantized.values())

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, 1, hd] for positions [B, T] (fp32 angles, as in the reference)."""
        freqs = positions[..., None].float() * self.inv_freq                    # [B, T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, step: StepInput, cache: KVCache, ffn: FFNFn | None = None,
                all_logits: bool = False) -> torch.Tensor:
        """tokens [B, T] -> logits [B, V] of the last position (``all_logits``: [B, T, V]), fp32."""
        B, T = tokens.shape
        eps = self.cfg.rms_norm_eps
        x = lookup(self.token_rows(), tokens)                                   # [B, T, d]
        cos, sin = self.rope(step.positions, x.dtype)
        fused = T == 1 and self.fused_decode and isinstance(self.lm_head_t, QMatrix)   # quantized decode: one C call
        rows = DecodeRows.of(step, cos, sin) if fused else None
        for i, layer in enumerate(self.layers):
            if rows is not None:                                                # x += attn(...) in place
                h = layer.decode_attention(x.view(B, -1), rows, cache.k[i], cache.v[i], eps)
            else:
                x = x + layer.attn(rms_norm(x, layer.attn_norm, eps), step, cos, sin, cache.k[i], cache.v[i])
                h = rms_norm(x, layer.ffn_norm, eps).view(B * T, -1)           # [N, d]
            x = x + (layer.ffn(h) if ffn is None else ffn(i, h)).view(B, T, -1)
        if not all_logits:
            x = x[:, -1]
        return linear(rms_norm(x, self.norm, eps), self.lm_head_t, self.num_threads).float()
