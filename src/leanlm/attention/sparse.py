"""Native Sparse Attention's three branches as plain-PyTorch reference operations.

These define the semantics; the Triton kernels (`leanlm.kernels`) are tested against them and take the same
arguments (fla's convention for `naive_nsa` / `parallel_nsa`), so one layer body calls either: this module, or
`leanlm.kernels.branches` (the kernels), or `leanlm.kernels.decode_branches` (one-token decoding over latent parts).
Queries sit at the contiguous positions q_start, q_start + 1, ... (an int, like the kernels'); only `select_blocks`
takes a position tensor, since query grouping selects for a strided subset of the rows. Block selection reads the
compression branch's log-sum-exp (not its probability matrix), as the on-device top-n kernel does. All work in
"KV group" form: queries q [B, H, T, Dk], keys k [B, G, S, Dk] and values v [B, G, S, Dv], where query head h
belongs to group h // (H / G). For NSA the groups are the GQA key/value heads; for ASA's global layers they are
GLA's latent heads in absorbed form (Dk = d_c + d_r, Dv = d_c). Positions are absolute token positions; keys start at `k_start`.

Semantics (NSA, arXiv 2502.11089, with fla's reading where the paper leaves room):
  compression  block m pools keys/values m*d .. m*d+l-1 (`compress`); a query at position p sees block m only once
               it is complete (m*d + l - 1 <= p); queries that see no block get a zero output.
  selection    importance of selection block j (tokens j*l' .. (j+1)*l'-1) = sum of the compression probabilities
               of the compressed blocks that overlap it, summed over the query heads of the group (NSA Eq. 9-10;
               identity when l = l' = d); the first `init_blocks` and the `local_blocks` most recent blocks are
               always chosen; top-n blocks per group and query, only blocks that start at or before p. The query
               then attends causally to the tokens of its chosen blocks. No gradient flows through the choice.
  window       a query at p attends to keys at p-w+1 .. p.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def num_compressed_blocks(length: int, block: int, stride: int) -> int:
    """Number of complete compression blocks among the first `length` tokens."""
    return 0 if length < block else (length - block) // stride + 1


class MLPCompressor(nn.Module):
    """NSA's learned compressor φ: intra-block position embedding, then an MLP over the flattened block."""

    def __init__(self, block: int, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or dim
        self.pos = nn.Parameter(torch.zeros(block, dim))
        self.fc1 = nn.Linear(block * dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        """blocks [..., l, D] -> [..., D]."""
        return self.fc2(F.gelu(self.fc1((blocks + self.pos).flatten(-2))))


def compress(x: torch.Tensor, block: int, stride: int, compressor: nn.Module | None = None) -> torch.Tensor:
    """Compressed tokens [B, G, M, D] of x [B, G, S, D]: block m covers x[:, :, m*stride : m*stride + block];
    mean pooling when `compressor` is None."""
    b, g, s, d = x.shape
    m = num_compressed_blocks(s, block, stride)
    if m == 0:
        return x.new_zeros(b, g, 0, d)
    windows = x.unfold(2, block, stride)  # [B, G, M, D, l]
    if compressor is None:
        return windows.mean(-1)
    return compressor(windows.transpose(-1, -2))


LATENT_PARTS = False  # keys come as one tensor (decode_branches takes latent parts)


def _positions(start: int, t: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, start + t, device=device)  # [T]


def _compression_scores(q: torch.Tensor, kc: torch.Tensor, q_pos: torch.Tensor, block: int, stride: int,
                        scale: float) -> torch.Tensor:
    """Scaled scores [B, H, T, M] in at least float32, -inf where a block is not yet complete for the query."""
    h, g, m = q.shape[1], kc.shape[1], kc.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax in at least float32
    scores = (q @ kc.repeat_interleave(h // g, dim=1).transpose(-1, -2)).to(acc) * scale  # [B, H, T, M]
    ends = torch.arange(m, device=q.device) * stride + block - 1
    return scores.masked_fill(~(ends[None, :] <= q_pos[:, None]), float("-inf"))


def compression_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, q_start: int, block: int,
                          stride: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over compressed blocks. q [B, H, T, Dk] at positions q_start.., kc [B, G, M, Dk], vc [B, G, M, Dv].
    Returns the output [B, H, T, Dv] (zero for queries that see no block) and the log-sum-exp [B, H, T] (-inf
    there; no gradient), which `select_blocks` reads."""
    h, g = q.shape[1], kc.shape[1]
    scores = _compression_scores(q, kc, _positions(q_start, q.shape[2], q.device), block, stride, scale)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible block: all -inf -> 0
    return probs.to(q.dtype) @ vc.repeat_interleave(h // g, dim=1), torch.logsumexp(scores, dim=-1).detach()


def compression_probs(q: torch.Tensor, kc: torch.Tensor, lse: torch.Tensor, q_pos: torch.Tensor, block: int,
                      stride: int, scale: float) -> torch.Tensor:
    """The compression branch's probabilities [B, H, T, M] recovered from its log-sum-exp, exp(s - lse): zero for
    blocks a query cannot see and for queries that see none. q [B, H, T, Dk], lse [B, H, T], q_pos [T]."""
    scores = _compression_scores(q, kc, q_pos, block, stride, scale)
    lse = torch.where(lse == float("-inf"), float("inf"), lse.to(scores.dtype))  # saw no block: all 0
    return torch.exp(scores - lse[..., None])


def block_overlap(num_cmp: int, num_sel: int, block: int, stride: int, sel_block: int,
                  device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[M, N] matrix: 1 where compressed block m overlaps selection block j (NSA Eq. 9 for general l, d, l')."""
    start = torch.arange(num_cmp, device=device) * stride
    j = torch.arange(num_sel, device=device)
    over = (start[:, None] < (j[None, :] + 1) * sel_block) & (start[:, None] + block > j[None, :] * sel_block)
    return over.to(dtype)


def select_blocks(q: torch.Tensor, kc: torch.Tensor, lse: torch.Tensor, q_pos: torch.Tensor, count: int,
                  block: int, stride: int, sel_block: int, init_blocks: int, local_blocks: int,
                  scale: float) -> torch.Tensor:
    """Top-`count` selection blocks per group and query. q [B, H, T, Dk] (the queries to select for), kc
    [B, G, M, Dk] (compressed keys), lse [B, H, T] (their compression log-sum-exp), q_pos [T] (their positions).
    Returns indices [B, G, T, count] (long), -1 where fewer blocks exist. No gradient flows through the choice."""
    probs = compression_probs(q.detach(), kc.detach(), lse, q_pos, block, stride, scale)  # [B, H, T, M]
    b, h, t, m = probs.shape
    groups = kc.shape[1]
    num_sel = int(q_pos.max().item()) // sel_block + 1 if t else 1
    overlap = block_overlap(m, num_sel, block, stride, sel_block, probs.device, torch.float32)
    acc = torch.promote_types(probs.dtype, torch.float32)
    imp = probs.to(acc) @ overlap.to(acc)  # [B, H, T, N]
    imp = imp.view(b, groups, h // groups, t, num_sel).sum(2)  # [B, G, T, N]
    j = torch.arange(num_sel, device=probs.device)
    cur = q_pos // sel_block  # [T]
    valid = j[None, :] <= cur[:, None]  # [T, N]
    forced = (j[None, :] < init_blocks) | (j[None, :] > cur[:, None] - local_blocks)
    score = torch.where(forced & valid, torch.full_like(imp, float("inf")), imp)
    score = score.masked_fill(~valid, float("-inf"))
    k = min(count, num_sel)
    top, idx = score.topk(k, dim=-1)
    idx = idx.masked_fill(top == float("-inf"), -1)
    if k < count:
        idx = F.pad(idx, (0, count - k), value=-1)
    return idx


def selection_mask(idx: torch.Tensor, q_pos: torch.Tensor, k_start: int, length: int, sel_block: int) -> torch.Tensor:
    """Boolean [B, G, T, S] mask of the tokens a query may attend in its selected blocks (causal)."""
    b, g, t, _ = idx.shape
    k_pos = torch.arange(k_start, k_start + length, device=idx.device)
    num_sel = int(k_pos[-1].item()) // sel_block + 1
    chosen = torch.zeros(b, g, t, num_sel + 1, dtype=torch.bool, device=idx.device)
    chosen.scatter_(-1, idx.masked_fill(idx < 0, num_sel), True)  # -1 -> the spare last column
    tok = chosen[..., k_pos // sel_block]  # [B, G, T, S]
    return tok & (k_pos[None, :] <= q_pos[:, None])


def selection_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, q_start: int,
                        k_start: int, sel_block: int, scale: float, query_group: int = 1) -> torch.Tensor:
    """Attention of each query over the tokens of its group's selected blocks. q [B, H, T, Dk] at positions
    q_start.., k [B, G, S, Dk] / v [B, G, S, Dv] from position k_start, idx [B, G, T, n]; returns [B, H, T, Dv].
    Dense masked reference (O(T*S) memory). `query_group` is the kernel's (rows of one group share blocks, which
    lets it load them once); the reference reads `idx` per row and needs no such promise."""
    h, g = q.shape[1], k.shape[1]
    q_pos = _positions(q_start, q.shape[2], q.device)
    mask = selection_mask(idx, q_pos, k_start, k.shape[2], sel_block).repeat_interleave(h // g, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=h != g)


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """Boolean [T, S]: query at p attends keys at p-window+1 .. p."""
    diff = q_pos[:, None] - k_pos[None, :]
    return (diff >= 0) & (diff < window)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, k_start: int, window: int,
                     scale: float) -> torch.Tensor:
    """Sliding-window attention. q [B, H, T, Dk] at positions q_start.., k [B, G, S, Dk] / v [B, G, S, Dv] from
    position k_start; returns [B, H, T, Dv]."""
    q_pos = _positions(q_start, q.shape[2], q.device)
    mask = window_mask(q_pos, _positions(k_start, k.shape[2], q.device), window)[None, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
