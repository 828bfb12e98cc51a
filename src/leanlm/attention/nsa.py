"""Native Sparse Attention (NSA, Yuan et al. 2025, arXiv 2502.11089) on GQA projections.

Each layer runs three branches over the same queries and mixes them with learned per-head sigmoid gates
(NSA Eq. 5): attention over compressed blocks, attention over the top-n selected blocks (chosen per GQA group from
the compression scores) and a sliding window. Keys and values are shared by the three branches and compressed
blocks are pooled from them (fla's reading; the paper gives each branch its own K/V, which triples the cache).
The branch maths is in `leanlm.attention.sparse`; `SparseBranches` here adds the parts ASA reuses: the optional
MLP compressor, query grouping (selection computed once per `nsa_query_group` tokens) and the decoding state.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import leanlm.attention.sparse as ops
from leanlm.attention.base import require_unpadded
from leanlm.attention.gqa import GroupedQueryAttention, KVState
from leanlm.attention.latent import LatentProjections
from leanlm.cache import GrowingBuffer, LeanCache, WindowBuffer
from leanlm.kernels.dispatch import use_kernels
from leanlm.rope import Positions

BRANCHES = ("cmp", "slc", "win")


def _full_keys(k, span: slice = slice(None)) -> torch.Tensor:
    """Keys [B, G, S, Dk]; latent parts (c, k_r) are concatenated to K̄ = [c ; k_r] (only over `span`)."""
    if isinstance(k, tuple):
        return LatentProjections.absorbed_keys(k[0][:, :, span], k[1][:, :, span])
    return k[:, :, span]


def _key_dim(k) -> int:
    """Key width of `k` (a tensor or latent parts)."""
    return k[0].shape[-1] + k[1].shape[-1] if isinstance(k, tuple) else k.shape[-1]


def _key_length(k) -> int:
    """Number of keys S in `k` (a tensor or latent parts)."""
    return (k[0] if isinstance(k, tuple) else k).shape[2]


class SparseState:
    """Decoding state of the sparse branches beyond the keys/values themselves: the compressed blocks (computed
    once, when a block completes) and, with query grouping, the selected blocks of the most recent query groups."""

    def __init__(self, query_group: int, margin: int, compressed_values: bool) -> None:
        self.query_group = query_group
        self.kc = GrowingBuffer()
        self.vc = GrowingBuffer() if compressed_values else None
        self.group_blocks = WindowBuffer(2, math.ceil(margin / query_group)) if query_group > 1 else None

    def crop(self, length: int, block: int, stride: int) -> None:
        m = ops.num_compressed_blocks(length, block, stride)
        self.kc.crop(m)
        if self.vc is not None:
            self.vc.crop(m)
        if self.group_blocks is not None:
            self.group_blocks.crop(math.ceil(length / self.query_group))

    def select(self, index: torch.Tensor) -> None:
        for buf in (self.kc, self.vc, self.group_blocks):
            if buf is not None:
                buf.select(index)

    def nbytes(self) -> int:
        return sum(buf.nbytes() for buf in (self.kc, self.vc, self.group_blocks) if buf is not None)


class SparseLayerState:
    """Cache of a sparse layer: the full keys/values (or latents) plus `SparseState`."""

    def __init__(self, kv, sparse: SparseState, block: int, stride: int) -> None:
        self.kv, self.sparse, self.block, self.stride = kv, sparse, block, stride

    def seq_length(self) -> int:
        return self.kv.seq_length()

    def crop(self, length: int) -> None:
        self.kv.crop(length)
        self.sparse.crop(length, self.block, self.stride)

    def select(self, index: torch.Tensor) -> None:
        self.kv.select(index)
        self.sparse.select(index)

    def nbytes(self) -> int:
        return self.kv.nbytes() + self.sparse.nbytes()


class SparseBranches(nn.Module):
    """NSA's compression / selection / sliding-window branches for one layer, in KV-group form.

    `value_prefix`: when the values are the first `value_prefix` channels of the keys (ASA's absorbed GLA latents,
    V̄ = c inside K̄ = [c ; k_r]) and pooling is the mean, compressed values are sliced from the compressed keys
    instead of being stored twice.
    """

    def __init__(self, config, layer_idx: int, key_dim: int, value_dim: int, groups: int, branches: tuple[str, ...],
                 value_prefix: int | None = None):
        super().__init__()
        self.branches = branches
        self.groups = groups
        self.block, self.stride = config.nsa_compress_block, config.nsa_compress_stride
        self.sel_block, self.count = config.nsa_select_block, config.select_count(layer_idx)
        self.init_blocks, self.local_blocks = config.nsa_init_blocks, config.nsa_local_blocks
        self.window, self.query_group = config.nsa_window, config.nsa_query_group
        self.margin = config.window_cache_margin
        self.kernels = config.attention_kernels
        self.mlp = config.nsa_compressor == "mlp"
        self.value_prefix = None if self.mlp else value_prefix
        if self.mlp and ("cmp" in branches or "slc" in branches):
            self.compress_k = ops.MLPCompressor(self.block, key_dim)
            self.compress_v = ops.MLPCompressor(self.block, value_dim)

    def new_state(self) -> SparseState:
        return SparseState(self.query_group, self.margin, compressed_values=self.value_prefix is None)

    def _compressed(self, k, v: torch.Tensor, state: SparseState | None):
        """Compressed keys/values [B, G, M, D] (cached in `state` as blocks complete). `k` as in `forward`."""
        ck, cv = (self.compress_k, self.compress_v) if self.mlp else (None, None)
        if state is None:
            k = _full_keys(k)
            kc = ops.compress(k, self.block, self.stride, ck)
            vc = kc[..., : self.value_prefix] if self.value_prefix else ops.compress(v, self.block, self.stride, cv)
            return kc, vc
        have = state.kc.length
        want = ops.num_compressed_blocks(_key_length(k), self.block, self.stride)
        if want > have:
            span = slice(have * self.stride, (want - 1) * self.stride + self.block)
            state.kc.append(ops.compress(_full_keys(k, span), self.block, self.stride, ck))
            if state.vc is not None:
                state.vc.append(ops.compress(v[:, :, span], self.block, self.stride, cv))
        kc = state.kc.view()
        if kc is None:
            kc = v.new_zeros(v.shape[0], v.shape[1], 0, _key_dim(k))
        if self.value_prefix:
            return kc, kc[..., : self.value_prefix]
        vc = state.vc.view()
        return kc, (vc if vc is not None else v.new_zeros(v.shape[0], v.shape[1], 0, v.shape[3]))

    def _selection(self, select, q_pos: torch.Tensor, q_start: int, state: SparseState | None) -> torch.Tensor:
        """Selected blocks per query [B, G, T, n]; with query groups, those of each group's first token.
        `select(rows)` returns the top-n blocks [B, G, R, n] of the query rows `rows` (a slice); the queries are
        at the contiguous positions q_pos = q_start, q_start + 1, ..."""
        qg = self.query_group
        if qg == 1:
            return select(slice(None))
        new = select(slice((-q_start) % qg, None, qg))  # rows that start a query group: [B, G, R, n]
        if state is None:
            table, first = new, q_start // qg
        else:
            table, first = state.group_blocks.append(new.to(torch.int32))
        return table[:, :, q_pos // qg - first].long()

    def _ops(self, q: torch.Tensor, k, k_start: int):
        """The branch operations to run (one signature, see `leanlm.attention.sparse`): the PyTorch references, the
        Triton kernels, or, for one query token over latent parts with the latents as values, the split-K latent
        decode kernels reading the cache in place."""
        if k_start != 0 or not use_kernels(q.device, self.kernels):
            return ops
        from leanlm.kernels import branches, decode_branches  # Triton: imported only where the kernels run

        if isinstance(k, tuple) and q.shape[2] == 1 and self.value_prefix is not None:
            return decode_branches
        return branches

    def forward(self, q: torch.Tensor, k, v: torch.Tensor, q_start: int, k_start: int, state: SparseState | None,
                scale: float) -> dict[str, torch.Tensor]:
        """q [B, H, T, Dk] at positions q_start.., k [B, G, S, Dk] and v [B, G, S, Dv] from position `k_start` (the
        compression and selection branches need `k_start == 0`). Returns {branch: [B, H, T, Dv]}.

        `k` may also be latent parts (c [B, G, S, d_c], k_r [B, 1, S, d_r]) standing for K̄ = [c ; k_r] (ASA's
        absorbed GLA keys): the decode kernels read them in place, the other paths concatenate them."""
        run = self._ops(q, k, k_start)
        keys = k if run.LATENT_PARTS else _full_keys(k)
        q_pos = torch.arange(q_start, q_start + q.shape[2], device=q.device)  # [T]
        out: dict[str, torch.Tensor] = {}
        if "cmp" in self.branches or "slc" in self.branches:
            kc, vc = self._compressed(k, v, state)
            o_cmp, lse = run.compression_attention(q, kc, vc, q_start, self.block, self.stride, scale)
            if "cmp" in self.branches:
                out["cmp"] = o_cmp
            if "slc" in self.branches:
                def select(rows):  # the top-n blocks [B, G, R, n] of the query rows `rows`
                    return run.select_blocks(q[:, :, rows], kc, lse[:, :, rows], q_pos[rows], self.count, self.block,
                                             self.stride, self.sel_block, self.init_blocks, self.local_blocks, scale)

                idx = self._selection(select, q_pos, q_start, state)  # [B, G, T, n]
                out["slc"] = run.selection_attention(q, keys, v, idx, q_start, k_start, self.sel_block, scale,
                                                     self.query_group)
        if "win" in self.branches:
            out["win"] = run.window_attention(q, keys, v, q_start, k_start, self.window, scale)
        return out

    @staticmethod
    def state_bytes(config, layer_idx: int, context: int, groups: int, key_dim: int, value_dim: int | None,
                    dtype_bytes: int) -> int:
        """Bytes of `SparseState` after `context` tokens (value_dim None: values sliced from keys)."""
        m = ops.num_compressed_blocks(context, config.nsa_compress_block, config.nsa_compress_stride)
        total = m * groups * (key_dim + (value_dim or 0)) * dtype_bytes
        qg = config.nsa_query_group
        if qg > 1 and context:
            keep = 1 + math.ceil(config.window_cache_margin / qg)
            total += min(math.ceil(context / qg), keep) * groups * config.select_count(layer_idx) * 4
        return total


def mix_branches(outs: dict[str, torch.Tensor], gates: torch.Tensor | None) -> torch.Tensor:
    """Σ_b g_b * o_b with gates [B, T, nb * H] (branch-major) or a plain sum without gates."""
    names = list(outs)
    if gates is None:
        return sum(outs[n] for n in names)
    b, t, _ = gates.shape
    g = torch.sigmoid(gates).view(b, t, len(names), -1).permute(2, 0, 3, 1)[..., None]  # [nb, B, H, T, 1]
    return sum(g[i] * outs[n] for i, n in enumerate(names))


class NativeSparseAttention(GroupedQueryAttention):
    """NSA on GQA projections (q/k/v/o as in Llama, inherited): compression + selection + sliding window, gated."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        c = config.hidden_size
        self.gate_proj = nn.Linear(c, len(BRANCHES) * self.num_heads) if config.nsa_gates else None
        self.sparse = SparseBranches(config, layer_idx, self.head_dim, self.head_dim, self.num_kv_heads, BRANCHES)

    @property
    def keys_compressed_nonlinearly(self) -> bool:
        """Whether the keys and values also feed a nonlinear map (the MLP compressor); mean pooling is linear.
        Tools that rescale the projections (WISCA) read this: a nonlinear compressor breaks output preservation."""
        return self.sparse.mlp

    @classmethod
    def cache_bytes(cls, config, layer_idx: int, context: int, dtype_bytes: int = 2) -> int:
        kv = super().cache_bytes(config, layer_idx, context, dtype_bytes)
        return kv + SparseBranches.state_bytes(config, layer_idx, context, config.num_key_value_heads,
                                               config.head_dim, config.head_dim, dtype_bytes)

    def _new_state(self) -> SparseLayerState:
        return SparseLayerState(KVState(), self.sparse.new_state(), self.sparse.block, self.sparse.stride)

    def forward(self, x: torch.Tensor, positions: Positions, cache: LeanCache | None,
                attention_mask: torch.Tensor | None) -> torch.Tensor:
        require_unpadded(attention_mask, "nsa")
        t = x.shape[1]
        q, k, v = self.project(x, positions)  # [B, H, T, D], [B, Hkv, T, D] x 2
        state = None
        if cache is not None:
            st = cache.state(self.layer_idx, self._new_state)
            k, v = st.kv.append(k, v)  # [B, Hkv, S, D]
            state = st.sparse
        s = k.shape[2]
        outs = self.sparse(q, k, v, s - t, 0, state, self.head_dim ** -0.5)
        return self.output(mix_branches(outs, self.gate_proj(x) if self.gate_proj is not None else None))
