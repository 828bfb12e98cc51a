"""Triton flash attention where every query sees one contiguous band of keys: NSA's compression and sliding-window
branches (forward and backward).

Keys are indexed i = 0..S-1 and carry a position kp(i) = i * key_step + key_offset; a query at position p attends to
key i iff  kp(i) <= p  and  p - kp(i) < window.  Two settings cover both branches:

  sliding window      key_step 1, key_offset k_start, window w           (reference: `sparse.window_attention`)
  compressed blocks   key_step d, key_offset l - 1 (a block's last token), window "infinite"
                                                                         (reference: `sparse.compression_attention`)

Queries are the contiguous positions q_start .. q_start + T - 1. Heads are in KV-group form: query head h reads key
group h // (H / G). A query that sees no key gets a zero output and lse = -inf (NSA: a token before the first
complete block gets nothing from the compression branch). The forward also returns the log-sum-exp per query and
head, which the top-n selection kernel (`leanlm.kernels.topk`) uses to turn scores into probabilities.

Backward follows FlashAttention-2: one kernel for dq (loop over the query tile's key band) and one for dk/dv per
key tile and KV group (loop over the group's heads and the queries that can see the tile), so nothing is atomic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from leanlm.kernels.common import (INF_WINDOW, block_dim, contiguous_last, load_tile, online_softmax_step,
                                   softmax_finish)

@triton.jit
def _key_band(p_lo, p_hi, S, key_step, key_offset, window):
    """Index range [lo, hi) of keys that some query in positions p_lo..p_hi can see."""
    hi = tl.minimum((p_hi - key_offset + key_step) // key_step, S)  # kp(i) <= p_hi (p_hi - offset >= -step here)
    hi = tl.where(p_hi - key_offset < 0, 0, hi)
    first = p_lo - window + 1 - key_offset  # kp(i) >= p_lo - window + 1
    lo = tl.where(first <= 0, 0, (first + key_step - 1) // key_step)
    return lo, hi


@triton.jit
def _query_tile(H, G, T, S, q_start, key_step, key_offset, window, BM: tl.constexpr):
    """The program's query tile: batch b, head h, its KV group g, rows [BM] (and which are real), their positions,
    and the key range [lo, hi) the tile needs."""
    pid_t, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    rows = pid_t * BM + tl.arange(0, BM)
    p_hi = q_start + tl.minimum(pid_t * BM + BM, T) - 1
    lo, hi = _key_band(q_start + pid_t * BM, p_hi, S, key_step, key_offset, window)
    return b, h, h // (H // G), rows, rows < T, q_start + rows, lo, hi


@triton.jit
def _visible(pos, cols, key_step, key_offset, window):
    """[M, N] mask: query at pos[i] sees key cols[j] (kp <= p and p - kp < window)."""
    kp = cols * key_step + key_offset
    return (kp[None, :] <= pos[:, None]) & (pos[:, None] - kp[None, :] < window)


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                sqb, sqh, sqt, skb, skg, sks, svb, svg, svs, sob, soh, sot,
                H, G, T, S, DK, DV, q_start, key_step, key_offset, window, scale,
                BM: tl.constexpr, BN: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr):
    b, h, g, rows, row_ok, pos, lo, hi = _query_tile(H, G, T, S, q_start, key_step, key_offset, window, BM)
    dv = tl.arange(0, BDV)
    q = load_tile(Q + b * sqb + h * sqh, rows, sqt, row_ok, DK, BDK)  # [BM, DK]
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    qk_scale = scale * 1.4426950408889634
    for start in range(lo, hi, BN):
        cols = start + tl.arange(0, BN)
        col_ok = cols < hi
        k = load_tile(K + b * skb + g * skg, cols, sks, col_ok, DK, BDK)  # [BN, DK]
        v = load_tile(V + b * svb + g * svg, cols, svs, col_ok, DV, BDV)  # [BN, DV]
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [BM, BN], log2 units
        see = _visible(pos, cols, key_step, key_offset, window) & col_ok[None, :]
        s = tl.where(see, s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc)
    o, lse = softmax_finish(m_i, l_i, acc)
    tl.store(O + b * sob + h * soh + rows[:, None] * sot + dv[None, :], o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (dv[None, :] < DV))
    tl.store(LSE + (b * H + h) * T + rows, lse, mask=row_ok)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   sqb, sqh, sqt, skb, skg, sks, svb, svg, svs, sdb, sdh, sdt,
                   H, G, T, S, DK, DV, q_start, key_step, key_offset, window, scale,
                   BM: tl.constexpr, BN: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr):
    b, h, g, rows, row_ok, pos, lo, hi = _query_tile(H, G, T, S, q_start, key_step, key_offset, window, BM)
    dk = tl.arange(0, BDK)
    q = load_tile(Q + b * sqb + h * sqh, rows, sqt, row_ok, DK, BDK)
    do = load_tile(DO + b * sdb + h * sdh, rows, sdt, row_ok, DV, BDV)
    lse = tl.load(LSE + (b * H + h) * T + rows, mask=row_ok, other=float("-inf"))
    delta = tl.load(DELTA + (b * H + h) * T + rows, mask=row_ok, other=0.0)
    lse_safe = tl.where(lse == float("-inf"), float("inf"), lse)  # rows that saw nothing: p = 0
    dq = tl.zeros([BM, BDK], tl.float32)
    for start in range(lo, hi, BN):
        cols = start + tl.arange(0, BN)
        col_ok = cols < hi
        k = load_tile(K + b * skb + g * skg, cols, sks, col_ok, DK, BDK)
        v = load_tile(V + b * svb + g * svg, cols, svs, col_ok, DV, BDV)
        see = _visible(pos, cols, key_step, key_offset, window) & col_ok[None, :]
        s = tl.dot(q, tl.trans(k)) * scale
        p = tl.where(see, tl.exp(s - lse_safe[:, None]), 0.0)  # [BM, BN]
        dp = tl.dot(do, tl.trans(v))  # [BM, BN]
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + b * sqb + h * sqh + rows[:, None] * sqt + dk[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (dk[None, :] < DK))


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK_, DV_,
                     sqb, sqh, sqt, skb, skg, sks, svb, svg, svs, sdb, sdh, sdt,
                     H, G, T, S, DK, DV, q_start, key_step, key_offset, window, scale,
                     BM: tl.constexpr, BN: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr):
    pid_s, pid_bg = tl.program_id(0), tl.program_id(1)
    b, g = pid_bg // G, pid_bg % G
    hg = H // G
    cols = pid_s * BN + tl.arange(0, BN)
    dk, dv = tl.arange(0, BDK), tl.arange(0, BDV)
    col_ok = cols < S
    k = load_tile(K + b * skb + g * skg, cols, sks, col_ok, DK, BDK)  # [BN, DK]
    v = load_tile(V + b * svb + g * svg, cols, svs, col_ok, DV, BDV)  # [BN, DV]
    # queries that can see some key of this tile: positions kp_min .. kp_max + window - 1
    kp_min = pid_s * BN * key_step + key_offset
    kp_max = (tl.minimum(pid_s * BN + BN, S) - 1) * key_step + key_offset
    r_lo = tl.maximum(kp_min - q_start, 0)
    r_hi = tl.minimum(tl.maximum(kp_max - q_start + window, 0), T)
    r_lo = (r_lo // BM) * BM
    dk_acc = tl.zeros([BN, BDK], tl.float32)
    dv_acc = tl.zeros([BN, BDV], tl.float32)
    for j in range(0, hg):
        h = g * hg + j
        for start in range(r_lo, r_hi, BM):
            rows = start + tl.arange(0, BM)
            row_ok = rows < r_hi
            pos = q_start + rows
            q = load_tile(Q + b * sqb + h * sqh, rows, sqt, row_ok, DK, BDK)  # [BM, DK]
            do = load_tile(DO + b * sdb + h * sdh, rows, sdt, row_ok, DV, BDV)  # [BM, DV]
            lse = tl.load(LSE + (b * H + h) * T + rows, mask=row_ok, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
            delta = tl.load(DELTA + (b * H + h) * T + rows, mask=row_ok, other=0.0)
            see = _visible(pos, cols, key_step, key_offset, window) & col_ok[None, :] & row_ok[:, None]
            s = tl.dot(q, tl.trans(k)) * scale  # [BM, BN]
            p = tl.where(see, tl.exp(s - lse[:, None]), 0.0)
            dv_acc += tl.dot(tl.trans(p.to(do.dtype)), do)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dk_acc += tl.dot(tl.trans(ds.to(q.dtype)), q)
    tl.store(DK_ + b * skb + g * skg + cols[:, None] * sks + dk[None, :], (dk_acc * scale).to(DK_.dtype.element_ty),
             mask=col_ok[:, None] & (dk[None, :] < DK))
    tl.store(DV_ + b * svb + g * svg + cols[:, None] * svs + dv[None, :], dv_acc.to(DV_.dtype.element_ty),
             mask=col_ok[:, None] & (dv[None, :] < DV))


def _tiles(dk: int, dv: int) -> tuple[int, int]:
    """(BM, BN): smaller tiles for wide heads so that the tiles fit in shared memory."""
    if max(dk, dv) > 128:
        return 32, 32
    return 64, 32


def banded_forward(q, k, v, q_start: int, key_step: int, key_offset: int, window: int, scale: float):
    """Forward of the banded attention: returns (out [B, H, T, Dv], lse [B, H, T] float32)."""
    b, h, t, dkd = q.shape
    g, s, dvd = k.shape[1], k.shape[2], v.shape[3]
    if s == 0 or t == 0:  # nothing to see (e.g. no complete compressed block yet): zero output, lse -inf
        return q.new_zeros(b, h, t, dvd), torch.full((b, h, t), float("-inf"), device=q.device)
    o = q.new_empty(b, h, t, dvd)
    lse = torch.empty(b, h, t, device=q.device, dtype=torch.float32)
    bm, bn = _tiles(dkd, dvd)
    grid = (triton.cdiv(t, bm), b * h)
    _fwd_kernel[grid](q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
                      h, g, t, s, dkd, dvd, q_start, key_step, key_offset, window, scale,
                      BM=bm, BN=bn, BDK=block_dim(dkd), BDV=block_dim(dvd))
    return o, lse


def banded_backward(q, k, v, o, lse, do, q_start: int, key_step: int, key_offset: int, window: int, scale: float):
    """Gradients (dq, dk, dv) of the banded attention."""
    b, h, t, dkd = q.shape
    g, s, dvd = k.shape[1], k.shape[2], v.shape[3]
    if s == 0 or t == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()  # gradients share these strides
    delta = (o.float() * do.float()).sum(-1).contiguous()  # [B, H, T]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    bm, bn = _tiles(dkd, dvd)
    args = (h, g, t, s, dkd, dvd, q_start, key_step, key_offset, window, scale)
    meta = dict(BM=bm, BN=bn, BDK=block_dim(dkd), BDV=block_dim(dvd))
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    _bwd_dq_kernel[(triton.cdiv(t, bm), b * h)](q, k, v, do, lse, delta, dq, *strides, *args, **meta)
    _bwd_dkdv_kernel[(triton.cdiv(s, bn), b * g)](q, k, v, do, lse, delta, dk, dv, *strides, *args, **meta)
    return dq, dk, dv


class _Banded(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_start, key_step, key_offset, window, scale):
        q, k, v = (contiguous_last(x) for x in (q, k, v))
        o, lse = banded_forward(q, k, v, q_start, key_step, key_offset, window, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (q_start, key_step, key_offset, window, scale)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = banded_backward(q, k, v, o, lse, do, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, k_start: int, window: int,
                     scale: float) -> torch.Tensor:
    """Sliding-window attention (kernel twin of `sparse.window_attention` with q_pos = q_start + arange(T)).
    q [B, H, T, Dk], k [B, G, S, Dk], v [B, G, S, Dv] -> [B, H, T, Dv]."""
    o, _ = _Banded.apply(q, k, v, q_start, 1, k_start, window, scale)
    return o


def compression_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, q_start: int, block: int,
                          stride: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over compressed blocks (kernel twin of `sparse.compression_attention`). q [B, H, T, Dk],
    kc [B, G, M, Dk], vc [B, G, M, Dv] -> (out [B, H, T, Dv], lse [B, H, T]); lse (not differentiable) feeds the
    top-n selection instead of the reference's probability matrix."""
    o, lse = _Banded.apply(q, kc, vc, q_start, stride, block - 1, INF_WINDOW, scale)
    return o, lse.detach()
