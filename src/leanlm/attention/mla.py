"""Multi-head Latent Attention (MLA, DeepSeek-V2): one latent of `kv_lora_rank` channels plus a decoupled RoPE key
of `qk_rope_head_dim` channels per token is all the cache holds; decoding runs weight-absorbed over it.
The maths is in `leanlm.attention.latent` (MLA is latent attention with a single latent head)."""

from __future__ import annotations

from leanlm.attention.latent import LatentAttention


class MultiHeadLatentAttention(LatentAttention):
    def __init__(self, config, layer_idx: int, window: int | None = None, gate: bool = False):
        super().__init__(config, layer_idx, 1, config.kv_lora_rank, window=window, gate=gate)

    @classmethod
    def cache_bytes(cls, config, layer_idx: int, context: int, dtype_bytes: int = 2) -> int:
        return cls.latent_bytes(config, 1, config.kv_lora_rank, context, dtype_bytes)
