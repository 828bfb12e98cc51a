"""WISCA: output-preserving weight rescaling of attention weight pairs (and LoRA factors), applied during training.

For every attention layer the Q/K pair and the V/O pair are rescaled so that the model computes exactly the same
function while the two matrices of each pair get equal norms (paper: arXiv 2508.16676; facts and ambiguities in
`shared/papers/wisca.md`):

    s = sqrt(|W_k| / |W_q|):  W_q, b_q <- s W_q, s b_q     W_k, b_k <- W_k / s, b_k / s
    t = sqrt(|W_o| / |W_v|):  W_v, b_v <- t W_v, t b_v     W_o      <- W_o / t   (o_proj bias unchanged)

Granularity (`qk`, `vo`): `tensor` (one factor per matrix, the paper's QK_TEN/VO_TEN, default), `group` (one factor
per KV group, shared by the group's query heads) or `channel` (one factor per KV-group channel; for Q/K it is
shared by the two channels of each RoPE-rotated pair (c, c + d/2), which is what keeps RoPE attention exact; a
per-row rule that ignores the pairs is *not* output-preserving and is not offered). `none` skips the pair.
`norm`: `l1` (entry-wise, the paper's) or `l2` (Frobenius). Both balance the two norms exactly.

QK-norm models (Qwen3, Gemma-3, OLMo-2): the projections feed a per-head RMSNorm, so scaling W_q or W_k changes
nothing; the real product symmetry is in the norm gains, so WISCA balances `q_norm`/`k_norm` gains instead
(Gemma stores the gain as 1 + w; the offset is detected by probing the module, not by its class name). The gains are
shared by all heads, so `group` acts like `tensor` there.

Extensions (off by default, not in the paper): `ffn=True` balances each SwiGLU hidden unit between its up_proj row
and down_proj column (the gate cannot be scaled: SiLU is not homogeneous). For PEFT LoRA models, `lora` selects
what is balanced: `effective` (reading (a): the attention pairs on the effective weights W0 + scale * B A, by
scaling the frozen W0 together with B rows or A columns), `factors` (reading (b): each adapted matrix's (B, A) pair
balanced, B <- u B, A <- A / u with u = sqrt(|A| / |B|); skipped while B = 0), or `both`.

Optimizer state after a transition (`optimizer_state`): `keep` (leave Adam's moments as they are: what an in-place
edit does, the paper's most likely behaviour, default), `reset` (drop the state of every rescaled parameter, so Adam
restarts its moments and bias correction for them) or `rescale` (map the moments to the new coordinates: a
parameter multiplied element-wise by f has gradients divided by f, so exp_avg <- exp_avg / f and
exp_avg_sq <- exp_avg_sq / f^2, which makes the transition equivariant for Adam).

Latent attention (MLA, GLA and ASA's layers; an extension, not in the paper): per head the score is
q_nope . (W_UK c) + q_rope . k_rope and the output is W_O (W_UV c), so three exact symmetries exist: the no-RoPE
query rows against the W_UK rows of the same head (per head and channel: no RoPE acts there), the RoPE query rows
against the shared RoPE key rows of `kv_a_proj_with_mqa` (one factor for the tensor: the key is shared by every
head), and the W_UV rows against the o_proj columns. `qk`/`vo` granularities map to these (`group` = per latent
head). The latent itself is untouched, so compressed and selected blocks see the same latents; only when an MLP
compressor reads the RoPE key (NSA's learned φ) is the RoPE factor left at 1, since φ is not homogeneous.
NSA layers with mean pooling rescale like GQA (pooling is linear); with the MLP compressor they are unsupported.

Modules are found by structure: any module holding q/k/v/o projections (under Llama, GPT-NeoX-style or Meta names,
or, failing names, four linear maps whose shapes fit H*d, Hkv*d, Hkv*d and H*d -> hidden in that order) whose head
counts come from the model config. Attention-like modules that do not fit (latent or sparse attention, fused QKV,
DoRA adapters) are listed in `WiscaReport.unsupported`, never skipped silently.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from leanlm.errors import ConfigError, ModelError
from leanlm.runconfig import register_section
from leanlm.train import Callback

GRANULARITIES = ("tensor", "group", "channel", "none")


@dataclass
class WiscaConfig:
    """The `wisca:` section of a run config. `every: 250` turns it on (with a transition at step 0 too)."""

    every: int = 0  # steps between transitions; 0 = no periodic transitions
    at_init: bool | None = None  # transition before the first step; None = yes iff every > 0 (init-only: every=0, at_init=true)
    qk: str = "tensor"
    vo: str = "tensor"
    norm: str = "l1"
    ffn: bool = False
    lora: str = "effective"
    optimizer_state: str = "keep"
    rope_pairs: str = "half"  # RoPE channel pairing: half (HF rotate_half: c, c+d/2) | interleaved (2c, 2c+1)
    apply: str = "weights"  # weights (WISCA) | lr (control: change per-tensor learning rates by the same ratios)

    def __post_init__(self) -> None:
        self.check()  # an invalid WiscaConfig cannot exist (e.g. ffn="no" would otherwise be truthy)

    @property
    def enabled(self) -> bool:
        return self.every > 0 or bool(self.at_init)

    @property
    def init_transition(self) -> bool:
        return self.every > 0 if self.at_init is None else bool(self.at_init)

    def check(self) -> None:
        if not isinstance(self.every, int) or isinstance(self.every, bool):
            raise ConfigError("wisca.every", f"must be an integer, got {self.every!r}", "use e.g. 250")
        for name in ("at_init", "ffn"):
            value = getattr(self, name)
            if not (isinstance(value, bool) or (name == "at_init" and value is None)):
                raise ConfigError(f"wisca.{name}", f"must be true or false, got {value!r}", f"use {name}: true")
        if self.every < 0:
            raise ConfigError("wisca.every", f"must be >= 0, got {self.every}", "use e.g. 250, or 0 for init only")
        for name in ("qk", "vo"):
            if getattr(self, name) not in GRANULARITIES:
                raise ConfigError(f"wisca.{name}", f"unknown granularity {getattr(self, name)!r}",
                                  f"use one of {GRANULARITIES}")
        choices = {"norm": ("l1", "l2"), "lora": ("effective", "factors", "both"),
                   "optimizer_state": ("keep", "reset", "rescale"), "rope_pairs": ("half", "interleaved"),
                   "apply": ("weights", "lr")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"wisca.{name}", f"unknown value {getattr(self, name)!r}", f"use one of {allowed}")


# ---------------------------------------------------------------------------------------------------- structure
@dataclass
class LinearView:
    """A linear map y = x W^T + b that may be a plain nn.Linear or a PEFT LoRA layer (W = W0 + sum scale * B A)."""

    module: nn.Module

    @property
    def base(self) -> nn.Module:
        return getattr(self.module, "base_layer", self.module)

    def adapters(self) -> list[tuple[nn.Linear, nn.Linear, float]]:
        """(A, B, scale) of every active LoRA adapter."""
        m = self.module
        if not hasattr(m, "lora_A"):
            return []
        active = getattr(m, "active_adapters", None) or list(m.lora_A.keys())
        return [(m.lora_A[a], m.lora_B[a], float(m.scaling[a])) for a in active if a in m.lora_A]

    def effective_weight(self) -> torch.Tensor:  # [out, in]; the weight itself when there is no adapter
        w = self.base.weight.detach()
        adapters = self.adapters()
        if adapters:
            w = w.double()
            for a, b, scale in adapters:
                w = w + scale * (b.weight.detach().double() @ a.weight.detach().double())
        return w

    @property
    def out_features(self) -> int:
        return self.base.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.base.weight.shape[1]

    def row_ops(self, r: torch.Tensor) -> list["ScaleOp"]:
        """Multiply output row i by r[i] (weight rows, bias, LoRA B rows)."""
        ops = [ScaleOp(self.base.weight, r[:, None])]
        if getattr(self.base, "bias", None) is not None:
            ops.append(ScaleOp(self.base.bias, r))
        ops += [ScaleOp(b.weight, r[:, None]) for _, b, _ in self.adapters()]
        return ops

    def col_ops(self, c: torch.Tensor) -> list["ScaleOp"]:
        """Multiply input column j by c[j] (weight columns, LoRA A columns); the bias is untouched."""
        return [ScaleOp(self.base.weight, c[None, :])] + [ScaleOp(a.weight, c[None, :]) for a, _, _ in self.adapters()]


@dataclass
class ScaleOp:
    """param <- (param + offset) * factor - offset, element-wise with broadcasting; computed in at least fp32."""

    param: nn.Parameter
    factor: torch.Tensor
    offset: float = 0.0


@dataclass
class AttentionSite:
    name: str
    q: LinearView
    k: LinearView
    v: LinearView
    o: LinearView
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None
    gain_offsets: tuple[float, float] = (0.0, 0.0)  # of q_norm / k_norm (1.0 for Gemma's 1 + w gains)

    def qk_gains(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Effective q/k norm gains (weight + offset) [d] in float64, for QK-norm models."""
        return (self.q_norm.weight.detach().double() + self.gain_offsets[0],
                self.k_norm.weight.detach().double() + self.gain_offsets[1])


