"""Rotary position embedding (RoPE), Llama's `rotate_half` convention.

Channel i of a head is paired with channel i + D/2; both rotate by the angle position * theta^(-2i/D).
The inverse frequencies are recomputed from `theta` on every call (D/2 numbers) instead of living in a buffer,
so meta-device loading and dtype casts can never leave them stale.
"""

from __future__ import annotations

import torch


def rope_cos_sin(position_ids: torch.Tensor, dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for `position_ids` [B, T]; each is [B, T, dim] in `dtype`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=position_ids.device, dtype=torch.float32) / dim))
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # [B, T, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, dim]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [B, H, T, D] by the tables `cos`, `sin` [B, T, D]."""
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, D]
    return x * cos + rotate_half(x) * sin


class Positions:
    """Absolute positions of the tokens of one forward pass, with their RoPE tables computed once per
    (dim, theta, dtype) and shared by every layer that asks (layers of different kinds may rotate different dims)."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids  # [B, T]
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (dim, theta, dtype)
        if key not in self._tables:
            self._tables[key] = rope_cos_sin(self.ids, dim, theta, dtype)
        return self._tables[key]
