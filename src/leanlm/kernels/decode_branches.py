"""NSA's branch operations for one query token over a latent cache (ASA's global layers, MLA/GLA decoding), with the
signatures of `leanlm.attention.sparse`: each is the split-K `latent_decode` kernel reading the cache in place.

Keys come as latent parts (c [B, G, S, d_c], k_r [B, 1, S, d_r]) standing for K̄ = [c ; k_r], and the values are the
latents themselves (V̄ = c): the absorbed form. Queries are q̄ [B, H, 1, d_c + d_r]; outputs are latent [B, H, 1, d_c].
"""

from __future__ import annotations

import torch

from leanlm.kernels.decode import latent_decode
from leanlm.kernels.topk import select_blocks

LATENT_PARTS = True  # keys come as (latents, RoPE keys)

__all__ = ["LATENT_PARTS", "compression_attention", "select_blocks", "selection_attention", "window_attention"]


def _split(q: torch.Tensor, dc: int) -> tuple[torch.Tensor, torch.Tensor]:
    return q[:, :, 0, :dc], q[:, :, 0, dc:]  # [B, H, d_c], [B, H, d_r]


def compression_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, q_start: int, block: int,
                          stride: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The one query sees every complete block. kc [B, G, M, d_c + d_r], vc = kc[..., :d_c] -> ([B, H, 1, d_c],
    lse [B, H, 1])."""
    dc = vc.shape[-1]
    o, lse = latent_decode(*_split(q, dc), kc[..., :dc], kc[..., dc:], scale)
    return o[:, :, None], lse[:, :, None]


def selection_attention(q: torch.Tensor, k: tuple[torch.Tensor, torch.Tensor], v: torch.Tensor, idx: torch.Tensor,
                        q_start: int, k_start: int, sel_block: int, scale: float, query_group: int = 1) -> torch.Tensor:
    """Over the tokens of each group's selected blocks idx [B, G, 1, n] (keys from position 0)."""
    o, _ = latent_decode(*_split(q, k[0].shape[-1]), k[0], k[1], scale, blocks=idx[:, :, 0], block=sel_block)
    return o[:, :, None]


def window_attention(q: torch.Tensor, k: tuple[torch.Tensor, torch.Tensor], v: torch.Tensor, q_start: int,
                     k_start: int, window: int, scale: float) -> torch.Tensor:
    """Over the keys at positions q_start - window + 1 .. q_start (the cache holds positions k_start..)."""
    lo = max(0, q_start - window + 1 - k_start)
    o, _ = latent_decode(*_split(q, k[0].shape[-1]), k[0], k[1], scale, lo=lo)
    return o[:, :, None]
