"""Latent key/value attention shared by MLA (one latent head) and GLA (g latent heads).

DeepSeek-V2 Multi-head Latent Attention caches, per token, a compressed latent c (d_c channels, RMS-normed) and one
decoupled RoPE key k_r (d_r channels) shared by all heads. Per head i, keys and values are up-projections of the
latent: k_i = [W_UK,i c ; k_r] and v_i = W_UV,i c. Grouped Latent Attention (Zadouri, Strauss & Dao 2025) splits the
latent into g latent heads, each with its own norm and up-projection, serving a group of H/g query heads; MLA is
the case g = 1.

Two equal ways to attend (same numbers up to rounding; `latent_absorb` picks one):
  expanded  keys/values are up-projected for every head, then ordinary attention (cheaper for training/prefill);
  absorbed  W_UK,i is folded into the query, q̄_i = [W_UK,i^T q_i ; q_r,i], so attention runs directly over the
            cached latent of its group (K̄ = [c ; k_r], V̄ = c, an MQA per latent head), and W_UV,i is applied to
            the latent output afterwards (cheaper when decoding against a long cache; what sparse selection needs).
Both use the softmax scale 1 / sqrt(d_nope + d_r).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.attention.base import Attention, require_unpadded, tree_or_causal_mask
from leanlm.attention.sparse import window_mask
from leanlm.cache import GrowingBuffer, LeanCache, WindowBuffer
from leanlm.kernels.dispatch import use_kernels
from leanlm.rope import Positions, apply_rope


class GroupedLinear(nn.Module):
    """g independent linear maps without bias: x [..., g, in] -> [..., g, out]; `weight` is [g, out, in]."""

    def __init__(self, groups: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(groups, out_features, in_features))
        for w in self.weight:
            nn.init.kaiming_uniform_(w, a=5 ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...gi,goi->...go", x, self.weight)


class GroupRMSNorm(nn.Module):
    """RMSNorm applied separately to each of g groups of channels: x [..., g, d], `weight` [g, d]."""

    def __init__(self, groups: int, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(groups, dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), None, self.eps) * self.weight


class LatentState:
    """Cache of a latent-attention layer: latents c [B, g, T, d_c] and the shared RoPE key k_r [B, 1, T, d_r].
    With `window` set, only the tokens a sliding window still needs are kept (`WindowBuffer`)."""

    def __init__(self, window: int | None = None, margin: int = 0) -> None:
        self.window = window
        make = (lambda: WindowBuffer(window, margin)) if window else GrowingBuffer
        self.c, self.k_rope = make(), make()

    def append(self, c: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Store new latents; return all latents visible to the new queries and the position of the first one."""
        if self.window:
            c_all, first = self.c.append(c)
            k_all, _ = self.k_rope.append(k_rope)
            return c_all, k_all, first
        return self.c.append(c), self.k_rope.append(k_rope), 0

    def seq_length(self) -> int:
        return self.c.length

    def crop(self, length: int) -> None:
        self.c.crop(length)
        self.k_rope.crop(length)

    def select(self, index: torch.Tensor) -> None:
        self.c.select(index)
        self.k_rope.select(index)

    def keep(self, start: int, index: torch.Tensor) -> None:
        if self.window:
            raise NotImplementedError("a sliding-window latent cache cannot keep a token subset; use chain drafting")
        self.c.keep(start, index)
        self.k_rope.keep(start, index)

    def move(self, dst: torch.Tensor, index: torch.Tensor) -> None:
        if self.window:
            raise NotImplementedError("a sliding-window latent cache cannot move tokens; use chain drafting")
        self.c.move(dst, index)
        self.k_rope.move(dst, index)

    def nbytes(self) -> int:
        return self.c.nbytes() + self.k_rope.nbytes()


