"""WISCA beyond the paper (each off by default or automatic only where the paper's rule cannot apply):
latent attention (MLA/GLA/ASA: three exact symmetries per head), SwiGLU up/down balancing (`ffn`), and LoRA factor
balancing (`lora: factors`). See the package docstring for the maths."""

from __future__ import annotations

import math

import torch
from torch import nn

from leanlm.wisca.config import WiscaConfig
from leanlm.wisca.core import ScaleOp, balance, mass, norm_of, total_norm
from leanlm.wisca.sites import FFNSite, LatentSite, LinearView, is_linear


def latent_ops(site: LatentSite, cfg: WiscaConfig) -> tuple[list[ScaleOp], float, float]:
    """Scale operations of a latent site; returns them with the mean QK and VO factors."""
    h, g, dn, dr, dv = site.num_heads, site.groups, site.nope_dim, site.rope_dim, site.v_dim
    p = site.parts()
    one = lambda *shape: torch.ones(*shape, dtype=torch.float64)  # noqa: E731
    s, r, t = one(h, dn), one(()), one(h, dv)
    if cfg.qk != "none":
        mq, mk = mass(p["q_nope"].reshape(h * dn, -1), cfg.norm, 1).view(h, dn), \
            mass(p["k_nope"].reshape(h * dn, -1), cfg.norm, 1).view(h, dn)
        s = granular(mk, mq, cfg.qk, cfg.norm, g)
        if site.scale_rope:
            r = balance(norm_of(mass(p["k_rope"], cfg.norm, 1).sum(), cfg.norm),
                         norm_of(mass(p["q_rope"].reshape(h * dr, -1), cfg.norm, 1).sum(), cfg.norm))
    if cfg.vo != "none":
        mv = mass(p["v"].reshape(h * dv, -1), cfg.norm, 1).view(h, dv)
        mo = mass(p["o"].reshape(-1, h * dv), cfg.norm, 0).view(h, dv)
        t = granular(mo, mv, cfg.vo, cfg.norm, g)
    q_rows = torch.cat([s, r.expand(h, dr)], dim=1).reshape(-1)  # [H * (d_nope + d_r)]
    kv_rows = torch.cat([1 / s, t], dim=1).view(g, h // g * (dn + dv))  # [g, (H/g)(d_nope + d_v)]
    latent_rows = one(site.kv_a.out_features - dr)
    ops = site.q.row_ops(q_rows) + [ScaleOp(site.kv_b, kv_rows[:, :, None])]
    ops += site.kv_a.row_ops(torch.cat([latent_rows, (1 / r).expand(dr)])) + site.o.col_ops(1 / t.reshape(-1))
    return ops, float(torch.cat([s.reshape(-1), r.reshape(1)]).mean()), float(t.mean())


def granular(num: torch.Tensor, den: torch.Tensor, mode: str, norm: str, groups: int) -> torch.Tensor:
    """Balancing factors [H, d] from masses [H, d]: one for all (tensor), per latent head (group), per channel."""
    h, d = num.shape
    if mode == "tensor":
        return balance(norm_of(num.sum(), norm), norm_of(den.sum(), norm)).expand(h, d).clone()
    if mode == "group":
        f = balance(norm_of(num.view(groups, -1).sum(-1), norm), norm_of(den.view(groups, -1).sum(-1), norm))
        return f[:, None].expand(groups, h // groups * d).reshape(h, d).clone()
    return balance(norm_of(num, norm), norm_of(den, norm))


def ffn_ops(site: FFNSite, cfg: WiscaConfig) -> list[ScaleOp]:
    up, down = site.up.effective_weight(), site.down.effective_weight()
    u = balance(norm_of(mass(down, cfg.norm, 0), cfg.norm), norm_of(mass(up, cfg.norm, 1), cfg.norm))
    return site.up.row_ops(u) + site.down.col_ops(1 / u)


def lora_factor_ops(model: nn.Module, cfg: WiscaConfig) -> list[ScaleOp]:
    ops = []
    for module in model.modules():
        if not hasattr(module, "lora_A") or not is_linear(module):
            continue
        for a, b, _ in LinearView(module).adapters():
            na, nb = total_norm(a.weight.detach(), cfg.norm), total_norm(b.weight.detach(), cfg.norm)
            if na > 0 and nb > 0:  # B <- u B, A <- A / u; nothing to balance while B == 0 (fresh adapters)
                u = torch.tensor(math.sqrt(na / nb), dtype=torch.float64)
                ops += [ScaleOp(b.weight, u), ScaleOp(a.weight, 1 / u)]
    return ops
