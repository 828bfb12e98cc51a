"""Grouped-query attention (GQA) with RoPE, as in Llama. MHA (`num_key_value_heads == num_attention_heads`) and MQA
(`num_key_value_heads == 1`) are special cases. The cache holds full keys and values of every layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.attention.base import Attention, tree_or_causal_mask
from leanlm.cache import GrowingBuffer, LeanCache
from leanlm.rope import Positions, apply_rope


class KVState:
    """Cache state of a GQA layer: keys and values [B, H_kv, T, D]."""

    def __init__(self) -> None:
        self.k = GrowingBuffer()
        self.v = GrowingBuffer()

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k.append(k), self.v.append(v)

    def seq_length(self) -> int:
        return self.k.length

    def crop(self, length: int) -> None:
        self.k.crop(length)
        self.v.crop(length)

    def select(self, index: torch.Tensor) -> None:
        self.k.select(index)
        self.v.select(index)

    def keep(self, start: int, index: torch.Tensor) -> None:
        self.k.keep(start, index)
        self.v.keep(start, index)

    def move(self, dst: torch.Tensor, index: torch.Tensor) -> None:
        self.k.move(dst, index)
        self.v.move(dst, index)

    def nbytes(self) -> int:
        return self.k.nbytes() + self.v.nbytes()


class GroupedQueryAttention(Attention):
    """Llama attention: q/k/v/o projections (names as in HF so peft and WISCA find them), RoPE, SDPA."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        c, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(c, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(c, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(c, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, c, bias=bias)

    @classmethod
    def cache_bytes(cls, config, layer_idx: int, context: int, dtype_bytes: int = 2) -> int:
        return 2 * config.num_key_value_heads * config.head_dim * context * dtype_bytes

    def project(self, x: torch.Tensor, positions: Positions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, C] -> q [B, H, T, D], k and v [B, Hkv, T, D], with RoPE applied to q and k."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        cos, sin = positions.cos_sin(self.head_dim, self.config.rope_theta, q.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """Per-head outputs [B, H, T, D] -> [B, T, C]."""
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

    def forward(self, x: torch.Tensor, positions: Positions, cache: LeanCache | None,
                attention_mask: torch.Tensor | None) -> torch.Tensor:
        t = x.shape[1]
        q, k, v = self.project(x, positions)
        if cache is not None:
            k, v = cache.state(self.layer_idx, KVState).append(k, v)  # [B, Hkv, S, D]
        s = k.shape[2]
        mask = tree_or_causal_mask(attention_mask, t, s, x.device)
        dropout = self.config.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None and t > 1,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # [B, H, T, D]
        return self.output(out)