class LatentProjections(nn.Module):
    """The projections of MLA/GLA (DeepSeek-V3 parameter names): query path, latent down-projection with per-group
    norm, grouped up-projection to per-head keys and values, output projection."""

    def __init__(self, config, latent_heads: int, latent_dim: int):
        super().__init__()
        c = config.hidden_size
        self.num_heads = h = config.num_attention_heads
        self.groups = g = latent_heads
        self.latent_dim = dc = latent_dim // latent_heads  # per latent head
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.rope_theta = config.rope_theta
        self.scale = (self.nope_dim + self.rope_dim) ** -0.5
        qk = self.nope_dim + self.rope_dim
        if config.q_lora_rank:
            self.q_a_proj = nn.Linear(c, config.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = GroupRMSNorm(1, config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, h * qk, bias=False)
        else:
            self.q_proj = nn.Linear(c, h * qk, bias=config.attention_bias)
        self.kv_a_proj_with_mqa = nn.Linear(c, g * dc + self.rope_dim, bias=config.attention_bias)
        self.kv_a_layernorm = GroupRMSNorm(g, dc, config.rms_norm_eps)
        self.kv_b_proj = GroupedLinear(g, dc, (h // g) * (self.nope_dim + self.v_dim))
        self.o_proj = nn.Linear(h * self.v_dim, c, bias=config.attention_bias)

    # -- projections -------------------------------------------------------------------------------------------
    def queries(self, x: torch.Tensor, positions: Positions) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C] -> q_nope [B, H, T, d_nope], q_rope [B, H, T, d_r] (rotated)."""
        b, t, _ = x.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)[..., None, :])[..., 0, :])
        q = q.view(b, t, self.num_heads, -1).transpose(1, 2)  # [B, H, T, d_nope + d_r]
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        cos, sin = positions.cos_sin(self.rope_dim, self.rope_theta, x.dtype)
        return q_nope, apply_rope(q_rope, cos, sin)

    def latents(self, x: torch.Tensor, positions: Positions) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C] -> latents c [B, g, T, d_c] (normed) and the shared RoPE key k_r [B, 1, T, d_r] (rotated)."""
        b, t, _ = x.shape
        kv = self.kv_a_proj_with_mqa(x)  # [B, T, g*d_c + d_r]
        c, k_rope = kv.split([self.groups * self.latent_dim, self.rope_dim], dim=-1)
        c = self.kv_a_layernorm(c.view(b, t, self.groups, self.latent_dim)).transpose(1, 2)  # [B, g, T, d_c]
        cos, sin = positions.cos_sin(self.rope_dim, self.rope_theta, x.dtype)
        return c, apply_rope(k_rope[:, None], cos, sin)

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b_proj.weight.view(self.groups, self.num_heads // self.groups, self.nope_dim + self.v_dim,
                                       self.latent_dim)  # [g, H/g, d_nope + d_v, d_c]
        return w[:, :, : self.nope_dim], w[:, :, self.nope_dim:]  # W_UK [g, H/g, d_nope, d_c], W_UV [g, H/g, d_v, d_c]

    def expand(self, c: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys [B, H, S, d_nope + d_r] and values [B, H, S, d_v] from latents c [B, g, S, d_c]."""
        b, g, s, _ = c.shape
        kv = self.kv_b_proj(c.transpose(1, 2))  # [B, S, g, (H/g)*(d_nope+d_v)]
        kv = kv.reshape(b, s, self.num_heads, self.nope_dim + self.v_dim).transpose(1, 2)  # [B, H, S, d_nope+d_v]
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(b, self.num_heads, s, self.rope_dim)], dim=-1)
        return k, v

    def absorbed_query(self, q_nope: torch.Tensor, q_rope: torch.Tensor) -> torch.Tensor:
        """q̄ [B, H, T, d_c + d_r]: W_UK folded into the no-RoPE part of the query."""
        b, h, t, _ = q_nope.shape
        w_uk, _ = self._up_weights()
        q = q_nope.view(b, self.groups, h // self.groups, t, self.nope_dim)
        q_lat = torch.einsum("bgjtn,gjnc->bgjtc", q, w_uk).reshape(b, h, t, self.latent_dim)
        return torch.cat([q_lat, q_rope], dim=-1)

    @staticmethod
    def absorbed_keys(c: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
        """K̄ [B, g, S, d_c + d_r] = [c ; k_r] per latent head (the values are c itself)."""
        return torch.cat([c, k_rope.expand(-1, c.shape[1], -1, -1)], dim=-1)

    def values_up(self, o_lat: torch.Tensor) -> torch.Tensor:
        """Latent attention output [B, H, T, d_c] -> per-head values [B, H, T, d_v] (W_UV applied afterwards)."""
        b, h, t, _ = o_lat.shape
        _, w_uv = self._up_weights()
        o = o_lat.view(b, self.groups, h // self.groups, t, self.latent_dim)
        return torch.einsum("bgjtc,gjvc->bgjtv", o, w_uv).reshape(b, h, t, self.v_dim)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """Per-head outputs [B, H, T, d_v] -> [B, T, C]."""
        b, h, t, d = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(b, t, h * d))

    # -- attention ---------------------------------------------------------------------------------------------
    def attend(self, q_nope: torch.Tensor, q_rope: torch.Tensor, c: torch.Tensor, k_rope: torch.Tensor,
               mask: torch.Tensor | None, is_causal: bool, absorbed: bool, dropout: float = 0.0) -> torch.Tensor:
        """Attention of queries over latents c [B, g, S, d_c] / k_r [B, 1, S, d_r]; returns [B, H, T, d_v].
        `mask` is a boolean [*, *, T, S] (True = attend) or None with `is_causal`."""
        if absorbed:
            o = F.scaled_dot_product_attention(
                self.absorbed_query(q_nope, q_rope), self.absorbed_keys(c, k_rope), c, attn_mask=mask,
                dropout_p=dropout, is_causal=is_causal, scale=self.scale, enable_gqa=self.groups != self.num_heads)
            return self.values_up(o)  # [B, H, T, d_v]
        k, v = self.expand(c, k_rope)
        q = torch.cat([q_nope, q_rope], dim=-1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                                              scale=self.scale)


def use_absorbed(mode: str, new_tokens: int, past: int) -> bool:
    """`latent_absorb`: `always`, `never`, or `auto` = absorbed when decoding a few tokens against a longer cache."""
    if mode == "auto":
        return past > 0 and new_tokens <= 16
    return mode == "always"


def _kernels_apply(config, x: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float) -> bool:
    """The Triton paths cover unmasked causal/window attention without dropout."""

    return attention_mask is None and dropout == 0.0 and use_kernels(x.device, config.attention_kernels)


class LatentAttention(Attention):
    """Full causal (or sliding-window) attention over a latent cache; `mla` and `gla` are this with g = 1 / g > 1.

    `window`: attend only to the last `window` positions, keeping only those in the cache (ASA's local layers).
    `gate`: per-head sigmoid output gate σ(W_g x) (ASA's optional local-layer gate).
    """

    def __init__(self, config, layer_idx: int, latent_heads: int, latent_dim: int, window: int | None = None,
                 gate: bool = False):
        super().__init__(config, layer_idx)
        self.latent = LatentProjections(config, latent_heads, latent_dim)
        self.window = window
        self.gate_proj = nn.Linear(config.hidden_size, config.num_attention_heads) if gate else None

    def _new_state(self) -> LatentState:
        return LatentState(self.window, self.config.window_cache_margin)

    @staticmethod
    def latent_bytes(config, latent_heads: int, latent_dim: int, context: int, dtype_bytes: int,
                     window: int | None = None) -> int:
        """Bytes of a `LatentState` after `context` tokens (g*d_c + d_r per kept token)."""
        kept = context if window is None else min(context, window - 1 + config.window_cache_margin)
        return (latent_dim + config.qk_rope_head_dim) * kept * dtype_bytes

    def _attend_kernels(self, q_nope, q_rope, c, k_rope, past: int, first: int,
                        attention_mask: torch.Tensor | None, dropout: float) -> torch.Tensor | None:
        """Triton paths (None when they do not apply), through the branch ops NSA uses: one-token decoding runs the
        split-K latent decode kernel over the cache in place (absorbed; a full layer is a window wider than the
        context); a sliding-window layer's training/prefill runs the banded kernel on the expanded keys. Full
        causal prefill stays with SDPA (FlashAttention on GPU)."""
        if not _kernels_apply(self.config, q_nope, attention_mask, dropout):
            return None
        from leanlm.kernels import branches, decode_branches  # Triton: imported only where the kernels run

        lat = self.latent
        if q_nope.shape[2] == 1 and past > 0 and self.config.latent_absorb != "never":
            q_bar = lat.absorbed_query(q_nope, q_rope)  # [B, H, 1, d_c + d_r]
            window = self.window or past + 1
            return lat.values_up(decode_branches.window_attention(q_bar, (c, k_rope), c, past, first, window,
                                                                  lat.scale))  # [B, H, 1, d_v]
        if self.window and self.config.latent_absorb != "always":
            k, v = lat.expand(c, k_rope)  # [B, H, S, d_nope + d_r], [B, H, S, d_v]
            q = torch.cat([q_nope, q_rope], dim=-1)
            return branches.window_attention(q, k, v, past, first, self.window, lat.scale)
        return None

    def forward(self, x: torch.Tensor, positions: Positions, cache: LeanCache | None,
                attention_mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        lat = self.latent
        q_nope, q_rope = lat.queries(x, positions)  # [B, H, T, d_nope], [B, H, T, d_r]
        c, k_rope = lat.latents(x, positions)  # [B, g, T, d_c], [B, 1, T, d_r]
        first = 0
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        if cache is not None:
            c, k_rope, first = cache.state(self.layer_idx, self._new_state).append(c, k_rope)
        s = c.shape[2]
        if self.window:
            require_unpadded(attention_mask, "sliding-window")
            q_pos = torch.arange(past, past + t, device=x.device)
            mask = window_mask(q_pos, torch.arange(first, first + s, device=x.device), self.window)[None, None]
        else:
            mask = tree_or_causal_mask(attention_mask, t, s, x.device)
        dropout = self.config.attention_dropout if self.training else 0.0
        o = self._attend_kernels(q_nope, q_rope, c, k_rope, past, first, attention_mask, dropout)
        if o is None:
            o = lat.attend(q_nope, q_rope, c, k_rope, mask, is_causal=mask is None and t > 1,
                           absorbed=use_absorbed(self.config.latent_absorb, t, past), dropout=dropout)
        # o: [B, H, T, d_v]
        if self.gate_proj is not None:
            o = o * torch.sigmoid(self.gate_proj(x)).transpose(1, 2)[..., None]
        return lat.output(o)
