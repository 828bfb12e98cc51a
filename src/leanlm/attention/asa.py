"""Alternating Sparse Attention (ASA, Hu et al. 2025, arXiv 2511.00819): NSA's branches split across layers.

Local layers run only the sliding-window branch, on Multi-head Latent Attention; their cache keeps the last
`nsa_window` latents (O(w), not O(T)). Global layers run only the compression and selection branches, on Grouped
Latent Attention in absorbed form: each GLA latent head is the key/value "group" whose query heads share one block
selection, with keys K̄ = [c ; k_r] and values V̄ = c. Their cache holds g*d_c + d_r numbers per token.

The paper's body was not available (see docs/asa.md); each ambiguity is an option, default = best reading:
  asa_pattern        `alternate` (layer 0 local; strict 1:1), `alternate_global_first`, `nsa` (every layer runs all
                     three branches on GLA: the fixed-pattern ablation) or an explicit list of local/global/both.
  block sizes        l = l' = d = 16 (reported "16-token blocks"); n = nsa_select_count (per layer allowed).
  nsa_query_group    4: selection computed once per 4 consecutive tokens from the first of them (reported reuse);
                     1 gives exact NSA semantics.
  nsa_compressor     mean pooling (fla; no parameters) or the NSA paper's MLP.
  latents            one latent shared by compression and selection (fla's reading; smallest cache).
  gates              σ(Linear(D, 2H)) mixing cmp/slc in global layers (`nsa_gates`); σ(Linear(D, H)) output gate in
                     local layers (`asa_local_gate`).
"""

from __future__ import annotations

import torch
from torch import nn

from leanlm.attention.base import require_unpadded
from leanlm.attention.latent import LatentAttention, LatentState
from leanlm.attention.nsa import SparseBranches, SparseLayerState, mix_branches
from leanlm.cache import LeanCache
from leanlm.rope import Positions


class AlternatingSparseAttention(LatentAttention):
    """One ASA layer; `config.asa_role(layer_idx)` decides whether it is local (MLA, window), global (GLA,
    compression + selection) or both (GLA, all three branches)."""

    def __init__(self, config, layer_idx: int):
        self.role = config.asa_role(layer_idx)
        if self.role == "local":
            super().__init__(config, layer_idx, 1, config.kv_lora_rank, window=config.nsa_window,
                             gate=config.asa_local_gate)
            return
        super().__init__(config, layer_idx, config.gla_latent_heads, config.gla_kv_lora_rank)
        branches = ("cmp", "slc") if self.role == "global" else ("cmp", "slc", "win")
        lat = self.latent
        self.sparse = SparseBranches(config, layer_idx, lat.latent_dim + lat.rope_dim, lat.latent_dim, lat.groups,
                                     branches, value_prefix=lat.latent_dim)
        lat.keys_compressed_nonlinearly = self.sparse.mlp  # the RoPE key feeds the MLP compressor too
        self.gate_proj = nn.Linear(config.hidden_size, len(branches) * config.num_attention_heads) \
            if config.nsa_gates else None

    @classmethod
    def cache_bytes(cls, config, layer_idx: int, context: int, dtype_bytes: int = 2) -> int:
        if config.asa_role(layer_idx) == "local":
            return cls.latent_bytes(config, 1, config.kv_lora_rank, context, dtype_bytes, window=config.nsa_window)
        g, dc = config.gla_latent_heads, config.gla_kv_lora_rank // config.gla_latent_heads
        values = dc if config.nsa_compressor == "mlp" else None
        return (cls.latent_bytes(config, g, config.gla_kv_lora_rank, context, dtype_bytes)
                + SparseBranches.state_bytes(config, layer_idx, context, g, dc + config.qk_rope_head_dim, values,
                                             dtype_bytes))

    def _new_state(self):
        if self.role == "local":
            return super()._new_state()
        return SparseLayerState(LatentState(), self.sparse.new_state(), self.sparse.block, self.sparse.stride)

    def forward(self, x: torch.Tensor, positions: Positions, cache: LeanCache | None,
                attention_mask: torch.Tensor | None) -> torch.Tensor:
        require_unpadded(attention_mask, "asa")
        if self.role == "local":
            return super().forward(x, positions, cache, attention_mask)
        lat = self.latent
        q_nope, q_rope = lat.queries(x, positions)  # [B, H, T, d_nope], [B, H, T, d_r]
        c, k_rope = lat.latents(x, positions)  # [B, g, T, d_c], [B, 1, T, d_r]
        state = None
        if cache is not None:
            st = cache.state(self.layer_idx, self._new_state)
            c, k_rope, _ = st.kv.append(c, k_rope)  # [B, g, S, d_c], [B, 1, S, d_r]
            state = st.sparse
        s, t = c.shape[2], x.shape[1]
        q_bar = lat.absorbed_query(q_nope, q_rope)  # [B, H, T, d_c + d_r]
        # keys K̄ = [c ; k_r] passed as parts: the decode kernels read the latent cache in place
        outs = self.sparse(q_bar, (c, k_rope), c, s - t, 0, state, lat.scale)  # each [B, H, T, d_c]
        o_lat = mix_branches(outs, self.gate_proj(x) if self.gate_proj is not None else None)
        return lat.output(lat.values_up(o_lat))
