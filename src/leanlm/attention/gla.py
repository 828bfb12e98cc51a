"""Grouped Latent Attention (GLA, Zadouri, Strauss & Dao 2025): the latent is split into `gla_latent_heads` latent
heads (total width `gla_kv_lora_rank`), each with its own norm and up-projection, each serving a group of
num_attention_heads / gla_latent_heads query heads; one decoupled RoPE key is shared. Per token the cache holds
gla_kv_lora_rank + qk_rope_head_dim numbers. The maths is in `leanlm.attention.latent`."""

from __future__ import annotations

from leanlm.attention.latent import LatentAttention


class GroupedLatentAttention(LatentAttention):
    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx, config.gla_latent_heads, config.gla_kv_lora_rank)

    @classmethod
    def cache_bytes(cls, config, layer_idx: int, context: int, dtype_bytes: int = 2) -> int:
        return cls.latent_bytes(config, config.gla_latent_heads, config.gla_kv_lora_rank, context, dtype_bytes)
