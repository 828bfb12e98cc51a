"""What every attention kind implements, and the padding/causal mask helper they share."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from leanlm.cache import LeanCache
    from leanlm.config import LeanLMConfig
    from leanlm.rope import Positions


class Attention(nn.Module):
    """Base class of an attention kind. Each kind is listed once in `leanlm.attention.ATTENTION_CLASSES`.

    `forward(x, positions, cache, attention_mask)`:
      x              [B, T, C]  hidden states of the new tokens
      positions      leanlm.rope.Positions: `.ids` [B, T] absolute positions of the new tokens, and
                     `.cos_sin(dim, theta, dtype)` RoPE tables shared across layers
      cache          LeanCache or None; the layer keeps its own state in `cache.state(layer_idx, ...)`
      attention_mask [B, S]     1 for real tokens and 0 for padding over all S = past + T tokens, or None;
                     full-attention kinds also take a boolean [B, 1, T, S] mask (True = attend) as is, which is
                     how speculative decoding verifies a token tree in one forward
    returns [B, T, C].
    """

    def __init__(self, config: "LeanLMConfig", layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx

    @classmethod
    def cache_bytes(cls, config: "LeanLMConfig", layer_idx: int, context: int, dtype_bytes: int = 2) -> int:
        """Exact bytes this layer's cache state holds for one sequence after `context` tokens, with activations of
        `dtype_bytes` bytes (what `LayerState.nbytes()` reports; buffer capacity beyond the length is not counted)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, positions: "Positions", cache: "LeanCache | None",
                attention_mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


def require_unpadded(attention_mask: torch.Tensor | None, kind: str) -> None:
    """Block-sparse and sliding-window kinds define blocks by absolute token position, so they refuse left padding
    (and padding followed by tokens). Right padding of a single forward (batched scoring) is harmless: real tokens
    come first and causal attention never reaches the pads after them."""
    if attention_mask is not None and attention_mask.dim() == 4:
        raise ValueError(f"{kind} attention cannot take a 4-D (tree) mask: its blocks are defined by absolute "
                         "positions; use chain drafting for speculative decoding")
    if attention_mask is None or bool(attention_mask.all()):
        return
    m = attention_mask.bool()
    if not bool((m.cummin(dim=-1).values == m).all()):
        raise ValueError(f"{kind} attention needs unpadded (or right-padded) batches, as its blocks are defined by "
                         "absolute positions: decode prompts of equal length together, or one at a time")


def tree_or_causal_mask(attention_mask: torch.Tensor | None, t: int, s: int, device: torch.device):
    """A 4-D boolean mask [B, 1, t, s] is used as given (token trees); a 2-D padding mask goes through
    `causal_padding_mask`."""
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.shape[-2:] != (t, s):
            raise ValueError(f"4-D attention mask has shape {tuple(attention_mask.shape)}, expected [B, 1, {t}, {s}]")
        return attention_mask.bool()
    return causal_padding_mask(attention_mask, t, s, device)


def causal_padding_mask(attention_mask: torch.Tensor | None, t: int, s: int, device: torch.device) -> torch.Tensor | None:
    """Boolean mask [B or 1, 1, t, s] (True = attend) for t new queries over s keys, the last t of which are new.

    Returns None when plain causal attention suffices without padding (the caller then uses `is_causal`, or no
    mask when t == 1). Every query may always attend to itself, so rows of left-padding never become all-masked
    (which would produce NaN in softmax); their outputs are never used.
    """
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    if attention_mask is None and (t == 1 or t == s):
        return None
    past = s - t
    q_pos = torch.arange(past, s, device=device)[:, None]  # [t, 1]
    k_pos = torch.arange(s, device=device)[None, :]  # [1, s]
    mask = (k_pos <= q_pos)[None, None]  # [1, 1, t, s]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, -s:].bool()
        mask = mask | (k_pos == q_pos)[None, None]
    return mask
