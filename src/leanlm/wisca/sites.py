"""Where WISCA's pairs are: attention modules found by structure (Llama, GPT-NeoX-style or Meta names, or four
linear maps whose shapes fit the config's heads), latent attention (DeepSeek parameter names), SwiGLU FFNs, PEFT
LoRA layers seen through `LinearView`, QK-norm gains (with Gemma's 1 + w offset probed, not guessed from names), and
each model family's RoPE channel pairing. Modules that look like attention but cannot be rescaled exactly are
listed as unsupported, never skipped silently."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from leanlm.wisca.core import ScaleOp, total_norm


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
        n = {k: total_norm(w.reshape(w.shape[0], -1) if w.dim() > 2 else w, norm) for k, w in p.items()}
        return {"q": n["q_nope"] + n["q_rope"], "k": n["k_nope"] + n["k_rope"], "v": n["v"], "o": n["o"]}


@dataclass
class FFNSite:
    name: str
    up: LinearView
    down: LinearView


_NAME_SETS = (("q_proj", "k_proj", "v_proj", "o_proj"), ("wq", "wk", "wv", "wo"),
              ("query", "key", "value", "dense"), ("q", "k", "v", "o"))


_FFN_NAMES = (("up_proj", "down_proj", "gate_proj"), ("w3", "w2", "w1"))


def is_linear(m: nn.Module) -> bool:
    return isinstance(getattr(m, "base_layer", m), nn.Linear)


def text_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    return cfg


def _uses_dora(m: nn.Module) -> bool:
    flags = getattr(m, "use_dora", {})
    return any(flags.values()) if isinstance(flags, dict) else bool(flags)


def find_sites(model: nn.Module) -> tuple[list[AttentionSite], list[FFNSite], list[tuple[str, str]]]:
    """Attention pairs and SwiGLU FFNs of `model`, and the attention-like modules that cannot be rescaled."""
    cfg = text_config(model)
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", None)
    head_dim = getattr(cfg, "head_dim", None) or (hidden // heads if heads and hidden else None)
    sites, ffns, unsupported = [], [], []
    claimed: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in claimed:  # inside a site already found (or sharing its projections)
            continue
        children = dict(module.named_children())
        latent = _latent_site(name, module)
        if latent is None and getattr(module, "keys_compressed_nonlinearly", False):
            unsupported.append((name, f"{type(module).__name__}: its keys and values also feed a nonlinear "
                                      "compressor (NSA's MLP), so rescaled keys/values would change the compressed "
                                      "blocks"))
            claimed.update(id(m) for m in module.modules())
            continue
        if latent is not None:
            sites.append(latent)
            claimed.update(id(m) for m in module.modules())
            continue
        found = None
        for names in _NAME_SETS:
            if all(n in children and is_linear(children[n]) for n in names):
                found = [children[n] for n in names]
                break
        if found is None and heads:
            lin = [c for c in children.values() if is_linear(c)]
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
            if all(n in children and is_linear(children[n]) for n in (up_n, down_n, gate_n)):
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
                      scale_rope=not getattr(module, "keys_compressed_nonlinearly", False))


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
    kind = getattr(text_config(model), "model_type", None)
    return next((layout for layout, kinds in ROPE_PAIRS.items() if kind in kinds), None)
