"""Triton decode attention over a latent cache: one new token per sequence against a long cache, split-K
(flash-decoding) style.

Absorbed MLA/GLA attention is an MQA per latent head: the query heads of group j read keys K̄ = [c ; k_r] and values
V̄ = c straight from the cache, c [B, G, S, d_c] and k_r [B, 1 or G, S, d_r]. The kernel keeps the two key parts
apart (nothing is concatenated or expanded, so the bytes read are the cache's own bytes) and reuses the loaded c
tile as the value tile, as FlashMLA does. Every head of a group is a row of one M tile, so each cache tile is loaded
once per group.

Which keys a sequence reads:
  dense     the index range [lo, hi): a full-cache layer (lo = 0), a sliding-window layer (lo = hi - w) or the
            compressed-block cache of a sparse layer;
  blocks    the union of its group's selected blocks [B, G, n] of `block` tokens (clipped to [0, hi)): the selection
            branch of NSA/ASA global layers.
The key range is cut into `splits` parts, each program writes a partial output and log-sum-exp, and a small
combine step merges them (the number of splits is chosen to fill the GPU when B*G is small).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from leanlm.kernels.common import block_dim, load_tile, online_softmax_step, softmax_finish


@triton.jit
def _decode_kernel(QL, QR, C, KR, BLK, OP, LP,
                   sqlb, sqlh, sqrb, sqrh, scb, scg, scs, skb, skg, sks, sbb, sbg,
                   H, G, DC, DR, lo, hi, per_split, scale, block,
                   NS: tl.constexpr, NB: tl.constexpr, USE_BLOCKS: tl.constexpr, STEP: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr,
                   BDC: tl.constexpr, BDR: tl.constexpr):
    pid_bg, split = tl.program_id(0), tl.program_id(1)
    b, g = pid_bg // G, pid_bg % G
    hg = H // G
    r = tl.arange(0, BM)
    row_ok = r < hg
    head = g * hg + r
    dc = tl.arange(0, BDC)
    ql = load_tile(QL + b * sqlb, head, sqlh, row_ok, DC, BDC)  # [BM, DC]
    qr = load_tile(QR + b * sqrb, head, sqrh, row_ok, DR, BDR)  # [BM, DR]
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDC], tl.float32)
    qk_scale = scale * 1.4426950408889634
    if USE_BLOCKS:
        n_items = tl.minimum(per_split, NB - split * per_split)
    else:
        n_items = tl.minimum(per_split, hi - lo - split * per_split)
    n_items = tl.maximum(n_items, 0)
    for it in range(0, n_items, STEP):  # STEP: 1 block, or BN keys
        if USE_BLOCKS:
            blk = tl.load(BLK + b * sbb + g * sbg + split * per_split + it)
            cols = blk * block + tl.arange(0, BN)
            col_ok = (tl.arange(0, BN) < block) & (cols >= 0) & (cols < hi)  # blk = -1 gives negative cols
        else:
            cols = lo + split * per_split + it + tl.arange(0, BN)
            col_ok = cols < tl.minimum(lo + split * per_split + n_items, hi)
        c = load_tile(C + b * scb + g * scg, cols, scs, col_ok, DC, BDC)  # [BN, DC]: key part and value
        kr = load_tile(KR + b * skb + g * skg, cols, sks, col_ok, DR, BDR)  # [BN, DR]
        s = (tl.dot(ql, tl.trans(c)) + tl.dot(qr, tl.trans(kr))) * qk_scale  # [BM, BN]
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, c, m_i, l_i, acc)
    o, lse = softmax_finish(m_i, l_i, acc)
    out = ((b * H + head) * NS + split)
    tl.store(OP + out[:, None] * DC + dc[None, :], o, mask=row_ok[:, None] & (dc[None, :] < DC))
    tl.store(LP + out, lse, mask=row_ok)


def _num_splits(work: int, programs: int, device: torch.device, unit: int) -> int:
    """Splits of the key range: enough programs to cover the GPU's SMs about twice, at least `unit` keys each."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4  # the interpreter: a few splits, so tests exercise the combine step
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(work, unit), 128))


def latent_decode(q_lat: torch.Tensor, q_rope: torch.Tensor, c: torch.Tensor, k_rope: torch.Tensor, scale: float,
                  lo: int = 0, hi: int | None = None, blocks: torch.Tensor | None = None, block: int = 16,
                  splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One query token per sequence over a latent cache.

    q_lat [B, H, d_c] (W_UK absorbed), q_rope [B, H, d_r], c [B, G, S, d_c], k_rope [B, 1 or G, S, d_r] (last dims
    unit-stride; other strides free, so slices of a larger buffer work). Keys [lo, hi) (dense) or the `block`-token
    blocks listed in `blocks` [B, G, n] (-1 = none), clipped to [0, hi). Returns the latent output [B, H, d_c] and
    the log-sum-exp [B, H] (float32; -inf where no key was visible, with a zero output)."""
    b, h, dcd = q_lat.shape
    g, s = c.shape[1], c.shape[2]
    drd = k_rope.shape[-1]
    hi = s if hi is None else hi
    for x in (q_lat, q_rope, c, k_rope):
        if x.stride(-1) != 1:
            raise ValueError("latent_decode needs unit stride in the last dimension")
    if s == 0 or hi <= lo:  # nothing visible: zero output, lse -inf (never launch with an empty tensor)
        return q_lat.new_zeros(b, h, dcd), torch.full((b, h), float("-inf"), device=q_lat.device)
    bn = 32 if blocks is None else block_dim(block)
    if blocks is not None:
        nb = blocks.shape[-1]
        blocks = blocks.to(torch.int32)
        ns = splits or _num_splits(nb, b * g, q_lat.device, 1)
        per = triton.cdiv(nb, ns)
    else:
        nb = 0
        ns = splits or _num_splits(max(hi - lo, 1), b * g, q_lat.device, 256)
        per = triton.cdiv(triton.cdiv(max(hi - lo, 1), ns), bn) * bn
    ns = max(1, triton.cdiv(nb if blocks is not None else max(hi - lo, 1), per))
    o_part = torch.empty(b, h, ns, dcd, device=c.device, dtype=torch.float32)
    l_part = torch.empty(b, h, ns, device=c.device, dtype=torch.float32)
    krs = k_rope.stride()
    blk = blocks if blocks is not None else torch.zeros(1, 1, 1, dtype=torch.int32, device=c.device)
    _decode_kernel[(b * g, ns)](q_lat, q_rope, c, k_rope, blk, o_part, l_part,
                                q_lat.stride(0), q_lat.stride(1), q_rope.stride(0), q_rope.stride(1),
                                *c.stride()[:3], krs[0], krs[1] if k_rope.shape[1] > 1 else 0, krs[2],
                                blk.stride(0), blk.stride(1), h, g, dcd, drd, lo, hi, per, scale, block,
                                NS=ns, NB=nb, USE_BLOCKS=blocks is not None, STEP=1 if blocks is not None else bn,
                                BM=block_dim(h // g), BN=bn,
                                BDC=block_dim(dcd), BDR=block_dim(drd))
    lse = torch.logsumexp(l_part, dim=-1)  # [B, H]
    w = torch.exp(l_part - lse.masked_fill(lse == float("-inf"), 0.0)[..., None]).nan_to_num(0.0)  # [B, H, NS]
    o = (w[..., None] * o_part).sum(2)
    return o.to(q_lat.dtype), lse
