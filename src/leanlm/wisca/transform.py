"""One WISCA transition: plan the scale operations of every site of a model, apply them, report."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from leanlm.errors import ConfigError, ModelError
from leanlm.wisca.config import WiscaConfig
from leanlm.wisca.core import ScaleOp, apply_ops, qk_ops, total_norm, vo_ops
from leanlm.wisca.extensions import ffn_ops, latent_ops, lora_factor_ops
from leanlm.wisca.sites import AttentionSite, LatentSite, find_sites, rope_pairs_of, text_config


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
                              f"({text_config(model).model_type} pairs channels {layout}), so per-channel Q/K "
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
                site_ops, s_mean, t_mean = latent_ops(site, cfg)
                ops += site_ops
                row.update({f"{k}_before": v for k, v in before.items()}, s_mean=s_mean, t_mean=t_mean)
            report.layers.append(row)
            continue
        if do_pairs and cfg.qk != "none":
            pair_ops, s, norms = qk_ops(site, cfg)
            ops += pair_ops
            row.update(q_before=norms["q"], k_before=norms["k"], s_mean=float(s.mean()))
        if do_pairs and cfg.vo != "none":
            pair_ops, t, norms = vo_ops(site, cfg)
            ops += pair_ops
            row.update(v_before=norms["v"], o_before=norms["o"], t_mean=float(t.mean()))
        report.layers.append(row)
    if cfg.ffn:
        for f in ffns:
            ops += ffn_ops(f, cfg)
    if is_lora and cfg.lora in ("factors", "both"):
        ops += lora_factor_ops(model, cfg)
    return ops, report


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
                row["q_after"], row["k_after"] = total_norm(gq, cfg.norm), total_norm(gk, cfg.norm)
            else:
                row["q_after"] = total_norm(site.q.effective_weight(), cfg.norm)
                row["k_after"] = total_norm(site.k.effective_weight(), cfg.norm)
        if "v_before" in row:
            row["v_after"] = total_norm(site.v.effective_weight(), cfg.norm)
            row["o_after"] = total_norm(site.o.effective_weight(), cfg.norm)
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
