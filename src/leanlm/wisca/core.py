"""WISCA's rule (arXiv 2508.16676): balance the norms of the two matrices of a pair whose product is all the
model sees, so the output is unchanged.

    s = sqrt(|W_k| / |W_q|):  W_q, b_q <- s W_q, s b_q     W_k, b_k <- W_k / s, b_k / s
    t = sqrt(|W_o| / |W_v|):  W_v, b_v <- t W_v, t b_v     W_o      <- W_o / t   (o_proj bias unchanged)

With grouped-query attention the K (and V) rows of one KV head serve the g query heads of its group, so the
factors live per KV head and the query side / o_proj side of every head of the group takes its KV head's factor.
`qk_ops` and `vo_ops` compute the factors at the three granularities (tensor, group, channel; channel factors are
tied across each RoPE channel pair) and return them as `ScaleOp`s; `apply_ops` applies them in place, with the
optimizer-state policy. Everything else in the package finds the pairs (`sites`), extends the rule beyond the
paper (`extensions`: latent attention, SwiGLU, LoRA factors) or runs it during training (`callback`, `hf`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn

from leanlm.wisca.config import WiscaConfig

if TYPE_CHECKING:
    from leanlm.wisca.sites import AttentionSite


@dataclass
class ScaleOp:
    """param <- (param + offset) * factor - offset, element-wise with broadcasting; computed in at least fp32."""

    param: nn.Parameter
    factor: torch.Tensor
    offset: float = 0.0


def mass(w: torch.Tensor, norm: str, dim: int) -> torch.Tensor:
    """Per-row (dim=1) or per-column (dim=0) contribution to the norm, accumulated in float64:
    sum |w| (l1) or sum w^2 (l2)."""
    if norm == "l1":
        return torch.linalg.vector_norm(w, ord=1, dim=dim, dtype=torch.float64)
    return torch.linalg.vector_norm(w, ord=2, dim=dim, dtype=torch.float64) ** 2


def norm_of(mass: torch.Tensor, norm: str) -> torch.Tensor:
    return mass if norm == "l1" else mass.sqrt()


def total_norm(w: torch.Tensor, norm: str) -> float:
    """Entry-wise norm of a whole tensor (2-D, or a 1-D gain vector)."""
    return float(norm_of(mass(w.reshape(1, -1) if w.dim() == 1 else w, norm, 1).sum(), norm))


def pair_sum(x: torch.Tensor, d: int, rope_pairs: str) -> torch.Tensor:
    """x [..., d] plus each channel's RoPE partner, so the result is equal on both channels of a pair."""
    if rope_pairs == "half":
        partner = torch.cat([x[..., d // 2 :], x[..., : d // 2]], dim=-1)
    else:
        partner = x.unflatten(-1, (d // 2, 2)).flip(-1).flatten(-2)
    return x + partner


def balance(num: torch.Tensor, den: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """sqrt(num / den), with 1 where either side is zero (nothing to balance)."""
    ok = (num > eps) & (den > eps)
    return torch.where(ok, (num.clamp_min(eps) / den.clamp_min(eps)).sqrt(), torch.ones_like(num))


def qk_ops(site: AttentionSite, cfg: WiscaConfig) -> tuple[list[ScaleOp], torch.Tensor, dict]:
    h, kvh, d = site.num_heads, site.num_kv_heads, site.head_dim
    g = h // kvh
    if site.q_norm is not None and site.k_norm is not None:
        off_q, off_k = site.gain_offsets
        gq, gk = site.qk_gains()  # [d] each, shared by all heads
        if cfg.qk == "channel":
            s = balance(pair_sum(mass(gk[None], cfg.norm, 0), d, cfg.rope_pairs),
                         pair_sum(mass(gq[None], cfg.norm, 0), d, cfg.rope_pairs))
        else:
            s = balance(norm_of(mass(gk[None], cfg.norm, 1), cfg.norm),
                         norm_of(mass(gq[None], cfg.norm, 1), cfg.norm)).reshape(()).expand(d).clone()
        ops = [ScaleOp(site.q_norm.weight, s, off_q), ScaleOp(site.k_norm.weight, 1 / s, off_k)]
        return ops, s, {"q": total_norm(gq, cfg.norm), "k": total_norm(gk, cfg.norm)}
    wq, wk = site.q.effective_weight(), site.k.effective_weight()
    mq = mass(wq, cfg.norm, 1).view(kvh, g, d)  # per query row, grouped by KV head
    mk = mass(wk, cfg.norm, 1).view(kvh, d)
    if cfg.qk == "tensor":
        s = balance(norm_of(mk.sum(), cfg.norm), norm_of(mq.sum(), cfg.norm)).expand(kvh, d)
    elif cfg.qk == "group":
        s = balance(norm_of(mk.sum(-1), cfg.norm), norm_of(mq.sum((1, 2)), cfg.norm))[:, None].expand(kvh, d)
    else:  # channel, tied across RoPE pairs and across the query heads of the group
        s = balance(norm_of(pair_sum(mk, d, cfg.rope_pairs), cfg.norm),
                     norm_of(pair_sum(mq.sum(1), d, cfg.rope_pairs), cfg.norm))
    s_q = s[:, None, :].expand(kvh, g, d).reshape(-1)  # query head h uses KV head h // g
    ops = site.q.row_ops(s_q) + site.k.row_ops((1 / s).reshape(-1))
    return ops, s, {"q": norm_of(mq.sum(), cfg.norm).item(), "k": norm_of(mk.sum(), cfg.norm).item()}


def vo_ops(site: AttentionSite, cfg: WiscaConfig) -> tuple[list[ScaleOp], torch.Tensor, dict]:
    h, kvh, d = site.num_heads, site.num_kv_heads, site.head_dim
    g = h // kvh
    wv, wo = site.v.effective_weight(), site.o.effective_weight()
    mv = mass(wv, cfg.norm, 1).view(kvh, d)
    mo = mass(wo, cfg.norm, 0).view(kvh, g, d).sum(1)  # o_proj columns of all query heads of a group
    if cfg.vo == "tensor":
        t = balance(norm_of(mo.sum(), cfg.norm), norm_of(mv.sum(), cfg.norm)).expand(kvh, d)
    elif cfg.vo == "group":
        t = balance(norm_of(mo.sum(-1), cfg.norm), norm_of(mv.sum(-1), cfg.norm))[:, None].expand(kvh, d)
    else:
        t = balance(norm_of(mo, cfg.norm), norm_of(mv, cfg.norm))
    t_o = t[:, None, :].expand(kvh, g, d).reshape(-1)
    ops = site.v.row_ops(t.reshape(-1)) + site.o.col_ops(1 / t_o)
    return ops, t, {"v": norm_of(mv.sum(), cfg.norm).item(), "o": norm_of(mo.sum(), cfg.norm).item()}


@torch.no_grad()
def apply_ops(ops: Iterable[ScaleOp], optimizer: torch.optim.Optimizer | None = None, state_mode: str = "keep") -> None:
    """Apply scale operations in place (in fp32, or fp64 for fp64 parameters) and update the optimizer state as
    `state_mode` says."""
    for op in ops:
        p = op.param
        work = torch.promote_types(p.dtype, torch.float32)
        f = op.factor.to(p.device, work)
        if op.offset == 0.0 and p.dtype == work:
            p.mul_(f)  # in place, no temporaries
        else:
            p.copy_(((p.to(work) + op.offset) * f - op.offset).to(p.dtype))
        if optimizer is None or state_mode == "keep" or p not in optimizer.state:
            continue
        if state_mode == "reset":
            del optimizer.state[p]
            continue
        st = optimizer.state[p]
        fb = f.expand_as(p) if f.dim() else f
        for key, power in (("exp_avg", 1), ("exp_avg_sq", 2), ("max_exp_avg_sq", 2)):
            if key in st:
                st[key].copy_((st[key].to(work) / fb**power).to(st[key].dtype))
