"""Attention kinds, one module each; `LeanLMConfig.attention` names one per layer (`leanlm.config.ATTENTION_KINDS`).

    gqa.py     grouped-query attention (Llama's; MHA and MQA as special cases)
    latent.py  latent attention shared by MLA and GLA (projections, absorbed decoding, window variant)
    mla.py     Multi-head Latent Attention          gla.py  Grouped Latent Attention
    sparse.py  NSA's branches as PyTorch references (compression, selection, window)
    nsa.py     Native Sparse Attention on GQA projections
    asa.py     Alternating Sparse Attention: local MLA window layers, global GLA compression + selection layers
"""

from leanlm.attention.asa import AlternatingSparseAttention
from leanlm.attention.base import Attention, causal_padding_mask
from leanlm.attention.gla import GroupedLatentAttention
from leanlm.attention.gqa import GroupedQueryAttention
from leanlm.attention.mla import MultiHeadLatentAttention
from leanlm.attention.nsa import NativeSparseAttention

# The one table from a kind's name to its class (the names are `leanlm.config.ATTENTION_KINDS`, checked by a test).
ATTENTION_CLASSES: dict[str, type[Attention]] = {
    "gqa": GroupedQueryAttention,
    "mla": MultiHeadLatentAttention,
    "gla": GroupedLatentAttention,
    "nsa": NativeSparseAttention,
    "asa": AlternatingSparseAttention,
}
ATTENTION_REGISTRY = ATTENTION_CLASSES  # the earlier name, kept for code written against it

__all__ = ["ATTENTION_CLASSES", "ATTENTION_REGISTRY", "Attention", "causal_padding_mask"]
