"""Building blocks of the decoder: RMSNorm, rotary positions (RoPE), grouped-query attention, and the block that
joins them with an MLP (model/mlp.py's SwiGLU, or model/moe.py's Mixture-of-Experts).

Names follow Llama / Hugging Face (`q_proj` … `o_proj`, `gate_proj`/`up_proj`/`down_proj`) so export is a
rename table. References: RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467), RoPE (Su et al. 2021,
arXiv:2104.09864; HF's rotate-half layout), SwiGLU (Shazeer 2020, arXiv:2002.05202), GQA (Ainslie et al.
2023, arXiv:2305.13245).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scratchllm.config import ModelConfig
from scratchllm.model.mlp import SwiGLU
from scratchllm.model.moe import MoE

# torch >= 2.5: SDPA takes fewer K/V heads than query heads itself (enable_gqa), so GQA needs no K/V copies.
SDPA_HAS_GQA = torch.__version__ >= (2, 5)

if TYPE_CHECKING:
    from scratchllm.model.kv_cache import KVCache


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · g, computed in float32 (bf16 squares lose too much precision)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables: position p rotates channel pair i by angle p · θ^(-2i/D) (RoPE eq. 34)."""

    def __init__(self, d_head: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, d_head, 2, dtype=torch.float32) / d_head))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (T, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (T, D): HF's rotate-half layout pairs i and i + D/2
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions (B, T) -> cos, sin of shape (B, 1, T, D), broadcasting over heads."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def span(self, start: int, length: int) -> tuple[Tensor, Tensor]:
        """Positions start..start+length-1 for every row: cos, sin of shape (1, 1, T, D), views, no gather."""
        return self.cos[start : start + length][None, None], self.sin[start : start + length][None, None]


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention with H query heads sharing K key/value heads (MHA: K=H, GQA: 1<K<H, MQA: K=1)."""

    use_sdpa: bool = True  # False selects the readable reference path; tests hold the two equal

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.d_head = config.n_heads, config.n_kv_heads, config.d_head
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.d_model, self.n_heads * self.d_head, bias=False)
        self.k_proj = nn.Linear(config.d_model, self.n_kv_heads * self.d_head, bias=False)
        self.v_proj = nn.Linear(config.d_model, self.n_kv_heads * self.d_head, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.d_head, config.d_model, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, kv_cache: KVCache | None = None
    ) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.d_head).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.d_head).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, K, T_past + T, D)
        group = self.n_heads // self.n_kv_heads
        dropout = self.dropout if self.training else 0.0
        if self.use_sdpa and SDPA_HAS_GQA:  # SDPA maps query head h to K/V head h // group without copying K/V
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                               enable_gqa=group > 1)
        else:
            if group > 1:  # each K/V head serves `group` consecutive query heads
                k = k.repeat_interleave(group, dim=1)  # (B, H, T_k, D)
                v = v.repeat_interleave(group, dim=1)
            if self.use_sdpa:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None)
            else:
                y = reference_attention(q, k, v, mask, dropout)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.d_head)  # (B, T, H*D)
        return self.o_proj(y)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float = 0.0) -> Tensor:
    """softmax(QKᵀ/√D + mask) V, written out (Vaswani et al. 2017 eq. 1). mask: bool, True = may attend."""
    T_q, T_k = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T_q, T_k)
    if mask is None:  # plain causal: query i sees keys 0..i (keys and queries aligned at the end)
        mask = torch.ones(T_q, T_k, dtype=torch.bool, device=q.device).tril(diagonal=T_k - T_q)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = F.dropout(scores.softmax(dim=-1), p=dropout)
    return weights @ v


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        if config.n_experts > 0:
            self.mlp: nn.Module = MoE(config)
        else:
            self.mlp = SwiGLU(config.d_model, config.resolved_d_ff)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, kv_cache: KVCache | None) -> Tensor:
        x = x + self.resid_dropout(self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache))
        return x + self.resid_dropout(self.mlp(self.post_attention_layernorm(x)))
