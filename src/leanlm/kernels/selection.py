"""Triton selection attention: each query attends causally to the tokens of its KV group's top-n blocks (kernel twin
of `sparse.selection_attention`), forward and backward.

One program serves a whole KV group and a run of `query_group` consecutive positions: its M tile stacks
(positions x query heads of the group), so each selected K/V block is loaded once per group and fills the tensor-core
tile even when a group has fewer than 16 heads (ASA's 4-token query reuse: 4 positions x 4 heads = 16 rows). The
block list is read from the run's first token; callers guarantee that the run shares it (`query_group` = 1 is exact
NSA, one token per program). Per-row causal masking inside the current block is kept.

Backward: dq accumulates in registers per program; dk/dv are scattered into the selected blocks with float32
atomic adds (many queries select the same block, and which ones is data-dependent), so gradients of k/v are
summed in an order that can vary between runs (differences at rounding level).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from leanlm.kernels.common import (block_dim, contiguous_last, load_tile, online_softmax_step, softmax_finish)


@triton.jit
def _rows(H, G, T, q_start, QG: tl.constexpr, BM: tl.constexpr):
    """The program's tile: batch b, KV group g, each row's token index and head, which rows are real, and the token
    whose block list the run uses."""
    pid_t, pid_bg = tl.program_id(0), tl.program_id(1)
    hg = H // G
    g = pid_bg % G
    r = tl.arange(0, BM)
    first = pid_t * QG - q_start % QG  # token index of the run's first position (may be < 0 for the first run)
    tok = first + r // hg
    head = g * hg + r % hg
    ok = (r < QG * hg) & (tok >= 0) & (tok < T)
    return pid_bg // G, g, tok, head, ok, tl.maximum(first, 0)


@triton.jit
def _block_cols(blocks, i, sel_block, k_start, S, BN: tl.constexpr):
    """Key positions [BN] of the i-th selected block in the list at `blocks`, their indices into the key tensor and
    which are real (a -1 entry gives negative indices, all masked)."""
    kp = tl.load(blocks + i) * sel_block + tl.arange(0, BN)
    cols = kp - k_start
    return kp, cols, (tl.arange(0, BN) < sel_block) & (cols >= 0) & (cols < S)


@triton.jit
def _fwd_kernel(Q, K, V, IDX, O, LSE,
                sqb, sqh, sqt, skb, skg, sks, svb, svg, svs, sib, sig, sit, sob, soh, sot,
                H, G, T, S, DK, DV, q_start, k_start, sel_block, scale,
                COUNT: tl.constexpr, QG: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BDK: tl.constexpr,
                BDV: tl.constexpr):
    b, g, tok, head, ok, t0 = _rows(H, G, T, q_start, QG, BM)
    dv = tl.arange(0, BDV)
    pos = q_start + tok
    q = load_tile(Q + b * sqb, head * sqh + tok * sqt, 1, ok, DK, BDK)  # [BM, DK]
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    qk_scale = scale * 1.4426950408889634
    for i in range(COUNT):
        kp, cols, col_ok = _block_cols(IDX + b * sib + g * sig + t0 * sit, i, sel_block, k_start, S, BN)
        k = load_tile(K + b * skb + g * skg, cols, sks, col_ok, DK, BDK)  # [BN, DK]
        v = load_tile(V + b * svb + g * svg, cols, svs, col_ok, DV, BDV)  # [BN, DV]
        s = tl.dot(q, tl.trans(k)) * qk_scale
        see = col_ok[None, :] & (kp[None, :] <= pos[:, None])
        s = tl.where(see, s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc)
    o, lse = softmax_finish(m_i, l_i, acc)
    tl.store(O + b * sob + head[:, None] * soh + tok[:, None] * sot + dv[None, :], o.to(O.dtype.element_ty),
             mask=ok[:, None] & (dv[None, :] < DV))
    tl.store(LSE + (b * H + head) * T + tok, lse, mask=ok)


@triton.jit
def _bwd_kernel(Q, K, V, IDX, DO, LSE, DELTA, DQ, DKF, DVF,
                sqb, sqh, sqt, skb, skg, sks, svb, svg, svs, sib, sig, sit, sdb, sdh, sdt,
                H, G, T, S, DK, DV, q_start, k_start, sel_block, scale,
                COUNT: tl.constexpr, QG: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BDK: tl.constexpr,
                BDV: tl.constexpr):
    b, g, tok, head, ok, t0 = _rows(H, G, T, q_start, QG, BM)
    dk, dv = tl.arange(0, BDK), tl.arange(0, BDV)
    pos = q_start + tok
    q = load_tile(Q + b * sqb, head * sqh + tok * sqt, 1, ok, DK, BDK)
    do = load_tile(DO + b * sdb, head * sdh + tok * sdt, 1, ok, DV, BDV)
    lse = tl.load(LSE + (b * H + head) * T + tok, mask=ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + (b * H + head) * T + tok, mask=ok, other=0.0)
    dq = tl.zeros([BM, BDK], tl.float32)
    for i in range(COUNT):
        kp, cols, col_ok = _block_cols(IDX + b * sib + g * sig + t0 * sit, i, sel_block, k_start, S, BN)
        k = load_tile(K + b * skb + g * skg, cols, sks, col_ok, DK, BDK)
        v = load_tile(V + b * svb + g * svg, cols, svs, col_ok, DV, BDV)
        see = col_ok[None, :] & (kp[None, :] <= pos[:, None]) & ok[:, None]
        s = tl.dot(q, tl.trans(k)) * scale
        p = tl.where(see, tl.exp(s - lse[:, None]), 0.0)  # [BM, BN]
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
        dk_blk = tl.dot(tl.trans(ds.to(q.dtype)), q) * scale  # [BN, DK]
        dv_blk = tl.dot(tl.trans(p.to(do.dtype)), do)  # [BN, DV]
        base = (b * G + g) * S
        tl.atomic_add(DKF + (base + cols[:, None]) * DK + dk[None, :], dk_blk,
                      mask=col_ok[:, None] & (dk[None, :] < DK))
        tl.atomic_add(DVF + (base + cols[:, None]) * DV + dv[None, :], dv_blk,
                      mask=col_ok[:, None] & (dv[None, :] < DV))
    tl.store(DQ + b * sqb + head[:, None] * sqh + tok[:, None] * sqt + dk[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=ok[:, None] & (dk[None, :] < DK))


def _launch(q, k, idx, query_group: int, q_start: int):
    b, h, t, dkd = q.shape
    g = k.shape[1]
    bm = block_dim(query_group * (h // g))
    runs = triton.cdiv(t + q_start % query_group, query_group)
    return (runs, b * g), bm


def selection_forward(q, k, v, idx, q_start: int, k_start: int, sel_block: int, scale: float, query_group: int):
    b, h, t, dkd = q.shape
    g, s, dvd = k.shape[1], k.shape[2], v.shape[3]
    o = q.new_empty(b, h, t, dvd)
    lse = torch.empty(b, h, t, device=q.device, dtype=torch.float32)
    grid, bm = _launch(q, k, idx, query_group, q_start)
    _fwd_kernel[grid](q, k, v, idx, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *idx.stride()[:3],
                      *o.stride()[:3], h, g, t, s, dkd, dvd, q_start, k_start, sel_block, scale,
                      COUNT=idx.shape[-1], QG=query_group, BM=bm, BN=block_dim(sel_block), BDK=block_dim(dkd),
                      BDV=block_dim(dvd))
    return o, lse


class _Selection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, q_start, k_start, sel_block, scale, query_group):
        q, k, v = (contiguous_last(x) for x in (q, k, v))
        idx = idx.to(torch.int32).contiguous()
        o, lse = selection_forward(q, k, v, idx, q_start, k_start, sel_block, scale, query_group)
        ctx.save_for_backward(q, k, v, idx, o, lse)
        ctx.args = (q_start, k_start, sel_block, scale, query_group)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, idx, o, lse = ctx.saved_tensors
        q_start, k_start, sel_block, scale, query_group = ctx.args
        b, h, t, dkd = q.shape
        g, s, dvd = k.shape[1], k.shape[2], v.shape[3]
        q, do = q.contiguous(), do.contiguous()  # dq is written with q's strides
        delta = (o.float() * do.float()).sum(-1).contiguous()
        dq = torch.empty_like(q)
        dkf = torch.zeros(b, g, s, dkd, device=q.device, dtype=torch.float32)
        dvf = torch.zeros(b, g, s, dvd, device=q.device, dtype=torch.float32)
        grid, bm = _launch(q, k, idx, query_group, q_start)
        _bwd_kernel[grid](q, k, v, idx, do, lse, delta, dq, dkf, dvf,
                          *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *idx.stride()[:3], *do.stride()[:3],
                          h, g, t, s, dkd, dvd, q_start, k_start, sel_block, scale,
                          COUNT=idx.shape[-1], QG=query_group, BM=bm, BN=block_dim(sel_block),
                          BDK=block_dim(dkd), BDV=block_dim(dvd))
        return dq, dkf.to(k.dtype), dvf.to(v.dtype), None, None, None, None, None, None


def selection_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, q_start: int,
                        k_start: int, sel_block: int, scale: float, query_group: int = 1) -> torch.Tensor:
    """q [B, H, T, Dk] at positions q_start.., k [B, G, S, Dk] / v [B, G, S, Dv] from position k_start, idx
    [B, G, T, n] selected blocks (-1 = none; tokens of one `query_group` run must share them) -> [B, H, T, Dv]."""
    return _Selection.apply(q, k, v, idx, q_start, k_start, sel_block, scale, query_group)