@dataclass
class LatentSite:
    """A latent-attention module (`leanlm.attention.latent.LatentProjections` layout, DeepSeek parameter names)."""

    name: str
    q: LinearView  # q_proj or q_b_proj: rows [H, d_nope + d_r]
    kv_a: LinearView  # kv_a_proj_with_mqa: rows [g * d_c latent ; d_r RoPE key]
    kv_b: nn.Parameter  # [g, (H/g) * (d_nope + d_v), d_c]
    o: LinearView  # columns [H, d_v]
    num_heads: int
    groups: int
    nope_dim: int
    rope_dim: int
    v_dim: int
    scale_rope: bool = True

    def parts(self) -> dict[str, torch.Tensor]:
        """The weights of each side of each pair (float64 views for norms)."""
        h, g, dn, dr, dv = self.num_heads, self.groups, self.nope_dim, self.rope_dim, self.v_dim
        wq = self.q.effective_weight().view(h, dn + dr, -1)
        kvb = self.kv_b.detach().view(g, h // g, dn + dv, -1)
        return {"q_nope": wq[:, :dn], "q_rope": wq[:, dn:], "k_nope": kvb[:, :, :dn].reshape(h, dn, -1),
                "k_rope": self.kv_a.effective_weight()[-dr:], "v": kvb[:, :, dn:].reshape(h, dv, -1),
                "o": self.o.effective_weight().view(-1, h, dv)}

    def norms(self, norm: str) -> dict[str, float]:
        p = self.parts()
        n = {k: _total_norm(w.reshape(w.shape[0], -1) if w.dim() > 2 else w, norm) for k, w in p.items()}
        return {"q": n["q_nope"] + n["q_rope"], "k": n["k_nope"] + n["k_rope"], "v": n["v"], "o": n["o"]}


@dataclass
class FFNSite:
    name: str
    up: LinearView
    down: LinearView


@dataclass
class WiscaReport:
    """What a transition did: per-layer norms before/after and factors; modules it could not handle."""

    layers: list[dict[str, Any]] = field(default_factory=list)
    unsupported: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    sites: list[AttentionSite | LatentSite] = field(default_factory=list, repr=False)  # one per row of `layers`

    def table(self) -> str:
        head = f"{'layer':<40} {'|Wq|':>10} {'|Wk|':>10} {'s':>7}   {'|Wv|':>10} {'|Wo|':>10} {'t':>7}"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            g = lambda key: r.get(key, math.nan)  # noqa: E731 (norms are absent for skipped pairs)
            lines.append(f"{r['name']:<40} {g('q_before'):>10.4g} {g('k_before'):>10.4g} {r['s_mean']:>7.3f}   "
                         f"{g('v_before'):>10.4g} {g('o_before'):>10.4g} {r['t_mean']:>7.3f}")
            lines.append(f"{'  after':<40} {g('q_after'):>10.4g} {g('k_after'):>10.4g} {'':>7}   "
                         f"{g('v_after'):>10.4g} {g('o_after'):>10.4g}")
        for name, why in self.unsupported:
            lines.append(f"unsupported: {name}: {why}")
        return "\n".join(lines)


_NAME_SETS = (("q_proj", "k_proj", "v_proj", "o_proj"), ("wq", "wk", "wv", "wo"),
              ("query", "key", "value", "dense"), ("q", "k", "v", "o"))
_FFN_NAMES = (("up_proj", "down_proj", "gate_proj"), ("w3", "w2", "w1"))


def _is_linear(m: nn.Module) -> bool:
    return isinstance(getattr(m, "base_layer", m), nn.Linear)


def _text_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    return cfg


def _uses_dora(m: nn.Module) -> bool:
    flags = getattr(m, "use_dora", {})
    return any(flags.values()) if isinstance(flags, dict) else bool(flags)


def find_sites(model: nn.Module) -> tuple[list[AttentionSite], list[FFNSite], list[tuple[str, str]]]:
    """Attention pairs and SwiGLU FFNs of `model`, and the attention-like modules that cannot be rescaled."""
    cfg = _text_config(model)
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", None)
    head_dim = getattr(cfg, "head_dim", None) or (hidden // heads if heads and hidden else None)
    sites, ffns, unsupported = [], [], []
    claimed: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in claimed:  # inside a site already found (or sharing its projections)
            continue
        reason = getattr(module, "wisca_unsupported", None)
        if callable(reason) and reason():
            unsupported.append((name, reason()))
            claimed.update(id(m) for m in module.modules())
            continue
        children = dict(module.named_children())
        latent = _latent_site(name, module)
        if latent is not None:
            sites.append(latent)
            claimed.update(id(m) for m in module.modules())
            continue
        found = None
        for names in _NAME_SETS:
            if all(n in children and _is_linear(children[n]) for n in names):
                found = [children[n] for n in names]
                break
        if found is None and heads:
            lin = [c for c in children.values() if _is_linear(c)]
            if len(lin) == 4:  # structural fallback: q, k, v, o in registration order, checked by shape
                found = lin
        if found is not None and heads and head_dim:
            q, k, v, o = (LinearView(m) for m in found)
            shapes_ok = (q.out_features == heads * head_dim and k.out_features == kv * head_dim
                         and v.out_features == kv * head_dim and o.in_features == heads * head_dim)
            if not shapes_ok:
                if any(t in type(module).__name__.lower() for t in ("attn", "attention")):
                    unsupported.append((name, "projection shapes do not match the config's heads/KV heads/head dim"))
                continue
            if any(_uses_dora(m) for m in found):
                unsupported.append((name, "DoRA adapters rescale their own magnitude vector; not supported"))
                continue
            qn, kn = children.get("q_norm"), children.get("k_norm")
            offsets = (gain_offset(qn), gain_offset(kn)) if qn is not None and kn is not None else (0.0, 0.0)
            sites.append(AttentionSite(name, q, k, v, o, heads, kv, head_dim, qn, kn, offsets))
            claimed.update(id(m) for m in module.modules())
            continue
        for up_n, down_n, gate_n in _FFN_NAMES:
            if all(n in children and _is_linear(children[n]) for n in (up_n, down_n, gate_n)):
                ffns.append(FFNSite(name, LinearView(children[up_n]), LinearView(children[down_n])))
                break
    site_names = [site.name for site in sites]
    for name, module in model.named_modules():
        cls = type(module).__name__.lower()
        if id(module) in claimed or not any(t in cls for t in ("attention", "attn")):
            continue
        if any(n.startswith(name + ".") for n in site_names):  # wraps a site; its other weights (gates) read x
            continue
        if any(name == u or name.startswith(u + ".") for u, _ in unsupported):
            continue
        if any(True for _ in module.parameters()):  # an attention module with weights that no site covers
            unsupported.append((name, f"{type(module).__name__}: no q/k/v/o projection pair that rescaling keeps "
                                      f"exact (e.g. latent, sparse or fused-QKV attention)"))
    return sites, ffns, unsupported


def _latent_site(name: str, module: nn.Module) -> LatentSite | None:
    """A `LatentSite` if `module` has the latent-attention layout (kv_a_proj_with_mqa, 3-D kv_b_proj, o_proj)."""
    kv_b = getattr(getattr(module, "kv_b_proj", None), "weight", None)
    if kv_b is None or kv_b.dim() != 3 or not hasattr(module, "kv_a_proj_with_mqa") or not hasattr(module, "o_proj"):
        return None
    q = module.q_proj if hasattr(module, "q_proj") else module.q_b_proj
    return LatentSite(name, LinearView(q), LinearView(module.kv_a_proj_with_mqa), kv_b, LinearView(module.o_proj),
                      module.num_heads, module.groups, module.nope_dim, module.rope_dim, module.v_dim,
                      scale_rope=not getattr(module, "rope_key_compressed_nonlinearly", False))


# ---------------------------------------------------------------------------------------------------- factors
def _mass(w: torch.Tensor, norm: str, dim: int) -> torch.Tensor:
    """Per-row (dim=1) or per-column (dim=0) contribution to the norm, accumulated in float64:
    sum |w| (l1) or sum w^2 (l2)."""
    if norm == "l1":
        return torch.linalg.vector_norm(w, ord=1, dim=dim, dtype=torch.float64)
    return torch.linalg.vector_norm(w, ord=2, dim=dim, dtype=torch.float64) ** 2


def _norm_of(mass: torch.Tensor, norm: str) -> torch.Tensor:
    return mass if norm == "l1" else mass.sqrt()


def _total_norm(w: torch.Tensor, norm: str) -> float:
    """Entry-wise norm of a whole tensor (2-D, or a 1-D gain vector)."""
    return float(_norm_of(_mass(w.reshape(1, -1) if w.dim() == 1 else w, norm, 1).sum(), norm))


def _pair_sum(x: torch.Tensor, d: int, rope_pairs: str) -> torch.Tensor:
    """x [..., d] plus each channel's RoPE partner, so the result is equal on both channels of a pair."""
    if rope_pairs == "half":
        partner = torch.cat([x[..., d // 2 :], x[..., : d // 2]], dim=-1)
    else:
        partner = x.unflatten(-1, (d // 2, 2)).flip(-1).flatten(-2)
    return x + partner


def _balance(num: torch.Tensor, den: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """sqrt(num / den), with 1 where either side is zero (nothing to balance)."""
    ok = (num > eps) & (den > eps)
    return torch.where(ok, (num.clamp_min(eps) / den.clamp_min(eps)).sqrt(), torch.ones_like(num))


def gain_offset(norm: nn.Module) -> float:
    """0 if `norm` multiplies by its weight, 1 if by (1 + weight) (Gemma); found by probing the module, not its name."""
    w = norm.weight
    orig = w.detach().clone()
    x = torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    with torch.no_grad():
        try:
            w.fill_(1.0)
            y1 = norm(x).float()
            w.fill_(2.0)
            y2 = norm(x).float()
        finally:
            w.copy_(orig)
    if torch.allclose(y2, 2 * y1, rtol=1e-2, atol=1e-6):
        return 0.0
    if torch.allclose(y2, 1.5 * y1, rtol=1e-2, atol=1e-6):
        return 1.0
    raise ValueError(f"{type(norm).__name__} is neither a w- nor a (1 + w)-gain norm; cannot rescale its gain")


def _qk_ops(site: AttentionSite, cfg: WiscaConfig) -> tuple[list[ScaleOp], torch.Tensor, dict]:
    h, kvh, d = site.num_heads, site.num_kv_heads, site.head_dim
    g = h // kvh
    if site.q_norm is not None and site.k_norm is not None:
        off_q, off_k = site.gain_offsets
        gq, gk = site.qk_gains()  # [d] each, shared by all heads
        if cfg.qk == "channel":
            s = _balance(_pair_sum(_mass(gk[None], cfg.norm, 0), d, cfg.rope_pairs),
                         _pair_sum(_mass(gq[None], cfg.norm, 0), d, cfg.rope_pairs))
        else:
            s = _balance(_norm_of(_mass(gk[None], cfg.norm, 1), cfg.norm),
                         _norm_of(_mass(gq[None], cfg.norm, 1), cfg.norm)).reshape(()).expand(d).clone()
        ops = [ScaleOp(site.q_norm.weight, s, off_q), ScaleOp(site.k_norm.weight, 1 / s, off_k)]
        return ops, s, {"q": _total_norm(gq, cfg.norm), "k": _total_norm(gk, cfg.norm)}
    wq, wk = site.q.effective_weight(), site.k.effective_weight()
    mq = _mass(wq, cfg.norm, 1).view(kvh, g, d)  # per query row, grouped by KV head
    mk = _mass(wk, cfg.norm, 1).view(kvh, d)
    if cfg.qk == "tensor":
        s = _balance(_norm_of(mk.sum(), cfg.norm), _norm_of(mq.sum(), cfg.norm)).expand(kvh, d)
    elif cfg.qk == "group":
        s = _balance(_norm_of(mk.sum(-1), cfg.norm), _norm_of(mq.sum((1, 2)), cfg.norm))[:, None].expand(kvh, d)
    else:  # channel, tied across RoPE pairs and across the query heads of the group
        s = _balance(_norm_of(_pair_sum(mk, d, cfg.rope_pairs), cfg.norm),
                     _norm_of(_pair_sum(mq.sum(1), d, cfg.rope_pairs), cfg.norm))
    s_q = s[:, None, :].expand(kvh, g, d).reshape(-1)  # query head h uses KV head h // g
    ops = site.q.row_ops(s_q) + site.k.row_ops((1 / s).reshape(-1))
    return ops, s, {"q": _norm_of(mq.sum(), cfg.norm).item(), "k": _norm_of(mk.sum(), cfg.norm).item()}


def _vo_ops(site: AttentionSite, cfg: WiscaConfig) -> tuple[list[ScaleOp], torch.Tensor, dict]:
    h, kvh, d = site.num_heads, site.num_kv_heads, site.head_dim
    g = h // kvh
    wv, wo = site.v.effective_weight(), site.o.effective_weight()
    mv = _mass(wv, cfg.norm, 1).view(kvh, d)
    mo = _mass(wo, cfg.norm, 0).view(kvh, g, d).sum(1)  # o_proj columns of all query heads of a group
    if cfg.vo == "tensor":
        t = _balance(_norm_of(mo.sum(), cfg.norm), _norm_of(mv.sum(), cfg.norm)).expand(kvh, d)
    elif cfg.vo == "group":
        t = _balance(_norm_of(mo.sum(-1), cfg.norm), _norm_of(mv.sum(-1), cfg.norm))[:, None].expand(kvh, d)
    else:
        t = _balance(_norm_of(mo, cfg.norm), _norm_of(mv, cfg.norm))
    t_o = t[:, None, :].expand(kvh, g, d).reshape(-1)
    ops = site.v.row_ops(t.reshape(-1)) + site.o.col_ops(1 / t_o)
    return ops, t, {"v": _norm_of(mv.sum(), cfg.norm).item(), "o": _norm_of(mo.sum(), cfg.norm).item()}


def _latent_ops(site: LatentSite, cfg: WiscaConfig) -> tuple[list[ScaleOp], float, float]:
    """Scale operations of a latent site; returns them with the mean QK and VO factors."""
    h, g, dn, dr, dv = site.num_heads, site.groups, site.nope_dim, site.rope_dim, site.v_dim
    p = site.parts()
    one = lambda *shape: torch.ones(*shape, dtype=torch.float64)  # noqa: E731
    s, r, t = one(h, dn), one(()), one(h, dv)
    if cfg.qk != "none":
        mq, mk = _mass(p["q_nope"].reshape(h * dn, -1), cfg.norm, 1).view(h, dn), \
            _mass(p["k_nope"].reshape(h * dn, -1), cfg.norm, 1).view(h, dn)
        s = _granular(mk, mq, cfg.qk, cfg.norm, g)
        if site.scale_rope:
            r = _balance(_norm_of(_mass(p["k_rope"], cfg.norm, 1).sum(), cfg.norm),
                         _norm_of(_mass(p["q_rope"].reshape(h * dr, -1), cfg.norm, 1).sum(), cfg.norm))
    if cfg.vo != "none":
        mv = _mass(p["v"].reshape(h * dv, -1), cfg.norm, 1).view(h, dv)
        mo = _mass(p["o"].reshape(-1, h * dv), cfg.norm, 0).view(h, dv)
        t = _granular(mo, mv, cfg.vo, cfg.norm, g)
    q_rows = torch.cat([s, r.expand(h, dr)], dim=1).reshape(-1)  # [H * (d_nope + d_r)]
    kv_rows = torch.cat([1 / s, t], dim=1).view(g, h // g * (dn + dv))  # [g, (H/g)(d_nope + d_v)]
    latent_rows = one(site.kv_a.out_features - dr)
    ops = site.q.row_ops(q_rows) + [ScaleOp(site.kv_b, kv_rows[:, :, None])]
    ops += site.kv_a.row_ops(torch.cat([latent_rows, (1 / r).expand(dr)])) + site.o.col_ops(1 / t.reshape(-1))
    return ops, float(torch.cat([s.reshape(-1), r.reshape(1)]).mean()), float(t.mean())


def _granular(num: torch.Tensor, den: torch.Tensor, mode: str, norm: str, groups: int) -> torch.Tensor:
    """Balancing factors [H, d] from masses [H, d]: one for all (tensor), per latent head (group), per channel."""
    h, d = num.shape
    if mode == "tensor":
        return _balance(_norm_of(num.sum(), norm), _norm_of(den.sum(), norm)).expand(h, d).clone()
    if mode == "group":
        f = _balance(_norm_of(num.view(groups, -1).sum(-1), norm), _norm_of(den.view(groups, -1).sum(-1), norm))
        return f[:, None].expand(groups, h // groups * d).reshape(h, d).clone()
    return _balance(_norm_of(num, norm), _norm_of(den, norm))


def _ffn_ops(site: FFNSite, cfg: WiscaConfig) -> list[ScaleOp]:
    up, down = site.up.effective_weight(), site.down.effective_weight()
    u = _balance(_norm_of(_mass(down, cfg.norm, 0), cfg.norm), _norm_of(_mass(up, cfg.norm, 1), cfg.norm))
    return site.up.row_ops(u) + site.down.col_ops(1 / u)


def _lora_factor_ops(model: nn.Module, cfg: WiscaConfig) -> list[ScaleOp]:
    ops = []
    for module in model.modules():
        if not hasattr(module, "lora_A") or not _is_linear(module):
            continue
        for a, b, _ in LinearView(module).adapters():
            na, nb = _total_norm(a.weight.detach(), cfg.norm), _total_norm(b.weight.detach(), cfg.norm)
            if na > 0 and nb > 0:  # B <- u B, A <- A / u; nothing to balance while B == 0 (fresh adapters)
                u = torch.tensor(math.sqrt(na / nb), dtype=torch.float64)
                ops += [ScaleOp(b.weight, u), ScaleOp(a.weight, 1 / u)]
    return ops


# RoPE channel pairing of model families (`config.model_type`): HF's rotate_half pairs (c, c + d/2); the
# interleaved families pair (2c, 2c + 1). Channel-level Q/K factors must be equal within a pair.
ROPE_PAIRS = {
    "half": frozenset({"leanlm", "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
                       "gemma2", "gemma3", "gemma3_text", "phi3", "olmo", "olmo2", "smollm3", "granite",
                       "starcoder2", "stablelm"}),
    "interleaved": frozenset({"cohere", "cohere2", "glm", "gptj", "codegen"}),
}


def rope_pairs_of(model: nn.Module) -> str | None:
    """`half` or `interleaved` when the model family's RoPE layout is known, else None."""
    kind = getattr(_text_config(model), "model_type", None)
    return next((layout for layout, kinds in ROPE_PAIRS.items() if kind in kinds), None)


def plan(model: nn.Module, cfg: WiscaConfig) -> tuple[list[ScaleOp], WiscaReport]:
    """The scale operations of one transition, and a report with the norms before it."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"WISCA needs a torch.nn.Module (a leanlm, Hugging Face or PEFT model), got "
                         f"{type(model).__name__}. Fix: pass the model itself")
    if not isinstance(cfg, WiscaConfig):
        raise ModelError(f"WISCA's cfg must be a WiscaConfig, got {type(cfg).__name__}. Fix: e.g. "
                         f"WiscaConfig(qk='tensor', vo='tensor')")
    if cfg.qk == "channel":
        layout = rope_pairs_of(model)
        if layout is not None and layout != cfg.rope_pairs:
            raise ConfigError("wisca.rope_pairs", f"{cfg.rope_pairs!r} does not match this model's RoPE "
                              f"({_text_config(model).model_type} pairs channels {layout}), so per-channel Q/K "
                              f"factors would change its outputs", f"use rope_pairs: {layout}")
    sites, ffns, unsupported = find_sites(model)
    if not sites and not unsupported:
        raise ModelError(f"WISCA found no attention layer in {type(model).__name__} (no q/k/v/o projections or "
                         f"latent attention). Fix: pass a decoder model (leanlm, Hugging Face Llama-family, PEFT)")
    report = WiscaReport(unsupported=unsupported, sites=sites)
    ops: list[ScaleOp] = []
    is_lora = any(hasattr(m, "lora_A") for m in model.modules())
    do_pairs = not is_lora or cfg.lora in ("effective", "both")
    for site in sites:
        row: dict[str, Any] = {"name": site.name, "s_mean": 1.0, "t_mean": 1.0}
        if isinstance(site, LatentSite):
            if do_pairs and (cfg.qk != "none" or cfg.vo != "none"):
                before = site.norms(cfg.norm)
                latent_ops, s_mean, t_mean = _latent_ops(site, cfg)
                ops += latent_ops
                row.update({f"{k}_before": v for k, v in before.items()}, s_mean=s_mean, t_mean=t_mean)
            report.layers.append(row)
            continue
        if do_pairs and cfg.qk != "none":
            qk_ops, s, norms = _qk_ops(site, cfg)
            ops += qk_ops
            row.update(q_before=norms["q"], k_before=norms["k"], s_mean=float(s.mean()))
        if do_pairs and cfg.vo != "none":
            vo_ops, t, norms = _vo_ops(site, cfg)
            ops += vo_ops
            row.update(v_before=norms["v"], o_before=norms["o"], t_mean=float(t.mean()))
        report.layers.append(row)
    if cfg.ffn:
        for f in ffns:
            ops += _ffn_ops(f, cfg)
    if is_lora and cfg.lora in ("factors", "both"):
        ops += _lora_factor_ops(model, cfg)
    return ops, report


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


def _after_norms(cfg: WiscaConfig, report: WiscaReport) -> None:
    """Fill in the norms after the transition, for the sites the report was planned on."""
    for row, site in zip(report.layers, report.sites):
        if isinstance(site, LatentSite):
            if "q_before" in row:
                row.update({f"{k}_after": v for k, v in site.norms(cfg.norm).items()})
            continue
        if "q_before" in row:
            if site.q_norm is not None:
                gq, gk = site.qk_gains()
                row["q_after"], row["k_after"] = _total_norm(gq, cfg.norm), _total_norm(gk, cfg.norm)
            else:
                row["q_after"] = _total_norm(site.q.effective_weight(), cfg.norm)
                row["k_after"] = _total_norm(site.k.effective_weight(), cfg.norm)
        if "v_before" in row:
            row["v_after"] = _total_norm(site.v.effective_weight(), cfg.norm)
            row["o_after"] = _total_norm(site.o.effective_weight(), cfg.norm)
    for row in report.layers:
        for key in ("q", "k", "v", "o"):
            row.setdefault(f"{key}_before", math.nan)
            row.setdefault(f"{key}_after", math.nan)


def wisca_transform(model: nn.Module, cfg: WiscaConfig | None = None, optimizer: torch.optim.Optimizer | None = None,
                    norms_after: bool = True) -> WiscaReport:
    """Apply one WISCA transition to `model` in place; returns what it did (see `WiscaReport`)."""
    cfg = WiscaConfig() if cfg is None else cfg
    if isinstance(cfg, WiscaConfig):
        cfg.check()
    t0 = time.perf_counter()
    ops, report = plan(model, cfg)
    apply_ops(ops, optimizer, cfg.optimizer_state)
    report.seconds = time.perf_counter() - t0
    if norms_after:
        _after_norms(cfg, report)
    return report


# ---------------------------------------------------------------------------------------------------- training
register_section("wisca", WiscaConfig)


def control_multipliers(model: nn.Module, cfg: WiscaConfig) -> dict[nn.Parameter, float]:
    """Learning-rate multipliers of the `apply: lr` control: under Adam, scaling a tensor by f changes its
    effective relative learning rate by 1/f, so the control multiplies each tensor's lr by 1/f instead of rescaling
    the weights (f computed from the current weights, as a transition would). Tensor granularity only."""
    ops, report = plan(model, cfg)
    if any(isinstance(site, LatentSite) for site in report.sites):
        raise ConfigError("wisca.apply", "the learning-rate control needs one factor per tensor, and latent "
                          "attention mixes factors inside q_proj / kv_b_proj", "use wisca.apply: weights")
    return {op.param: 1.0 / float(op.factor.flatten()[0]) for op in ops if op.offset == 0.0}


class WiscaCallback(Callback):
    """Runs WISCA transitions during training: at step 0 (if `init_transition`) and every `every` steps, after
    optimizer.step() and before the next forward. With `apply: lr` it runs the learning-rate control instead.
    Records per-transition factors and time spent in `self.log`."""

    def __init__(self, cfg: WiscaConfig):
        cfg.check()
        self.cfg = cfg
        self.log: list[dict[str, Any]] = []
        self.seconds = 0.0

    def isolated_params(self, model: nn.Module) -> list[nn.Parameter]:
        if self.cfg.apply != "lr":
            return []
        if self.cfg.qk not in ("tensor", "none") or self.cfg.vo not in ("tensor", "none"):
            raise ConfigError("wisca.apply", "the learning-rate control needs one factor per tensor",
                              "use wisca.qk/vo: tensor with wisca.apply: lr")
        return list(control_multipliers(model, self.cfg))

    def _transition(self, trainer) -> None:
        t0 = time.perf_counter()
        if self.cfg.apply == "weights":
            report = wisca_transform(trainer.raw_model, self.cfg, trainer.optimizer, norms_after=False)
            s = [r["s_mean"] for r in report.layers]
            t = [r["t_mean"] for r in report.layers]
        else:
            mult = control_multipliers(trainer.raw_model, self.cfg)
            lam = trainer.scheduler.lr_lambdas[0](trainer.step)
            for i, group in enumerate(trainer.optimizer.param_groups):
                if len(group["params"]) == 1 and group["params"][0] in mult:
                    trainer.scheduler.base_lrs[i] = trainer.cfg.lr * mult[group["params"][0]]
                    group["lr"] = trainer.scheduler.base_lrs[i] * lam
            s = t = list(mult.values())
        dt = time.perf_counter() - t0
        self.seconds += dt
        self.log.append({"step": trainer.step, "seconds": dt, "factor_min": min(s + t, default=1.0),
                         "factor_max": max(s + t, default=1.0)})
        trainer.log({"step": trainer.step, "wisca_seconds": dt, "wisca_s_mean": sum(s) / max(1, len(s)),
                     "wisca_t_mean": sum(t) / max(1, len(t))})

    def on_train_start(self, trainer) -> None:
        if trainer.step == 0 and self.cfg.init_transition:
            self._transition(trainer)

    def on_step_end(self, trainer, step: int) -> None:
        if self.cfg.every and step % self.cfg.every == 0 and step < trainer.cfg.max_steps:
            self._transition(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "log": self.log}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seconds, self.log = state.get("seconds", 0.0), list(state.get("log", []))


def __getattr__(name: str):
    """`leanlm.wisca.WiscaTrainerCallback` (the Hugging Face Trainer callback, in `leanlm.wisca_hf`), imported on
    first use so that this module does not import the Trainer stack."""
    if name == "WiscaTrainerCallback":
        from leanlm.wisca_hf import WiscaTrainerCallback

        return WiscaTrainerCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
