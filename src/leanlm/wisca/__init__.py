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

The package, one concern per module:
    core.py        the paper's rule: Q/K and V/O factors (GQA-aware, three granularities), applied in place
    sites.py       finding the pairs in a model (names, shapes, QK-norm gains, PEFT LoRA, RoPE pairing)
    extensions.py  latent attention, SwiGLU and LoRA-factor balancing (beyond the paper)
    transform.py   one transition: `plan`, `wisca_transform`, `WiscaReport`
    callback.py    `WiscaCallback` for leanlm's trainer, and the `apply: lr` control
    hf.py          `WiscaTrainerCallback` for Hugging Face's Trainer / TRL (imported on first use)
    config.py      `WiscaConfig`, the run config's `wisca:` section
"""

from __future__ import annotations

from leanlm.wisca.callback import WiscaCallback, control_multipliers
from leanlm.wisca.config import GRANULARITIES, WiscaConfig
from leanlm.wisca.core import ScaleOp, apply_ops
from leanlm.wisca.sites import (ROPE_PAIRS, AttentionSite, FFNSite, LatentSite, LinearView, find_sites, gain_offset,
                                rope_pairs_of)
from leanlm.wisca.transform import WiscaReport, plan, wisca_transform

__all__ = ["GRANULARITIES", "ROPE_PAIRS", "AttentionSite", "FFNSite", "LatentSite", "LinearView", "ScaleOp",
           "WiscaCallback", "WiscaConfig", "WiscaReport", "WiscaTrainerCallback", "apply_ops", "control_multipliers",
           "find_sites", "gain_offset", "plan", "rope_pairs_of", "wisca_transform"]


def __getattr__(name: str):
    """`WiscaTrainerCallback` (in `leanlm.wisca.hf`) is imported on first use, so that importing WISCA does not
    import transformers' Trainer stack."""
    if name == "WiscaTrainerCallback":
        from leanlm.wisca.hf import WiscaTrainerCallback

        return WiscaTrainerCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
