"""The target model of speculative decoding: a leanlm model or any Hugging Face causal LM, behind one interface.

What the engine needs from a target: a forward over new tokens with explicit positions and (for trees) a boolean
[1, 1, N, past + N] mask, returning logits and the last hidden state (the feature an EAGLE draft head reads; for
Llama-family models it is the output of the final norm, so `lm_head(feature) == logits`); and two cache edits:
`crop` (drop the tail) and `keep` (keep the prefix plus the accepted path of a tree).

leanlm targets use `LeanCache` (trees need full-attention kinds: GQA, MLA, GLA; ASA/NSA targets can use chain
drafting, which only crops). Hugging Face targets use `DynamicCache`, whose per-layer key/value tensors are edited
in place. For models with sliding-window layers (Gemma-3, Mistral-style) the cache is created with full layers (a
sliding layer of transformers' own cache drops old tokens and cannot be rolled back), and a tree mask is given per
layer type (`hf_tree_masks`): the sliding layers' mask also hides keys more than `sliding_window - 1` positions back.
"""

from __future__ import annotations

import torch


class Target:
    def __init__(self, model):
        self.model = model.eval()
        self.config = model.config
        self.cache = None
        self.is_leanlm = type(model).__module__.startswith("leanlm")
        self.device = next(model.parameters()).device

    @property
    def embed_tokens(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    def reset(self) -> None:
        self.cache = None

    def length(self) -> int:
        return 0 if self.cache is None else self.cache.get_seq_length()

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                tree_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [1, N] after the cached tokens -> logits [N, V] (float32), features [N, C]."""
        kwargs = {"use_cache": True, "output_hidden_states": True}
        if self.cache is not None:
            kwargs["past_key_values"] = self.cache
        elif not self.is_leanlm:
            from transformers import DynamicCache

            kwargs["past_key_values"] = DynamicCache()  # full layers everywhere, see the module docstring
        if tree_mask is not None:
            if self.is_leanlm:
                kwargs["attention_mask"] = tree_mask
            else:
                past = tree_mask.shape[-1] - tree_mask.shape[-2]
                k_pos = torch.cat([torch.arange(past, device=position_ids.device)[None], position_ids], dim=1)
                kwargs["attention_mask"] = hf_tree_masks(self.model, tree_mask, position_ids, k_pos)
            kwargs["position_ids"] = position_ids
        elif position_ids is not None:
            kwargs["position_ids"] = position_ids
        out = self.model(input_ids=input_ids, **kwargs)
        self.cache = out.past_key_values
        return out.logits[0].float(), out.hidden_states[-1][0]


    def crop(self, length: int) -> None:
        if self.is_leanlm:
            self.cache.crop(length)
        else:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]

    def keep(self, start: int, index: list[int]) -> None:
        """Keep cached positions [0, start) and start + index (the accepted path, ascending)."""
        idx = torch.tensor(index, device=self.device)
        if self.is_leanlm:
            self.cache.keep(start, idx)
            return
        for layer in self.cache.layers:
            layer.keys = torch.cat([layer.keys[..., :start, :], layer.keys[..., start + idx, :]], dim=-2)
            layer.values = torch.cat([layer.values[..., :start, :], layer.values[..., start + idx, :]], dim=-2)


def hf_tree_masks(model, mask: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor):
    """A boolean tree mask [B, 1, N, S] as transformers takes it: additive floats (0 = attend, large negative =
    masked); for models with sliding-window layers also the windowed mask (keys at positions > q - window), as a
    {layer type: mask} dict when full and sliding layers are mixed. q_pos [B, N], k_pos [B, S] absolute positions."""
    dtype = next(model.parameters()).dtype

    def additive(m: torch.Tensor) -> torch.Tensor:
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)

    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or []
    if not window or (types and "sliding_attention" not in types):
        return additive(mask)
    slide = mask & (k_pos[:, None, None, :] > q_pos[:, None, :, None] - window)
    if "full_attention" in types:
        return {"full_attention": additive(mask), "sliding_attention": additive(slide)}
    return additive(slide)
