"""Triton top-n block selection on device (kernel twin of `sparse.select_blocks`).

For a query at position p of KV group j, the importance of selection block b is the compression-branch probability
mass of the compressed blocks overlapping b, summed over the group's query heads (NSA Eq. 9-10):

    imp[b] = sum_{h in group j} sum_{m overlaps b} exp(q_h . kc_m * scale - lse_h)

The kernel recomputes q . kc blockwise from the compression branch's log-sum-exp, so the [T, M] probability matrix
is never written (fla's "online top-k" idea), and keeps a running top-n list in registers while it sweeps the blocks:
each chunk of BN candidate blocks is merged by n rounds of "if the chunk's best beats the list's worst, swap it in".
The first `init_blocks` and the `local_blocks` most recent blocks score +inf (always chosen); blocks after the
query's own block are never chosen. Output: block indices [B, G, T, n] (int32, -1 where fewer blocks exist), in no
particular order. No host synchronisation: the sweep length is read on device from the query's position.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from leanlm.kernels.common import block_dim, contiguous_last, load_tile


@triton.jit
def _topk_kernel(Q, KC, LSE, QPOS, IDX,
                 sqb, sqh, sqt, skb, skg, skm, sib, sig, sit,
                 H, G, T, M, DK, scale, block, stride, sel_block, init_blocks, local_blocks,
                 COUNT: tl.constexpr, NP: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr, BDK: tl.constexpr,
                 R: tl.constexpr, L: tl.constexpr):
    t, pid_bg = tl.program_id(0), tl.program_id(1)
    b, g = pid_bg // G, pid_bg % G
    hg = H // G
    heads = tl.arange(0, BH)
    head_ok = heads < hg
    q = load_tile(Q + b * sqb + t * sqt, g * hg + heads, sqh, head_ok, DK, BDK)  # [BH, DK]
    lse = tl.load(LSE + (b * H + g * hg + heads) * T + t, mask=head_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # a query that saw no block: all probabilities 0
    p = tl.load(QPOS + t)
    cur = p // sel_block
    slots = tl.arange(0, NP)
    best_v = tl.where(slots < COUNT, float("-inf"), float("inf"))  # slots >= COUNT are never the worst
    best_i = tl.full([NP], -1, tl.int32)
    for j0 in range(0, cur + 1, BN):
        j = j0 + tl.arange(0, BN)  # candidate selection blocks
        imp = tl.zeros([BN], tl.float32)
        for o in tl.static_range(R + L - 1):  # compressed blocks m overlapping block j: j*R - L + 1 .. j*R + R - 1
            m = j * R - L + 1 + o
            m_ok = (m >= 0) & (m < M) & (m * stride + block - 1 <= p)
            kc = load_tile(KC + b * skb + g * skg, m, skm, m_ok, DK, BDK)  # [BN, DK]
            s = tl.dot(q, tl.trans(kc)) * scale  # [BH, BN]
            pr = tl.where(m_ok[None, :] & head_ok[:, None], tl.exp(s - lse[:, None]), 0.0)
            imp += tl.sum(pr, 0)
        valid = j <= cur
        forced = (j < init_blocks) | (j > cur - local_blocks)
        score = tl.where(valid, tl.where(forced, float("inf"), imp), float("-inf"))
        for _ in range(COUNT):
            c_best = tl.max(score, 0)
            c_arg = tl.argmax(score, 0)
            w_val = tl.min(best_v, 0)
            w_arg = tl.argmin(best_v, 0)
            take = c_best > w_val
            w_arg = tl.where(take, w_arg, -1)  # -1 matches no slot: nothing changes
            c_arg = tl.where(take, c_arg, -1)
            best_v = tl.where(slots == w_arg, c_best, best_v)
            best_i = tl.where(slots == w_arg, j0 + c_arg, best_i)
            score = tl.where(tl.arange(0, BN) == c_arg, float("-inf"), score)
    out = tl.where(best_v == float("-inf"), -1, best_i)
    tl.store(IDX + b * sib + g * sig + t * sit + slots, out, mask=slots < COUNT)


def select_blocks(q: torch.Tensor, kc: torch.Tensor, lse: torch.Tensor, q_pos: torch.Tensor, count: int,
                  block: int, stride: int, sel_block: int, init_blocks: int, local_blocks: int,
                  scale: float) -> torch.Tensor:
    """Top-`count` selection blocks per group and query. q [B, H, T, Dk] (the queries to select for), kc
    [B, G, M, Dk] (compressed keys), lse [B, H, T] (their compression-branch log-sum-exp), q_pos [T] (positions).
    Needs d | l and d | l' (checked by the config). Returns [B, G, T, count] int32, -1 where fewer blocks exist."""
    b, h, t, dkd = q.shape
    g, m = kc.shape[1], kc.shape[2]
    q, kc = contiguous_last(q), contiguous_last(kc)
    idx = torch.empty(b, g, t, count, device=q.device, dtype=torch.int32)
    if t == 0:
        return idx
    if m == 0:  # no complete compressed block yet: only forced blocks; never launch with an empty tensor
        kc = kc.new_zeros(b, g, 1, dkd)
    grid = (t, b * g)
    _topk_kernel[grid](q, kc, lse.contiguous(), q_pos.to(torch.int32).contiguous(), idx,
                       *q.stride()[:3], *kc.stride()[:3], *idx.stride()[:3],
                       h, g, t, m, dkd, scale, block, stride, sel_block, init_blocks, local_blocks,
                       COUNT=count, NP=triton.next_power_of_2(count), BH=block_dim(h // g), BN=64,
                       BDK=block_dim(dkd), R=sel_block // stride, L=block // stride)
    return idx
